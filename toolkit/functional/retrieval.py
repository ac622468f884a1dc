"""Recall@K for retrieval with learned embeddings (the metric of deep metric learning).

Every item is a query against all the other items of the same set (leave-one-out, the CUB/Cars/SOP
protocol of the metric-learning literature): Recall@K is the fraction of queries with at least one
item of their class among their K nearest neighbours by cosine similarity (Euclidean distance on
L2-normalised embeddings ranks identically). Queries whose class has no other item cannot be
answered and are left out. Computed in chunks of queries (memory O(chunk · N)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def recall_at_k(
    embeddings: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1,),
    normalize: bool = True,
    chunk: int = 1024,
) -> Tensor:
    """Recall@k for each k of `ks` (a float tensor of len(ks)), leave-one-out on (N, D) embeddings."""
    ks = [int(k) for k in ks]
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"recall@K needs embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}"
        )
    n = embeddings.shape[0]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if max(ks) > n - 1:
        raise ValueError(f"recall@{max(ks)} needs more than {max(ks)} items to search, got {n}")
    e = embeddings.float()
    if normalize:
        e = F.normalize(e, dim=-1)
    counts = torch.bincount(labels - labels.min())[labels - labels.min()]
    answerable = counts > 1
    if not bool(answerable.any()):
        raise ValueError("recall@K needs at least one class with two or more items")
    kmax = max(ks)
    hits = []
    for start in range(0, n, chunk):
        q = e[start : start + chunk]
        sim = q @ e.T
        rows = torch.arange(q.shape[0], device=e.device)
        sim[rows, rows + start] = float("-inf")  # a query does not retrieve itself
        top = sim.topk(kmax, dim=1).indices
        hits.append(labels[top] == labels[start : start + chunk].unsqueeze(1))
    hit = torch.cat(hits)[answerable]
    return torch.stack([hit[:, :k].any(dim=1).float().mean() for k in ks])


__all__ = ["recall_at_k"]
