"""Classification/Distillation modules through real Lightning Trainer runs."""

import lightning as L
import pytest
import torch
from helpers import StopAfter
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from toolkit import LossTerm
from toolkit.data import DigitsDataModule
from toolkit.distill import ProjectorSet, Teacher
from toolkit.functional import cross_entropy
from toolkit.models import create_model
from toolkit.modules import ClassificationModule, DistillationModule

ADAM = {"name": "adam", "lr": 0.01}


def digits(**kw):
    kw.setdefault("batch_size", 64)
    kw.setdefault("augment", True)  # exercises the RNG restored on resume
    return DigitsDataModule(val_split=0.1, seed=0, **kw)


def teacher_net(seed=0, num_classes=10):
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=num_classes, in_chans=1)


class Hint(LossTerm):
    """A feature term for the tests: MSE between projected student and teacher features."""

    needs_teacher = True
    needs_target = False

    def __init__(self, student_path="features.4", teacher_path="layer2"):
        super().__init__()
        self.student_features = (student_path,)
        self.teacher_features = (teacher_path,)
        self.projectors = ProjectorSet()

    def setup(self, example):
        s, t = (
            example.student.features[self.student_features[0]],
            example.teacher.features[self.teacher_features[0]],
        )
        self.projectors.ensure("hint", s, t)

    def forward(self, step):
        s = self.projectors["hint"](step.student.features[self.student_features[0]])
        return (s - step.teacher.features[self.teacher_features[0]]).pow(2).flatten(1).mean(1)


def distiller(teacher=None, seed=1, **kw):
    torch.manual_seed(seed)
    kw.setdefault(
        "terms",
        {
            "ce": {"loss": "cross_entropy", "weight": 0.5},
            "kd": {"distiller": "kd", "weight": 0.5},
            "hint": Hint(),
        },
    )
    return DistillationModule(
        "convnet",
        teacher or Teacher(teacher_net()),
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        optimizer=ADAM,
        scheduler={"name": "cosine"},
        **kw,
    )


def test_classification_module_learns(make_trainer):
    L.seed_everything(0)
    module = ClassificationModule(
        "convnet", num_classes=10, in_chans=1, model_kwargs={"width": 8}, optimizer=ADAM
    )
    dm = digits()
    trainer = make_trainer(max_epochs=3)
    trainer.fit(module, datamodule=dm)
    (res,) = trainer.test(module, datamodule=dm, verbose=False)
    assert res["test/acc"] > 0.85
    # the accuracy metric agrees with a direct count
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for b in dm.test_dataloader():
            correct += (module(b.input).argmax(1) == b.target).sum().item()
            total += len(b.target)
    assert res["test/acc"] == pytest.approx(correct / total, abs=1e-6)


def test_checkpoint_excludes_teacher_and_loads_strictly(tmp_path, make_trainer):
    module = distiller()
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=digits())
    path = tmp_path / "kd.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(k.startswith(("model.", "loss_terms.")) for k in keys)
    assert not any("teacher" in k for k in keys)
    teacher_param_count = sum(p.numel() for p in module.teacher.nets[0].parameters())
    assert sum(v.numel() for v in ckpt["state_dict"].values() if torch.is_tensor(v)) < teacher_param_count
    assert any(k.startswith("loss_terms.hint.projectors") for k in keys)
    # strict reload, without a dry run: the projector is rebuilt from its recorded spec
    loaded = DistillationModule.load_from_checkpoint(
        path,
        teacher=module.teacher,
        terms={
            "ce": {"loss": "cross_entropy", "weight": 0.5},
            "kd": {"distiller": "kd", "weight": 0.5},
            "hint": Hint(),
        },
    )
    for k, v in module.state_dict().items():
        other = loaded.state_dict()[k]
        assert torch.equal(v, other) if torch.is_tensor(v) else v == other, k
    # an extra key is refused (strict)
    ckpt["state_dict"]["model.bogus"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match="bogus"):
        DistillationModule.load_from_checkpoint(
            path,
            teacher=module.teacher,
            terms={"ce": {"loss": "cross_entropy"}, "kd": {"distiller": "kd"}, "hint": Hint()},
        )


def test_classification_checkpoint_roundtrip_via_hparams(tmp_path, make_trainer):
    module = ClassificationModule(
        "convnet", num_classes=10, in_chans=1, model_kwargs={"width": 4}, optimizer=ADAM
    )
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=digits())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    loaded = ClassificationModule.load_from_checkpoint(tmp_path / "c.ckpt")
    x = torch.randn(3, 1, 8, 8)
    module.eval(), loaded.eval()
    assert torch.equal(module(x), loaded(x))


