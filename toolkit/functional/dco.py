"""DCO: the confidence-limited cross-entropy that targets pass@N ("direct coverage optimisation").

Chen, Raventós, Cheng, Ganguli & Druckmann, "Rethinking Fine-Tuning when Scaling Test-Time
Compute: Limiting Confidence Improves Mathematical Reasoning" (NeurIPS 2025, arXiv 2502.07154);
the authors' blog post "Direct Coverage Optimization" (druckmann-lab.github.io, 2025-03-07).

With p̂ = Π_t p(y_t | x, y_<t) the model's probability of the whole correct answer, pass@N (at
least one of N independent samples is correct) has probability 1 − (1 − p̂)^N, and

    L_DCO^N = −log(1 − (1 − p̂)^N),       ∇L = F(N, p̂)·∇(−log p̂),
    F(N, p) = N·p·(1 − p)^(N−1) / (1 − (1 − p)^N)  ∈ (0, 1]

N = 1 gives exactly the sequence NLL (−log p̂, i.e. cross-entropy summed over the answer); for
N > 1, F → 0 as p̂ → 1, so examples the model is already confident about stop pushing it to more
confidence (the paper's over-confidence argument), and F → 1 as p̂ → 0 (CE on hard examples).

Confirmed (the paper's abstract and the authors' blog): the pass@N objective, the loss and its
gradient factor. Decided here: the "answer" is a sequence of tokens whose log-probabilities are
summed (`level="sequence"`, the paper's setting); `level="token"` applies the same loss to every
token's own probability (our extension for plain language modelling, where a whole chunk's p̂ is
vanishingly small and sequence-level DCO equals the sequence NLL). Not implemented: the paper's
approximate variant for chain-of-thought and proof-tree search (its exact form was not read).

Numerics: L is computed from s = log p̂ in float64 in log space — log(−log(1 − p̂)) uses the
series s + p̂/2 for p̂ < e⁻²⁰, and −log(1 − e^u) with u = N·log(1 − p̂) uses c − e^c/2,
c = log(−u), when −u < e⁻²⁰ — so it is finite from p̂ = 1 down to log p̂ = −10⁶ (where
L ≈ −log N − log p̂), where the direct formula gives inf. The gradient is the analytic factor,
log F = log N + s + (N − 1)·log(1 − p̂) + L (a custom autograd function), which is exactly 1 for
N = 1 and 0 at p̂ = 1 for N > 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction

LEVELS = ("sequence", "token")
_SMALL = -20.0  # below e^-20 the two-term series are exact in float64


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0 (−inf at 0), accurate on both sides of −log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _dco_value(s: Tensor, n: float) -> Tensor:
    """L = −log(1 − (1 − e^s)^n) from s = log p̂ ≤ 0, float64, in log space."""
    # a = log(−log(1 − p̂))
    small = s < _SMALL
    s_small = torch.where(small, s, _SMALL)
    s_big = torch.where(small, _SMALL, s)
    a = torch.where(small, s_small + torch.exp(s_small) / 2, torch.log(-_log1mexp(s_big)))
    c = math.log(n) + a  # log(−u), u = n·log(1 − p̂)
    tiny = c < _SMALL
    c_small = torch.where(tiny, c, _SMALL)
    c_big = torch.where(tiny, _SMALL, c)
    log_cover = torch.where(tiny, c_small - torch.exp(c_small) / 2, _log1mexp(-torch.exp(c_big)))
    return -log_cover


class _DCOFromLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: Tensor, n: float) -> Tensor:
        s64 = s.double().clamp(max=0.0)
        loss = _dco_value(s64, n)
        ctx.save_for_backward(s64, loss)
        ctx.n = n
        return loss.to(s.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        s64, loss = ctx.saved_tensors
        n = ctx.n
        if n == 1:
            factor = torch.ones_like(s64)
        else:
            log_factor = math.log(n) + s64 + (n - 1) * _log1mexp(s64) + loss
            factor = torch.exp(log_factor)
        return (-factor * grad.double()).to(grad.dtype), None


def dco_from_log_prob(log_prob: Tensor, n: float) -> Tensor:
    """L_DCO^n = −log(1 − (1 − p̂)^n) elementwise from log p̂ (any shape; values > 0 are clipped to 0).

    Gradient w.r.t. log p̂: −F(n, p̂).
    """
    check_n(n)
    return _DCOFromLogProb.apply(log_prob, float(n))


def dco_factor(log_prob: Tensor, n: float) -> Tensor:
    """The gradient factor F(n, p̂) = n·p̂·(1 − p̂)^(n−1) / (1 − (1 − p̂)^n), from log p̂."""
    check_n(n)
    s = log_prob.double().clamp(max=0.0)
    if n == 1:
        return torch.ones_like(s)
    return torch.exp(math.log(n) + s + (n - 1) * _log1mexp(s) + _dco_value(s, n))


def check_n(n: float) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not n >= 1 or math.isinf(n):
        raise ValueError(f"n (the pass@N sample budget) must be a finite number >= 1, got {n!r}")


def dco_loss(
    logits: Tensor,
    target: Tensor,
    n: float = 4,
    ignore_index: int = -100,
    level: str = "sequence",
    reduction: str = "mean",
) -> Tensor:
    """DCO of logits (..., V) against targets (...).

    `level="sequence"`: a sequence is the last axis of `target` when it has two or more axes
    ((B, T) targets: log p̂_b = Σ_t log p(y_bt), ignored tokens left out), otherwise every row is
    a one-token answer ((B,) targets: a classifier). Returns (B,) per sequence for "none"; "mean"
    averages over sequences with at least one valid token.
    `level="token"`: every token's own probability is p̂; "none" returns per-token losses shaped
    like `target` (0 at ignored tokens); "mean" averages over valid tokens.
    """
    check_reduction(reduction)
    check_n(n)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., V), got shape {tuple(logits.shape)}")
    if target.is_floating_point():
        raise ValueError("DCO needs integer class/token targets (p̂ is the probability of the correct answer)")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target must have the logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(target.shape)}"
        )
    vocab = logits.shape[-1]
    if target.device.type == "cpu" and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}")
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    z = logits.float()
    log_p = -F.cross_entropy(z.reshape(-1, vocab), safe.reshape(-1), reduction="none").reshape(safe.shape)
    log_p = torch.where(valid, log_p, 0.0)
    if level == "token":
        per = torch.where(valid, dco_from_log_prob(log_p, n), 0.0)
        counted = valid
    else:
        seq_log_p = log_p.sum(-1) if target.dim() >= 2 else log_p
        counted = valid.any(-1) if target.dim() >= 2 else valid
        per = torch.where(counted, dco_from_log_prob(seq_log_p, n), 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / counted.sum().clamp_min(1)


__all__ = ["dco_factor", "dco_from_log_prob", "dco_loss"]
