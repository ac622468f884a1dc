"""One-step look-ahead: a differentiable virtual SGD step and the hypergradient it gives.

Meta-learning methods that tune something the training loss depends on (per-sample weights, a
loss-mixing network, augmentation parameters) from how well the model does *after* training on
it share one computation (Ren et al. 2018, "Learning to Reweight Examples"; Shu et al. 2019,
"Meta-Weight-Net"; TGeo-KD, `toolkit.distill.tgeo_kd`):

    θ'(ω) = θ − η · ∇_θ L_inner(θ, ω)            a virtual SGD step, kept differentiable in ω
    g_ω   = ∂ L_outer(θ'(ω)) / ∂ω                 the hypergradient

    = −η · (∂²L_inner / ∂ω ∂θ)ᵀ · ∇_θ' L_outer(θ')   (one Hessian-vector product; no Hessian is formed)

The model is run functionally (`torch.func.functional_call`) on the parameter dictionaries θ and
θ', so its own parameters, their `.grad` and its buffers (BatchNorm running statistics: the
look-ahead runs on clones) are left untouched: the real optimiser step happens afterwards, as
usual. The caller updates ω with its own optimiser (`apply_meta_gradients`).

    result = lookahead_hypergradient(
        model,
        inner_loss=lambda f: (weights(omega) * F.cross_entropy(f(x), y, reduction="none")).mean(),
        outer_loss=lambda f: F.cross_entropy(f(x_val), y_val),
        meta_params={"omega": omega},      # leaves with requires_grad=True
        lr=0.1,
    )
    apply_meta_gradients(meta_optimizer, {"omega": omega_param}, result.meta_grads)

Cost: one extra forward/backward on the inner batch with `create_graph=True`, one forward/backward
on the outer batch, and the double-backward through the inner gradient (about 3× a training
step). `params` restricts the virtual step to some of the parameters (e.g. the last layer, a
common cheaper approximation): the others are held fixed.

Under DDP, average the meta gradients across processes before the meta step
(`average_across_processes`) so every replica keeps the same meta-parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

FunctionalModel = Callable[..., Any]


@dataclass
class LookaheadResult:
    """What `lookahead_hypergradient` returns.

    Attributes:
        meta_grads: ∂L_outer(θ'(ω))/∂ω for every meta-parameter, by name (zeros where L_outer does
            not depend on it).
        inner_loss: L_inner(θ, ω), detached.
        outer_loss: L_outer(θ'), detached.
    """

    meta_grads: dict[str, Tensor]
    inner_loss: Tensor
    outer_loss: Tensor


def trainable_params(model: nn.Module, names: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """The model's parameters that require grad, by name; `names(name) -> bool` filters them."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and (names is None or names(n))}


def functional_model(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None
) -> FunctionalModel:
    """`f(*args, **kwargs)` = `model(*args, **kwargs)` run with `params` (and `buffers`) in place of
    the module's own tensors; names not given keep the module's tensors."""
    tensors = {**(buffers or {}), **params}

    def f(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, tensors, args, kwargs)

    return f


def virtual_sgd_step(
    params: Mapping[str, Tensor], loss: Tensor, lr: float, create_graph: bool = True
) -> dict[str, Tensor]:
    """θ − lr·∇_θ loss for each tensor of `params` (tensors the loss does not use are returned as
    they are). With `create_graph=True` the result stays differentiable in whatever the loss
    depended on (the meta-parameters)."""
    _check_lr(lr)
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True
    )
    return {n: params[n] if g is None else params[n] - lr * g for n, g in zip(names, grads)}


def lookahead_hypergradient(
    model: nn.Module,
    inner_loss: Callable[[FunctionalModel], Tensor],
    outer_loss: Callable[[FunctionalModel], Tensor],
    meta_params: Mapping[str, Tensor],
    lr: float,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
) -> LookaheadResult:
    """The hypergradient of one SGD look-ahead step (see the module docstring).

    Args:
        model: the network trained by the inner loss (the student).
        inner_loss: `inner_loss(f) -> scalar`, where `f` runs the model at the current θ; the
            meta-parameters must enter this loss (e.g. per-sample weights computed from them).
        outer_loss: `outer_loss(f) -> scalar`, where `f` runs the model at θ' (e.g. cross-entropy
            on a held-out batch). It should not use the meta-parameters directly.
        meta_params: ω by name: tensors with `requires_grad=True` (e.g. detached copies of a
            meta-network's parameters, used inside `inner_loss` through `functional_call`).
        lr: η ≥ 0, the virtual step size (usually the model optimiser's current learning rate).
            η = 0 gives zero hypergradients.
        params: the θ to step (default: every parameter of `model` that requires grad); other
            parameters stay fixed at their current values.
        buffers: the buffers to run with (default: clones of the model's buffers, so BatchNorm
            running statistics are not changed by the look-ahead forwards).

    Returns:
        `LookaheadResult(meta_grads, inner_loss, outer_loss)`. Nothing is written to any `.grad`.
    """
    _check_lr(lr)
    if not meta_params:
        raise ValueError("meta_params is empty: give the tensors to differentiate with respect to")
    for name, p in meta_params.items():
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(
                f"meta-parameter {name!r} must be a tensor with requires_grad=True "
                "(e.g. p.detach().requires_grad_() for each parameter of the meta-network)"
            )
    theta = dict(trainable_params(model) if params is None else params)
    if not theta:
        raise ValueError("no model parameter to step: the model has no parameter that requires grad")
    for name, p in theta.items():
        if not p.requires_grad:
            raise ValueError(f"model parameter {name!r} does not require grad: the virtual step needs it")
    if buffers is None:
        buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.enable_grad():
        inner = inner_loss(functional_model(model, theta, buffers))
        _check_scalar("inner_loss", inner)
        stepped = virtual_sgd_step(theta, inner, lr, create_graph=True)
        outer = outer_loss(functional_model(model, stepped, buffers))
        _check_scalar("outer_loss", outer)
        names = list(meta_params)
        grads = torch.autograd.grad(outer, [meta_params[n] for n in names], allow_unused=True)
    meta_grads = {
        n: torch.zeros_like(meta_params[n]) if g is None else g.detach() for n, g in zip(names, grads)
    }
    return LookaheadResult(meta_grads, inner.detach(), outer.detach())


def average_across_processes(grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The mean of each gradient over the processes of an initialised `torch.distributed` group
    (unchanged in a single process)."""
    out = dict(grads)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        for name, g in out.items():
            g = g.clone()
            torch.distributed.all_reduce(g)
            out[name] = g / world
    return out


def apply_meta_gradients(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]
) -> None:
    """Write `grads` into the `.grad` of `params` (by name), step `optimizer`, then clear the
    `.grad` again so no other optimiser sees them."""
    missing = set(params) - set(grads)
    if missing:
        raise KeyError(f"no gradient given for meta-parameters {sorted(missing)}")
    for name, p in params.items():
        p.grad = grads[name].to(device=p.device, dtype=p.dtype)
    optimizer.step()
    for p in params.values():
        p.grad = None


def _check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"the look-ahead learning rate must be a finite number >= 0, got {lr!r}")


def _check_scalar(name: str, value: Any) -> None:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must return a scalar tensor (reduce it, e.g. .mean()), got {shape}")


__all__ = [
    "LookaheadResult",
    "apply_meta_gradients",
    "average_across_processes",
    "functional_model",
    "lookahead_hypergradient",
    "trainable_params",
    "virtual_sgd_step",
]
