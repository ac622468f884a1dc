"""Cross-entropy with label smoothing and soft (probability) targets.

    CE(z, y) = -Σ_c q_c log softmax(z)_c,   q = (1 - ε)·y + ε/C

where y is one-hot for class-index targets or a probability vector for soft targets, and ε the
label smoothing. Computed in float32 from log_softmax, so it is stable for logits of magnitude 1e4
and in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, reduce


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of `logits` (B, C) against class indices (B,) or probabilities (B, C).

    With `reduction="none"` returns the (B,) per-sample losses (ignored samples give 0). With
    "mean", ignored samples are excluded from the mean, as in `F.cross_entropy`.
    """
    check_reduction(reduction)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logp = F.log_softmax(logits.float(), dim=-1)
    num_classes = logits.shape[-1]
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        q = target.float()
        if label_smoothing:
            q = (1 - label_smoothing) * q + label_smoothing / num_classes
        per_sample = -(q * logp).sum(-1)
        return reduce(per_sample, reduction)
    if not label_smoothing and logp.dim() == 2 and reduction != "mean":
        # One fused op, the same values and gradients as the masked gather below (ignored
        # samples give 0): the per-sample path every training step takes.
        return reduce(F.nll_loss(logp, target, ignore_index=ignore_index, reduction="none"), reduction)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    per_sample = nll * valid
    if reduction == "mean":
        return per_sample.sum() / valid.sum().clamp_min(1)
    return reduce(per_sample, reduction)
