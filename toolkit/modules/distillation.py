"""`DistillationModule`: a student trained with a frozen teacher through loss terms.

    module = DistillationModule(
        student="resnet8x4", teacher=Teacher.from_checkpoint("runs/teacher.ckpt"), num_classes=100,
        terms={"ce": {"loss": "cross_entropy", "weight": 0.1}, "kd": {"distiller": "kd", "weight": 0.9}},
    )

The teacher runs under `no_grad` in eval mode only when some term needs it, is never optimised
and never saved (see `toolkit.distill.teacher`); checkpoints hold the student, the terms'
trainable parts and the training state, and load strictly. With `teacher_cache=True` the teacher's
logits are computed once per (sample, augmentation view) and read back afterwards
(`toolkit.distill.cache`); with `teacher_cache_dir=PATH` they (and the teacher features the
terms tap) are kept in memory-mapped files under PATH, fingerprinted, and reused by later runs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolkit.distill.cache import TeacherCache, batch_rows, cache_views, feature_keys
from toolkit.distill.teacher import Teacher
from toolkit.models.output import num_classes_of
from toolkit.modules.classification import ClassificationModule, record_hparams
from toolkit.types import Batch, ModelOutput, require_index
from toolkit.utils.rng import rng_states, set_rng_states

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_FILLS = ("record", "precompute")

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
            error at set-up if it cannot serve this run (a term reads teacher features, which only
            the cache on disk stores, or the data is augmented without the DataModule's
            `augment_views`); "auto": on only where it
            can serve; False (default): off. Batches need sample indices.
        teacher_cache_dtype: storage of the cached logits (and features): "float32" (exact),
            "float16" or "bfloat16" (half the memory). Default: float32, except float16 for a
            top-k cache on disk.
        teacher_cache_dir: keep the cache on disk in this directory instead of in the checkpoint
            (memory-mapped, fingerprinted, reused by later runs and shared by DDP ranks; it also
            stores the teacher features the terms tap). Turns the cache on (`teacher_cache`
            False is read as True; "auto" is kept). A directory built for another teacher, data
            or transforms is refused at set-up.
        teacher_cache_top_k: on disk: None (full logits), k (top-k logits, the rest rebuilt by
            FKD's marginal smoothing, see `toolkit.distill.cache_store`), or "auto" (default:
            full logits up to 100 classes, k = 10 above).
        teacher_cache_fill: on disk: "record" (default: rows written as training first sees
            them) or "precompute" (a pass over every training sample and view in
            `on_train_start`, only for missing rows).
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
        teacher_cache_dtype: str | None = None,
        teacher_cache_dir: str | os.PathLike | None = None,
        teacher_cache_top_k: int | str | None = "auto",
        teacher_cache_fill: str = "record",
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
            teacher_cache_dir=None if teacher_cache_dir is None else str(teacher_cache_dir),
            teacher_cache_top_k=teacher_cache_top_k,
            teacher_cache_fill=teacher_cache_fill,
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
        if teacher_cache_dtype is not None and teacher_cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"teacher_cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {teacher_cache_dtype!r}"
            )
        if teacher_cache_fill not in CACHE_FILLS:
            raise ValueError(f"teacher_cache_fill must be one of {CACHE_FILLS}, got {teacher_cache_fill!r}")
        if teacher_cache_dir is None and (
            teacher_cache_top_k not in ("auto", None) or teacher_cache_fill != "record"
        ):
            raise ValueError(
                "teacher_cache_top_k and teacher_cache_fill apply to the teacher cache on disk: give teacher_cache_dir too"
            )
        if teacher_cache_dir is not None and teacher_cache is False:
            teacher_cache = True
        self.teacher_cache = (
            TeacherCache(
                self.num_classes,
                dtype=teacher_cache_dtype,
                directory=teacher_cache_dir,
                top_k=teacher_cache_top_k if teacher_cache_dir is not None else "auto",
            )
            if teacher_cache
            else None
        )
        self._cache_fill = teacher_cache_fill
        self._teacher_shapes: dict[str, tuple[int, ...]] | None = None
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
        cache = self.teacher_cache
        if self._cache_active and self.model.training and torch.is_grad_enabled():
            index = require_index(batch, "teacher_cache")
            if cache.on_disk:
                return cache.outputs(index, self.progress().epoch, batch.input, self.teacher)
            logits = self.teacher_cache.logits(
                index, self.progress().epoch, batch.input, lambda x: self.teacher(x).logits
            )
            return ModelOutput(logits)
        if self._cache_active and cache.on_disk and not self._prepared:
            # the dry run: a complete cache answers it, so a later run never runs the teacher
            example = cache.example_output(batch_rows(batch.input))
            if example is not None:
                return ModelOutput(
                    example.logits.to(self.device),
                    None,
                    {k: v.to(self.device) for k, v in example.features.items()},
                )
        return self.teacher(batch.input)

    def _cache_problem(self) -> str | None:
        """Why the cache cannot serve this run (None: it can); fixes its number of views."""
        tapped = self._tap_paths("teacher")
        disk = self.teacher_cache.on_disk
        if tapped and not disk:
            return (
                f"in memory it stores logits only, but the terms read teacher features {tapped} "
                "(the cache on disk, teacher_cache_dir=..., stores them too)"
            )
        if not self._teacher_needed:
            return "no term reads the teacher"
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not hasattr(dm, "augment"):
            if disk:
                return (
                    "on disk it fingerprints the training data, but the run has no toolkit DataModule: "
                    "fit with datamodule=..."
                )
            warnings.warn(
                "teacher_cache: cannot see whether the training data is augmented; the cache assumes a "
                "sample's input is the same every epoch",
                stacklevel=3,
            )
            return None
        views, problem = cache_views(dm)
        if problem is not None:
            return problem
        self.teacher_cache.set_views(views)
        return None

    def setup(self, stage: str) -> None:
        disk = stage == "fit" and self.teacher_cache is not None and self.teacher_cache.on_disk
        if disk:  # before the dry run, which a complete cache on disk answers
            self._setup_cache()
        super().setup(stage)
        if stage == "fit" and self.teacher_cache is not None:
            if not disk:
                self._setup_cache()
            elif self._cache_active:
                self.teacher_cache.create(self._feature_shapes())

    def _setup_cache(self) -> None:
        problem = self._cache_problem()
        if problem is not None and self._cache_mode is True:
            raise ValueError(f"teacher_cache cannot serve this run: {problem}; or use teacher_cache=False")
        self._cache_active = problem is None
        if self._cache_active and self.teacher_cache.on_disk:
            self.teacher_cache.attach(
                self.teacher, self.trainer.datamodule, feature_keys(self.teacher, self._tap_paths("teacher"))
            )

    def _feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the teacher features the cache stores (from the dry run)."""
        names = self.teacher_cache.feature_names
        if names and (self._teacher_shapes is None or any(k not in self._teacher_shapes for k in names)):
            self.teacher.tap(self._tap_paths("teacher"))
            out = self.teacher(self._example_input())
            self._teacher_shapes = {k: tuple(v.shape[1:]) for k, v in out.features.items()}
        return {k: self._teacher_shapes[k] for k in names}

    def check_teacher(self, student: ModelOutput, teacher: ModelOutput | None) -> None:
        if teacher is not None:
            self._teacher_shapes = {k: tuple(v.shape[1:]) for k, v in teacher.features.items()}
        if teacher is not None and teacher.logits.shape[-1] != student.logits.shape[-1]:
            raise ValueError(
                f"teacher and student predict different class counts (teacher {teacher.logits.shape[-1]}, "
                f"student {student.logits.shape[-1]}): build both for the same classes"
            )

    def on_train_epoch_start(self) -> None:
        self.teacher.eval_nets()

    def on_train_start(self) -> None:
        cache = self.teacher_cache
        if self._cache_active and cache is not None and cache.on_disk and self._cache_fill == "precompute":
            states = rng_states()  # the pass must not shift the run's random stream
            try:
                cache.fill(self.teacher, self.trainer.datamodule, device=self.device)
            finally:
                set_rng_states(states)
        super().on_train_start()

    def on_train_epoch_end(self) -> None:
        if self.teacher_cache is not None:
            self.teacher_cache.flush()  # each rank's rows reach the files at every epoch end
        super().on_train_epoch_end()

    def on_train_end(self) -> None:
        if self.teacher_cache is not None:
            self.teacher_cache.flush()
        super().on_train_end()

    def on_validation_end(self) -> None:
        self.teacher.eval_nets()
