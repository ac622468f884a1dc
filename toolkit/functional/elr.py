"""Early-Learning Regularization (Liu, Niles-Weed, Razavian, Fernandez-Granda, "Early-Learning
Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020, arXiv 2007.00151).

Every training sample i keeps a target t_i ∈ Δ^C, a temporal ensemble of the model's own
predictions (t_i = 0 before the first visit). On each visit, with p_i = clamp(softmax(z_i), ε, 1 − ε):

    t_i ← β·t_i + (1 − β)·p̄_i / Σ_c p̄_ic          (p̄_i = p_i without gradient)
    L = CE(z, y) + λ·(1/B)·Σ_i log(1 − ⟨t_i, p_i⟩)

The regulariser is ≤ 0 and decreasing in ⟨t_i, p_i⟩: it pulls the prediction towards the
early-learning target, which resists memorising noisy labels. Its gradient w.r.t. the logits
(t fixed, clamp inactive) is ∂/∂z_c log(1 − ⟨t, p⟩) = −p_c·(t_c − ⟨t, p⟩)/(1 − ⟨t, p⟩).

Confirmed from the official code (github.com/shengliu66/ELR, `ELR/model/loss.py` `elr_loss`,
`config_cifar10.json`, `config_cifar100.json`): the clamp ε = 1e-4, the update *before* the
regulariser is computed (the new target is used in the same step), the mean over the batch, and
the defaults β = 0.7, λ = 3 (CIFAR-10) and β = 0.9, λ = 7 (CIFAR-100).
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.functional._reduce import check_class_logits, reduce
from toolkit.functional.cross_entropy import cross_entropy


def check_elr(beta: float, lam: float, clamp: float) -> None:
    if not 0 <= beta < 1:
        raise ValueError(
            f"beta (the target EMA momentum) must be in [0, 1), got {beta}; the paper uses 0.7 or 0.9"
        )
    if not lam >= 0:
        raise ValueError(f"lam (λ) must be >= 0, got {lam}; the paper uses 3 (CIFAR-10) or 7 (CIFAR-100)")
    if not 0 < clamp < 0.5:
        raise ValueError(f"clamp must be in (0, 0.5), got {clamp}; the official code uses 1e-4")


def elr_probs(logits: Tensor, clamp: float = 1e-4) -> Tensor:
    """clamp(softmax(z), ε, 1 − ε) in float32."""
    return logits.float().softmax(-1).clamp(clamp, 1 - clamp)


@torch.no_grad()
def elr_update_target(target: Tensor, logits: Tensor, beta: float = 0.7, clamp: float = 1e-4) -> Tensor:
    """The new targets β·t + (1 − β)·p̄/Σp̄ for (B, C) targets and logits (no gradient; float32)."""
    if target.shape != logits.shape:
        raise ValueError(
            f"targets {tuple(target.shape)} and logits {tuple(logits.shape)} must both be (B, C)"
        )
    p = elr_probs(logits.detach(), clamp)
    return beta * target.float() + (1 - beta) * p / p.sum(-1, keepdim=True)


def elr_regularizer(logits: Tensor, target: Tensor, clamp: float = 1e-4, reduction: str = "mean") -> Tensor:
    """log(1 − ⟨t, clamp(softmax(z))⟩) per sample (≤ 0), reduced; gradient flows into the logits only."""
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} must both be (B, C)"
        )
    inner = (target.detach().float() * elr_probs(logits, clamp)).sum(-1)
    return reduce(torch.log1p(-inner), reduction)


def elr_loss(
    logits: Tensor,
    labels: Tensor,
    target: Tensor,
    lam: float = 3.0,
    clamp: float = 1e-4,
    reduction: str = "mean",
) -> Tensor:
    """CE(z, y) + λ·log(1 − ⟨t, p⟩) for already-updated targets t (the official loss with mean reduction)."""
    check_class_logits(logits, labels, "elr")
    ce = cross_entropy(logits, labels, reduction="none")
    return reduce(ce.float() + lam * elr_regularizer(logits, target, clamp, "none"), reduction)
