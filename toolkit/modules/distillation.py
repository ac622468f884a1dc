"""`DistillationModule`: a student trained with a frozen teacher through loss terms.

    module = DistillationModule(
        student="resnet8x4", teacher=Teacher.from_checkpoint("runs/teacher.ckpt"), num_classes=100,
        terms={"ce": {"loss": "cross_entropy", "weight": 0.1}, "kd": {"distiller": "kd", "weight": 0.9}},
    )

The teacher runs under `no_grad` in eval mode only when some term needs it, is never optimised
and never saved (see `toolkit.distill.teacher`); checkpoints hold the student, the terms'
trainable parts and the training state, and load strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from toolkit.distill.teacher import Teacher
from toolkit.models.output import num_classes_of
from toolkit.modules.classification import ClassificationModule, record_hparams
from toolkit.types import Batch, ModelOutput

DEFAULT_TERMS = {
    "ce": {"loss": "cross_entropy", "weight": 0.5},
    "kd": {"distiller": "kd", "weight": 0.5, "temperature": 4.0},
}


def as_teacher(teacher: Teacher | nn.Module | str | list, num_classes: int | None = None) -> Teacher:
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, str):
        return Teacher.from_name(teacher, num_classes=num_classes)
    if isinstance(teacher, (list, tuple)):
        return Teacher([as_teacher(t, num_classes).nets[0] if isinstance(t, str) else t for t in teacher])
    return Teacher(teacher)


class DistillationModule(ClassificationModule):
    """Student + frozen teacher + loss terms (default: 0.5·CE + 0.5·KD at τ=4).

    Args:
        student: model spec or module (as `ClassificationModule.model`).
        teacher: a `Teacher`, an `nn.Module`, a spec/checkpoint path, or a list (ensemble).
        terms: terms spec (see `toolkit.modules.config`); default `DEFAULT_TERMS`.
        Other arguments as `ClassificationModule`.
    """

    def __init__(
        self,
        student: str | nn.Module,
        teacher: Teacher | nn.Module | str | list,
        num_classes: int | None = None,
        terms: Any = None,
        in_chans: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        optimizer: str | Mapping[str, Any] | None = None,
        scheduler: str | Mapping[str, Any] | None = None,
        top_k: int = 5,
    ) -> None:
        super().__init__(
            student,
            num_classes=num_classes,
            loss=DEFAULT_TERMS if terms is None else terms,
            in_chans=in_chans,
            model_kwargs=model_kwargs,
            optimizer=optimizer,
            scheduler=scheduler,
            top_k=top_k,
        )
        record_hparams(
            self,
            student=student,
            num_classes=num_classes,
            terms=terms,
            in_chans=in_chans,
            model_kwargs=model_kwargs,
            optimizer=optimizer,
            scheduler=scheduler,
            top_k=top_k,
        )
        self.teacher = as_teacher(teacher, self.num_classes)
        declared = self.teacher.num_classes
        student_declared = num_classes_of(self.model) or self.num_classes
        if declared is not None and declared != student_declared:
            raise ValueError(
                f"teacher and student predict different class counts (teacher {declared}, student {student_declared}): "
                "build both for the same classes, or distil through a feature-only method"
            )
        self._teacher_needed = self._needs_teacher()

    def _needs_teacher(self) -> bool:
        """Run the teacher only when a term reads its outputs or features."""
        return any(t.needs_teacher for t in self.loss_terms.values()) or bool(self._tap_paths("teacher"))

    @property
    def student(self) -> nn.Module:
        return self.model

    def _install_taps(self) -> None:
        super()._install_taps()
        self.teacher.tap(self._tap_paths("teacher"))
        self._teacher_needed = self._needs_teacher()

    def teacher_output(self, batch: Batch) -> ModelOutput | None:
        if not self._teacher_needed:
            return None
        return self.teacher(batch.input)

    def check_teacher(self, student: ModelOutput, teacher: ModelOutput | None) -> None:
        if teacher is not None and teacher.logits.shape[-1] != student.logits.shape[-1]:
            raise ValueError(
                f"teacher and student predict different class counts (teacher {teacher.logits.shape[-1]}, "
                f"student {student.logits.shape[-1]}): build both for the same classes"
            )

    def on_train_epoch_start(self) -> None:
        self.teacher.eval_nets()

    def on_validation_end(self) -> None:
        self.teacher.eval_nets()