class TeacherWatch(Callback):
    def __init__(self):
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert not any(m.training for m in pl_module.teacher.nets[0].modules())
        self.checked += 1


def test_teacher_stays_eval_and_unchanged_across_validation_loops(make_trainer):
    module = distiller()
    net = module.teacher.nets[0]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    watch = TeacherWatch()
    trainer = make_trainer(
        max_epochs=3, limit_train_batches=4, limit_val_batches=2, callbacks=[watch], num_sanity_val_steps=1
    )
    trainer.fit(module, datamodule=digits())
    assert watch.checked == 12
    for k, v in net.state_dict().items():  # BatchNorm running stats included
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in net.parameters())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in net.parameters()}
    assert {id(p) for p in module.loss_terms["hint"].parameters()} <= opt_params


def _final_weights(tmp_path, stop_after=None, max_epochs=3):
    L.seed_everything(7, workers=True)
    module = distiller(seed=3)
    dm = digits(train_subset=320)
    ckpt_dir = tmp_path / "ckpt"
    kw = dict(max_epochs=max_epochs, limit_val_batches=2, deterministic=True)
    if stop_after is None:
        L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            **kw,
        ).fit(module, datamodule=dm)
        return module.state_dict()
    cb = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0)
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, StopAfter(stop_after)],
        **kw,
    ).fit(module, datamodule=dm)
    # a fresh process would start from scratch: new objects, other RNG state
    torch.manual_seed(12345)
    L.seed_everything(7, workers=True)
    resumed = distiller(seed=99)
    dm = digits(train_subset=320)
    cb = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0)
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        **kw,
    ).fit(resumed, datamodule=dm, ckpt_path=str(ckpt_dir / "last.ckpt"))
    return resumed.state_dict()


def test_resume_gives_the_same_final_weights(tmp_path):
    straight = _final_weights(tmp_path / "a")
    resumed = _final_weights(tmp_path / "b", stop_after=1)
    assert straight.keys() == resumed.keys()
    for k in straight:
        if torch.is_tensor(straight[k]):
            assert torch.equal(straight[k], resumed[k]), k
        else:
            assert straight[k] == resumed[k], k


def test_bad_inputs_give_clear_errors(make_trainer):
    with pytest.raises(ValueError, match=r"different class counts \(teacher 7, student 10\)"):
        distiller(teacher=Teacher(teacher_net(num_classes=7)))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distiller(terms={"kd": {"distiller": "kd", "temperature": 0}})
    with pytest.raises(KeyError, match="Did you mean 'kd'"):
        distiller(terms={"kd": {"distiller": "kdd"}})
    with pytest.raises(KeyError, match="Did you mean 'cross_entropy'"):
        ClassificationModule("convnet", num_classes=10, loss="cross_entropyy")
    with pytest.raises(ValueError, match="num_classes=5"):
        ClassificationModule(create_model("convnet", num_classes=10), num_classes=5)

    class NeedsIndex(LossTerm):
        needs_index = True

        def forward(self, step):
            return cross_entropy(step.student.logits, step.target, reduction="none")

    module = ClassificationModule("convnet", num_classes=10, in_chans=1, loss={"mem": NeedsIndex()})
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with pytest.raises(ValueError, match=r"'mem' keeps per-sample memory.*IndexedDataset"):
        make_trainer(max_epochs=1).fit(module, train_dataloaders=plain)
    bad = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.full((32,), 11)), batch_size=16)
    with pytest.raises(ValueError, match="labels out of range"):
        make_trainer(max_epochs=1).fit(
            ClassificationModule("convnet", num_classes=10, in_chans=1), train_dataloaders=bad
        )


def test_plain_dataloaders_and_example_input(make_trainer):
    """Existing (x, y) loaders work; feature terms without a DataModule ask for an example."""
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    make_trainer(max_epochs=1).fit(distiller(terms={"kd": {"distiller": "kd"}}), train_dataloaders=loader)
    with pytest.raises(ValueError, match="example input"):
        make_trainer(max_epochs=1).fit(distiller(), train_dataloaders=loader)
    module = distiller()
    module.example_input_array = x[:2]
    make_trainer(max_epochs=1).fit(module, train_dataloaders=loader)
    assert "hint" in module.loss_terms["hint"].projectors


def test_ensemble_teacher_from_list(make_trainer):
    module = distiller(teacher=[teacher_net(0), teacher_net(1)], terms={"kd": {"distiller": "kd"}})
    assert module.teacher.is_ensemble
    make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(module, datamodule=digits())


