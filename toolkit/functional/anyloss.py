"""AnyLoss: a confusion-matrix metric turned into a loss (Han, Moniz & Chawla, "AnyLoss: Transforming
Classification Metrics into Loss Functions", KDD 2024, arXiv 2405.14745).

Binary form (the paper's). With p_i = sigmoid(z_i) the predicted probability of the positive class
and y_i ∈ {0, 1}, the approximation function

    A(p) = 1 / (1 + exp(−L·(p − 0.5)))

pushes p towards 0 or 1 (L is the "amplifying scale"), and the confusion matrix of the batch is
written with A_i in place of the thresholded prediction:

    TP = Σ y_i·A_i,  FN = Σ y_i·(1 − A_i),  FP = Σ (1 − y_i)·A_i,  TN = Σ (1 − y_i)·(1 − A_i)

with n⁺ = Σ y_i = TP + FN, n⁻ = N − n⁺ = FP + TN. The loss is 1 − M(TP, FN, FP, TN) for

    metric="accuracy"           M = (TP + TN)/N
    metric="f1" / "fbeta"       M = (1 + β²)·TP / (β²·n⁺ + Σ A_i + s)         (Σ A_i = TP + FP)
    metric="balanced_accuracy"  M = (n⁻·TP + n⁺·TN) / (2·n⁺·n⁻ + s)           (= (TPR + TNR)/2)
    metric="gmean"              M = sqrt(TP·TN / (n⁺·n⁻ + s))                 (= sqrt(TPR·TNR))
    metric="gmean_surrogate"    M = TP·TN / (n⁺·n⁻ + s)                       (no square root)

CONFIRMED from the official code: the approximation function, the soft confusion matrix and the
accuracy, F_β, G-mean (with the square root) and balanced-accuracy formulas, and L = 73, from the
authors' KDD repository README (github.com/doheonhan/anyloss: `Ours_Accu`, `Ours_Fbeta`,
`Ours_Gmean`, `Ours_BAccu`, "L = 73"); the smoothing s = 1e-5 in the denominators and the G-mean
surrogate without the square root from the authors' extension repository (doheonhan/
anyloss_extension, README.md and AnyLoss_Code.ipynb: `Any_Fbeta`, `Any_Gmean`, `Any_BAccu`,
`s = 1e-5`, "L ... [2, 70]"). DECIDED here: s is also added inside the G-mean's square root
denominator (the KDD code has none, so a batch without one class divides by zero), and the square
root's argument is floored at 1e-12 so that its gradient stays finite when TP·TN = 0.

Multi-class (OURS: the paper is binary only and names the multi-class extension as future work).
Logits (B, C) with C ≥ 2 are treated one-vs-rest: class c is a binary problem with
p_ic = sigmoid(z_ic) and y_ic = 1[y_i = c], which keeps the paper's mechanism per class (at
initialisation p ≈ 0.5, where A is steepest; softmax probabilities ≈ 1/C would sit where A is flat
for the paper's L and barely train). `average="macro"` averages the C per-class metrics,
`average="micro"` pools the C confusion matrices first; `average="binary"` with C = 2 takes class 1
as the positive class. (B,) or (B, 1) logits are the paper's binary setting.

BATCH-LEVEL: the metric is a ratio of sums over the batch, so there is no per-sample form.
`reduction="mean"` and `"sum"` both return that single batch value (one value per batch: its mean
and its sum are itself); `reduction="none"` raises. Batches should hold both classes (for every
class, in the multi-class form): F_β of a batch without positives is 0 whatever the model does, and
balanced accuracy / G-mean lose their meaning (s keeps them finite); use large batches or a
class-balanced sampler on imbalanced data.

Computed in float32 (float64 stays float64): finite for logits of ±1e4 and in bf16 (A saturates
to exactly 0 or 1 there, and so does its gradient, as in the paper's saturation argument).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from toolkit.functional._reduce import check_class_logits, check_reduction

ANYLOSS_METRICS = ("accuracy", "f1", "fbeta", "balanced_accuracy", "gmean", "gmean_surrogate")
ANYLOSS_AVERAGES = ("macro", "micro", "binary")


def check_anyloss(metric: str, beta: float, L: float, average: str | None, eps: float) -> None:
    if metric not in ANYLOSS_METRICS:
        raise ValueError(f"metric must be one of {ANYLOSS_METRICS}, got {metric!r}")
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if metric == "f1" and beta != 1.0:
        raise ValueError(f"metric='f1' is F_β with β = 1; use metric='fbeta' for beta={beta}")
    if not L > 0 or not math.isfinite(L):
        raise ValueError(f"L (the amplifying scale) must be a finite number > 0, got {L}; the paper uses 73")
    if average is not None and average not in ANYLOSS_AVERAGES:
        raise ValueError(f"average must be one of {ANYLOSS_AVERAGES} or None, got {average!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def approximate(prob: Tensor, L: float) -> Tensor:
    """The approximation function A(p) = sigmoid(L·(p − 0.5))."""
    return torch.sigmoid(L * (prob - 0.5))


def _binary_targets(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(B, K) probabilities and (B, K) 0/1 labels of the K binary problems."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() == 1:  # the paper's binary setting
        if target.shape != x.shape:
            raise ValueError(f"binary target must be (B,) = ({x.shape[0]},), got {tuple(target.shape)}")
        t = target.to(x.dtype)
        if target.device.type == "cpu" and t.numel() and bool(((t != 0) & (t != 1)).any()):
            raise ValueError("binary targets must be 0 or 1")
        return torch.sigmoid(x).unsqueeze(1), t.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"anyloss needs (B,) binary logits or (B, C) logits, got shape {tuple(x.shape)}")
    check_class_logits(x, target, "anyloss with (B, C) logits")
    onehot = torch.zeros_like(x).scatter_(1, target.long().unsqueeze(1), 1.0)
    return torch.sigmoid(x), onehot


def soft_confusion(logits: Tensor, target: Tensor, L: float = 73.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Soft (TP, FN, FP, TN), each (K,): K = 1 for binary logits, K = C one-vs-rest otherwise."""
    prob, y = _binary_targets(logits, target)
    a = approximate(prob, L)
    tp = (y * a).sum(0)
    fn = (y * (1 - a)).sum(0)
    fp = ((1 - y) * a).sum(0)
    tn = ((1 - y) * (1 - a)).sum(0)
    return tp, fn, fp, tn


