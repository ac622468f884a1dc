"""Spectral statistics of layer-wise gradient matrices (SVD).

Li, Li, Li, Zhou, "How Instruction and Reasoning Data shape Post-Training: Data Quality through
the Lens of Layer-wise Gradients", arXiv:2504.10766 (2025). For a layer's weight gradient
G ∈ R^{m×n} with singular values σ_1 ≥ … ≥ σ_r ≥ 0:

    nuclear norm      ‖G‖_* = Σ_i σ_i
    effective rank    erank(G) = exp(−Σ_i p_i log p_i),  p_i = σ_i / Σ_j σ_j  (Roy & Vetterli 2007)

(higher-quality data: lower nuclear norm, higher effective rank). Also reported, as standard
companions: the spectral norm σ_1, the Frobenius norm ‖G‖_F = √Σσ_i², the stable rank
‖G‖_F² / σ_1², the top singular values σ_1..σ_k, the ratios σ_i / σ_1 (i = 2..k) and the top
share σ_1 / Σσ_i.

CONFIRMED: the paper's two metrics are named and defined as above in its abstract and project
README (MingLiiii/Gradient_Unified: "nuclear norm" and "effective rank (entropy)"); its
predecessor's code (MingLiiii/Layer_Gradient `code_gradient/get_gradient_values.py`) takes
`torch.linalg.svd(param.grad)` of every ≥2-D parameter gradient and records the sum, max and min
of the singular values (S_sum = nuclear norm, S_max = spectral norm) and the Frobenius norm.
Decided here: a convolution's gradient (out, in, kh, kw) is read as the matrix
(out, in·kh·kw) (the 1-D bias gradients have no spectrum and are skipped); singular values are
computed in float32 (float64 inputs stay float64); the zero matrix has every statistic 0
(its entropy is undefined). Statistics are not differentiable through repeated singular values
and are meant for monitoring.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def as_matrix(grad: Tensor) -> Tensor:
    """A gradient as a matrix: (out, in) stays, (out, in, *k) becomes (out, in·∏k)."""
    if grad.dim() < 2:
        raise ValueError(f"a gradient spectrum needs a matrix (>= 2 dims), got shape {tuple(grad.shape)}")
    m = grad.reshape(grad.shape[0], -1)
    return m if m.dtype == torch.float64 else m.float()


def effective_rank(singular_values: Tensor) -> Tensor:
    """exp of the Shannon entropy of σ / Σσ (zeros contribute nothing); 0 for an all-zero input."""
    s = singular_values.clamp_min(0)
    total = s.sum()
    if total <= 0:
        return total.new_zeros(())
    p = s / total
    entropy = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum()
    return entropy.exp()


def stable_rank(singular_values: Tensor) -> Tensor:
    """‖G‖_F² / ‖G‖_2² = Σσ² / σ_max²; 0 for an all-zero input."""
    top = singular_values.max()
    if top <= 0:
        return top.new_zeros(())
    return singular_values.pow(2).sum() / top.pow(2)


def spectrum_stats(matrix: Tensor, top_k: int = 3) -> dict[str, Tensor]:
    """Spectral statistics of one gradient (a matrix, or a conv kernel read as one).

    Keys: `sigma_1`..`sigma_k` (padded with 0 past the rank's size), `ratio_2`..`ratio_k`
    (σ_i / σ_1), `top_share` (σ_1 / Σσ), `nuclear_norm`, `spectral_norm`, `frobenius_norm`,
    `effective_rank`, `stable_rank`.
    """
    if int(top_k) != top_k or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    s = torch.linalg.svdvals(as_matrix(matrix.detach()))
    top = s.new_zeros(int(top_k))
    top[: min(len(s), int(top_k))] = s[: int(top_k)]
    nuclear = s.sum()
    spectral = s.max() if len(s) else s.new_zeros(())
    out: dict[str, Tensor] = {f"sigma_{i + 1}": top[i] for i in range(int(top_k))}
    for i in range(1, int(top_k)):
        out[f"ratio_{i + 1}"] = top[i] / spectral if spectral > 0 else s.new_zeros(())
    out["top_share"] = spectral / nuclear if nuclear > 0 else s.new_zeros(())
    out["nuclear_norm"] = nuclear
    out["spectral_norm"] = spectral
    out["frobenius_norm"] = s.pow(2).sum().sqrt()
    out["effective_rank"] = effective_rank(s)
    out["stable_rank"] = stable_rank(s)
    return out


def gradient_spectrum(grads: Mapping[str, Tensor], top_k: int = 3) -> dict[str, dict[str, Tensor]]:
    """`spectrum_stats` of every gradient with >= 2 dims in {name: gradient}; others skipped."""
    return {name: spectrum_stats(g, top_k) for name, g in grads.items() if g is not None and g.dim() >= 2}


__all__ = ["as_matrix", "effective_rank", "gradient_spectrum", "spectrum_stats", "stable_rank"]
