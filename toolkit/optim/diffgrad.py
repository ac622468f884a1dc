"""diffGrad (Dubey, Chakraborty, Roy, Mukherjee, Singh & Chaudhuri, "diffGrad: An Optimization
Method for Convolutional Neural Networks", IEEE TNNLS 2019, arXiv 1909.11015).

Adam whose first-moment step is scaled per element by a friction coefficient from the change of
the gradient:

    m_t = β₁ m_{t−1} + (1 − β₁) g_t,   v_t = β₂ v_{t−1} + (1 − β₂) g_t²
    ξ_t = 1 / (1 + exp(−|g_{t−1} − g_t|))          (in [0.5, 1); g_0 = 0)
    θ_t = θ_{t−1} − lr · √(1 − β₂ᵗ)/(1 − β₁ᵗ) · ξ_t · m_t / (√v_t + ε)

i.e. lr·ξ_t·m̂_t/(√v̂_t + ε′) with ε′ = ε/√(1 − β₂ᵗ): ε is added to √v_t, as in the official code.

CONFIRMED from the official code (shivram1987/diffGrad): `diffGrad_v2.py`, which fixes the bug of
`diffGrad.py` (used for the paper's experiments) where `previous_grad` aliased the current gradient
so |g_{t−1} − g_t| was always 0 and ξ ≡ 0.5. This implementation follows the paper's rule (v2):
the previous gradient is a copy. Weight decay as in the official code: L2, g ← g + λθ before the
moments and ξ (the decayed gradient is also what is remembered). Defaults lr 1e-3,
betas (0.9, 0.999), eps 1e-8, weight_decay 0. `torch-optimizer`'s `DiffGrad` (the same semantics)
is the test oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from toolkit.optim._common import check_betas, check_lr, check_nonnegative, params_with_grad, run_closure
from toolkit.registry import register


@register("optimizer", "diffgrad")
class DiffGrad(Optimizer):
    """diffGrad (v2 semantics): Adam with a per-element friction ξ = sigmoid(|g_{t−1} − g_t|).

    Args:
        params: parameters or parameter groups (each may set lr, betas, eps, weight_decay).
        lr: learning rate (1e-3).
        betas: Adam's (β₁, β₂) (0.9, 0.999).
        eps: added to √v_t (1e-8).
        weight_decay: L2 penalty λ added to the gradient (0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check_lr(lr)
        betas = check_betas(betas)
        check_nonnegative("eps", eps)
        check_nonnegative("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        for group, p, grad in params_with_grad(self, "DiffGrad"):
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["previous_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avg, exp_avg_sq, previous = state["exp_avg"], state["exp_avg_sq"], state["previous_grad"]
            state["step"] += 1
            t = state["step"]
            if group["weight_decay"]:
                grad = grad.add(p, alpha=group["weight_decay"])
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            friction = torch.sigmoid((previous - grad).abs())
            previous.copy_(grad)  # a copy: the v1 code's aliasing made ξ ≡ 0.5
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            p.addcdiv_(exp_avg * friction, denom, value=-step_size)
        return loss
