"""Choose a training subset from per-sample scores (score-based data pruning).

Data Diet (Paul et al., 2021) keeps the highest-scoring ("hardest") samples, and, for aggressive
pruning, first drops a fraction of the very highest (often mislabelled) ones: with n samples,
`keep` fraction kept and `drop_hardest` fraction dropped first, the kept samples are ranks
[n·drop_hardest, n·drop_hardest + n·keep) of the samples sorted by decreasing score. "easiest"
keeps the lowest scores instead. Ties are broken by sample index, so the choice is a pure
function of the scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("hardest", "easiest")


def check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1] of the training samples to keep, got {keep!r}")


def kept_count(n: int, keep: float) -> int:
    """How many of n samples a fraction `keep` keeps (rounded, at least one)."""
    check_keep(keep)
    return max(1, min(n, int(round(keep * n))))


def select_subset(
    index: Tensor, score: Tensor, keep: float, mode: str = "hardest", drop_hardest: float = 0.0
) -> Tensor:
    """The sample indices kept (sorted): `keep` of `index`, chosen by `score` as described above."""
    check_keep(keep)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if drop_hardest and mode != "hardest":
        raise ValueError(f"drop_hardest applies to mode='hardest' only, got mode={mode!r}")
    if not 0 <= drop_hardest < 1 or drop_hardest + keep > 1 + 1e-9:
        raise ValueError(
            f"drop_hardest must be in [0, 1 - keep] (a fraction dropped before keeping), got {drop_hardest} "
            f"with keep={keep}"
        )
    index, score = torch.as_tensor(index).long().flatten(), torch.as_tensor(score).flatten()
    if index.shape != score.shape:
        raise ValueError(f"{len(index)} indices but {len(score)} scores")
    if not len(index):
        raise ValueError("no scored samples to select from")
    if torch.isnan(score).any():
        raise ValueError("scores contain NaN: some samples were never scored")
    n = len(index)
    by_index = torch.argsort(index, stable=True)
    index, score = index[by_index], score[by_index].double()
    order = torch.argsort(-score if mode == "hardest" else score, stable=True)
    count = kept_count(n, keep)
    start = min(int(round(drop_hardest * n)), n - count)
    return index[order[start : start + count]].sort().values
