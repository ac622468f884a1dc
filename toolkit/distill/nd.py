"""KD++'s ND (norm and direction) loss as a loss term; maths in `toolkit.functional.nd`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.distill.fitnet import check_path, feature_at
from toolkit.distill.heads import HeadSet, pool_feature
from toolkit.functional.nd import nd_loss
from toolkit.functional.nkd import class_indices
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import ModelOutput, as_batch, to_device_input
from toolkit.utils.rng import rng_states, set_rng_states


@register("distiller", "nd")
class NDLoss(LossTerm):
    """ND loss: 1 − ⟨s_i, e_{y_i}⟩ / max(‖s_i‖, ‖t_i‖), per sample, e_y the teacher's unit class mean.

    Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction"
    (ECCV 2024); follows the official WangYZ1608/Knowledge-Distillation-via-ND code. s is the
    student's penultimate embedding (through a projector when its width differs from the
    teacher's), t the teacher's, e_y = c_y/‖c_y‖ with c_y the mean teacher embedding of class y
    on the training set. It pulls the student's embedding towards the direction of the teacher's
    class mean and its norm up to at least the teacher's (`toolkit.functional.nd`).

    The recipe (KD++, `train_cifar_kd.py`) is three bus terms: CE + λ_kd·KD(τ = 4)·warm-up + λ_nd·ND,
    the warm-up min(1, epoch/20) on KD only, written as the `kd` term's weight schedule:
    `{"ce": {"loss": "cross_entropy", "weight": 1.0}, "kd": {"distiller": "kd", "temperature": 4.0,
    "weight": {"schedule": "linear", "start": 0, "end": λ_kd, "end_epoch": 20}}, "nd": {"distiller":
    "nd", "weight": λ_nd}}` (DKD++ swaps `kd` for `dkd`).

    What this term owns and does:
    - the embeddings are FeatureTaps on both networks; default "fc:input", the input of the final
      linear layer (the pooled, flattened embedding, as the official `embed=True` output); 4-D
      maps are average-pooled, token sequences read at the first token;
    - the class means: computed once per fit in `on_train_start`, one pass of the teacher (eval
      mode, no gradient) over the training loader (its augmentation, as the official pass), summed
      across DDP ranks (the sampler's padding counts a few samples twice there), and kept in the
      `class_means` buffer, so checkpoints carry them and a resumed run does not recompute them
      (`set_class_means` takes precomputed ones instead);
    - the projector when the widths differ: the official `EmbTrans`, BatchNorm1d → Dropout(0.5) →
      Linear (zero bias), sized by the dry run, trained and checkpointed with the student; the
      student's classifier still reads its own, unprojected embedding. Equal widths: none.

    Confirmed against the official code: the formula, the batch mean, the class means' source, the
    projector, τ = 4, warm-up 20 epochs on KD, and the CIFAR-100 weights in `train_cifar.sh`
    (CE 1 + KD·λ_kd + ND·λ_nd): ResNet56 → ResNet20 λ_kd = 1, λ_nd = 2; ResNet32x4 → ResNet8x4
    λ_kd = 3.5, λ_nd = 2; WRN-40-2 → WRN-40-1 λ_kd = 1, λ_nd = 1.5. Decided here: soft (B, C)
    targets are read through their argmax (the official code has only class indices).

    When to use: on top of a logit distiller (KD, DKD) with a teacher whose penultimate embedding
    can be tapped. Reported: state of the art on CIFAR-100, ImageNet and COCO when added to KD/DKD/
    ReviewKD (abstract; not reproduced here). Needs class-index targets and one pass of the
    teacher over the training data before the first step.

    Args:
        student_feature: student tap path of its embedding (default "fc:input").
        teacher_feature: teacher tap path of its embedding (default "fc:input").
        dropout: dropout of the projector built when the widths differ (official: 0.5).
    """

    needs_teacher = True
    needs_target = True

    def __init__(
        self, student_feature: str = "fc:input", teacher_feature: str = "fc:input", dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.student_feature = check_path(student_feature, "student_feature", "nd")
        self.teacher_feature = check_path(teacher_feature, "teacher_feature", "nd")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"nd: dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        self.student_features = (self.student_feature,)
        self.teacher_features = (self.teacher_feature,)
        self.projector = HeadSet()
        self.num_classes: int | None = None
        self.register_buffer("class_means", torch.zeros(0))

    # -- set-up -----------------------------------------------------------------------------
    def _embeddings(self, step: Step) -> tuple[Tensor, Tensor]:
        """(student, teacher) pooled (B, D_s), (B, D_t) embeddings of a step, before projection."""
        if step.teacher is None:
            raise ValueError("nd needs a teacher: use it in a DistillationModule")
        s = feature_at(step.student.features, self.student_feature, "student", "nd")
        t = feature_at(step.teacher.features, self.teacher_feature, "teacher", "nd")
        for side, path, f in (("student", self.student_feature, s), ("teacher", self.teacher_feature, t)):
            if f.dim() not in (2, 3, 4) or f.shape[0] != step.student.logits.shape[0]:
                raise ValueError(
                    f"nd: the {side} feature {path!r} has shape {tuple(f.shape)}; nd needs one embedding per sample, "
                    "such as the classifier's input 'fc:input'"
                )
        return pool_feature(s), pool_feature(t)

    def setup(self, example: Step) -> None:
        s, t = self._embeddings(example)
        self.num_classes = example.student.logits.shape[-1]
        if s.shape[-1] != t.shape[-1]:
            self.projector.ensure("embedding", s, t.shape[-1], "bn_linear", dropout=self.dropout)
        if self.class_means.numel() and tuple(self.class_means.shape) != (self.num_classes, t.shape[-1]):
            raise ValueError(
                f"nd: the class means have shape {tuple(self.class_means.shape)} but this teacher gives "
                f"{self.num_classes} classes × {t.shape[-1]} features"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # the means are sized once known (at fit start): take the checkpoint's size before loading
        key = prefix + "class_means"
        if key in state_dict and state_dict[key].shape != self.class_means.shape:
            self.class_means = torch.zeros_like(state_dict[key], device=self.class_means.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- class means --------------------------------------------------------------------------
    @property
    def has_class_means(self) -> bool:
        return self.class_means.numel() > 0

    def set_class_means(self, means: Tensor) -> None:
        """Use precomputed (C, D_teacher) class means (e.g. the official JSON files)."""
        if means.dim() != 2:
            raise ValueError(f"nd: class means must be (C, D), got shape {tuple(means.shape)}")
        self.class_means = means.detach().float().to(self.class_means.device)

    @torch.no_grad()
    def compute_class_means(
        self,
        teacher: Callable[[Any], ModelOutput],
        batches: Iterable[Any],
        num_classes: int,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Mean teacher embedding of every class over `batches` (anything `as_batch` reads), summed
        across DDP ranks; stored in the `class_means` buffer and returned."""
        sums: Tensor | None = None
        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        for raw in batches:
            b = as_batch(raw)
            if b.target is None:
                raise ValueError("nd: the training batches have no targets, which the class means need")
            out = teacher(to_device_input(b.input, torch.device(device)))
            t = pool_feature(feature_at(out.features, self.teacher_feature, "teacher", "nd")).double()
            y = class_indices(b.target).to(device)
            if sums is None:
                sums = torch.zeros(num_classes, t.shape[-1], dtype=torch.float64, device=device)
            sums.index_add_(0, y, t)
            counts += torch.bincount(y, minlength=num_classes).double()
        if sums is None:
            raise ValueError(
                "nd: the training data gave no batches to compute the teacher's class means from"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)  # every rank saw its shard: the global means, identical on all ranks
            dist.all_reduce(counts)
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            warnings.warn(
                f"nd: no training samples of classes {missing[:10]}{'...' if len(missing) > 10 else ''}; their class "
                "mean is zero and their samples get a constant ND loss of 1 (no gradient)",
                stacklevel=2,
            )
        self.set_class_means((sums / counts.clamp_min(1).unsqueeze(-1)).float())
        return self.class_means

    def on_train_start(self, module: Any) -> None:
        """One teacher pass over the training data, unless the means are known (a resumed run)."""
        if self.has_class_means:
            return
        teacher = getattr(module, "teacher", None)
        if teacher is None:
            raise ValueError(
                "nd computes the teacher's class means at fit start from module.teacher: use a DistillationModule, "
                "or call set_class_means / compute_class_means before fitting"
            )
        trainer = module.trainer
        dm = getattr(trainer, "datamodule", None)
        loader = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        if loader is None:
            raise ValueError("nd: no training dataloader to compute the teacher's class means from")
        num_classes = self.num_classes or module.num_classes
        states = rng_states()  # the pass must not shift the run's random stream
        try:
            self.compute_class_means(teacher, loader, num_classes, module.device)
        finally:
            set_rng_states(states)

    # -- loss ---------------------------------------------------------------------------------
    def project(self, student_embedding: Tensor) -> Tensor:
        """The student's embedding in the teacher's width (identity when the widths match)."""
        return (
            self.projector["embedding"](student_embedding)
            if "embedding" in self.projector
            else student_embedding
        )

    def forward(self, step: Step) -> Tensor:
        if not self.has_class_means:
            raise RuntimeError(
                "nd: the teacher's class means are not computed yet: they are computed in on_train_start (a "
                "Trainer fit of a DistillationModule); outside one call compute_class_means or set_class_means"
            )
        s, t = self._embeddings(step)
        s = self.project(s)
        if s.shape[-1] != t.shape[-1]:
            raise RuntimeError("nd's projector is not built yet: the module's dry run (prepare) did not run")
        return nd_loss(s, t, self.class_means, class_indices(step.target), reduction="none")

    def extra_repr(self) -> str:
        return (
            f"student_feature={self.student_feature!r}, teacher_feature={self.teacher_feature!r}, "
            f"class_means={tuple(self.class_means.shape)}"
        )
