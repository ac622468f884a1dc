"""1-to-K contrastive loss: one anchor aligned with K positives at once (multi-positive InfoNCE).

Nie, Zhang, Feng, Huang & Liu, *Improving the Consistency in Cross-Lingual Cross-Modal Retrieval
with 1-to-K Contrastive Learning* (KDD 2024, arXiv 2406.18254); official code BUAADreamer/CCRK
`models/xvlm.py::get_unialign_contrastive_loss`.

B anchors (images) and B·K candidates (captions, K per image, one per language), features
L2-normalised, logits ℓ = A Cᵀ/τ (B × BK), Y_ij = 1 when candidate j belongs to anchor i:

    L_i2t = −mean_i Σ_j Y_ij log softmax_j(ℓ_i·)        (all K positives at once, each in the
                                                          others' denominator)
    L_t2i = −mean_j log softmax_i(ℓ_·j)[owner(j)]        (each candidate against all anchors)
    L     = (L_i2t + L_t2i) / 2 / K

K = 1 is the symmetric CLIP/InfoNCE loss.

CONFIRMED from the official code (`need_divm=0`, the default: divide by K; labels built as
`labels_i2t[i][K·i : K·i + K] = 1`, `labels_t2i = labels_i2tᵀ`; mean over images and over texts).
A review of the paper shows the image-to-text part as −(1/K) Σ_k log(...), matching the code;
the paper's text-to-image equation was not read: the code (which also divides that part by K) is
followed. The official temperature is learnable and clamped to [0.001, 0.5]; here it is a fixed
argument (the term's default is ours).
Generalised here (for labelled batches): anchors may own different numbers K_i of candidates,
then L = ½[mean_i L_i2t,i / K_i + mean_j L_t2i,j / K_owner(j)] (equal to the code's for equal K);
anchors owning no candidate are left out of the image-to-text mean but stay in the text-to-image
denominators. Computed in float32 from log-softmax: stable for features of 1e4 and in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._pairs import SINGLE_SAMPLE_HINT, check_embeddings_and_labels
from toolkit.functional._reduce import check_reduction, check_temperature

METHOD = "one_to_k_contrastive"


def _parts(logits: Tensor, owner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(i2t (M,), K (M,), t2i (N,)) from logits (M, N) and each candidate's anchor (N,)."""
    m, _ = logits.shape
    y = F.one_hot(owner, m).T.bool()  # (M, N): candidate j belongs to anchor i
    k = y.sum(dim=1)
    logp_i2t = F.log_softmax(logits, dim=1)
    i2t = -torch.where(y, logp_i2t, torch.zeros_like(logp_i2t)).sum(dim=1)
    logp_t2i = F.log_softmax(logits.T, dim=1)  # (N, M)
    t2i = -logp_t2i.gather(1, owner.unsqueeze(1)).squeeze(1)
    return i2t, k, t2i


def _contributions(i2t: Tensor, k: Tensor, t2i: Tensor, owner: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-anchor and per-candidate contributions scaled so that their mean over all M + N items
    is the loss."""
    has = k > 0
    m_valid = has.sum().clamp_min(1)
    total = i2t.shape[0] + t2i.shape[0]
    kf = k.clamp_min(1).float()
    anchor = torch.where(has, i2t / kf, torch.zeros_like(i2t)) * (total / (2 * m_valid))
    cand = t2i / kf[owner] * (total / (2 * t2i.shape[0]))
    return anchor, cand, total


def one_to_k_contrastive_loss(
    anchors: Tensor,
    candidates: Tensor,
    temperature: float = 0.07,
    owner: Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """1-to-K loss of anchors (M, D) and candidates (N, D).

    `owner` (N,) gives each candidate's anchor; by default candidates are grouped, N = M·K and
    candidate j belongs to anchor j // K. With `reduction="none"` returns (M + N,) contributions,
    anchors first, whose mean is the loss ("sum" is their sum).
    """
    check_reduction(reduction)
    check_temperature(temperature)
    if anchors.dim() != 2 or candidates.dim() != 2 or anchors.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"{METHOD} needs anchors (M, D) and candidates (N, D) of one width, got "
            f"{tuple(anchors.shape)} and {tuple(candidates.shape)}"
        )
    m, n = anchors.shape[0], candidates.shape[0]
    if m < 1 or n < 1:
        raise ValueError(f"{METHOD} needs at least one anchor and one candidate")
    if owner is None:
        if n % m:
            raise ValueError(f"grouped candidates need N = M·K, got M={m}, N={n}; or pass owner")
        owner = torch.arange(m, device=anchors.device).repeat_interleave(n // m)
    if owner.shape != (n,) or owner.is_floating_point():
        raise ValueError(f"owner must be (N,) = ({n},) anchor indices, got {tuple(owner.shape)}")
    if owner.device.type == "cpu" and bool(((owner < 0) | (owner >= m)).any()):
        raise ValueError(f"owner indices must be in [0, {m})")
    a, c = anchors.float(), candidates.float()
    if normalize:
        a, c = F.normalize(a, dim=-1), F.normalize(c, dim=-1)
    i2t, k, t2i = _parts(a @ c.T / temperature, owner)
    anchor, cand, _ = _contributions(i2t, k, t2i, owner)
    per_item = torch.cat([anchor, cand])
    if reduction == "none":
        return per_item
    return per_item.mean() if reduction == "mean" else per_item.sum()


def one_to_k_contrastive_embeddings(
    embeddings: Tensor,
    labels: Tensor,
    temperature: float = 0.07,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """The 1-to-K loss on a labelled batch of one modality (B, D).

    The first sample of each class in the batch is its anchor (the "image"), the class's other
    samples its K candidates (the "captions"); other classes' anchors and candidates are the
    negatives. With a P×K class-balanced batch that is P anchors with K − 1 positives each.
    With `reduction="none"` returns (B,) per-sample contributions (anchors carry their
    anchor-to-candidates term, candidates their candidate-to-anchors term) whose mean is the loss.
    A batch where every class has one sample is an error.
    """
    check_reduction(reduction)
    check_embeddings_and_labels(embeddings, labels, METHOD)
    b = len(labels)
    pos = torch.arange(b, device=labels.device)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    first = torch.where(same, pos.unsqueeze(0), torch.full_like(same, b, dtype=torch.long)).amin(dim=1)
    is_anchor = first == pos
    if bool(is_anchor.all()):
        raise ValueError(f"{METHOD}: {SINGLE_SAMPLE_HINT}")
    anchor_pos = pos[is_anchor]
    cand_pos = pos[~is_anchor]
    # the anchor row of each candidate: rank of its class's first sample among the anchors
    anchor_row = torch.cumsum(is_anchor.long(), 0) - 1
    owner = anchor_row[first[cand_pos]]
    e = embeddings.float()
    if normalize:
        e = F.normalize(e, dim=-1)
    i2t, k, t2i = _parts(e[anchor_pos] @ e[cand_pos].T / temperature, owner)
    anchor, cand, _ = _contributions(i2t, k, t2i, owner)
    per_sample = torch.zeros(b, device=e.device)
    per_sample = per_sample.index_put((anchor_pos,), anchor).index_put((cand_pos,), cand)
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


__all__ = ["one_to_k_contrastive_embeddings", "one_to_k_contrastive_loss"]
