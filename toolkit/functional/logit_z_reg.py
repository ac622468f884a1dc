"""The log²Z ("z-loss") regulariser of the output softmax, an add-on to cross-entropy.

Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways" (JMLR 2023, arXiv 2204.02311),
section 5 (training set-up, loss function): an auxiliary loss z_loss = 10⁻⁴·log²Z "to encourage
the softmax normalizer log(Z) to be close to 0, which we found increases the stability of
training", with Z = Σ_v exp(z_v) the partition function of the output logits. Per row (a token,
or a sample for a classifier):

    R(z) = (log Σ_v exp z_v)² = lse(z)²,     ∂R/∂z_v = 2·lse(z)·softmax(z)_v

Cross-entropy is invariant to adding a constant to every logit; R is not, and pulls the logits'
log-partition to 0 (so log softmax ≈ the logits themselves). It is *not* the spherical "Z-loss"
of de Brébisson & Vincent (`spherical_z`).

Confirmed: the coefficient 1e-4 (PaLM; also OLMo 2) and the definition log²Z from the paper's
text as quoted by secondary sources (the paper's own page was not readable here); the masking of
ignored tokens from apple/ml-cross-entropy's `compute_z_loss` (squares of the log-sum-exp at the
non-ignored positions). The coefficient is the term's weight (the function returns lse², not
1e-4·lse²). Computed in float32 from `torch.logsumexp`, so it is finite for logits of 1e4 and in
bf16. For logits that are never materialised, use `linear_cross_entropy(..., z_loss=1e-4)`,
which adds the same term inside its chunked pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.functional._reduce import check_reduction


def logit_z_reg(
    logits: Tensor,
    target: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """lse(z)² of every row of `logits` (..., V).

    With `target` (...), rows whose target is `ignore_index` give 0 and are left out of the mean
    (as in cross-entropy). `reduction="none"` returns the (...) per-row values.
    """
    check_reduction(reduction)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")
    per_row = torch.logsumexp(logits.float(), dim=-1).square()
    if target is None:
        valid = None
    else:
        if tuple(target.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"target must have the logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(target.shape)}"
            )
        valid = target != ignore_index
        per_row = torch.where(valid, per_row, 0.0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if valid is None:
        return per_row.mean()
    return per_row.sum() / valid.sum().clamp_min(1)


__all__ = ["logit_z_reg"]
