"""Checks and pair masks shared by the metric-learning losses (embeddings (B, D) + labels (B,))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SINGLE_SAMPLE_HINT = (
    "every class in this batch has a single sample, so there is no positive pair. Draw class-balanced "
    "P×K batches (toolkit DataModules: data option samples_per_class=K with K >= 2; or "
    "toolkit.data.ClassBalancedSampler)"
)


def check_embeddings_and_labels(embeddings: Tensor, labels: Tensor, method: str) -> None:
    """(B, D) floating-point embeddings, B ≥ 2, and (B,) integer labels."""
    if embeddings.dim() != 2:
        raise ValueError(f"{method} needs (B, D) embeddings, got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"{method} needs floating-point embeddings, got {embeddings.dtype}")
    if labels is None:
        raise ValueError(f"{method} needs the class labels of the batch")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{method} needs integer class labels (B,), got {labels.dtype}")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be (B,) = ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if embeddings.shape[0] < 2:
        raise ValueError(f"{method} needs at least 2 samples in the batch, got {embeddings.shape[0]}")


def same_class(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(positives, negatives) (B, B) boolean masks: same label without the diagonal; other label."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def require_positive_pairs(positives: Tensor, method: str) -> None:
    """A clear error when no sample has a same-class partner (checked on every device: it is one
    boolean reduction, and training on such a batch silently does nothing)."""
    if not bool(positives.any()):
        raise ValueError(f"{method}: {SINGLE_SAMPLE_HINT}")


def cosine_similarity_matrix(embeddings: Tensor, normalize: bool = True) -> Tensor:
    """S = ê êᵀ in float32 (ê L2-normalised when `normalize`)."""
    e = embeddings.float()
    if normalize:
        e = F.normalize(e, dim=-1)
    return e @ e.T


def class_partners(labels: Tensor) -> Tensor:
    """For each sample the next sample of its class in batch order, cyclically (the only other one
    in a class of two); -1 for a sample alone in its class."""
    b = len(labels)
    pos = torch.arange(b, device=labels.device)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    # distance forward in the batch, cyclic; the sample itself is at distance b (never the nearest
    # unless it is alone)
    dist = (pos.unsqueeze(0) - pos.unsqueeze(1)) % b
    dist = torch.where(dist == 0, torch.full_like(dist, b), dist)
    dist = torch.where(same, dist, torch.full_like(dist, 2 * b))
    nearest = dist.argmin(dim=1)
    alone = same.sum(1) == 1
    return torch.where(alone, torch.full_like(nearest, -1), nearest)
