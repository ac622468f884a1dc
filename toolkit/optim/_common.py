"""Argument checks and the step loop shared by the paper optimisers (`lion`, `diffgrad`, `classp`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def check_lr(lr: float) -> None:
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")


def check_betas(betas: Any) -> tuple[float, float]:
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be two numbers (beta1, beta2), got {betas!r}") from None
    for i, b in enumerate((b1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    return b1, b2


def check_nonnegative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def run_closure(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def params_with_grad(optimizer: torch.optim.Optimizer, name: str) -> Iterator[tuple[dict, Tensor, Tensor]]:
    """(group, parameter, gradient) for every parameter that has a gradient."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{name} does not support complex parameters")
            yield group, p, p.grad
