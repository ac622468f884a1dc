"""Comp-sum losses (CE, GCE, MAE by one parameter τ) as a loss term; maths in
`toolkit.functional.comp_sum`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional.comp_sum import check_tau, comp_sum_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "comp_sum")
class CompSumLoss(LossTerm):
    """Comp-sum loss ℓ^τ = Φ^τ(Σ_{y'≠y} exp(h_{y'} − h_y)), per sample.

    Mao, Mohri & Zhong, "Cross-Entropy Loss Functions: Theoretical Analysis and Applications"
    (ICML 2023, arXiv 2304.07288). Φ^τ(u) = log(1 + u) at τ = 1 and ((1 + u)^{1−τ} − 1)/(1 − τ)
    otherwise; in p_y = softmax(h)_y: τ = 0 the sum-exponential loss 1/p_y − 1, τ = 1
    cross-entropy −log p_y, τ ∈ (1, 2) generalised cross-entropy (1 − p_y^q)/q with q = τ − 1,
    τ = 2 the MAE-like 1 − p_y. The paper proves H-consistency bounds for the whole family.

    When to use: a single knob between cross-entropy (τ = 1: fastest fitting, unbounded loss) and
    bounded, noise-robust losses (τ > 1: GCE/MAE, which cap the influence of mislabelled samples
    at the price of slower fitting; MAE alone often underfits). τ < 1 weighs hard samples more
    than CE does. Expected effect on clean data: τ near 1 matches CE; on noisy labels τ ≈ 1.5–1.7
    (GCE's q = 0.5–0.7) is the usual robust choice.

    Args:
        tau: τ ≥ 0 (default 1, cross-entropy). The paper's experiments compare several values of
            τ; the exact grid is not confirmed here.
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        check_tau(tau)
        self.tau = float(tau)

    def forward(self, step: Step) -> Tensor:
        return comp_sum_loss(step.student.logits, step.target, self.tau, reduction="none")

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
