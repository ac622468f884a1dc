"""FitNets hint loss (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin
Deep Nets", ICLR 2015).

The paper's hint-based training objective (eq. 3) is

    L_HT(W_Guided, W_r) = ½ · ‖u_h(x; W_Hint) − r(v_g(x; W_Guided); W_r)‖²

with u_h the teacher up to its hint layer, v_g the student up to its guided layer and r a learned
regressor. Here the per-sample form is the *mean* squared error over the feature's C·H·W elements
(as mdistiller and CRD/RepDistiller, which use `F.mse_loss`), so that `reduction="mean"` equals
`F.mse_loss(student_feature, teacher_feature)` and the published weight (λ = 100 on CIFAR-100)
carries over. The paper's constant is recovered by the weight: ½·‖·‖² = (C·H·W / 2) · hint_loss.
The regressor is not part of this function: pass the student feature after it.
"""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import check_reduction, reduce


def hint_loss(student_feature: Tensor, teacher_feature: Tensor, reduction: str = "mean") -> Tensor:
    """Per-sample mean of (s − t)² over every non-batch dimension, then reduced over the batch.

    Args:
        student_feature: the (regressed) student feature, (B, ...) with the teacher's shape.
        teacher_feature: the teacher's hint, (B, ...).
        reduction: "mean" (equals `F.mse_loss`), "sum" or "none" for the (B,) per-sample values.

    Computed in float32 (finite in bf16 inputs and for activations of 1e4 and more).
    """
    check_reduction(reduction)
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"hint loss needs equal shapes, got student {tuple(student_feature.shape)} and teacher "
            f"{tuple(teacher_feature.shape)}: pass the student feature through a regressor (Projector) first"
        )
    if student_feature.dim() < 1 or student_feature.shape[0] == 0:
        raise ValueError(
            f"hint loss needs a (B, ...) batch of features, got shape {tuple(student_feature.shape)}"
        )
    diff = student_feature.float() - teacher_feature.float()
    per_sample = diff.pow(2).reshape(diff.shape[0], -1).mean(1)
    return reduce(per_sample, reduction)
