"""Soft-InfoNCE: InfoNCE with weighted negatives.

Li, Zhou, Luu & Miao, *Rethinking Negative Pairs in Code Search* (EMNLP 2023, arXiv 2310.08069);
official code Alex-HaochenLi/Soft-InfoNCE (`UniXCoder/run.py`, the `--softinfonce` branch).

For query i with positive p(i) and negatives j (scores s_ij, e.g. q_i·k_j), an estimate sim_ij of
how related each negative is gives π_ij = softmax_j(sim_ij / t) over the n_i negatives and

    w_ij = max( (β − α·π_ij) / (β − α/n_i), 0.1 ),
    L_i  = −log( e^{s_{i,p(i)}} / (e^{s_{i,p(i)}} + Σ_j w_ij e^{s_ij}) ).

Before the clip the weights average to 1 over the negatives (Σ_j (β − απ_ij) = n_iβ − α), so the
loss re-distributes the negatives' pressure: related negatives (large π, likely false negatives)
are pushed less, unrelated ones more. α = 0 gives w ≡ 1, plain InfoNCE (the special case the
abstract states).

CONFIRMED from the official code: the weight formula, the 0.1 clip, softmax over the negatives at
temperature t, positive weight 1 inside the denominator, the mean over queries; defaults t = 1,
α (`--weight_kl`) = 1, β (`--weight_unif`) = 1. The estimates come from outside the trained
network (BM25, a frozen SimCSE encoder, or a frozen copy of a previously trained model) under
`no_grad`: the weights carry no gradient here either (`similarity` is detached).
The paper's text beyond the abstract was not readable here; the code is followed.
Decided here: the official `+1e-15` inside the log is dropped (log-sum-exp form instead, exact and
stable for scores of 1e4 and in bf16); β ≤ α/n_i (a zero or negative normaliser) is an error;
`positive`/`valid` generalise the code's diagonal layout (query i ↔ key i, all keys candidates)
to in-batch pairs of one modality, where a sample must not be its own negative. Without an
explicit `similarity`, the detached scores themselves are the estimate (the "trained model"
estimator applied to the current model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._pairs import (
    SINGLE_SAMPLE_HINT,
    check_embeddings_and_labels,
    class_partners,
    cosine_similarity_matrix,
)
from toolkit.functional._reduce import check_reduction, check_temperature

METHOD = "soft_infonce"
ESTIMATORS = ("embedding", "labels")


def check_soft_infonce_args(alpha: float, beta: float, t: float, min_weight: float) -> None:
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (0 gives InfoNCE), got {alpha}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}; the official default is 1")
    check_temperature(t)
    if not min_weight >= 0:
        raise ValueError(f"min_weight must be >= 0, got {min_weight}; the official clip is 0.1")


def soft_infonce_weights(
    similarity: Tensor,
    negatives: Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    t: float = 1.0,
    min_weight: float = 0.1,
) -> Tensor:
    """The (N, M) negative weights w_ij (0 where `negatives` is False), without gradient."""
    check_soft_infonce_args(alpha, beta, t, min_weight)
    sim = similarity.detach().float()
    n = negatives.sum(dim=1, keepdim=True)
    logits = torch.where(negatives, sim / t, torch.full_like(sim, float("-inf")))
    has_neg = n > 0
    pi = torch.where(has_neg, F.softmax(torch.where(has_neg, logits, torch.zeros_like(logits)), dim=1), 0.0)
    norm = beta - alpha / n.clamp_min(1).float()
    if bool((has_neg & (norm <= 0)).any()):
        raise ValueError(
            f"beta must exceed alpha/n (n = negatives per query) so the weights' normaliser β − α/n is "
            f"positive; got alpha={alpha}, beta={beta}, n={int(n[has_neg].min())}"
        )
    w = ((beta - alpha * pi) / norm).clamp_min(min_weight)
    return torch.where(negatives, w, torch.zeros_like(w))


def soft_infonce_loss(
    scores: Tensor,
    similarity: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    t: float = 1.0,
    positive: Tensor | None = None,
    valid: Tensor | None = None,
    min_weight: float = 0.1,
    reduction: str = "mean",
) -> Tensor:
    """Soft-InfoNCE of scores (N, M) (query × key, already divided by any temperature).

    Args:
        similarity: (N, M) relatedness estimates of the pairs (default: the detached scores).
        positive: (N,) column of each query's positive (default i ↔ i); -1 marks a query without
            one (it contributes 0 and is left out of the mean).
        valid: (N, M) boolean mask of the candidate keys (default: all); the negatives are the
            valid keys other than the positive.
        min_weight: the clip of the weights (0.1 in the official code).
    Returns (N,) per-query losses with `reduction="none"`.
    """
    check_reduction(reduction)
    if scores.dim() != 2:
        raise ValueError(f"soft_infonce needs (N, M) scores, got shape {tuple(scores.shape)}")
    n_q, n_k = scores.shape
    device = scores.device
    if positive is None:
        if n_k < n_q:
            raise ValueError(
                f"with the default diagonal positives the scores need M >= N, got {tuple(scores.shape)}"
            )
        positive = torch.arange(n_q, device=device)
    if positive.shape != (n_q,) or positive.is_floating_point():
        raise ValueError(
            f"positive must be (N,) = ({n_q},) integer column indices, got {tuple(positive.shape)}"
        )
    if positive.device.type == "cpu" and bool(((positive < -1) | (positive >= n_k)).any()):
        raise ValueError(f"positive indices must be in [0, {n_k}) (or -1 for none)")
    if valid is None:
        valid = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if valid.shape != scores.shape:
        raise ValueError(f"valid must have the scores' shape {tuple(scores.shape)}, got {tuple(valid.shape)}")
    if similarity is None:
        similarity = scores
    if similarity.shape != scores.shape:
        raise ValueError(
            f"similarity must have the scores' shape {tuple(scores.shape)}, got {tuple(similarity.shape)}"
        )
    has_pos = positive >= 0
    safe_pos = positive.clamp_min(0)
    is_pos = F.one_hot(safe_pos, n_k).bool() & has_pos.unsqueeze(1)
    negatives = valid & ~is_pos
    w = soft_infonce_weights(similarity, negatives, alpha, beta, t, min_weight)
    s = scores.float()
    pos_score = s.gather(1, safe_pos.unsqueeze(1)).squeeze(1)
    # log(e^{s_p} + Σ_j w_j e^{s_j}) as one log-sum-exp: the weights enter as log w (−inf where 0)
    terms = torch.where(negatives, s + torch.log(w.clamp_min(1e-45)), torch.full_like(s, float("-inf")))
    denom = torch.logsumexp(torch.cat([pos_score.unsqueeze(1), terms], dim=1), dim=1)
    per_query = torch.where(has_pos, denom - pos_score, torch.zeros_like(pos_score))
    if reduction == "mean":
        return per_query.sum() / has_pos.sum().clamp_min(1)
    return per_query.sum() if reduction == "sum" else per_query


def soft_infonce_embeddings(
    embeddings: Tensor,
    labels: Tensor,
    temperature: float = 0.1,
    alpha: float = 1.0,
    beta: float = 1.0,
    t: float = 1.0,
    estimator: str = "embedding",
    min_weight: float = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Soft-InfoNCE on a labelled batch of one modality (B, D).

    Every sample is a query; its positive is the next sample of its class in the batch (cyclic,
    `class_partners`), its candidates every other sample (itself excluded), so the other samples of
    its class are negatives: exactly the false negatives the weights are meant to soften.
    Scores are cosine similarities / `temperature`. `estimator`: "embedding" (the detached cosine
    similarities) or "labels" (1 for the same class, 0 otherwise). Samples alone in their class
    contribute 0; a batch where every class has one sample is an error.
    """
    check_embeddings_and_labels(embeddings, labels, METHOD)
    check_temperature(temperature)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    partner = class_partners(labels)
    if not bool((partner >= 0).any()):
        raise ValueError(f"{METHOD}: {SINGLE_SAMPLE_HINT}")
    cos = cosine_similarity_matrix(embeddings, normalize)
    valid = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if estimator == "labels":
        similarity = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()
    else:
        similarity = cos.detach()
    return soft_infonce_loss(
        cos / temperature, similarity, alpha, beta, t, partner, valid, min_weight, reduction
    )


__all__ = ["soft_infonce_embeddings", "soft_infonce_loss", "soft_infonce_weights"]
