"""Lion, EvoLved Sign Momentum (Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le,
"Symbolic Discovery of Optimization Algorithms", NeurIPS 2023, arXiv 2302.06675).

Per parameter θ with gradient g and one momentum m (initialised to 0):

    θ ← θ · (1 − lr·λ)                     (decoupled weight decay)
    θ ← θ − lr · sign(β₁·m + (1 − β₁)·g)   (sign of the interpolated momentum)
    m ← β₂·m + (1 − β₂)·g

CONFIRMED from Google's reference PyTorch implementation (google/automl `lion/lion_pytorch.py`;
the `lion-pytorch` package, this module's test oracle, computes the same update): the order above
(decay, update from the interpolation, then the momentum), sign(0) = 0, betas in [0, 1), defaults
lr = 1e-4, betas = (0.9, 0.99), weight_decay = 0. The authors' guidance (as quoted by the Keras and
MLX documentation of Lion): lr 3–10× smaller than AdamW's and weight decay 3–10× larger, so that
lr·λ stays comparable, because sign updates have a larger norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from toolkit.optim._common import check_betas, check_lr, check_nonnegative, params_with_grad, run_closure
from toolkit.registry import register


@register("optimizer", "lion")
class Lion(Optimizer):
    """Lion: sign of the β₁-interpolated momentum, decoupled weight decay, one state tensor.

    Args:
        params: parameters or parameter groups (each group may set its own lr, betas, weight_decay).
        lr: learning rate (reference default 1e-4; use 3–10× less than with AdamW).
        betas: (β₁ for the update's interpolation, β₂ for the momentum), reference (0.9, 0.99).
        weight_decay: decoupled decay λ: θ ← θ(1 − lr·λ) (use 3–10× more than with AdamW).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        check_lr(lr)
        betas = check_betas(betas)
        check_nonnegative("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        for group, p, grad in params_with_grad(self, "Lion"):
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avg = state["exp_avg"]
            if wd:
                p.mul_(1 - lr * wd)
            update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
            p.add_(update, alpha=-lr)
            exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return loss
