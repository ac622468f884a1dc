"""CLASSP (Ludwig, "CLASSP: a Biologically-Inspired Approach to Continual Learning through
Adjustment Suppression and Sparsity Promotion", arXiv 2405.09637, 2024).

A generalised AdaGrad with a gradient threshold, per weight i:

    G_i ← G_i + |g_i|^p                                        (every step)
    w_i ← w_i − lr · g_i / (G_i + ε)^{1/p}    if g_i² > threshold,   else w_i unchanged

Adjustment suppression: weights that received much gradient get smaller steps (they likely
encode earlier tasks); sparsity promotion: only weights whose gradient matters for the current
loss move, leaving the others free for later tasks. p = 2 and threshold = 0 is AdaGrad.

Followed: the paper's per-weight rule (its equation: update only when (∇L(w_i))² > threshold,
denominator (ε + Σ_k |∇L(w_{i,k})|^p)^{1/p}). Decided where the sources differ: the sum includes
the current gradient (as AdaGrad, which the paper generalises, and the official code; a sum that
stops at the previous step would make the first step lr·g/ε^{1/p}), and it accumulates at every
step for every weight, as the equation's sum over all past gradients.

The official code (oswaldoludwig/CLASSP `CLASSP.py`) deviates from the paper, and
`reference_compat=True` reproduces it: its test `(grad ** 2).any() > threshold` compares a boolean
with the threshold, so a whole tensor is updated when any of its gradients is non-zero (and never
when threshold >= 1); it accumulates |g| (the `** power` result is discarded) and only when that
test passes. Defaults from the code: lr 0.2, threshold 0.5, epsilon 1e-5, power 1,
apply_scaling True. Weight decay (not in the paper): L2, g ← g + λw before everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from toolkit.optim._common import check_lr, check_nonnegative, params_with_grad, run_closure
from toolkit.registry import register


@register("optimizer", "classp")
class CLASSP(Optimizer):
    """CLASSP: per-weight thresholded updates scaled by lr/(Σ|g|^p + ε)^{1/p}.

    Args:
        params: parameters or parameter groups (each may set any option below).
        lr: learning rate (0.2).
        threshold: a weight moves only if g² > threshold (0.5).
        eps: ε in the denominator (1e-5).
        power: p (1).
        apply_scaling: divide by (G + ε)^{1/p}; False gives thresholded SGD (True).
        weight_decay: L2 penalty λ added to the gradient (0).
        reference_compat: reproduce the official code's per-tensor test and |g| accumulation.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.2,
        threshold: float = 0.5,
        eps: float = 1e-5,
        power: float = 1.0,
        apply_scaling: bool = True,
        weight_decay: float = 0.0,
        reference_compat: bool = False,
    ) -> None:
        check_lr(lr)
        check_nonnegative("threshold", threshold)
        check_nonnegative("weight_decay", weight_decay)
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be > 0 (it keeps the first steps finite), got {eps!r}")
        if not isinstance(power, (int, float)) or not power > 0:
            raise ValueError(f"power must be > 0, got {power!r}")
        defaults = dict(
            lr=lr,
            threshold=threshold,
            eps=eps,
            power=power,
            apply_scaling=bool(apply_scaling),
            weight_decay=weight_decay,
            reference_compat=bool(reference_compat),
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        for group, p, grad in params_with_grad(self, "CLASSP"):
            state = self.state[p]
            if not state:
                state["grad_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grad_sum = state["grad_sum"]
            lr, power, eps = group["lr"], group["power"], group["eps"]
            if group["weight_decay"]:
                grad = grad.add(p, alpha=group["weight_decay"])
            if group["reference_compat"]:
                # the official code: `if (grad ** 2).any() > threshold:` (a bool against the threshold)
                if float(bool((grad**2).any())) > group["threshold"]:
                    grad_sum.add_(grad.abs())
                    scale = lr / (grad_sum + eps).pow(1 / power) if group["apply_scaling"] else lr
                    p.sub_(scale * grad)
                continue
            grad_sum.add_(grad.abs().pow(power))
            move = grad * grad > group["threshold"]
            step = grad / (grad_sum + eps).pow(1 / power) if group["apply_scaling"] else grad
            p.sub_(torch.where(move, step, torch.zeros_like(step)), alpha=lr)
        return loss

    def average_grad_sum(self) -> float:
        """The mean accumulated |g|^p over every parameter element with state (for logging)."""
        total, count = 0.0, 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "grad_sum" in state:
                    total += float(state["grad_sum"].sum())
                    count += p.numel()
        return total / count if count else 0.0
