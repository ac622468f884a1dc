"""The data that flows between the parts: `Batch` in, `ModelOutput` out, `Progress` for schedules.

`Batch` is a NamedTuple so that PyTorch's default collate and Lightning's device transfer keep its
type. Modules accept plain `(x, y)`, `(x, y, index)` tuples and dicts too (see `as_batch`), so an
existing DataModule works unchanged; only methods that keep per-sample memory need `index`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

_INPUT_KEYS = ("input", "x", "image", "images", "pixel_values", "inputs")
_TARGET_KEYS = ("target", "y", "label", "labels", "targets")
_INDEX_KEYS = ("index", "idx", "indices", "sample_index")


class Batch(NamedTuple):
    """One training batch: model input, class targets and the dataset index of every sample.

    `input` is a tensor, or a dict of tensors for text models (`input_ids`, `attention_mask`, ...).
    `index` is None when the data source gives no sample indices.
    """

    input: Any
    target: Tensor | None = None
    index: Tensor | None = None

    @property
    def size(self) -> int:
        if isinstance(self.input, Tensor):
            return self.input.shape[0]
        if isinstance(self.input, Mapping):
            return next(iter(self.input.values())).shape[0]
        raise TypeError(f"cannot infer the batch size of an input of type {type(self.input).__name__}")


def _pick(d: Mapping, keys: Sequence[str]) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def as_batch(batch: Any) -> Batch:
    """Normalise what a DataLoader yields into a `Batch`.

    Accepts a `Batch`, a tuple/list `(x,)`, `(x, y)` or `(x, y, index)`, or a dict with
    input/target/index under common names. A dict with none of the input names is treated as
    tokenised text: every key other than the target and index goes to the model.
    """
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Mapping):
        target = _pick(batch, _TARGET_KEYS)
        index = _pick(batch, _INDEX_KEYS)
        inp = _pick(batch, _INPUT_KEYS)
        if inp is None:
            inp = {k: v for k, v in batch.items() if k not in _TARGET_KEYS and k not in _INDEX_KEYS}
            if not inp:
                raise ValueError(f"batch dict has no model input; keys are {sorted(batch)}")
        return Batch(inp, target, index)
    if isinstance(batch, (tuple, list)):
        if not 1 <= len(batch) <= 3:
            raise ValueError(
                f"a tuple batch must be (input,), (input, target) or (input, target, index); got {len(batch)} items"
            )
        return Batch(*batch)
    if isinstance(batch, Tensor):
        return Batch(batch)
    raise TypeError(f"unsupported batch type {type(batch).__name__}: yield a Batch, a tuple or a dict")


def require_index(batch: Batch, who: str) -> Tensor:
    """The batch's sample indices, or a clear error naming the method that needs them."""
    if batch.index is None:
        raise ValueError(
            f"{who} keeps per-sample memory and needs the dataset index of every sample, but the batch has "
            "none. Use a toolkit DataModule (they yield Batch(input, target, index)), wrap your dataset in "
            "toolkit.data.IndexedDataset, or yield (x, y, index) tuples."
        )
    return batch.index


@dataclass
class ModelOutput:
    """What a network produced for one batch.

    logits: (B, C) class scores. embedding: (B, D) penultimate pooled features, when the adapter
    can produce them. features: intermediate activations keyed by module path (filled by
    `FeatureTaps`).
    """

    logits: Tensor
    embedding: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> ModelOutput:
        return ModelOutput(
            self.logits.detach(),
            None if self.embedding is None else self.embedding.detach(),
            {k: v.detach() for k, v in self.features.items()},
        )


@dataclass(frozen=True)
class Progress:
    """Where training is: used by scheduled weights and epoch-dependent methods."""

    epoch: int = 0
    global_step: int = 0
    max_epochs: int = 1
    steps_per_epoch: int = 1

    @property
    def fraction(self) -> float:
        """Fraction of the planned optimiser steps done, in [0, 1]."""
        total = max(1, self.max_epochs * self.steps_per_epoch)
        return min(1.0, self.global_step / total)


def check_targets(target: Tensor, num_classes: int, where: str = "batch") -> None:
    """Raise a clear error when class targets fall outside [0, num_classes)."""
    if target is None or target.is_floating_point():
        return
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels out of range in the {where}: found labels in [{lo}, {hi}] but the model has "
            f"{num_classes} classes (valid labels are 0..{num_classes - 1}). Set num_classes to match the "
            "data, or remap the labels."
        )


def to_device_input(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device_input(v, device) for k, v in x.items()}
    return x
