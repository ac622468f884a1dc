"""`DistillationModule`: a student trained with a frozen teacher through loss terms.

    module = DistillationModule(
        student="resnet8x4", teacher=Teacher.from_checkpoint("runs/teacher.ckpt"), num_classes=100,
        terms={"ce": {"loss": "cross_entropy", "weight": 0.1}, "kd": {"distiller": "kd", "weight": 0.9}},
    )

The teacher runs under `no_grad` in eval mode only when some term needs it, is never optimised
and never saved (see `toolkit.distill.teacher`); checkpoints hold the student, the terms'
trainable parts and the training state, and load strictly. With `teacher_cache=True` the teacher's
logits are computed once per (sample, augmentation view) and read back afterwards
(`toolkit.distill.cache`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolkit.distill.cache import TeacherCache
from toolkit.distill.teacher import Teacher
from toolkit.models.output import num_classes_of
from toolkit.modules.classification import ClassificationModule, record_hparams
from toolkit.types import Batch, ModelOutput, require_index

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

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
        teacher_cache: keep the teacher's training logits per (sample index, augmentation view)
            and skip its forward pass for samples already seen (`TeacherCache`). True: on, and an
            error at set-up if it cannot serve this run (a term reads teacher features, or the
            data is augmented without the DataModule's `augment_views`); "auto": on only where it
            can serve; False (default): off. Batches need sample indices.
        teacher_cache_dtype: storage of the cached logits: "float32" (exact), "float16" or
            "bfloat16" (half the memory).
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
        teacher_cache: bool | str = False,
        teacher_cache_dtype: str = "float32",
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
            teacher_cache=teacher_cache,
            teacher_cache_dtype=teacher_cache_dtype,
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
        if teacher_cache not in (True, False, "auto"):
            raise ValueError(f"teacher_cache must be True, False or 'auto', got {teacher_cache!r}")
        if teacher_cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"teacher_cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {teacher_cache_dtype!r}"
            )
        self.teacher_cache = (
            TeacherCache(self.num_classes, dtype=CACHE_DTYPES[teacher_cache_dtype]) if teacher_cache else None
        )
        self._cache_mode = teacher_cache
        self._cache_active = teacher_cache is True

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
        if self._cache_active and self.model.training and torch.is_grad_enabled():
            index = require_index(batch, "teacher_cache")
            logits = self.teacher_cache.logits(
                index, self.progress().epoch, batch.input, lambda x: self.teacher(x).logits
            )
            return ModelOutput(logits)
        return self.teacher(batch.input)

    def _cache_problem(self) -> str | None:
        """Why the cache cannot serve this run (None: it can); fixes its number of views."""
        tapped = self._tap_paths("teacher")
        if tapped:
            return f"it stores logits only, but the terms read teacher features {tapped}"
        if not self._teacher_needed:
            return "no term reads the teacher"
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not hasattr(dm, "augment"):
            warnings.warn(
                "teacher_cache: cannot see whether the training data is augmented; the cache assumes a "
                "sample's input is the same every epoch",
                stacklevel=3,
            )
            return None
        views = getattr(dm, "augment_views", None)
        if dm.augment and views is None:
            return (
                "random augmentation would replay one view's teacher logits for another: set the "
                "DataModule's augment_views=K (the augmentation repeats every K epochs and K views are cached) "
                "or augment=False"
            )
        self.teacher_cache.set_views(views if dm.augment else 1)
        return None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher_cache is not None:
            problem = self._cache_problem()
            if problem is not None and self._cache_mode is True:
                raise ValueError(
                    f"teacher_cache cannot serve this run: {problem}; or use teacher_cache=False"
                )
            self._cache_active = problem is None

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
