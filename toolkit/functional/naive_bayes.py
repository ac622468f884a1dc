"""Gaussian naive Bayes on frozen features, in closed form (a generative linear probe).

Zheng, Wu, Bao, Cao, Li & Zhu, "Revisiting Discriminative vs. Generative Classifiers: Theory
and Implications", ICML 2023 (arXiv 2302.02334); official code:
ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers `models/gaussnb.py`.

Per class c (n_c training samples, n in all): prior π_c = n_c / n, mean μ_c, diagonal variance
v_c (population variance, ddof 0). The paper's classifier shares one prior-weighted pooled
variance σ² = Σ_c π_c v_c (+ ε) across classes, which makes it LINEAR in x:

    log p(x, c) = log π_c − ½ Σ_d [(x_d − μ_cd)² / σ²_d + log(2π σ²_d)]
    ŷ = argmax_c  w_c·x + b_c,   w_c = μ_c / σ²,   b_c = log π_c − ½ Σ_d μ_cd² / σ²_d

(the terms in x_d² and log σ² are the same for every class and drop out of the arg-max).
`variance="per_class"` keeps v_c + ε per class (scikit-learn's `GaussianNB`, quadratic).

CONFIRMED from the official code: per-class means, per-class population variances, priors n_c/n,
prediction with the prior-weighted pooled variance `Σ_c prior_c · var_c` and the log prior; `fit`
merges the statistics of successive chunks with the parallel-variance formula (exactly what
`merge_gaussian_nb_stats` does), so streaming over batches equals one fit on all data.

DECIDED here: the smoothing ε follows scikit-learn (`var_smoothing` × the largest per-feature
variance of all training data, default 1e-9) instead of the official absolute 1e-9 added per
class: scale-free, so embeddings of any magnitude behave alike, and `variance="per_class"`
then equals `sklearn.naive_bayes.GaussianNB` exactly. Classes absent from the training data get
prior 0 (never predicted). Statistics are accumulated in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

VARIANCES = ("pooled", "per_class")


class GaussianNBStats(NamedTuple):
    """Sufficient statistics per class: `count` (C,), `mean` (C, D), `m2` (C, D) = Σ (x − μ_c)²."""

    count: Tensor
    mean: Tensor
    m2: Tensor


class GaussianNBParams(NamedTuple):
    """A fitted classifier: `mean` (C, D), `var` (C, D) (rows equal when pooled), `log_prior` (C,)."""

    mean: Tensor
    var: Tensor
    log_prior: Tensor


def gaussian_nb_stats(x: Tensor, y: Tensor, num_classes: int) -> GaussianNBStats:
    """Per-class count, mean and sum of squared deviations of the (N, D) features `x`."""
    if x.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    if y.shape != x.shape[:1] or y.is_floating_point():
        raise ValueError(
            f"labels must be (N,) = ({x.shape[0]},) class indices, got {tuple(y.shape)} {y.dtype}"
        )
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
    if y.numel() and bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"labels must be class indices in [0, {num_classes})")
    x = x.detach().to(torch.float64)
    y = y.detach().long()
    c, d = int(num_classes), x.shape[1]
    count = torch.zeros(c, dtype=torch.float64, device=x.device).index_add_(
        0, y, torch.ones(y.shape[0], dtype=torch.float64, device=x.device)
    )
    total = torch.zeros(c, d, dtype=torch.float64, device=x.device).index_add_(0, y, x)
    mean = total / count.clamp_min(1.0)[:, None]
    m2 = torch.zeros_like(total).index_add_(0, y, (x - mean[y]) ** 2)
    return GaussianNBStats(count, mean, m2)


def merge_gaussian_nb_stats(a: GaussianNBStats, b: GaussianNBStats) -> GaussianNBStats:
    """Statistics of the union of two disjoint chunks (Chan et al.'s parallel-variance formula,
    as the official `fit` merges successive calls)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"cannot merge statistics of shapes {tuple(a.mean.shape)} and {tuple(b.mean.shape)}")
    count = a.count + b.count
    n = count.clamp_min(1.0)[:, None]
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count[:, None] / n)
    m2 = a.m2 + b.m2 + delta**2 * (a.count * b.count)[:, None] / n
    return GaussianNBStats(count, mean, m2)


