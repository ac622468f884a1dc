"""Confidence calibration of a classifier: reliability bins, ECE / MCE, temperature scaling.

Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017
(arXiv 1706.04599); official code: gpleiss/temperature_scaling `temperature_scaling.py`.

With p̂_i = max_k softmax(z_i)_k the top-1 confidence, ŷ_i its class, and M equal-width bins
B_m = {i : p̂_i ∈ ((m − 1)/M, m/M]}:

    acc(B_m)  = mean of 1[ŷ_i = y_i] over B_m          conf(B_m) = mean of p̂_i over B_m
    ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)|          MCE = max_m |acc(B_m) − conf(B_m)|
    temperature scaling: q̂ = softmax(z / T), T > 0 minimising the NLL on held-out (validation)
    data. T does not change the arg-max, so accuracy is unchanged; T > 1 softens over-confident
    predictions.

CONFIRMED from the official code: M = 15 bins with (lower, upper] intervals, each bin weighted by
the fraction of samples in it (`_ECELoss`); T fitted by LBFGS on the mean cross-entropy of z / T
over the whole validation set (`set_temperature`: lr 0.01, max_iter 50, T initialised at 1.5).
MCE (max over non-empty bins) is the paper's Eq. (4).

DECIDED here: the fit optimises log T (so T stays positive) with LBFGS and a strong-Wolfe line
search from T = 1, in float64, and clips the result to [t_min, t_max] (when every validation
prediction is right and separable the NLL keeps falling as T → 0: no finite optimum). The
official step (lr 0.01 without line search) can stop short of the optimum within 50 iterations.
Bins follow Guo's (lower, upper]; torchmetrics' `CalibrationError` uses [lower, upper) and gives
confidences equal to 1 a bin of their own; the two agree except for confidences lying exactly on
a bin edge (the tests use torchmetrics as an oracle on continuous data). Logits are upcast to
float32 before the softmax (bf16 inputs and magnitudes of 1e4 are fine).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_class_logits

NORMS = ("l1", "max")


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of the top-1 confidence: `edges` (M + 1,), `count` (M,), mean
    `confidence` (M,) and `accuracy` (M,) (both 0 in empty bins)."""

    edges: Tensor
    count: Tensor
    confidence: Tensor
    accuracy: Tensor


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins} (Guo et al. use 15)")


def _check(logits: Tensor, target: Tensor, who: str) -> None:
    check_class_logits(logits, target, who)
    if logits.shape[0] == 0:
        raise ValueError(f"{who} needs at least one sample, got an empty batch")


def reliability_bins(logits: Tensor, target: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Bin the top-1 confidences of softmax(`logits`) (N, C) into `n_bins` equal-width (lower,
    upper] bins and return the count, mean confidence and accuracy of each bin."""
    _check_bins(n_bins)
    _check(logits, target, "reliability_bins")
    probs = torch.softmax(logits.detach().float(), dim=-1)
    confidence, pred = probs.max(dim=-1)
    correct = (pred == target).float()
    edges = torch.linspace(0.0, 1.0, int(n_bins) + 1, device=probs.device)
    # right=False: edges[i-1] < x <= edges[i], i.e. Guo's (lower, upper] intervals
    idx = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.zeros(int(n_bins), device=probs.device).index_add_(0, idx, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, idx, confidence)
    acc_sum = torch.zeros_like(count).index_add_(0, idx, correct)
    denom = count.clamp_min(1.0)
    return ReliabilityBins(edges, count, conf_sum / denom, acc_sum / denom)


def calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15, norm: str = "l1") -> Tensor:
    """Top-label calibration error of softmax(`logits`): `norm="l1"` is the ECE (bin gaps
    weighted by the fraction of samples), `norm="max"` the MCE (largest gap of a non-empty bin).
    A scalar tensor (not differentiable: the binning is piecewise constant)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} ('l1' = ECE, 'max' = MCE), got {norm!r}")
    bins = reliability_bins(logits, target, n_bins)
    gap = (bins.accuracy - bins.confidence).abs()
    if norm == "l1":
        return (gap * bins.count).sum() / bins.count.sum()
    return gap[bins.count > 0].max()


def expected_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15) -> Tensor:
    """ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)| (Guo et al. 2017, Eq. 3)."""
    return calibration_error(logits, target, n_bins, "l1")


def maximum_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15) -> Tensor:
    """MCE = max_m |acc(B_m) − conf(B_m)| over non-empty bins (Guo et al. 2017, Eq. 4)."""
    return calibration_error(logits, target, n_bins, "max")


def check_temperature_value(temperature: float | Tensor) -> None:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {t}")


def temperature_scale(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """z / T (differentiable in both). Softmax of the result gives the calibrated probabilities."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        if not temperature.requires_grad:
            check_temperature_value(temperature)
        return logits / temperature.to(logits.dtype).reshape(())
    check_temperature_value(temperature)
    return logits / temperature


def fit_temperature(
    logits: Tensor,
    target: Tensor,
    max_iter: int = 100,
    t_min: float = 1e-2,
    t_max: float = 1e2,
) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T) over (logits, target).

    LBFGS with a strong-Wolfe line search on log T from T = 1 (float64), clipped to
    [t_min, t_max]. Works inside Lightning's evaluation loop (`torch.inference_mode`)."""
    _check(logits, target, "fit_temperature")
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter}")
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().to(torch.float64).clone()
        y = target.detach().long().clone()
        log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS(
            [log_t],
            lr=1.0,
            max_iter=int(max_iter),
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )
        lo, hi = math.log(t_min), math.log(t_max)

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            # clamped inside the closure too: the line search may probe far outside [t_min, t_max]
            loss = F.cross_entropy(z / log_t.clamp(lo - 1.0, hi + 1.0).exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        value = float(log_t.detach())
    if math.isnan(value):
        raise RuntimeError("the temperature fit diverged (NaN): check the logits for NaN or inf values")
    return float(min(max(math.exp(min(max(value, lo), hi)), t_min), t_max))
