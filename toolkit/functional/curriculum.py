"""Curriculum sample weights (MacAvaney, Nardini, Perego, Tonellotto, Goharian, Frieder, "Training
Curricula for Open Domain Answer Re-Ranking", SIGIR 2020, arXiv 2004.14269).

Each sample has an easiness D ∈ [0, 1] (1 = easiest), computed once before training. In epoch e
(0-based) its loss is weighted by

    W = (D + 1e-8)·(1 − e/m) + e/m     for e < m,        W = 1 for e ≥ m

so training starts on the easy samples (W = D) and reaches plain training at epoch m, the end of
the curriculum. With `anti`, D ← 1 − D (hard samples first).

Confirmed from the official code (OpenNIR `onir/trainers/pointwise_cl.py`, `pairwise_cl.py`):
the weight, the 1e-8 smoothing, `eoc_epoch` m = 20, the `anti` flag (1 − D before mixing). There
D comes from the initial BM25 ranking (reciprocal rank, normalised score or a KDE of the score);
the pointwise trainer multiplies the batch loss by the batch mean of W, the paper weights every
sample: we weight every sample. For classification we derive D from per-sample difficulty scores
(`difficulty_to_easiness`: high score = hard, as EL2N or a loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAPPINGS = ("rank", "minmax", "easiness")
SMOOTH = 1e-8


def check_curriculum(end_epoch: int) -> None:
    if isinstance(end_epoch, bool) or not isinstance(end_epoch, int) or end_epoch < 1:
        raise ValueError(
            f"end_epoch (m, the end of the curriculum) must be an integer >= 1, got {end_epoch!r}"
        )


def curriculum_weight(easiness: Tensor, epoch: int, end_epoch: int = 20, anti: bool = False) -> Tensor:
    """W for easiness D ∈ [0, 1] at epoch `epoch` (see the module docstring; float32)."""
    check_curriculum(end_epoch)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    d = torch.as_tensor(easiness).float()
    if d.device.type == "cpu" and d.numel() and (torch.isnan(d).any() or d.min() < 0 or d.max() > 1):
        raise ValueError("easiness D must be in [0, 1]")
    if epoch >= end_epoch:
        return torch.ones_like(d)
    if anti:
        d = 1 - d
    progress = epoch / end_epoch
    return (d + SMOOTH) * (1 - progress) + progress


def difficulty_to_easiness(scores: Tensor, mapping: str = "rank", higher_is_harder: bool = True) -> Tensor:
    """(N,) easiness D ∈ [0, 1] from (N,) per-sample difficulty scores.

    "rank": D = 1 − rank/(N − 1) with rank 0 for the easiest (ties share their average rank), so
    D is uniform on [0, 1] whatever the score's scale; "minmax": D = (s_max − s)/(s_max − s_min)
    (all equal → 1); "easiness": the scores are D already (checked to lie in [0, 1]).
    `higher_is_harder=False` for scores where high means easy (e.g. a confidence).
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    s = torch.as_tensor(scores).detach().double().flatten()
    if not s.numel():
        raise ValueError("no scores")
    if not torch.isfinite(s).all():
        raise ValueError("scores must be finite (a NaN means a sample was never scored)")
    if mapping == "easiness":
        if s.min() < 0 or s.max() > 1:
            raise ValueError(
                "mapping='easiness' needs scores in [0, 1]; use mapping='rank' or 'minmax' for difficulties"
            )
        return s.float()
    if not higher_is_harder:
        s = -s
    if mapping == "minmax":
        lo, hi = s.min(), s.max()
        return ((hi - s) / (hi - lo)).float() if hi > lo else torch.ones_like(s, dtype=torch.float32)
    if len(s) == 1:
        return torch.ones(1)
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    rank = (start + (counts - 1) / 2.0)[inverse]
    return (1 - rank / (len(s) - 1)).float()
