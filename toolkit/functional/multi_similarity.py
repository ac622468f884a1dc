"""Multi-Similarity (MS) loss with its pair mining.

Wang, Han, Huang, Dong & Scott, *Multi-Similarity Loss with General Pair Weighting for Deep Metric
Learning* (CVPR 2019, arXiv 1904.06627); official code MalongTech/research-ms-loss
`ret_benchmark/losses/multi_similarity_loss.py`.

S_ij = cosine similarity of the L2-normalised embeddings. Mining (per anchor i, the "relative
similarity" step): keep a negative j (y_j ≠ y_i) if S_ij > min_{k: y_k = y_i, k ≠ i} S_ik − ε, and a
positive j (y_j = y_i, j ≠ i) if S_ij < max_{k: y_k ≠ y_i} S_ik + ε. Weighting:

    L = (1/m) Σ_i [ (1/α) log(1 + Σ_{k∈P_i} e^{−α(S_ik − λ)}) + (1/β) log(1 + Σ_{k∈N_i} e^{β(S_ik − λ)}) ]

with P_i, N_i the mined positives and negatives of anchor i and m the batch size.

CONFIRMED from the official code: the mining rule, ε = 0.1 (`margin`) and λ = 0.5 (`thresh`)
hard-coded, α and β read from the config (`SCALE_POS`, `SCALE_NEG`; 2 and 40 in the copies of it
that hard-code them; 50 in pytorch-metric-learning's defaults, whose documentation also states
that the paper uses λ = 1); the per-anchor terms and the division by the batch size.
Where the official code and the paper's formula differ we follow the paper, as pytorch-metric-
learning does: an anchor with mined positives but no mined negatives (or the reverse) keeps its
non-empty part (the official loop skips the anchor: `continue`), and the anchor itself is
excluded from its positives by index (the official code drops positives with S ≥ 1 − 1e-5, which
also drops exact duplicates). An anchor without mined pairs contributes 0 and still counts in m.
Defaults here: α = 2, β = 50, λ = 0.5, ε = 0.1 (pytorch-metric-learning's, close to the official
code's); the paper's λ = 1 is one option away.

A batch in which every class has a single sample has no positive pair: that is an error (use a
P×K class-balanced sampler). Computed in float32 from normalised embeddings with log-sum-exp, so
it is stable for embeddings of magnitude 1e4 and in bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.functional._pairs import (
    check_embeddings_and_labels,
    cosine_similarity_matrix,
    require_positive_pairs,
    same_class,
)
from toolkit.functional._reduce import check_reduction, reduce

METHOD = "multi_similarity"


def check_ms_args(alpha: float, beta: float, epsilon: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha (the positive scale) must be > 0, got {alpha}; the paper uses 2")
    if not beta > 0:
        raise ValueError(f"beta (the negative scale) must be > 0, got {beta}; the paper uses 50")
    if not epsilon >= 0:
        raise ValueError(f"epsilon (the mining margin) must be >= 0, got {epsilon}; the paper uses 0.1")


def ms_mine(similarity: Tensor, labels: Tensor, epsilon: float = 0.1) -> tuple[Tensor, Tensor]:
    """The MS miner: (positives, negatives) (B, B) boolean masks of the pairs kept per anchor row."""
    pos_all, neg_all = same_class(labels)
    s = similarity.detach().float()
    inf = torch.tensor(float("inf"), device=s.device)
    hardest_pos = torch.where(pos_all, s, inf).amin(dim=1, keepdim=True)  # +inf: no positive
    hardest_neg = torch.where(neg_all, s, -inf).amax(dim=1, keepdim=True)  # -inf: no negative
    negatives = neg_all & (s + epsilon > hardest_pos)
    positives = pos_all & (s - epsilon < hardest_neg)
    return positives, negatives


def _masked_log1p_sum_exp(x: Tensor, mask: Tensor) -> Tensor:
    """log(1 + Σ_{mask} e^x) per row, stably (a log-sum-exp with a zero column)."""
    x = torch.where(mask, x, torch.full_like(x, float("-inf")))
    x = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
    return torch.logsumexp(x, dim=1)


def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    mining: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """MS loss of embeddings (B, D) with labels (B,); per anchor with `reduction="none"` (B,).

    Args:
        alpha, beta: scales of the positive and negative terms.
        base: λ, the similarity margin both terms are centred on.
        epsilon: the mining margin ε; `mining=False` keeps every pair (no miner).
        normalize: L2-normalise the embeddings (cosine similarity, as the paper).
    """
    check_reduction(reduction)
    check_ms_args(alpha, beta, epsilon)
    check_embeddings_and_labels(embeddings, labels, METHOD)
    s = cosine_similarity_matrix(embeddings, normalize)
    pos_all, neg_all = same_class(labels)
    require_positive_pairs(pos_all, METHOD)
    positives, negatives = ms_mine(s, labels, epsilon) if mining else (pos_all, neg_all)
    pos_term = _masked_log1p_sum_exp(-alpha * (s - base), positives) / alpha
    neg_term = _masked_log1p_sum_exp(beta * (s - base), negatives) / beta
    return reduce(pos_term + neg_term, reduction)


__all__ = ["ms_mine", "multi_similarity_loss"]
