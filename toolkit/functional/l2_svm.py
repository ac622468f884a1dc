"""L2-SVM (squared hinge) loss on a classifier's raw scores.

Tang, "Deep Learning using Linear Support Vector Machines" (ICML 2013 workshop, arXiv 1306.0239)
trains the last layer of a network as one-vs-rest L2-SVMs; Agarap, "An Architecture Combining
Convolutional Neural Network (CNN) and Support Vector Machine (SVM) for Image Classification"
(arXiv 1712.03541) and "A Neural Network Architecture Combining Gated Recurrent Unit (GRU) and
Support Vector Machine (SVM) for Intrusion Detection" (arXiv 1709.03082) use the same loss on a CNN
and a GRU. For scores o (B, C) = W·h + b and labels t_ic = +1 if c = y_i else −1:

    one_vs_rest     L_i = C_pen · red_c max(0, m − t_ic·o_ic)²
    weston_watkins  L_i = C_pen · red_{c≠y} max(0, m − (o_iy − o_ic))²      (= F.multi_margin_loss(p=2))
    + λ · mean(W²)  on the classifier weight W, added to every sample when λ > 0

with red = mean over the C classes (Agarap's `tf.reduce_mean` over the (B, C) matrix; for
weston_watkins the sum over c ≠ y divided by C, as `F.multi_margin_loss`) or sum (Tang's Σ_c),
margin m = 1. The batch mean of L_i is Agarap's loss `reduce_mean(square(W)) + C·hinge_loss`
exactly (its weight penalty is λ = 1 on the mean of the squared weights).

Confirmed from Agarap's code (AFAgarap/cnn-svm `model/cnn_svm.py`; the same `svm_loss` function
recurs in his other repositories): one-hot labels with 0 replaced by −1, the squared hinge
max(0, 1 − t·o)² averaged over batch and classes, the penalty parameter C multiplying it, the
regulariser `reduce_mean(square(readout_weight))` on the readout weight only (not its bias), Adam
lr 1e-3, batch 128. C is a command-line argument there (C = 1 is `methods-1.md`'s recollection,
marked inferred; the default here). The code predicts argmax(sign(o)); the toolkit's accuracy takes
argmax(o), the same class whenever exactly one score is positive. Tang's L2-SVM objective
½‖w‖² + C·Σ max(0, 1 − t·o)² is recalled (`methods-1.md`, marked inferred there): `class_reduction=
"sum"` with λ = 0 and weight decay gives it. The Weston–Watkins (multi-class margin) form is an
option for comparison with `F.multi_margin_loss`, not the papers' loss.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_class_logits, check_nonnegative, check_reduction, reduce

MULTICLASS = ("one_vs_rest", "weston_watkins")
CLASS_REDUCTIONS = ("mean", "sum")


def check_svm_args(margin: float, penalty: float, multiclass: str, class_reduction: str) -> None:
    if not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number > 0, got {margin} (the SVM margin is 1)")
    check_nonnegative("penalty", penalty)
    if not math.isfinite(penalty):
        raise ValueError(f"penalty must be finite, got {penalty}")
    if multiclass not in MULTICLASS:
        raise ValueError(f"multiclass must be one of {MULTICLASS}, got {multiclass!r}")
    if class_reduction not in CLASS_REDUCTIONS:
        raise ValueError(f"class_reduction must be one of {CLASS_REDUCTIONS}, got {class_reduction!r}")


def check_weight_penalty(weight_penalty: float) -> None:
    check_nonnegative("weight_penalty", weight_penalty)
    if not math.isfinite(weight_penalty):
        raise ValueError(f"weight_penalty must be finite, got {weight_penalty}")


def l2_svm_loss(
    scores: Tensor,
    target: Tensor,
    margin: float = 1.0,
    penalty: float = 1.0,
    multiclass: str = "one_vs_rest",
    class_reduction: str = "mean",
    weight: Tensor | None = None,
    weight_penalty: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Squared hinge of raw `scores` (B, C) against class indices (B,); (B,) with "none".

    `weight` (the classifier's weight matrix) with `weight_penalty` λ adds λ·mean(W²) to every
    sample (its gradient flows into W). Computed in float32.
    """
    check_reduction(reduction)
    check_svm_args(margin, penalty, multiclass, class_reduction)
    check_weight_penalty(weight_penalty)
    check_class_logits(scores, target, "l2_svm")
    o = scores.float()
    num_classes = o.shape[-1]
    onehot = F.one_hot(target.long(), num_classes).bool()
    if multiclass == "one_vs_rest":
        t = onehot.float() * 2 - 1
        hinge = (margin - t * o).clamp_min(0).square()
    else:
        o_y = o.gather(-1, target.long().unsqueeze(-1))
        hinge = (margin - o_y + o).clamp_min(0).square().masked_fill(onehot, 0.0)
    per_sample = hinge.sum(-1)
    if class_reduction == "mean":
        per_sample = per_sample / num_classes
    per_sample = penalty * per_sample
    if weight_penalty:
        if weight is None:
            raise ValueError("weight_penalty > 0 needs the classifier's weight matrix (weight=...)")
        per_sample = per_sample + weight_penalty * weight.float().square().mean()
    return reduce(per_sample, reduction)
