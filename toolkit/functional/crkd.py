"""Class-relation knowledge distillation for novel class discovery, Cr-KD (Gu, Zhang, Xu & He,
"Class-relation Knowledge Distillation for Novel Class Discovery", ICCV 2023, arXiv 2307.09158;
official code: kleinzcy/Cr-KD-NCD `rKD.py`, `model/losses.py`, `utils/eval_utils.py`).

Novel class discovery: K known classes are labelled, N novel classes are not. A model trained on the
known classes (the teacher, frozen) is followed by a discovery model over K + N outputs (the known
head then the novel head), trained with UNO's swapped prediction plus Cr-KD. With z the discovery
model's logits over all K + N classes, τ the softmax temperature of the heads, T the KD temperature:

  targets, per view v: labelled sample → one-hot over the known part; unlabelled sample →
      Sinkhorn-Knopp(z_v[unlabelled, K:]) over the novel part (equipartition over the batch)
  L_cluster_i = mean over ordered view pairs (v, v') of  −Σ_c target_v,i,c · log softmax(z_v',i / τ)_c

  on unlabelled samples i only:
      q_i = softmax(z^teacher_i / τ / T)              the teacher's class relation over the K known classes
      p_i = softmax(z_i[:K] / τ / T)                  the discovery model's known head
      w̃_i = Σ_{c<K} softmax(z_i / τ / T)_c            how "known-like" the sample looks to the model
      w_i = w̃_i / mean_{unlabelled} w̃                 (weights averaging 1 over the unlabelled batch)
      L_KD_i = T² · w_i · Σ_c −q_i,c · log p_i,c
  L = mean_i L_cluster_i + α · mean_{unlabelled i} L_KD_i

Confirmed from the official code: the KD term above exactly (`losses.KD`: both logits divided by
`args.temperature` then by T, the teacher detached, the weight from the student's full softmax
summed over the known classes and divided by its mean, −log p · q · T² · w summed over classes,
averaged over the unlabelled samples and the views, then over the heads), the gate is *not*
detached (its gradient flows into the student: the paper's "learnable weighting function" is this
data-dependent gate; the paper's text beyond the abstract could not be read here); the total
loss_cluster + α·L_KD; Sinkhorn-Knopp with 3 iterations and ε = 0.05 (`losses.SinkhornKnopp`);
the swapped prediction (`rKD.swapped_prediction`); the CIFAR-100 50/50 setting (τ = 0.1, T = 4,
α = 0.1, 4 heads, 2 large + 2 small crops, 500 epochs, SGD lr 0.4, batch 512, warm-up 10 epochs then
cosine to 1e-3, weight decay 1.5e-4); the student and the teacher both start from the
known-class pre-trained network (`train_discover` loads it into both, except the novel head);
clustering accuracy with the Hungarian assignment of clusters to classes
(`eval_utils.cluster_acc`, scipy's `linear_sum_assignment`).

Numerics: computed in float32 from log_softmax; Sinkhorn-Knopp runs its normalisations in log
space (the official `exp(logits / ε)` overflows for logits above ~4.4 at ε = 0.05, and rows that
underflow give 0/0; the result is the same wherever the official one is finite).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, check_temperature, reduce


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, num_iters: int = 3, epsilon: float = 0.05) -> Tensor:
    """Soft cluster assignments (B, K) with equal cluster mass over the batch, each row summing to
    1 (the official `SinkhornKnopp`: Q = exp(logits / ε), then `num_iters` alternating
    normalisations of the clusters to 1/K and the samples to 1/B, rows rescaled by B)."""
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be (B, K) with B >= 1, got {tuple(logits.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    # the same normalisations in log space: no overflow of exp(logits / ε), and no 0/0 when whole
    # rows underflow (the official code returns inf/NaN for such logits)
    log_q = (logits.detach().float() / epsilon).t()  # (K, B)
    k, b = log_q.shape
    log_q = log_q - torch.logsumexp(log_q.flatten(), 0)
    for _ in range(num_iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(b)
    return (log_q + math.log(b)).exp().t()


def ncd_targets(
    logits: Tensor, target: Tensor, num_known: int, num_iters: int = 3, epsilon: float = 0.05
) -> Tensor:
    """UNO's targets (B, K + N): one-hot over the known part for labelled samples (target < K),
    Sinkhorn-Knopp over the novel logits for the others (their labels are not read)."""
    labelled = target < num_known
    out = torch.zeros_like(logits, dtype=torch.float32)
    if labelled.any():
        out[labelled, :num_known] = F.one_hot(target[labelled].long(), num_known).float()
    if (~labelled).any():
        out[~labelled, num_known:] = sinkhorn_knopp(logits[~labelled, num_known:], num_iters, epsilon)
    return out


def swapped_prediction_loss(
    view_logits: list[Tensor], view_targets: list[Tensor], temperature: float = 0.1
) -> Tensor:
    """Per sample (B,): the mean over ordered pairs of different views (v, v') of the cross-entropy
    of softmax(logits_v' / τ) against targets_v (the official loop with every view a large crop)."""
    check_temperature(temperature)
    if len(view_logits) != len(view_targets) or not view_logits:
        raise ValueError("give one target per view (and at least one view)")
    pairs = [(v, o) for v in range(len(view_logits)) for o in range(len(view_logits)) if o != v]
    if not pairs:  # a single view predicts its own targets (self-labelling)
        pairs = [(0, 0)]
    total = 0.0
    for v, o in pairs:
        log_p = F.log_softmax(view_logits[o].float() / temperature, dim=-1)
        total = total + (-(view_targets[v].float() * log_p).sum(-1))
    return total / len(pairs)


def crkd_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    unlabelled: Tensor,
    temperature: float = 0.1,
    kd_temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """Cr-KD's weighted class-relation KD (see the module docstring).

    Args:
        student_logits: (B, K + N) logits of the discovery model, known classes first.
        teacher_logits: (B, K) the known-class teacher's logits (detached here).
        unlabelled: (B,) bool, the samples the KD applies to (at least one).
        temperature: τ > 0, the heads' softmax temperature (official 0.1, for cosine-similarity heads).
        kd_temperature: T > 0 (official 4).
        reduction: "mean" over the unlabelled samples (the official value), "sum", or "none": (B,)
            with zeros at the labelled samples.
    """
    check_reduction(reduction)
    check_temperature(temperature)
    check_temperature(kd_temperature)
    if (
        student_logits.dim() != 2
        or teacher_logits.dim() != 2
        or teacher_logits.shape[0] != student_logits.shape[0]
    ):
        raise ValueError(
            f"student logits (B, K + N) and teacher logits (B, K) expected, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    k = teacher_logits.shape[-1]
    if not 1 <= k < student_logits.shape[-1]:
        raise ValueError(
            f"the teacher predicts {k} known classes; the discovery model must predict more ({student_logits.shape[-1]})"
        )
    if unlabelled.shape != student_logits.shape[:1] or unlabelled.dtype != torch.bool:
        raise ValueError(
            f"unlabelled must be a (B,) bool mask, got {unlabelled.dtype} {tuple(unlabelled.shape)}"
        )
    if not bool(unlabelled.any()):
        raise ValueError("crkd_kd_loss needs at least one unlabelled sample in the batch")
    scale = temperature * kd_temperature
    s = student_logits.float() / scale
    log_q = F.log_softmax(teacher_logits.detach().float() / scale, dim=-1)
    log_p_known = F.log_softmax(s[:, :k], dim=-1)
    log_p_all = F.log_softmax(s, dim=-1)
    gate = torch.logsumexp(log_p_all[:, :k], dim=-1).exp()  # Σ_{c<K} softmax(s)_c, in log space
    gate = gate / gate[unlabelled].mean()
    per_sample = -(log_q.exp() * log_p_known).sum(-1) * kd_temperature**2 * gate
    per_sample = torch.where(unlabelled, per_sample, torch.zeros_like(per_sample))
    if reduction == "mean":
        return per_sample.sum() / unlabelled.sum()
    return reduce(per_sample, reduction)


def cluster_accuracy(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> float:
    """Clustering accuracy: the best one-to-one assignment of predicted clusters to classes
    (Hungarian, scipy's `linear_sum_assignment`) and the fraction of samples it gets right
    (the official `cluster_acc`). Cluster and class ids need not share a range."""
    from scipy.optimize import linear_sum_assignment

    y_pred = np.asarray(pred.cpu() if isinstance(pred, Tensor) else pred).astype(np.int64).ravel()
    y_true = np.asarray(target.cpu() if isinstance(target, Tensor) else target).astype(np.int64).ravel()
    if y_pred.shape != y_true.shape:
        raise ValueError(f"pred and target differ in length: {y_pred.shape} and {y_true.shape}")
    if y_pred.size == 0:
        raise ValueError("cluster_accuracy needs at least one sample")
    if y_pred.min() < 0 or y_true.min() < 0:
        raise ValueError("cluster and class ids must be >= 0")
    d = int(max(y_pred.max(), y_true.max())) + 1
    counts = np.zeros((d, d), dtype=np.int64)
    np.add.at(counts, (y_pred, y_true), 1)
    rows, cols = linear_sum_assignment(counts.max() - counts)
    return float(counts[rows, cols].sum()) / y_pred.size


def split_cluster_accuracy(
    pred: Tensor | np.ndarray, target: Tensor | np.ndarray, num_known: int
) -> dict[str, float]:
    """Task-agnostic accuracies (the official `split_cluster_acc_v2`): one Hungarian assignment of
    predicted ids to classes over all samples, then the accuracy on all of them, on the known
    classes (target < K, "seen") and on the novel ones (target ≥ K); a part without samples is NaN."""
    from scipy.optimize import linear_sum_assignment

    y_pred = np.asarray(pred.cpu() if isinstance(pred, Tensor) else pred).astype(np.int64).ravel()
    y_true = np.asarray(target.cpu() if isinstance(target, Tensor) else target).astype(np.int64).ravel()
    if y_pred.shape != y_true.shape or y_pred.size == 0:
        raise ValueError(
            f"pred and target must be non-empty and of equal length, got {y_pred.shape}, {y_true.shape}"
        )
    d = int(max(y_pred.max(), y_true.max())) + 1
    counts = np.zeros((d, d), dtype=np.int64)
    np.add.at(counts, (y_pred, y_true), 1)
    rows, cols = linear_sum_assignment(counts.max() - counts)
    mapped = np.full(d, -1, dtype=np.int64)
    mapped[rows] = cols  # predicted id -> class
    correct = mapped[y_pred] == y_true
    seen = y_true < num_known

    def acc(mask: np.ndarray) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    return {"all": float(correct.mean()), "seen": acc(seen), "novel": acc(~seen)}
