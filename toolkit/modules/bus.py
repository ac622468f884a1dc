"""`LossBus`: named, weighted, scheduled loss terms and sample weighters for any LightningModule.

Lightning callbacks cannot replace a loss, so anything that must change it (a distiller, a
regulariser, a sample reweighter) registers itself here, typically from a callback's `setup()`:

    class MyModule(LossBus, L.LightningModule):
        def training_step(self, batch, batch_idx):
            return self.loss_from(self.net(batch[0]), batch)

For each step the bus computes every term, combines the per-sample ones with the sample weights,

    total = Σ_k w_k(progress) · mean_i(s_i · ℓ_k,i)   (+ w_k · ℓ_k for batch-level terms)

logs each term as `train/loss/<name>` (unweighted) and the total as `train/loss` (in training at
the steps whose values are written, shown or monitored: `LossBus._step_values_are_kept`), returns
`{"loss", "per_sample_loss", "logits", "index"}` so observing callbacks can read per-sample
results in `on_train_batch_end`. `per_sample_loss` is Σ_k w_k·ℓ_k,i before sample weighting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from toolkit.schedules import Weight, as_weight, weight_value
from toolkit.terms import LossTerm, Step
from toolkit.types import ModelOutput, Progress, as_batch, check_targets, require_index


class SampleWeighter(Protocol):
    """Gives each sample of the batch a weight (B,), from the step and the per-sample loss."""

    def __call__(self, step: Step, per_sample_loss: Tensor) -> Tensor: ...


def _weighted(w: float, value: Tensor) -> Tensor:
    """w · value, without the multiplication when w is 1 (exact either way)."""
    return value if w == 1.0 else w * value


def _check_term(name: str, term: Any) -> None:
    if not isinstance(term, LossTerm):
        raise TypeError(
            f"loss term {name!r} must be a toolkit LossTerm, got {type(term).__name__}; wrap plain functions "
            "with toolkit.losses.FunctionTerm"
        )


class LossBus:
    """Mixin for LightningModules: holds loss terms, their weights and the sample weighters.

    Put it before `L.LightningModule` in the bases. Terms are submodules (`self.loss_terms`), so
    their trainable parts are optimised and checkpointed with the model.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ensure_bus()

    def _ensure_bus(self) -> None:
        if "loss_terms" not in getattr(self, "_modules", {}):
            self.loss_terms = nn.ModuleDict()
            self.__dict__["_term_weights"] = {}
            self.__dict__["_weighters"] = {}
            self.__dict__["_targets_checked"] = False

    # -- registration ---------------------------------------------------------------------
    def add_term(self, name: str, term: LossTerm, weight: Weight | Mapping = 1.0) -> None:
        """Register a loss term under `name` with a constant, callable or scheduled weight."""
        self._ensure_bus()
        _check_term(name, term)
        if name in self.loss_terms:
            raise KeyError(f"a loss term named {name!r} is already registered; pick another name")
        self.loss_terms[name] = term
        self._term_weights[name] = as_weight(weight)

    def remove_term(self, name: str) -> LossTerm:
        self._ensure_bus()
        self._term_weights.pop(name)
        term = self.loss_terms[name]
        del self.loss_terms[name]
        return term

    def set_weight(self, name: str, weight: Weight | Mapping) -> None:
        if name not in self.loss_terms:
            raise KeyError(f"no loss term {name!r}; terms are {list(self.loss_terms)}")
        self._term_weights[name] = as_weight(weight)

    def add_weighter(self, name: str, weighter: SampleWeighter | Callable[[Step, Tensor], Tensor]) -> None:
        """Register a sample weighter; several multiply."""
        self._ensure_bus()
        if name in self._weighters:
            raise KeyError(f"a sample weighter named {name!r} is already registered")
        self._weighters[name] = weighter

    def remove_weighter(self, name: str) -> None:
        self._weighters.pop(name)

    @property
    def terms(self) -> dict[str, LossTerm]:
        self._ensure_bus()
        return dict(self.loss_terms.items())

    def term_weight(self, name: str, progress: Progress | None = None) -> float:
        return weight_value(self._term_weights[name], progress or self.progress())

    # -- computation ----------------------------------------------------------------------
    def progress(self) -> Progress:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return Progress()
        steps = trainer.num_training_batches
        steps = int(steps) if steps not in (None, float("inf")) else 1
        accumulate = max(1, getattr(trainer, "accumulate_grad_batches", 1))
        return Progress(
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            max_epochs=max(1, trainer.max_epochs or 1),
            steps_per_epoch=max(1, steps // accumulate),
        )

    def _validate_step(self, step: Step) -> None:
        for name, term in self.loss_terms.items():
            if term.needs_teacher and step.teacher is None:
                raise ValueError(f"loss term {name!r} needs a teacher but this module has none")
            if term.needs_index:
                require_index(step.batch, f"loss term {name!r}")
            if term.needs_target and step.batch.target is None:
                raise ValueError(f"loss term {name!r} needs targets but the batch has none")
        if not self._targets_checked and step.batch.target is not None:
            # Checked once: every-step checks would force a device sync on accelerators.
            check_targets(step.batch.target, step.student.logits.shape[-1])
            self.__dict__["_targets_checked"] = True

    def compute_loss(self, step: Step) -> dict[str, Any]:
        """Evaluate every term on `step`; returns total, per-sample total and each term's value."""
        self._ensure_bus()
        if not self.loss_terms:
            raise RuntimeError("no loss terms registered: add one with add_term(name, term)")
        self._validate_step(step)
        b = step.student.logits.shape[0]
        values: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        # Sums start from their first part and skip `1.0 *`: the same values bit for bit as
        # `zeros + w * x` (0 + x and 1.0 * x are exact), without two tensor ops (and two autograd
        # nodes) per term and sum, which show on small models.
        per_sample: Tensor | None = None
        for name, term in self.loss_terms.items():
            w = weight_value(self._term_weights[name], step.progress)
            weights[name] = w
            value = term(step)
            if value.dim() == 1 and value.shape[0] != b:
                raise ValueError(
                    f"loss term {name!r} returned {value.shape[0]} per-sample values for a batch of {b}"
                )
            if value.dim() > 1:
                raise ValueError(
                    f"loss term {name!r} must return (B,) or a scalar, got shape {tuple(value.shape)}"
                )
            values[name] = value
            if value.dim() == 1:
                part = _weighted(w, value.float())
                per_sample = part if per_sample is None else per_sample + part
        if per_sample is None:
            per_sample = torch.zeros(b, device=step.student.logits.device)
        sample_w = None
        for weighter in self._weighters.values():
            sw = weighter(step, per_sample.detach())
            sample_w = sw if sample_w is None else sample_w * sw
        total: Tensor | None = None
        for name, value in values.items():
            if value.dim() == 1:
                value = value.float() * sample_w if sample_w is not None else value.float()
                part = _weighted(weights[name], value.mean())
            else:
                part = _weighted(weights[name], value.float())
            total = part if total is None else total + part
        return {"loss": total, "per_sample_loss": per_sample, "terms": values, "sample_weights": sample_w}

    def log_loss(self, result: dict[str, Any], batch_size: int, prefix: str = "train") -> None:
        if getattr(self, "_trainer", None) is None:
            return
        # On the progress bar only when there is one: Lightning turns progress-bar values into
        # Python numbers (`.item()`, a device sync on accelerators) at every step.
        bar = getattr(self._trainer, "progress_bar_callback", None) is not None
        # None: every value is kept at this step; else only what is read at every step
        read = None if self._step_values_are_kept() else self._monitored_every_step()
        for name, value in result["terms"].items():
            if read is None or f"{prefix}/loss/{name}" in read:
                self.log(f"{prefix}/loss/{name}", value.detach().mean(), batch_size=batch_size)
        if read is None or bar or f"{prefix}/loss" in read:
            self.log(f"{prefix}/loss", result["loss"].detach(), prog_bar=bar, batch_size=batch_size)

    def _step_values_are_kept(self) -> bool:
        """Whether values logged at this step reach the logger or stay in `callback_metrics`:
        always outside training (validation averages them over the epoch); in training, on the
        steps the logger writes (every `log_every_n_steps`, when stopping, `fast_dev_run`) and on
        the last step of an epoch or of the run. On the other steps a logged value would be
        overwritten unread, unless a progress bar shows it or a callback or a step-interval
        scheduler monitors it (`_monitored_every_step`), and Lightning's `self.log` costs about
        1 ms per value on CPU (it re-applies the device to its whole metric record): 10% of a
        small convnet's step. So the event files are the same as with logging at every step;
        read a step's total from the `outputs["loss"]` of `on_train_batch_end`."""
        trainer = self._trainer
        if not trainer.training or trainer.fast_dev_run or trainer._logger_connector.should_update_logs:
            return True
        loop = trainer.fit_loop.epoch_loop
        last_in_epoch = (
            loop.batch_progress.is_last_batch or loop.batch_idx + 1 >= trainer.num_training_batches
        )
        return last_in_epoch or 0 < trainer.max_steps <= trainer.global_step + 1

    def _monitored_every_step(self) -> set[str]:
        """The keys that callbacks (`monitor`, e.g. ModelCheckpoint, EarlyStopping) or schedulers
        stepping every step (ReduceLROnPlateau) read from `callback_metrics`."""
        trainer = self._trainer
        keys = {getattr(cb, "monitor", None) for cb in trainer.callbacks}
        keys |= {c.monitor for c in trainer.lr_scheduler_configs if c.interval == "step"}
        return keys - {None}

    def step_output(self, step: Step, prefix: str = "train") -> dict[str, Any]:
        """Compute, log and package the loss of `step` as training_step's return value."""
        result = self.compute_loss(step)
        self.log_loss(result, step.student.logits.shape[0], prefix)
        return {
            "loss": result["loss"],
            "per_sample_loss": result["per_sample_loss"].detach(),
            "logits": step.student.logits.detach(),
            "index": step.batch.index,
        }

    def loss_from(
        self, output: Tensor | ModelOutput, batch: Any, teacher: ModelOutput | None = None
    ) -> dict[str, Any]:
        """For a user's own training_step: the loss of these logits (or ModelOutput) on `batch`."""
        student = output if isinstance(output, ModelOutput) else ModelOutput(output)
        step = Step(as_batch(batch), student, teacher, self.progress(), self)
        return self.step_output(step)

    def setup_terms(self, example: Step) -> None:
        """Let every term size its trainable parts from a dry-run step."""
        for term in self.loss_terms.values():
            term.setup(example)

    # Lightning hooks forwarded to the terms (a subclass that overrides one calls super()).
    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        for term in self.loss_terms.values():
            term.on_train_start(self)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # type: ignore[misc]
        for term in self.loss_terms.values():
            term.on_train_batch_end(self)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # type: ignore[misc]
        for term in self.loss_terms.values():
            term.on_train_epoch_end(self)


__all__ = ["LossBus", "SampleWeighter"]
