"""σReparam and attention entropy (Zhai, Likhomanenko, Littwin, Busbridge, Ramapuram, Zhang, Gu &
Susskind, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse", ICML 2023,
arXiv 2303.06296).

Every linear weight W is reparameterised as

    Ŵ = (γ / σ(W)) · W

with γ a learnable scalar and σ(W) the spectral norm of W, estimated by power iteration: from the
stored right vector u, one step per training forward pass

    v ← normalize(W u),   u ← normalize(Wᵀ v),   σ = vᵀ W u

(u, v without gradient; the gradient flows through W in σ). The paper monitors the attention
entropy of each head, Ent(A) = −(1/T) Σ_i Σ_j A_ij log A_ij, and shows that its collapse (low
entropy) goes with unstable training; σReparam bounds it from below.

CONFIRMED from the official code (apple/ml-sigma-reparam `vision/layers.py`, `SpectralNormedWeight`
and `SNLinear`): u initialised with the top right singular vector from an SVD of the initial
weight; γ initialised to σ(W_init), so Ŵ = W at initialisation; one power step per forward in
training, u stored only in training (evaluation takes the same step from the stored u without
storing it); σ computed in float32 under mixed precision (their `FP32SpectralNormedWeight`);
convolutions use the (out, in·k·k) matrix of the kernel. The paper's own text on γ's
initialisation was not read here: the code's choice (γ = σ(W_init)) is followed.

Not implemented (decided): the official code's re-initialisation of every converted layer with
trunc_normal(std 0.02·gain) (it builds models from scratch; the toolkit keeps the existing weights
so the surgery preserves the function), its removal of normalisation layers, and its `stats_only`
mode (the callback logs σ and γ instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _matrix(weight: Tensor) -> Tensor:
    if weight.dim() < 2:
        raise ValueError(
            f"σReparam needs a weight matrix or kernel (≥ 2 dims), got shape {tuple(weight.shape)}"
        )
    return weight.flatten(1).float()


@torch.no_grad()
def spectral_init(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(σ, u, v) of W from an SVD: the top singular value, right and left singular vectors
    (W u = σ v). Convolution kernels are read as their (out, in·k·k) matrix."""
    w = _matrix(weight.detach())
    left, s, vh = torch.linalg.svd(w, full_matrices=False)
    return s[0].clone(), vh[0].clone(), left[:, 0].clone()


def power_iteration(weight: Tensor, u: Tensor, steps: int = 1, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """`steps` power-iteration steps from the right vector u: v = normalize(W u), u = normalize(Wᵀ v).
    Returns the new (u, v), without gradient."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with torch.no_grad():
        w = _matrix(weight.detach())
        if u.shape != (w.shape[1],):
            raise ValueError(f"u must have shape ({w.shape[1]},) for a weight of shape {tuple(weight.shape)}")
        u = u.float()
        for _ in range(steps):
            v = F.normalize(w @ u, dim=0, eps=eps)
            u = F.normalize(w.t() @ v, dim=0, eps=eps)
    return u, v


def spectral_norm_estimate(weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """σ = vᵀ W u in float32, differentiable with respect to W (dσ/dW = v uᵀ)."""
    return torch.einsum("c,cd,d->", v.float(), weight.flatten(1).float(), u.float())


def sigma_reparam_weight(
    weight: Tensor, gamma: Tensor, u: Tensor, steps: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ŵ = (γ/σ)·W after `steps` power steps from u. Returns (Ŵ, σ, new u, new v); Ŵ has W's dtype
    and shape and is differentiable with respect to W and γ."""
    u, v = power_iteration(weight, u, steps)
    sigma = spectral_norm_estimate(weight, u, v)
    scale = gamma.float() / sigma
    return (scale * weight.float()).to(weight.dtype), sigma, u, v


def attention_entropy(attn: Tensor) -> Tensor:
    """Ent(A) = −(1/T) Σ_i Σ_j A_ij log A_ij of attention maps A (..., T, S) whose rows are
    probabilities over the S keys: the mean over the T queries of each row's entropy (nats).
    Returns shape (...), e.g. (B, H) for (B, H, T, S) maps. 0·log 0 = 0 (masked keys)."""
    if attn.dim() < 2:
        raise ValueError(f"attention maps must be (..., T, S), got shape {tuple(attn.shape)}")
    a = attn.float()
    return -torch.special.xlogy(a, a).sum(-1).mean(-1)
