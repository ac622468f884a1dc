"""FitNets hint loss as a loss term; maths in `toolkit.functional.fitnet`."""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch import Tensor

from toolkit.distill.projectors import ProjectorSet
from toolkit.functional.fitnet import hint_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


def feature_at(features: dict[str, Tensor], path: str, side: str, term: str) -> Tensor:
    """The tapped feature `path` of one side, or a clear error (e.g. an ensemble teacher, whose
    features are keyed "i:path")."""
    if path not in features:
        raise ValueError(
            f"{term}: the {side} has no tapped feature {path!r} (tapped: {sorted(features)}); "
            "feature distillers need a single teacher network, not an ensemble"
        )
    return features[path]


def check_path(value: object, name: str, term: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{term}: {name} must be a module path such as 'layer2', got {value!r}")
    return value


@register("distiller", "fitnet")
class FitNetLoss(LossTerm):
    """FitNets hint loss: mean over C·H·W of (r(F_s) − F_t)² per sample.

    Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015). F_s is the output of the
    student's guided layer (`student_layer`), F_t that of the teacher's hint layer
    (`teacher_layer`), r a learned regressor: a `Projector` (1×1 conv + BatchNorm on 4-D maps,
    pooled or resized to the teacher's H×W; a linear layer on (B, D) / (B, N, D) features), sized
    from the dry run in `setup` and saved with the student (rebuilt from checkpoints by its
    `ProjectorSet`), followed by a ReLU when `relu=True`.

    Single-stage variant: the paper trains in two stages (first the student up to the guided
    layer on the hint loss alone, then the whole student with KD). Like the modern benchmarks
    (CRD/RepDistiller, mdistiller, torchdistill's CIFAR configs) this term is meant to be added to
    cross-entropy in one stage, L = CE + λ·hint, with λ = 100 on CIFAR-100 (mdistiller). The
    two-stage schedule can be rebuilt with weight schedules or two recipe runs.

    Differences from the paper, and why:
    - the paper's constant is ½·‖·‖² summed over the C·H·W elements; here the per-sample *mean*
      (as `F.mse_loss` in mdistiller/CRD), so the published λ carries over; λ_paper-equivalent =
      2·λ/(C·H·W);
    - the paper's convolutional regressor has a k×k kernel sized so that the student map shrinks
      to the teacher's H×W, and mdistiller's `ConvReg` uses a stride-2 conv / transposed conv for
      2× size ratios; here a 1×1 conv followed by average pooling (student larger) or bilinear
      upsampling (smaller). With equal sizes (the CIFAR ResNet pairs) both are a 1×1 conv + BN(+ReLU)
      like `ConvReg`, except for the conv bias, which BatchNorm makes redundant;
    - the paper requires the regressor to end in the same non-linearity as the teacher's hint
      layer; `relu=True` (default, as `ConvReg`) fits hints taken after a ReLU (ResNet stage
      outputs, conv-BN-ReLU blocks). Set `relu=False` for hints that can be negative
      (pre-activation outputs, transformer tokens); the set-up warns when a ReLU regressor meets
      a teacher feature with negative values.

    When to use: a student and teacher with comparable spatial structure, where matching an
    intermediate representation helps optimisation (thin deep students). Reported effect on CIFAR-100
    ResNet32x4 → ResNet8x4: 73.50 vs 72.50 for the student alone (the DKD paper's table; not
    reproduced here).

    Args:
        student_layer: module path of the student's guided layer (e.g. "layer2").
        teacher_layer: module path of the teacher's hint layer (e.g. "layer2").
        relu: end the regressor with a ReLU (for non-negative hints).
    """

    needs_teacher = True
    needs_target = False

    def __init__(self, student_layer: str, teacher_layer: str, relu: bool = True) -> None:
        super().__init__()
        self.student_layer = check_path(student_layer, "student_layer", "fitnet")
        self.teacher_layer = check_path(teacher_layer, "teacher_layer", "fitnet")
        self.relu = bool(relu)
        self.student_features = (self.student_layer,)
        self.teacher_features = (self.teacher_layer,)
        self.projectors = ProjectorSet()

    def setup(self, example: Step) -> None:
        if example.teacher is None:
            raise ValueError("fitnet needs a teacher: use it in a DistillationModule")
        s = feature_at(example.student.features, self.student_layer, "student", "fitnet")
        t = feature_at(example.teacher.features, self.teacher_layer, "teacher", "fitnet")
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"fitnet: student batch {s.shape[0]} and teacher batch {t.shape[0]} differ")
        try:
            self.projectors.ensure("hint", s, t)
        except ValueError as err:
            raise ValueError(
                f"fitnet cannot regress student layer {self.student_layer!r} {tuple(s.shape)} onto teacher "
                f"layer {self.teacher_layer!r} {tuple(t.shape)}: {err}"
            ) from None
        if self.relu and bool((t < 0).any()):
            warnings.warn(
                f"fitnet: the teacher's hint {self.teacher_layer!r} has negative values but the regressor ends "
                "in a ReLU (relu=True), so the student cannot match them; tap a post-ReLU layer or set relu=False",
                stacklevel=2,
            )

    def regressed(self, student_feature: Tensor) -> Tensor:
        """r(F_s): the student feature through the regressor (and the ReLU)."""
        y = self.projectors["hint"](student_feature)
        return F.relu(y) if self.relu else y

    def forward(self, step: Step) -> Tensor:
        if "hint" not in self.projectors:
            raise RuntimeError(
                "fitnet's regressor is not built yet: the module's dry run (prepare) did not run"
            )
        s = feature_at(step.student.features, self.student_layer, "student", "fitnet")
        t = feature_at(step.teacher.features, self.teacher_layer, "teacher", "fitnet")
        return hint_loss(self.regressed(s), t, reduction="none")

    def extra_repr(self) -> str:
        return f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}, relu={self.relu}"
