"""Bias loss: cross-entropy weighted per sample by the variance of its feature maps.

Abrahamyan, Ziatchin, Chen & Deligiannis, "Bias Loss for Mobile Neural Networks" (ICCV 2021,
arXiv 2107.11170); official code lusinlu/bias-loss-skipblocknet (`bias_loss/biasloss.py`,
`bias_loss/train.py`, `bias_loss/models/resnet.py`). For a batch with features F_i of sample i
(a feature map of the network, detached):

    v_i = Var(vec(F_i))                              (unbiased, over all C·H·W values)
    v̂_i = (v_i − m) / (max_j v_j − min_j v_j)        m = min_j v_j, or a running minimum
    w_i = exp(β·v̂_i) − 1 + α
    L_i = w_i · CE(z_i, y_i)                          (batch loss: the mean over i)

Confirmed from the official code: the variance of each sample's flattened, detached feature map
(`torch.var`, unbiased); min-max scaling with the batch range, where the subtracted minimum is
either the batch minimum (`normalisation_mode="local"`) or the smallest batch minimum seen so far
(`"global"`, the code's default: the running minimum is held by the loss object); the weight
exp(β·v̂) − 1 + α with α = β = 0.3; the mean of w·CE; the feature being the output of the last
convolutional stage before pooling (ResNet-18's `layer4` output, post-ReLU, returned by the
model beside the logits). The paper's own text could not be read here: `methods-2.md` recalls
its scaling function as z(v) = exp(α·v) − β (α = β = 0.3, unverified); with α = β that differs from
the code's weight by the constant 0.4 (w = z − 0.4). The code's form is implemented.

Decided here: when all variances of the batch are equal (or B = 1) the range is 0 and the code
divides by 0; here v̂ = 0, so every weight is α and the loss is α·CE. The weights carry no
gradient (the features are detached, as in the code). The per-sample values depend on the batch
through the min-max scaling.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from toolkit.functional._reduce import check_class_logits, check_nonnegative, check_reduction, reduce
from toolkit.functional.cross_entropy import cross_entropy


def check_bias_args(alpha: float, beta: float) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        check_nonnegative(name, value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")


def feature_variance(features: Tensor) -> Tensor:
    """(B,) unbiased variance of each sample's flattened features, detached, in float32."""
    if features.dim() < 2:
        raise ValueError(f"bias_loss needs per-sample features (B, ...), got shape {tuple(features.shape)}")
    flat = features.detach().float().reshape(features.shape[0], -1)
    if flat.shape[1] < 2:
        raise ValueError(
            f"bias_loss needs at least 2 feature values per sample for a variance, got {flat.shape[1]}: tap a "
            "feature map (e.g. the last convolutional stage), not a scalar"
        )
    return flat.var(dim=1, unbiased=True)


def bias_weights(
    variance: Tensor, alpha: float = 0.3, beta: float = 0.3, variance_min: Tensor | float | None = None
) -> Tensor:
    """w_i = exp(β·v̂_i) − 1 + α with v̂ = (v − m)/(max v − min v); m the batch minimum, or
    `variance_min` (the official "global" mode's running minimum). A zero range gives v̂ = 0."""
    check_bias_args(alpha, beta)
    v = variance.detach().float()
    lo, hi = v.min(), v.max()
    m = lo if variance_min is None else torch.as_tensor(variance_min, dtype=v.dtype, device=v.device)
    span = hi - lo
    scaled = torch.where(span > 0, (v - m) / span.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))
    return torch.expm1(beta * scaled) + alpha


def bias_loss(
    logits: Tensor,
    target: Tensor,
    features: Tensor,
    alpha: float = 0.3,
    beta: float = 0.3,
    variance_min: Tensor | float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """w_i·CE(z_i, y_i) for `logits` (B, C), class indices (B,) and `features` (B, ...) of the same
    samples; (B,) with "none". The weights come from `bias_weights(feature_variance(features))`."""
    check_reduction(reduction)
    check_bias_args(alpha, beta)
    check_class_logits(logits, target, "bias_loss")
    if features.shape[0] != logits.shape[0]:
        raise ValueError(f"bias_loss: {features.shape[0]} feature rows for {logits.shape[0]} logits rows")
    w = bias_weights(feature_variance(features), alpha, beta, variance_min)
    return reduce(w * cross_entropy(logits, target, reduction="none"), reduction)