def _total_variance(stats: GaussianNBStats) -> Tensor:
    """Per-feature population variance of all the data the statistics summarise."""
    n = stats.count.sum()
    grand = (stats.count[:, None] * stats.mean).sum(0) / n
    m2 = stats.m2.sum(0) + (stats.count[:, None] * (stats.mean - grand) ** 2).sum(0)
    return m2 / n


def gaussian_nb_fit(
    x: Tensor | None = None,
    y: Tensor | None = None,
    num_classes: int | None = None,
    variance: str = "pooled",
    var_smoothing: float = 1e-9,
    stats: GaussianNBStats | None = None,
) -> GaussianNBParams:
    """Fit Gaussian naive Bayes from features `x` (N, D) and labels `y` (N,), or from
    accumulated `stats`. `variance`: "pooled" (the paper: Σ_c π_c v_c shared, a linear
    classifier) or "per_class" (scikit-learn's GaussianNB). `var_smoothing`: ε = var_smoothing ×
    the largest per-feature variance of all the training data, added to every variance."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if not var_smoothing >= 0:
        raise ValueError(f"var_smoothing must be >= 0, got {var_smoothing}")
    if stats is None:
        if x is None or y is None or num_classes is None:
            raise ValueError("give either x, y and num_classes, or stats=gaussian_nb_stats(...)")
        stats = gaussian_nb_stats(x, y, num_classes)
    n = stats.count.sum()
    if not n > 0:
        raise ValueError("Gaussian naive Bayes needs at least one training sample")
    eps = var_smoothing * _total_variance(stats).max()
    var_c = stats.m2 / stats.count.clamp_min(1.0)[:, None]
    prior = stats.count / n
    if variance == "pooled":
        var = (prior[:, None] * var_c).sum(0, keepdim=True).expand_as(var_c) + eps
    else:
        var = var_c + eps
    if bool((var <= 0).any()):
        raise ValueError(
            "a feature has zero variance and var_smoothing=0 (or all features are constant): "
            "use var_smoothing > 0, e.g. 1e-9"
        )
    return GaussianNBParams(stats.mean, var.contiguous(), prior.log())


def gaussian_nb_log_likelihood(params: GaussianNBParams, x: Tensor) -> Tensor:
    """Joint log-likelihood log p(x, c) (N, C), float64 (scikit-learn's `_joint_log_likelihood`)."""
    if x.dim() != 2 or x.shape[1] != params.mean.shape[1]:
        raise ValueError(f"features must be (N, {params.mean.shape[1]}), got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    mean, var = params.mean.to(x.device), params.var.to(x.device)
    quad = ((x[:, None, :] - mean[None]) ** 2 / var[None]).sum(-1)
    return params.log_prior.to(x.device) - 0.5 * (var * (2 * math.pi)).log().sum(-1) - 0.5 * quad


def gaussian_nb_predict(params: GaussianNBParams, x: Tensor, chunk: int = 4096) -> Tensor:
    """Predicted classes (N,) (arg-max of the joint log-likelihood; chunked over samples)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat(
        [gaussian_nb_log_likelihood(params, x[s : s + chunk]).argmax(-1) for s in range(0, x.shape[0], chunk)]
    )


def gaussian_nb_linear(params: GaussianNBParams) -> tuple[Tensor, Tensor]:
    """(W (C, D), b (C,)) of the pooled-variance classifier: x @ W.T + b differs from the joint
    log-likelihood by a per-sample constant, so it has the same arg-max and softmax."""
    var = params.var[0]
    if not torch.equal(params.var, var.expand_as(params.var)):
        raise ValueError("only the pooled-variance classifier is linear: fit with variance='pooled'")
    weight = params.mean / var
    bias = params.log_prior - 0.5 * (params.mean**2 / var).sum(-1)
    return weight, bias
