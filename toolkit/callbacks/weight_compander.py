"""Weight compander: each weight used through an elementwise bounded, zero-repelling function.

    trainer = L.Trainer(callbacks=[WeightCompanderCallback()])      # every Linear and Conv of module.model
    python -m recipes.train --callbacks weight_compander --callbacks.weight_compander.slope 2

UNCONFIRMED: the paper's function could not be read; the function used here is a stand-in with
the properties the paper states (see `toolkit.functional.weight_compander`). Surgery shared with
`sigma_reparam` (`toolkit.callbacks.reparam`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from toolkit.callbacks.reparam import (
    ReparamCallback,
    apply_reparametrization,
    find_layers,
    fold_reparametrization,
    log_scalars,
    reparametrized,
)
from toolkit.functional.weight_compander import compand, compand_inverse
from toolkit.registry import register


def initial_bound(weight: Tensor, bound: float | None, bound_scale: float) -> float:
    """The bound a of a layer: `bound` when given, else `bound_scale`·max|w₀| (for an all-zero
    weight, `bound_scale`/√fan_in)."""
    if bound is not None:
        return float(bound)
    peak = float(weight.detach().abs().max()) if weight.numel() else 0.0
    if peak == 0.0:
        peak = 1.0 / math.sqrt(max(1, weight[0].numel()))
    return bound_scale * peak


class WeightCompander(nn.Module):
    """Weight parametrization w = a·tanh(s·v/a) of a latent v (`torch.nn.utils.parametrize`).

    UNCONFIRMED stand-in for the paper's function (odd, bounded by a, slope s at zero). The
    latent is initialised to f⁻¹(w₀) (`right_inverse`), so the layer's function is unchanged at
    setup. a and s are stored as logarithms (`log_bound`, `log_slope`): trainable Parameters when
    `learnable` (the paper's extension that learns the hyper-parameters), fixed buffers otherwise.
    """

    def __init__(self, bound: float, slope: float, learnable: bool = False) -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        if not slope > 0:
            raise ValueError(f"slope must be > 0, got {slope}")
        log_bound = torch.tensor(math.log(bound))
        log_slope = torch.tensor(math.log(slope))
        if learnable:
            self.log_bound = nn.Parameter(log_bound)
            self.log_slope = nn.Parameter(log_slope)
        else:
            self.register_buffer("log_bound", log_bound)
            self.register_buffer("log_slope", log_slope)

    @property
    def bound(self) -> Tensor:
        return self.log_bound.exp()

    @property
    def slope(self) -> Tensor:
        return self.log_slope.exp()

    def forward(self, latent: Tensor) -> Tensor:
        return compand(latent.float(), self.bound, self.slope).to(latent.dtype)

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> Tensor:
        return compand_inverse(weight.float(), self.bound, self.slope).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bound={float(self.bound):.4g}, slope={float(self.slope):.4g}"


def apply_weight_compander(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    types: Iterable[str] = ("linear", "conv"),
    exclude: Sequence[str] = (),
    bound: float | None = None,
    bound_scale: float = 2.0,
    slope: float = 2.0,
    learnable: bool = False,
) -> list[str]:
    """Compand the chosen layers of `model` in place (outside any trainer); returns the paths."""
    check_compander_args(bound, bound_scale, slope)
    chosen = find_layers(model, layers, types, exclude)
    apply_reparametrization(
        model,
        chosen,
        lambda _p, w: WeightCompander(initial_bound(w, bound, bound_scale), slope, learnable),
        WeightCompander,
    )
    return sorted(chosen)


def remove_weight_compander(model: nn.Module) -> list[str]:
    """Fold every companded weight into a plain weight (for export)."""
    return fold_reparametrization(model, WeightCompander)


def check_compander_args(bound: float | None, bound_scale: float, slope: float) -> None:
    if bound is not None and not bound > 0:
        raise ValueError(f"bound must be None (relative to each layer) or > 0, got {bound}")
    if not bound_scale > 1:
        raise ValueError(
            f"bound_scale must be > 1 (the bound must exceed every initial weight), got {bound_scale}"
        )
    if not slope > 0:
        raise ValueError(f"slope must be > 0 (> 1 expands weights near zero), got {slope}")


@register("callback", "weight_compander")
class WeightCompanderCallback(ReparamCallback):
    """Weight compander (Cakaj, Mehnert & Yang, arXiv 2306.16993): w = f(v) per weight.

    UNCONFIRMED FUNCTION: f(v) = a·tanh(s·v/a) is a stand-in with the properties the paper
    states (odd, bounded: restricts weight magnitudes; slope s > 1 at zero: pushes weights away
    from zero; hyper-parameters optionally learned), not the paper's equation, which could not be
    read. Expected effect per the paper: a regulariser that improves generalisation when added to
    standard regularisation (weight decay, dropout, augmentation); no number retrieved.

    At `setup` the chosen layers of `pl_module.model` get a `WeightCompander` parametrization with
    latent v₀ = f⁻¹(w₀), so the function is unchanged at setup; state (latent, a, s) in checkpoints;
    `fold_on_fit_end=True` or `remove_weight_compander(model)` folds f(v) into plain weights. With
    `learnable=True`, `weight_compander/<layer>/bound` and `/slope` are logged every
    `log_every_n_steps` steps.

    Args:
        layers, types, exclude, target, fold_on_fit_end: which layers (see `ReparamCallback`);
            default every Linear and Conv layer (biases and norms untouched).
        bound: the bound a for every layer; None: `bound_scale`·max|w₀| per layer.
        bound_scale: relative bound (> 1 so every initial weight is inside it).
        slope: s, the slope at zero (> 1 expands small weights).
        learnable: learn a and s with the network (the paper's extension).
        log_every_n_steps: logging period when learnable (default: the trainer's).
    """

    kind = WeightCompander
    name = "weight_compander"
    default_types = ("linear", "conv")

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        types: Iterable[str] | None = None,
        exclude: Sequence[str] = (),
        target: str | None = "model",
        fold_on_fit_end: bool = False,
        bound: float | None = None,
        bound_scale: float = 2.0,
        slope: float = 2.0,
        learnable: bool = False,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(layers, types, exclude, target, fold_on_fit_end)
        check_compander_args(bound, bound_scale, slope)
        if log_every_n_steps is not None and (
            int(log_every_n_steps) != log_every_n_steps or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be None or an integer >= 1, got {log_every_n_steps}")
        self.bound = None if bound is None else float(bound)
        self.bound_scale = float(bound_scale)
        self.slope = float(slope)
        self.learnable = bool(learnable)
        self.log_every_n_steps = None if log_every_n_steps is None else int(log_every_n_steps)
        self.last_metrics: dict[str, float] = {}

    def make(self, path: str, weight: Tensor) -> nn.Module:
        return WeightCompander(
            initial_bound(weight, self.bound, self.bound_scale), self.slope, self.learnable
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.learnable:
            return
        period = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        step = trainer.global_step - 1  # this batch's optimiser step (already counted)
        if step % period:
            return
        metrics = {}
        for path, p in sorted(reparametrized(self.network(pl_module), WeightCompander).items()):
            metrics[f"weight_compander/{path}/bound"] = float(p.bound.detach())
            metrics[f"weight_compander/{path}/slope"] = float(p.slope.detach())
        self.last_metrics = metrics
        log_scalars(trainer, metrics, step)