def test_projector_is_saved_with_student_not_teacher():
    module = distiller()
    module.prepare(torch.randn(2, 1, 8, 8))
    proj = module.loss_terms["hint"].projectors["hint"]
    assert (
        isinstance(proj.proj[0], nn.Conv2d)
        and proj.proj[0].in_channels == 8
        and proj.proj[0].out_channels == 32
    )


def test_modules_from_yaml(tmp_path, make_trainer):
    import yaml

    teacher = ClassificationModule("resnet8", num_classes=10, in_chans=1)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(teacher, datamodule=digits())
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    cfg = yaml.safe_load(f"""
student: convnet
teacher: {tmp_path / "teacher.ckpt"}
num_classes: 10
in_chans: 1
model_kwargs: {{width: 4}}
terms:
  ce: {{loss: cross_entropy, weight: 0.5}}
  kd: {{distiller: kd, temperature: 2.0, weight: {{schedule: linear, start: 0.0, end: 0.5, end_epoch: 2}}}}
optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
scheduler: {{name: multistep, milestones: [1]}}
""")
    module = DistillationModule(**cfg)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(module.teacher(x).logits, teacher.eval()(x))
    assert module.term_weight("kd", module.progress()) == 0.0
    assert module.loss_terms["kd"].temperature == 2.0
    make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1).fit(module, datamodule=digits())
    assert module.hparams["terms"]["kd"]["temperature"] == 2.0
    assert module.term_weight("kd") == pytest.approx(0.5)  # end of the ramp after 2 epochs


class InjectTerm(Callback):
    """What a loss-changing callback does: register itself on the bus in setup()."""

    def setup(self, trainer, pl_module, stage):
        pl_module.add_term("hint", Hint(), 0.1)
        pl_module.add_weighter("halve", lambda step, per: torch.full_like(per, 0.5))


def test_callback_injects_term_and_weighter_in_setup(make_trainer):
    module = distiller(terms={"kd": {"distiller": "kd"}})
    seen = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs)

    trainer = make_trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[InjectTerm(), Watch()]
    )
    trainer.fit(module, datamodule=digits())
    assert "hint" in module.loss_terms and "hint" in module.loss_terms["hint"].projectors
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.loss_terms["hint"].parameters()} <= opt_params
    assert {"train/loss/hint", "train/loss/kd"} <= set(trainer.callback_metrics)
    # total = mean(0.5 * per_sample) because of the injected weighter
    assert seen and torch.allclose(
        seen[-1]["loss"].detach(), 0.5 * seen[-1]["per_sample_loss"].mean(), rtol=1e-5
    )


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_is_finite(precision, make_trainer):
    module = distiller()
    losses = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    make_trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, precision=precision, callbacks=[Watch()]
    ).fit(module, datamodule=digits())
    assert len(losses) == 3 and all(torch.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in module.parameters())


class HookedPeer(LossTerm):
    """A term with every lifecycle hook and a second network evaluated beside the student."""

    needs_target = True

    def __init__(self):
        super().__init__()
        self.peer = nn.Linear(64, 10)
        self.calls = {"start": 0, "batch": 0, "epoch": 0}

    def forward(self, step):
        return cross_entropy(self.peer(step.batch.input.flatten(1)), step.target, reduction="none")

    def on_train_start(self, module):
        self.calls["start"] += 1
        torch.rand(100)  # a pass over data would draw random numbers: resume must not shift

    def on_train_batch_end(self, module):
        self.calls["batch"] += 1

    def on_train_epoch_end(self, module):
        self.calls["epoch"] += 1

    def eval_logits(self, batch):
        return {"peer": self.peer(batch.input.flatten(1))}


def test_term_lifecycle_hooks_and_extra_network_accuracy(make_trainer):
    L.seed_everything(0)
    module = ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 8},
        optimizer=ADAM,
    )
    term = HookedPeer()
    module.add_term("peer", term, 1.0)
    dm = digits(augment=False)
    trainer = make_trainer(max_epochs=2, limit_train_batches=4)
    trainer.fit(module, datamodule=dm)
    assert term.calls == {"start": 1, "batch": 8, "epoch": 2}
    (res,) = trainer.test(module, datamodule=dm, verbose=False)
    # the peer's logged accuracy equals a direct count (it is trained: its parameters moved)
    with torch.no_grad():
        pairs = [(term.peer(b.input.flatten(1)).argmax(1), b.target) for b in dm.test_dataloader()]
    correct = sum((p == t).sum().item() for p, t in pairs)
    total = sum(len(t) for _, t in pairs)
    assert res["test/peer/acc"] == pytest.approx(correct / total, abs=1e-6)
    assert res["test/peer/acc"] > 0.3
