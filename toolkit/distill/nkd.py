"""Normalized Knowledge Distillation as a loss term; maths in `toolkit.functional.nkd`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import check_nonnegative, check_temperature
from toolkit.functional.nkd import nkd_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("distiller", "nkd")
class NKDLoss(LossTerm):
    """NKD: −T_y·log S_y − γ·λ²·Σ_{i≠y} T̂_i·log Ŝ_i, per sample.

    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
    with Normalized Loss and Customized Soft Labels" (ICCV 2023); follows the official
    yzd-v/cls_KD `mmcls/models/dis_losses/nkd.py` with the fixed non-target mask. T_y, S_y are the
    teacher's and student's (unsoftened) probabilities of the true class, T̂ = softmax(t_{¬y}/λ)
    and Ŝ = softmax(s_{¬y}/λ) the non-target distributions, each renormalised to sum to 1 (the
    "normalised" of the name); see `toolkit.functional.nkd`.

    CE: the official distiller keeps the student's own classification loss at weight 1 and adds
    NKD unweighted, so a run is `{"ce": {"loss": "cross_entropy", "weight": 1.0},
    "nkd": {"distiller": "nkd", "weight": 1.0}}` (no warm-up, no mixing weight).

    When to use: a logit distiller with KD's cost; the paper reports ResNet-34 → ResNet-18 on
    ImageNet 69.90 → 71.96 top-1 (official README) and gains on CIFAR-100. The non-target term is
    a cross-entropy, so its value does not reach 0 at a perfect match (its gradient does).
    Needs class-index (or soft, argmax-taken) targets and a teacher predicting the same classes.

    Args:
        temperature: λ > 0 of the non-target softmaxes only (ImageNet config: 1; the repository's
            CIFAR-100 config: 3).
        gamma: γ ≥ 0, weight of the non-target term (ImageNet config: 1.5; CIFAR-100 config: 3.5).
    """

    needs_teacher = True
    needs_target = True

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5) -> None:
        super().__init__()
        check_temperature(temperature)
        check_nonnegative("gamma", gamma)
        self.temperature = float(temperature)
        self.gamma = float(gamma)

    def forward(self, step: Step) -> Tensor:
        return nkd_loss(
            step.student.logits,
            step.teacher.logits,
            step.target,
            self.temperature,
            self.gamma,
            reduction="none",
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}"
