"""`LossTerm`: one named piece of the training loss, and `Step`: everything a term may read.

A term maps a `Step` to a per-sample loss (B,) or a batch-level scalar. It declares what it needs
(`needs_teacher`, `needs_index`, feature paths on the student and teacher) so the module can tap
the right layers, run (or skip) the teacher and fail early with a clear message. Trainable parts a
term owns (projectors, auxiliary heads) are its submodules: they are optimised and checkpointed
with the student because the term lives inside the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from toolkit.types import Batch, ModelOutput, Progress


@dataclass
class Step:
    """One training step as the loss terms see it."""

    batch: Batch
    student: ModelOutput
    teacher: ModelOutput | None = None
    progress: Progress = Progress()
    module: Any = None  # the LightningModule, for terms that need its state (e.g. an EMA teacher)

    @property
    def target(self) -> Tensor | None:
        return self.batch.target


class LossTerm(nn.Module):
    """Base class of every loss term.

    Subclasses implement `forward(step) -> Tensor` returning (B,) per-sample losses (preferred:
    sample weighters and data scores use them) or a scalar for batch-level losses. Override
    `setup(example)` to size trainable parts from a dry run (called once before training with the
    outputs of a small example batch).
    """

    needs_teacher: bool = False
    needs_index: bool = False
    needs_target: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.student_features: tuple[str, ...] = ()
        self.teacher_features: tuple[str, ...] = ()

    def setup(self, example: Step) -> None:  # noqa: B027 - optional hook
        """Size trainable parts from a dry run; default: nothing to size."""

    def forward(self, step: Step) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # Lifecycle hooks, called by the module for every term (all optional). They let a method keep
    # state beyond one step without a separate callback: a pass over the data before training
    # (class means), an update after each optimiser step (an EMA teacher), a second network that
    # is evaluated alongside the student (online distillation).

    def on_train_start(self, module: Any) -> None:  # noqa: B027 - optional hook
        """Once per `fit`, after a checkpoint is restored and before the first training batch."""

    def on_train_batch_end(self, module: Any) -> None:  # noqa: B027 - optional hook
        """After every optimiser step."""

    def on_train_epoch_end(self, module: Any) -> None:  # noqa: B027 - optional hook
        """At the end of every training epoch."""

    def eval_logits(self, batch: Batch) -> dict[str, Tensor]:
        """Logits of extra networks this term trains, keyed by a short name; the module logs
        their accuracy as `val/<name>/acc` and `test/<name>/acc`. Default: none."""
        return {}