def confusion_metric(
    tp: Tensor, fn: Tensor, fp: Tensor, tn: Tensor, metric: str = "f1", beta: float = 1.0, eps: float = 1e-5
) -> Tensor:
    """M(TP, FN, FP, TN) elementwise, with AnyLoss's smoothing `eps` in the denominators."""
    pos, neg = tp + fn, fp + tn
    if metric == "accuracy":
        return (tp + tn) / (pos + neg)
    if metric in ("f1", "fbeta"):
        b2 = beta * beta
        return (1 + b2) * tp / (b2 * pos + tp + fp + eps)
    if metric == "balanced_accuracy":
        return (neg * tp + pos * tn) / (2 * pos * neg + eps)
    surrogate = tp * tn / (pos * neg + eps)
    if metric == "gmean_surrogate":
        return surrogate
    if metric == "gmean":
        return surrogate.clamp_min(1e-12).sqrt()
    raise ValueError(f"metric must be one of {ANYLOSS_METRICS}, got {metric!r}")


def anyloss(
    logits: Tensor,
    target: Tensor,
    metric: str = "f1",
    beta: float = 1.0,
    L: float = 73.0,
    average: str | None = None,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> Tensor:
    """Batch-level AnyLoss 1 − M(soft confusion matrix) (a scalar).

    logits: (B,) or (B, 1) for binary targets in {0, 1} (the paper's setting), or (B, C) with
    class-index targets (one-vs-rest per class). `average`: None picks "binary" for binary logits
    and "macro" for (B, C); "micro" pools the per-class counts; "binary" with (B, 2) logits scores
    class 1 only. There is no per-sample form: `reduction="none"` raises.
    """
    check_reduction(reduction)
    if reduction == "none":
        raise ValueError(
            "anyloss is batch-level (a metric of the whole batch's confusion matrix) and has no "
            "per-sample form; use reduction='mean'"
        )
    check_anyloss(metric, beta, L, average, eps)
    binary_logits = logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)
    tp, fn, fp, tn = soft_confusion(logits, target, L)
    if average is None:
        average = "binary" if binary_logits else "macro"
    if average == "binary" and not binary_logits:
        if logits.shape[1] != 2:
            raise ValueError(
                f"average='binary' needs binary logits or (B, 2) logits, got {logits.shape[1]} classes; "
                "use average='macro' or 'micro'"
            )
        tp, fn, fp, tn = tp[1:], fn[1:], fp[1:], tn[1:]
    if average == "micro":
        tp, fn, fp, tn = (
            tp.sum(0, keepdim=True),
            fn.sum(0, keepdim=True),
            fp.sum(0, keepdim=True),
            tn.sum(0, keepdim=True),
        )
    return 1 - confusion_metric(tp, fn, fp, tn, metric, beta, eps).mean()
