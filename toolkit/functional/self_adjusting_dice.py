"""Self-adjusting Dice loss for (data-imbalanced) classification.

Li, Sun, Meng, Liang, Wu & Li, "Dice Loss for Data-imbalanced NLP Tasks" (ACL 2020,
arXiv 1911.02855); official code ShannonAI/dice_loss_for_NLP (`loss/dice_loss.py`). Per sample i
and class c, with p = softmax(z), y the one-hot target, p̃ = (1 − p)^α·p the self-adjusted
probability and γ the smoothing constant:

    DSC_ic = (2·p̃_ic·y_ic + γ) / (p̃_ic + y_ic + γ)            (paper)
    DSC_ic = (2·p̃_ic·y_ic + γ) / (p̃_ic² + y_ic² + γ)          (square_denominator=True)
    L_i    = Σ_c (1 − DSC_ic)

Confirmed from the paper's text: the per-instance coefficient (2·p_i1·y_i1 + γ)/(p_i1 + y_i1 + γ),
γ added so that negatives (y = 0, coefficient γ/(p + γ)) contribute, and the self-adjusting factor
(1 − p)^α that down-weights easy examples (the paper writes it for a binary task, p_i1 the
positive-class probability). Confirmed from the official code: p̃ = (1 − p)^α·p, the multi-class
extension as one such term per softmax class summed over classes, the `square_denominator`
option (p̃² + y²), the defaults smooth = 1e-4 and alpha = 0 of the class, and smooth = 1,
alpha = 0.01 with `--dice_square` in the two published scripts read (`scripts/tnews/bert_dice.sh`,
text classification, and a BERT-large MRPC dice script).

Which variant this is: the per-sample one, a (B,) loss with a true per-sample form. With the
squared denominator it is exactly the official code's computation (its intersection and its
`torch.sum(..., -1)` denominators are both per element there). The official code's *non-squared*
path differs: its intersection is per element but its denominator `flat_input.sum() +
flat_target.sum()` sums over the whole batch, so its per-sample values depend on the batch and
perfect predictions do not give 0; the published scripts do not use that path and it is not
reproduced. Not implemented either: the official OHEM option, the token mask (use per-sample
losses with a weighter) and the single-logit sigmoid variant (use two logits).

Computation: in float32 from log-softmax; log(1 − p_c) is taken as log1p(−p_c) for every class but
the row's arg-max (where p_c ≤ ½) and as logsumexp of the other logits minus logsumexp(z) for the
arg-max, so p → 1 (logits of ±1e4) gives finite values and gradients also for 0 < α < 1, where
d(1 − p)^α/dp is infinite at p = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_class_logits, check_nonnegative, check_reduction, reduce


def check_dice_args(alpha: float, smooth: float) -> None:
    check_nonnegative("alpha", alpha)
    if not (math.isfinite(alpha)):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if not (smooth > 0 and math.isfinite(smooth)):
        raise ValueError(
            f"smooth (γ) must be a finite number > 0, got {smooth}; without it negatives give 0/0 and no gradient "
            "(the official scripts use 1)"
        )


def log_one_minus_softmax(logits: Tensor) -> Tensor:
    """log(1 − softmax(z)) (B, C), stable with finite gradients also where p = 1 in float."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = (z - lse).exp()
    top = z.argmax(dim=-1, keepdim=True)
    is_top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, top, True)
    # every other class has p ≤ ½, where log1p(−p) is accurate with a gradient ≤ 2 in size
    rest = torch.log1p(-p.masked_fill(is_top, 0.0))
    others = torch.logsumexp(z.masked_fill(is_top, float("-inf")), dim=-1, keepdim=True) - lse
    return torch.where(is_top, others, rest)


def self_adjusting_dice_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float = 0.01,
    smooth: float = 1.0,
    square_denominator: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Σ_c (1 − DSC_ic) per sample of `logits` (B, C) against class indices (B,); (B,) with "none".

    α = 0 is the plain (smoothed) soft Dice loss of each sample; α > 0 shrinks the contribution
    of confident (easy) predictions.
    """
    check_reduction(reduction)
    check_dice_args(alpha, smooth)
    check_class_logits(logits, target, "self_adjusting_dice")
    logp = F.log_softmax(logits.float(), dim=-1)
    log_adjusted = logp + alpha * log_one_minus_softmax(logits) if alpha else logp
    p_adj = log_adjusted.exp()
    y = F.one_hot(target.long(), logits.shape[-1]).float()
    if square_denominator:
        den = p_adj.square() + y + smooth  # y² = y for a one-hot target
    else:
        den = p_adj + y + smooth
    dice = (2 * p_adj * y + smooth) / den
    return reduce((1 - dice).sum(-1), reduction)
