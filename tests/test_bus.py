"""The loss bus: weights, schedules, sample weighters, logging, and use from a user's module."""

import lightning as L
import pytest
import torch
from torch import nn

from toolkit import LossTerm, Progress, Step
from toolkit.functional import cross_entropy
from toolkit.losses import CrossEntropyLoss
from toolkit.modules import LossBus
from toolkit.schedules import Ramp, as_weight
from toolkit.types import Batch, ModelOutput


class Bare(LossBus, nn.Module):
    """The bus on a plain module: compute_loss works without a Trainer."""


class MeanLogit(LossTerm):
    needs_target = False

    def forward(self, step):
        return step.student.logits.mean(-1)


class BatchLevel(LossTerm):
    needs_target = False

    def forward(self, step):
        return step.student.logits.pow(2).mean()


def make_step(rng, progress=None):
    logits = torch.randn(4, 3, generator=rng)
    return Step(
        Batch(torch.zeros(4, 1), torch.tensor([0, 1, 2, 0]), torch.arange(4)),
        ModelOutput(logits),
        None,
        progress or Progress(),
    )


def test_weighted_total_and_per_sample(rng):
    bus = Bare()
    bus.add_term("ce", CrossEntropyLoss(), 0.3)
    bus.add_term("m", MeanLogit(), 2.0)
    bus.add_term("reg", BatchLevel(), 0.5)
    step = make_step(rng)
    out = bus.compute_loss(step)
    z, y = step.student.logits, step.target
    ce = cross_entropy(z, y, reduction="none")
    expected_per = 0.3 * ce + 2.0 * z.mean(-1)
    assert torch.allclose(out["per_sample_loss"], expected_per)
    assert torch.allclose(out["loss"], expected_per.mean() + 0.5 * z.pow(2).mean())
    assert set(out["terms"]) == {"ce", "m", "reg"}


def test_sample_weighters_multiply(rng):
    bus = Bare()
    bus.add_term("ce", CrossEntropyLoss(), 1.0)
    bus.add_weighter("a", lambda step, per: torch.tensor([1.0, 0.0, 2.0, 1.0]))
    bus.add_weighter("b", lambda step, per: torch.full((4,), 0.5))
    step = make_step(rng)
    ce = cross_entropy(step.student.logits, step.target, reduction="none")
    out = bus.compute_loss(step)
    assert torch.allclose(out["loss"], (ce * torch.tensor([0.5, 0.0, 1.0, 0.5])).mean())
    # per_sample_loss is before sample weighting
    assert torch.allclose(out["per_sample_loss"], ce)


def test_scheduled_weight(rng):
    ramp = as_weight({"schedule": "linear", "start": 0.0, "end": 1.0, "begin_epoch": 0, "end_epoch": 10})
    assert isinstance(ramp, Ramp)
    assert ramp(Progress(global_step=0, steps_per_epoch=5, max_epochs=20)) == 0.0
    assert ramp(Progress(global_step=25, steps_per_epoch=5, max_epochs=20)) == pytest.approx(0.5)
    assert ramp(Progress(global_step=500, steps_per_epoch=5, max_epochs=20)) == 1.0
    cos = Ramp(1.0, 0.0, shape="cosine")
    assert cos(Progress(global_step=5, steps_per_epoch=1, max_epochs=10)) == pytest.approx(0.5)
    bus = Bare()
    bus.add_term("ce", CrossEntropyLoss(), ramp)
    step = make_step(rng, Progress(global_step=25, steps_per_epoch=5, max_epochs=20))
    ce = cross_entropy(step.student.logits, step.target)
    assert torch.allclose(bus.compute_loss(step)["loss"], 0.5 * ce)
    with pytest.raises(ValueError, match="end_epoch"):
        Ramp(begin_epoch=5, end_epoch=2)


def test_bus_errors(rng):
    bus = Bare()
    with pytest.raises(RuntimeError, match="no loss terms"):
        bus.compute_loss(make_step(rng))
    with pytest.raises(TypeError, match="LossTerm"):
        bus.add_term("f", lambda s: s)
    bus.add_term("ce", CrossEntropyLoss())
    with pytest.raises(KeyError, match="already registered"):
        bus.add_term("ce", CrossEntropyLoss())

    class NeedsIndex(MeanLogit):
        needs_index = True

    bus.add_term("ni", NeedsIndex())
    step = make_step(rng)
    step.batch = Batch(step.batch.input, step.batch.target, None)
    with pytest.raises(ValueError, match=r"'ni' keeps per-sample memory"):
        bus.compute_loss(step)
    bus.remove_term("ni")
    bad = make_step(rng)
    bad.batch = Batch(bad.batch.input, torch.tensor([0, 1, 7, 0]), bad.batch.index)
    with pytest.raises(ValueError, match="labels out of range"):
        bus.compute_loss(bad)


