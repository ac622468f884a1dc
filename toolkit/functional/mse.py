"""Squared error for scalar regression: the baseline `hl_gauss` is compared with.

    L(o, y) = (o − (y − μ)/s)²,   prediction ŷ = μ + s·o

o the model's single output, μ and s a fixed standardisation of the target (the usual practice:
a network initialised near 0 reaches targets in the hundreds only after many steps otherwise);
μ = 0, s = 1 is the plain squared error. Per sample, computed in float32 (stable in bf16).
"""

from __future__ import annotations

import math

from torch import Tensor

from toolkit.functional._reduce import check_reduction, reduce


def _single_output(pred: Tensor) -> Tensor:
    if pred.dim() == 2 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)
    if pred.dim() != 1:
        raise ValueError(
            f"squared error needs one output per sample ((B,) or (B, 1)), got shape {tuple(pred.shape)}; "
            "build the model with a single output"
        )
    return pred


def check_standardisation(loc: float, scale: float) -> None:
    if not math.isfinite(loc):
        raise ValueError(f"loc must be finite, got {loc}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be > 0, got {scale}")


def squared_error(
    pred: Tensor, target: Tensor, loc: float = 0.0, scale: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """(o − (y − loc)/scale)² for outputs o (B,) or (B, 1) and targets y (B,) or (B, 1)."""
    check_reduction(reduction)
    check_standardisation(loc, scale)
    pred = _single_output(pred)
    if target.dim() == 2 and target.shape[-1] == 1:
        target = target.squeeze(-1)
    if target.shape != pred.shape:
        raise ValueError(f"target must be ({pred.shape[0]},) like the predictions, got {tuple(target.shape)}")
    per_sample = (pred.float() - (target.float() - loc) / scale) ** 2
    return reduce(per_sample, reduction)


def squared_error_decode(pred: Tensor, loc: float = 0.0, scale: float = 1.0) -> Tensor:
    """The prediction ŷ = loc + scale·o (B,)."""
    return loc + scale * _single_output(pred).float()


__all__ = ["squared_error", "squared_error_decode"]
