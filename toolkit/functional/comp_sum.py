"""Comp-sum losses: cross-entropy, generalised cross-entropy and MAE as one family of τ.

Mao, Mohri & Zhong, "Cross-Entropy Loss Functions: Theoretical Analysis and Applications"
(ICML 2023, arXiv 2304.07288). For scores h (B, C) and a label y,

    u = Σ_{y' ≠ y} exp(h_{y'} − h_y) = 1/p_y − 1,        p = softmax(h)
    ℓ^τ = Φ^τ(u),   Φ^τ(u) = log(1 + u)                          τ = 1
                            = ((1 + u)^{1−τ} − 1) / (1 − τ)       τ ≥ 0, τ ≠ 1

which gives, by τ:
    τ = 0        sum-exponential loss  u = Σ_{y'≠y} exp(h_{y'} − h_y);
    τ = 1        logistic loss = cross-entropy −log p_y;
    τ ∈ (1, 2)   generalised cross-entropy (Zhang & Sabuncu, 2018) (1 − p_y^q)/q with q = τ − 1;
    τ = 2        1 − p_y = ½·‖onehot(y) − p‖₁ (the mean absolute error, up to the factor ½).
Φ^τ is continuous in τ (the τ → 1 limit is log(1 + u)), bounded by 1/(τ − 1) for τ > 1.

Computed from ℓ = −log p_y = logsumexp(h) − h_y ≥ 0 (float32 log-softmax): 1 + u = exp(ℓ), so
Φ^τ = expm1((1 − τ)·ℓ)/(1 − τ), accurate near τ = 1 and for p_y → 1.

Sources. The family, its special cases and the τ ≥ 0 range were checked numerically (the
τ = 1, 2 and GCE identities above and the continuity at τ = 1, in the tests); only the paper's
abstract was readable here, which confirms the family includes cross-entropy, generalised
cross-entropy and MAE but not this notation, so the parametrisation Φ^τ is the one recalled in
`methods-1.md` (#59) and marked there as inferred. Not implemented: the paper's smooth adversarial
comp-sum losses (they need an inner attack loop).

Decided here (the paper is silent, being a theory paper):
- overflow guard for τ < 1: the exact loss grows like exp((1 − τ)·ℓ) and leaves the float range
  once (1 − τ)·ℓ > ~88 (p_y < e^{−88} for the sum-exponential loss). Above (1 − τ)·ℓ = 40
  (`EXP_CAP`), Φ^τ is continued linearly in ℓ with the slope it has there (value and gradient
  continuous), so logits of ±1e4 give a finite loss and gradient. The loss is exact below the cap;
  τ ≥ 1 never reaches it;
- class-index targets only (the family is defined for a single label).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_class_logits, check_reduction, reduce

EXP_CAP = 40.0


def check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(
            f"tau must be a finite number >= 0, got {tau!r}; tau = 1 is cross-entropy, 1.7 GCE (q = 0.7), 2 MAE"
        )


def comp_sum_phi(ce: Tensor, tau: float) -> Tensor:
    """Φ^τ(u) written in ℓ = −log p_y = log(1 + u): exp((1 − τ)ℓ) − 1 over 1 − τ (ℓ at τ = 1),
    continued linearly beyond (1 − τ)·ℓ = `EXP_CAP`."""
    check_tau(tau)
    if tau == 1:
        return ce
    a = (1.0 - tau) * ce
    a_cap = a.clamp(max=EXP_CAP)
    # below the cap the second term is 0 (value and gradient); above, the tangent at the cap
    return (a_cap.expm1() + a_cap.exp() * (a - a_cap)) / (1.0 - tau)


def comp_sum_loss(logits: Tensor, target: Tensor, tau: float = 1.0, reduction: str = "mean") -> Tensor:
    """Comp-sum loss ℓ^τ of `logits` (B, C) against class indices (B,); (B,) with "none".

    τ = 1 is `F.cross_entropy`, τ = 2 is 1 − p_y, τ = 1 + q is GCE with exponent q, τ = 0 the
    sum-exponential loss. Computed in float32.
    """
    check_reduction(reduction)
    check_tau(tau)
    check_class_logits(logits, target, "comp_sum")
    logp = F.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return reduce(comp_sum_phi(ce, tau), reduction)
