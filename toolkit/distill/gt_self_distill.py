"""Self-distillation with ground-truth mixing as a loss term; maths in
`toolkit.functional.gt_self_distill`, generations as recipe stages (`recipes/stages.py`)."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import check_nonnegative
from toolkit.functional.gt_self_distill import check_alpha, gt_self_distill_loss, parameter_norm_penalty
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("distiller", "gt_self_distill")
class GTSelfDistillLoss(LossTerm):
    """(α/C)·‖p − y‖² + ((1 − α)/C)·‖p − q‖² + reg·Σ_θ‖θ‖₂, per sample.

    Borup & Andersen, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization
    Imposed by Self-Distillation" (NeurIPS 2021), following the official Kennethborup/
    self_distillation `self_distiller.py`: p = softmax of the network being trained, q = softmax
    of its teacher, the *previous generation* of the same architecture (frozen), y the one-hot
    label. Generation 0 has no teacher (α = 1: the squared error to the labels alone). The
    generations are recipe stages: `recipes/configs/distill/gt_self_distill.yaml` trains
    generation 0 from the labels, then generations 1..4 each from the one before, each from
    scratch (`python -m recipes.distill --method gt_self_distill`; re-running skips finished
    generations and resumes an interrupted one).

    The regulariser (the sum of the unsquared L2 norms of the trained network's parameter
    tensors, `step.module.model`) is a batch constant; it is added to every sample's value, so
    the batch mean is the official loss (under a sample weighter it is weighted like the rest).
    Set reg_coef=0 to regularise through the optimiser's weight decay instead.

    When to use: several rounds of self-distillation (no larger teacher), where the paper's
    analysis says that mixing the labels back in (α > 0) keeps each round from over-regularising:
    with α = 0 repeated rounds shrink the solution towards zero, with α > 0 they converge to the
    original problem with the regularisation amplified to λ/α. Expected effect: small gains over
    generation 0 for moderate α (the paper sweeps α; the README's example uses α = 0.6) and
    stable accuracy over generations, against a decline for α = 0.

    Args:
        alpha: weight in [0, 1] of the ground truth (official CLI default 1.0 = no distillation;
            README example 0.6). With α = 1 the term needs no teacher.
        reg_coef: coefficient ≥ 0 of Σ_θ‖θ‖₂ (official default 1e-4).
    """

    needs_target = True

    def __init__(self, alpha: float = 0.6, reg_coef: float = 1e-4) -> None:
        super().__init__()
        check_alpha(alpha)
        check_nonnegative("reg_coef", reg_coef)
        self.alpha = float(alpha)
        self.reg_coef = float(reg_coef)
        self.needs_teacher = self.alpha < 1.0  # generation 0 runs without a teacher

    def forward(self, step: Step) -> Tensor:
        teacher = step.teacher.logits if (self.needs_teacher and step.teacher is not None) else None
        loss = gt_self_distill_loss(step.student.logits, step.target, teacher, self.alpha, reduction="none")
        if self.reg_coef > 0 and step.module is not None:
            loss = loss + self.reg_coef * parameter_norm_penalty(step.module.model.parameters()).to(
                loss.device
            )
        return loss

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reg_coef={self.reg_coef}"
