"""Optimisers and LR schedules from a name or a config dict.

    build_optimizer(params, {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4})
    build_scheduler(opt, {"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}, max_epochs=240)

Optimisers are registered under kind "optimizer" (torch's `sgd`, `adam`, `adamw`, `rmsprop` here;
the paper optimisers add themselves), schedules under "scheduler". Schedules step per epoch
unless the config says `interval: step`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import lr_scheduler

from toolkit import registry

for _name, _cls in (
    ("sgd", torch.optim.SGD),
    ("adam", torch.optim.Adam),
    ("adamw", torch.optim.AdamW),
    ("rmsprop", torch.optim.RMSprop),
):
    registry.register("optimizer", _name)(_cls)


def _spec(spec: str | Mapping[str, Any] | None, default: str) -> tuple[str, dict[str, Any]]:
    if spec is None:
        return default, {}
    if isinstance(spec, str):
        return spec, {}
    kw = dict(spec)
    return kw.pop("name", default), kw


def build_optimizer(params: Iterable, spec: str | Mapping[str, Any] | None) -> torch.optim.Optimizer:
    name, kw = _spec(spec, "sgd")
    cls = registry.get("optimizer", name)
    if name == "sgd":
        kw.setdefault("lr", 0.1)
        kw.setdefault("momentum", 0.9)
    try:
        return cls(params, **kw)
    except TypeError as e:
        raise TypeError(f"bad options for optimizer {name!r}: {e}") from e


@registry.register("scheduler", "multistep")
def _multistep(opt, milestones=(150, 180, 210), gamma: float = 0.1, max_epochs: int | None = None):
    return lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)


@registry.register("scheduler", "step")
def _step(opt, step_size: int = 30, gamma: float = 0.1, max_epochs: int | None = None):
    return lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)


@registry.register("scheduler", "cosine")
def _cosine(
    opt, max_epochs: int | None = None, t_max: int | None = None, eta_min: float = 0.0, warmup_epochs: int = 0
):
    total = t_max or max_epochs
    if not total:
        raise ValueError("the cosine schedule needs t_max or the trainer's max_epochs")
    cosine = lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup_epochs), eta_min=eta_min)
    if not warmup_epochs:
        return cosine
    warm = lr_scheduler.LinearLR(opt, start_factor=1.0 / (warmup_epochs + 1), total_iters=warmup_epochs)
    return lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[warmup_epochs])


@registry.register("scheduler", "constant")
def _constant(opt, max_epochs: int | None = None):
    return lr_scheduler.LambdaLR(opt, lambda _epoch: 1.0)


def build_scheduler(
    opt: torch.optim.Optimizer, spec: str | Mapping[str, Any] | None, max_epochs: int | None = None
) -> dict[str, Any] | None:
    """A Lightning lr-scheduler config dict, or None for no schedule."""
    if spec is None or spec == "none":
        return None
    name, kw = _spec(spec, "constant")
    interval = kw.pop("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ValueError(f"scheduler interval must be 'epoch' or 'step', got {interval!r}")
    factory = registry.get("scheduler", name)
    try:
        sched = factory(opt, max_epochs=max_epochs, **kw)
    except TypeError as e:
        raise TypeError(f"bad options for scheduler {name!r}: {e}") from e
    return {"scheduler": sched, "interval": interval}
