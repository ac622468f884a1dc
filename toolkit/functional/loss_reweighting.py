"""Loss-based sample weights (Sow, Woisetschläger, Bulusu, Wang, Jacobsen, Liang, "Dynamic Loss-Based
Sample Reweighting for Improved Large Language Model Pretraining", ICLR 2025, arXiv 2502.06733).

For the per-sample losses ℓ of one (global) batch, with δ > 0 and a temperature r > 0:

    ℓ̃ = (2δ·ℓ − δ·(ℓ_max + ℓ_min)) / max(ℓ_max − ℓ_min, 1e-6)        (ℓ̃ ∈ [−δ, δ])
    f = min(ℓ̃ + δ, δ)   (linupper)     1 − ℓ̃²/δ²   (quadratic)
        |ℓ̃|              (extremes)     ℓ̃            (uniform: the code's identity strategy)
    w = softmax((f − max f) / r)                                         (Σ w = 1)

LinUpper (the paper's recommendation) down-weights low-loss (redundant, already learnt) samples
and gives every sample above the batch mid-range (ℓ_max + ℓ_min)/2 the same, capped weight.
r → ∞ gives uniform weights 1/N (the plain mean); small r concentrates the weight.

Confirmed from the official code (github.com/sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025:
README "core code pieces" and `src/trainer.py`): the normalisation, the four strategies (the
trainer calls quadratic "mid"), the softmax with the max subtracted, the 1e-6 floor, δ = 1, the
weights computed without gradient over the losses gathered from every GPU, and the loss
`world_size · Σ_local w_i ℓ_i`. The README's "uniform" strategy is the identity f = ℓ̃, which still
reweights unless r is large: the paper's uniform *baseline* is the plain mean (no weighting).
"""

from __future__ import annotations

import torch
from torch import Tensor

STRATEGIES = ("linupper", "quadratic", "extremes", "uniform")


def check_loss_reweighting(strategy: str, r: float, delta: float) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not r > 0:
        raise ValueError(f"r (the softmax temperature) must be > 0, got {r}; the paper uses r in [0.4, 1]")
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}; the paper uses delta=1")


def normalize_losses(losses: Tensor, delta: float = 1.0) -> Tensor:
    """ℓ̃: the losses mapped linearly onto [−δ, δ] (min → −δ, max → δ; all equal → 0)."""
    lo, hi = losses.min(), losses.max()
    span = torch.clamp(hi - lo, min=1e-6)
    return (2 * delta * losses - delta * (hi + lo)) / span


def reweighting_strategy(normalized: Tensor, strategy: str = "linupper", delta: float = 1.0) -> Tensor:
    """f(ℓ̃) of one strategy (see the module docstring)."""
    if strategy == "linupper":
        return torch.clamp(normalized + delta, max=delta)
    if strategy == "quadratic":
        return 1 - normalized**2 / delta**2
    if strategy == "extremes":
        return normalized.abs()
    if strategy == "uniform":
        return normalized
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


@torch.no_grad()
def loss_reweighting_weights(
    losses: Tensor, strategy: str = "linupper", r: float = 1.0, delta: float = 1.0
) -> Tensor:
    """(N,) weights summing to 1 for the (N,) per-sample losses of a batch (no gradient; float32)."""
    check_loss_reweighting(strategy, r, delta)
    if losses.dim() != 1 or not losses.numel():
        raise ValueError(f"losses must be a non-empty (N,) tensor, got shape {tuple(losses.shape)}")
    x = losses.detach().double()
    if x.device.type == "cpu" and not torch.isfinite(x).all():  # CPU only: no device sync per step
        raise ValueError(
            "non-finite per-sample losses: the weights would be undefined (the training diverged)"
        )
    f = reweighting_strategy(normalize_losses(x, delta), strategy, delta)
    return torch.softmax((f - f.max()) / r, dim=0).float()
