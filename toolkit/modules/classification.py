"""`ClassificationModule`: any model, any registered loss, accuracy metrics, optimiser and schedule
from config. The base of `DistillationModule`.

    module = ClassificationModule("resnet8x4", num_classes=100, loss="cross_entropy",
                                  optimizer={"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
                                  scheduler={"name": "multistep", "milestones": [150, 180, 210]})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from toolkit.distill.taps import FeatureTaps
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.models.factory import create_model
from toolkit.models.output import forward_output, num_classes_of
from toolkit.modules.bus import LossBus
from toolkit.modules.config import build_terms
from toolkit.optim.factory import build_optimizer, build_scheduler
from toolkit.terms import Step
from toolkit.types import Batch, ModelOutput, Progress, as_batch
from toolkit.utils.rng import rng_states, set_rng_states

CHECKPOINT_KEY = "toolkit"


def _serialisable(v: Any) -> bool:
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_serialisable(x) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _serialisable(x) for k, x in v.items())
    return False


def record_hparams(module: L.LightningModule, **args: Any) -> None:
    """Save the constructor arguments that can be written to YAML as hyper-parameters (replacing
    any recorded before, so a subclass records its own signature). Objects (an nn.Module model, a
    Teacher, LossTerm instances) are left out: pass them again to `load_from_checkpoint`."""
    module.save_hyperparameters({k: v for k, v in args.items() if _serialisable(v)})


class TrainingState:
    """Optimiser and LR schedule from config, and exact resume: the checkpoint's `toolkit` key
    holds the model spec and the global RNG states, restored when training starts.

    Shared by the toolkit's LightningModules (put it before `LossBus` in the bases); they set
    `optimizer_config`, `scheduler_config` and `model_spec`.
    """

    optimizer_config: Any
    scheduler_config: Any
    model_spec: dict[str, Any] | None

    def configure_optimizers(self) -> Any:
        opt = build_optimizer(self.parameters(), self.optimizer_config)
        max_epochs = self.trainer.max_epochs if getattr(self, "_trainer", None) is not None else None
        sched = build_scheduler(opt, self.scheduler_config, max_epochs=max_epochs)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The global RNG states make a resumed run draw the same augmentations, dropout masks and
        # worker seeds as one that never stopped (the data order itself depends only on seed+epoch).
        checkpoint[CHECKPOINT_KEY] = {"model": self.model_spec, "rng": rng_states()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY, {})
        trainer = getattr(self, "_trainer", None)
        if "rng" in state and trainer is not None and trainer.state.fn == "fit":
            # Applied in on_train_start: the sanity-check validation in between draws random numbers.
            self._resume_rng = state["rng"]

    def on_train_start(self) -> None:
        rng = getattr(self, "_resume_rng", None)
        if rng is not None:
            set_rng_states(rng)
            self._resume_rng = None
        super().on_train_start()  # LossBus: the terms' own start hooks
        if rng is not None:
            # a term's pass over the data must not shift the restored random stream
            set_rng_states(rng)


class ClassificationModule(TrainingState, LossBus, L.LightningModule):
    """Train one classifier with the loss bus.

    Args:
        model: a model spec for `toolkit.models.create_model` ("resnet8x4", "timm:resnet18",
            "hf:PATH") or an `nn.Module`. A spec is recorded in checkpoints so the model can be
            rebuilt (e.g. as a teacher) from the checkpoint alone.
        num_classes: class count; required for a spec, checked against a module that declares one.
        loss: terms spec (see `toolkit.modules.config`): a name, a LossTerm, or `{name: entry}`.
        in_chans: input channels, for specs.
        model_kwargs: extra keyword arguments for `create_model`.
        optimizer: name or dict for `toolkit.optim.build_optimizer` (default SGD lr 0.1, momentum 0.9).
        scheduler: name or dict for `toolkit.optim.build_scheduler` (default none).
        top_k: also report top-k accuracy when there are more than k classes.
    """

    def __init__(
        self,
        model: str | nn.Module,
        num_classes: int | None = None,
        loss: Any = "cross_entropy",
        in_chans: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        optimizer: str | Mapping[str, Any] | None = None,
        scheduler: str | Mapping[str, Any] | None = None,
        top_k: int = 5,
    ) -> None:
        super().__init__()
        record_hparams(
            self,
            model=model,
            num_classes=num_classes,
            loss=loss,
            in_chans=in_chans,
            model_kwargs=model_kwargs,
            optimizer=optimizer,
            scheduler=scheduler,
            top_k=top_k,
        )
        if isinstance(model, str):
            if num_classes is None:
                raise ValueError(f"num_classes is required to build model {model!r}")
            kw = dict(model_kwargs or {})
            self.model = create_model(model, num_classes=num_classes, in_chans=in_chans, **kw)
            self.model_spec: dict[str, Any] | None = {
                "name": model,
                "kwargs": {"num_classes": num_classes, **({"in_chans": in_chans} if in_chans else {}), **kw},
            }
        else:
            self.model = model
            self.model_spec = None
        declared = num_classes_of(self.model)
        if num_classes is None:
            num_classes = declared
        elif declared is not None and declared != num_classes:
            raise ValueError(f"the model predicts {declared} classes but num_classes={num_classes}")
        if num_classes is None:
            raise ValueError("num_classes is required: the model does not declare its class count")
        self.num_classes = num_classes
        self.optimizer_config = optimizer
        self.scheduler_config = scheduler
        for name, (term, weight) in build_terms(loss, default_name="loss").items():
            self.add_term(name, term, weight)
        self.val_metrics = self._metrics("val", top_k)
        self.test_metrics = self._metrics("test", top_k)
        self._student_taps: FeatureTaps | None = None
        self._prepared = False

    def _metrics(self, prefix: str, top_k: int) -> torchmetrics.MetricCollection:
        task = {"task": "multiclass", "num_classes": self.num_classes}
        metrics = {"acc": torchmetrics.Accuracy(**task)}
        if self.num_classes > top_k:
            metrics[f"acc_top{top_k}"] = torchmetrics.Accuracy(**task, top_k=top_k)
        return torchmetrics.MetricCollection(metrics, prefix=f"{prefix}/")

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Any) -> Tensor:
        return forward_output(self.model, x).logits

    def student_output(self, batch: Batch) -> ModelOutput:
        out = forward_output(self.model, batch.input)
        if self._student_taps is not None:
            out.features = self._student_taps.pop()
        return out

    def teacher_output(self, batch: Batch) -> ModelOutput | None:
        return None

    # -- set-up ---------------------------------------------------------------------------
    def _tap_paths(self, side: str) -> list[str]:
        return list(
            dict.fromkeys(p for t in self.loss_terms.values() for p in getattr(t, f"{side}_features"))
        )

    def _install_taps(self) -> None:
        paths = self._tap_paths("student")
        if self._student_taps is not None:
            self._student_taps.remove()
        self._student_taps = FeatureTaps(self.model, paths) if paths else None

    def _example_input(self) -> Any:
        if self.example_input_array is not None:
            return self.example_input_array
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is not None and hasattr(dm, "example_input"):
            return dm.example_input()
        return None

    def prepare(self, example_input: Any = None) -> None:
        """Dry run: install feature taps, check class counts, and let the terms size their
        trainable parts (projectors, heads). Called from `setup("fit")`; call it yourself before
        `load_state_dict` when you build a module outside a Trainer."""
        self._install_taps()
        example = example_input if example_input is not None else self._example_input()
        if example is None:
            if self._tap_paths("student") or self._tap_paths("teacher"):
                raise ValueError(
                    "feature terms need an example input to size their projectors: use a toolkit DataModule, "
                    "set module.example_input_array, or call module.prepare(example_input)"
                )
            self._prepared = True
            return
        was_training = self.model.training
        self.model.eval()  # no BatchNorm statistics updates from the dry run
        try:
            with torch.no_grad():
                batch = Batch(example)
                student = self.student_output(batch)
                teacher = self.teacher_output(batch)
        finally:
            self.model.train(was_training)
        if student.logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the model outputs {student.logits.shape[-1]} classes but num_classes={self.num_classes}"
            )
        self.check_teacher(student, teacher)
        self.setup_terms(Step(batch, student, teacher, Progress(), self))
        self._prepared = True

    def check_teacher(self, student: ModelOutput, teacher: ModelOutput | None) -> None:
        """Hook for modules with a teacher."""

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._prepared:
            self.prepare()

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        b = as_batch(batch)
        if not self._prepared:
            self.prepare()
        step = Step(b, self.student_output(b), self.teacher_output(b), self.progress(), self)
        return self.step_output(step)

    def _eval_step(self, batch: Any, metrics: torchmetrics.MetricCollection, prefix: str) -> None:
        b = as_batch(batch)
        logits = forward_output(self.model, b.input).logits
        if self._student_taps is not None:
            self._student_taps.features = {}  # taps also fire in evaluation: drop those tensors now
        if b.target is None:
            raise ValueError(f"{prefix} batches need targets to compute accuracy")
        n = logits.shape[0]
        self.log(f"{prefix}/loss", cross_entropy(logits, b.target), batch_size=n, sync_dist=True)
        metrics.update(logits, b.target)
        self.log_dict(metrics, batch_size=n)
        for term in self.loss_terms.values():
            for name, extra in term.eval_logits(b).items():
                acc = (extra.argmax(-1) == b.target).float().mean()
                self.log(f"{prefix}/{name}/acc", acc, batch_size=n, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")
