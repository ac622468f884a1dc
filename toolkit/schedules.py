"""Weights that change over training, for loss terms (e.g. a KD weight warmed up over 20 epochs).

A weight is a float, a callable `Progress -> float`, or a dict spec read from YAML:

    {"schedule": "linear", "start": 0.0, "end": 1.0, "begin_epoch": 0, "end_epoch": 20}
    {"schedule": "cosine", "start": 1.0, "end": 0.0}            # over the whole run
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from toolkit.types import Progress

Weight = float | Callable[[Progress], float]


@dataclass(frozen=True)
class Ramp:
    """Linear (or cosine) move from `start` to `end` between two (fractional) epochs.

    With `end_epoch=None` the ramp spans the whole run (by fraction of optimiser steps).
    """

    start: float = 0.0
    end: float = 1.0
    begin_epoch: float = 0.0
    end_epoch: float | None = None
    shape: str = "linear"

    def __post_init__(self) -> None:
        if self.shape not in ("linear", "cosine"):
            raise ValueError(f"schedule shape must be 'linear' or 'cosine', got {self.shape!r}")
        if self.end_epoch is not None and self.end_epoch <= self.begin_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be after begin_epoch ({self.begin_epoch})")

    def __call__(self, progress: Progress) -> float:
        if self.end_epoch is None:
            t = progress.fraction
        else:
            epoch = progress.global_step / max(1, progress.steps_per_epoch)
            t = (epoch - self.begin_epoch) / (self.end_epoch - self.begin_epoch)
        t = min(1.0, max(0.0, t))
        if self.shape == "cosine":
            t = 0.5 * (1 - math.cos(math.pi * t))
        return self.start + (self.end - self.start) * t


def as_weight(spec: Any) -> Weight:
    """Turn a float, callable or YAML dict into a term weight."""
    if isinstance(spec, bool):
        raise TypeError("a term weight must be a number, a callable or a schedule dict, not a bool")
    if isinstance(spec, (int, float)):
        return float(spec)
    if callable(spec):
        return spec
    if isinstance(spec, Mapping):
        kw = dict(spec)
        shape = kw.pop("schedule", "linear")
        try:
            return Ramp(shape=shape, **kw)
        except TypeError as e:
            raise TypeError(
                f"bad schedule spec {dict(spec)}: {e}. Keys: schedule, start, end, begin_epoch, end_epoch"
            ) from e
    raise TypeError(
        f"a term weight must be a number, a callable or a schedule dict, got {type(spec).__name__}"
    )


def weight_value(weight: Weight, progress: Progress) -> float:
    return weight(progress) if callable(weight) else weight