class UserModule(LossBus, L.LightningModule):
    """A user's own module: only the training_step uses the bus."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.add_term("ce", CrossEntropyLoss(), 1.0)
        self.add_term("m", MeanLogit(), 0.1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        return self.loss_from(self.net(x.flatten(1)), (x, y, idx))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.seen.append(outputs)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_user_module_logs_every_term_to_tensorboard(tmp_path, digits):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = UserModule()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=digits.train_dataloader())
    out = module.seen[0]
    assert set(out) == {"loss", "per_sample_loss", "logits", "index"}
    assert (
        out["per_sample_loss"].shape == (64,)
        and out["logits"].shape == (64, 10)
        and out["index"].shape == (64,)
    )
    event_dir = next(tmp_path.rglob("events.out.tfevents*")).parent
    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss/ce", "train/loss/m", "train/loss"} <= tags
    total = [e.value for e in acc.Scalars("train/loss")]
    ce = [e.value for e in acc.Scalars("train/loss/ce")]
    m = [e.value for e in acc.Scalars("train/loss/m")]
    assert len(total) == len(module.seen)
    for t, c, mm in zip(total, ce, m):
        assert t == pytest.approx(c + 0.1 * mm, rel=1e-5)


def _logged_steps(tmp_path, digits, **trainer_kw):
    """(module, trainer, {name: [step of every self.log call]}) for 2 epochs of 5 steps, logger
    writing every 3 steps."""
    from lightning.pytorch.loggers import TensorBoardLogger

    class Counting(UserModule):
        def __init__(self):
            super().__init__()
            self.log_steps = {}

        def log(self, name, value, *args, **kwargs):
            self.log_steps.setdefault(name, []).append(self.trainer.fit_loop.epoch_loop._batches_that_stepped)
            super().log(name, value, *args, **kwargs)

    module = Counting()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=5,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        log_every_n_steps=3,
        enable_model_summary=False,
        limit_val_batches=0,
        **{"enable_checkpointing": False, "enable_progress_bar": False, **trainer_kw},
    )
    trainer.fit(module, train_dataloaders=digits.train_dataloader())
    return module, trainer, module.log_steps


def test_step_values_are_logged_only_where_they_are_written_or_kept(tmp_path, digits):
    """Training values skip the steps whose values nobody reads (Lightning's `self.log` costs
    about 1 ms per value): the event file gets them at every step the logger writes, exactly as
    before, and `callback_metrics` hold the last step's values at the end of fit."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module, trainer, steps = _logged_steps(tmp_path, digits)
    # steps 0..9; the logger writes after steps 2, 5, 8; epochs end after steps 4 and 9
    for name in ("train/loss", "train/loss/ce", "train/loss/m"):
        assert steps[name] == [2, 4, 5, 8, 9], name
    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    acc.Reload()
    total = acc.Scalars("train/loss")
    ce, m = acc.Scalars("train/loss/ce"), acc.Scalars("train/loss/m")
    assert [e.step for e in total] == [e.step for e in ce] == [e.step for e in m] == [2, 5, 8]
    for t, c, mm in zip(total, ce, m):
        assert t.value == pytest.approx(c.value + 0.1 * mm.value, rel=1e-5)
    metrics = trainer.callback_metrics
    last = module.seen[-1]["loss"]
    assert float(metrics["train/loss"]) == pytest.approx(float(last), rel=1e-5)
    assert float(metrics["train/loss/ce"]) + 0.1 * float(metrics["train/loss/m"]) == pytest.approx(
        float(last), rel=1e-5
    )


def test_step_values_shown_or_monitored_are_logged_at_every_step(tmp_path, digits):
    from lightning.pytorch.callbacks import ModelCheckpoint

    watch = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="train/loss/m", every_n_train_steps=1)
    _, _, steps = _logged_steps(tmp_path, digits, callbacks=[watch], enable_checkpointing=True)
    assert steps["train/loss/m"] == list(range(10))
    assert steps["train/loss/ce"] == [2, 4, 5, 8, 9]
    _, _, steps = _logged_steps(tmp_path / "bar", digits, enable_progress_bar=True)
    assert steps["train/loss"] == list(range(10))
    assert steps["train/loss/ce"] == [2, 4, 5, 8, 9]
