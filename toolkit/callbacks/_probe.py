"""Shared parts of the observing callbacks: a fixed probe batch, the loss on it, parameter
selection by module path, and the train/eval bookkeeping that leaves the run untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.distill.taps import resolve_module
from toolkit.models.output import as_model_output
from toolkit.types import Batch, as_batch, to_device_input

LossFn = Callable[[Any, Batch], Tensor]


def probe_loader(trainer: Any) -> Any:
    """Where a probe batch comes from: the DataModule's unaugmented training samples in index
    order (`scoring_dataloader`, toolkit DataModules), else its `train_dataloader()`, else the
    trainer's training loader (a module that defines its own); None if none is available yet."""
    dm = getattr(trainer, "datamodule", None)
    if dm is not None:
        if hasattr(dm, "scoring_dataloader"):
            return dm.scoring_dataloader()
        if hasattr(dm, "train_dataloader"):
            return dm.train_dataloader()
    loader = getattr(trainer, "train_dataloader", None)
    return loader if loader is not None and not callable(loader) else None


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate batch inputs of type {type(first).__name__}")


def collect_batch(loader: Any, num_samples: int) -> Batch:
    """The first `num_samples` samples of `loader` as one Batch on CPU. Drawn under a forked
    random state, so a shuffling loader leaves the run's random stream unchanged."""
    inputs, targets, n = [], [], 0
    with torch.random.fork_rng(devices=[]):
        for raw in loader:
            b = as_batch(raw)
            if b.target is None:
                raise ValueError("the probe batch needs targets (labelled training data)")
            inputs.append(to_device_input(b.input, torch.device("cpu")))
            targets.append(b.target.cpu())
            n += len(b.target)
            if n >= num_samples:
                break
    if not inputs:
        raise ValueError("the training data is empty: no probe batch can be drawn")
    x, y = _cat(inputs), torch.cat(targets)
    if isinstance(x, Tensor):
        x = x[:num_samples]
    else:
        x = {k: v[:num_samples] for k, v in x.items()}
    return Batch(x, y[:num_samples])


def as_probe_batch(batch: Any) -> Batch:
    """A user-given probe batch ((x, y), a Batch or a dict) as a Batch on CPU."""
    b = as_batch(batch)
    if b.target is None:
        raise ValueError("the probe batch must carry targets: give (x, y)")
    return Batch(to_device_input(b.input, torch.device("cpu")), b.target.cpu())


def default_loss(pl_module: Any, batch: Batch) -> Tensor:
    """Mean cross-entropy of the module's forward on the batch (float32)."""
    logits = as_model_output(pl_module(batch.input)).logits
    return F.cross_entropy(logits.float(), batch.target)


def select_parameters(pl_module: nn.Module, path: str | None) -> tuple[list[str], list[Tensor]]:
    """(names, parameters that require grad) of the LightningModule, or of its submodule at
    `path` (e.g. "model.fc"); a wrong path lists the closest module paths."""
    root = pl_module if path in (None, "", ".") else resolve_module(pl_module, path)
    prefix = "" if path in (None, "", ".") else f"{path}."
    named = [(prefix + n, p) for n, p in root.named_parameters() if p.requires_grad]
    if not named:
        where = "the module" if not prefix else f"{path!r}"
        raise ValueError(f"{where} has no trainable parameters to measure")
    return [n for n, _ in named], [p for _, p in named]


@contextmanager
def measuring(pl_module: nn.Module, train_mode: bool = False) -> Iterator[None]:
    """Gradients on (even under Lightning's inference mode), the module in eval mode (no
    BatchNorm statistics updates, no dropout) unless `train_mode`, parameter `.grad`s untouched;
    everything restored afterwards."""
    modes = {m: m.training for m in pl_module.modules()}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            pl_module.train(train_mode)
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def device_batch(batch: Batch, device: torch.device) -> Batch:
    """A clone of the probe batch on `device` (a normal tensor even under inference mode)."""
    x = batch.input
    x = x.to(device).clone() if isinstance(x, Tensor) else {k: v.to(device).clone() for k, v in x.items()}
    return Batch(x, batch.target.to(device).clone())


def current_lr(trainer: Any) -> float | None:
    """The learning rate of the first parameter group of the first optimiser (None without one)."""
    optimizers = getattr(trainer, "optimizers", None) or []
    if not optimizers:
        return None
    groups = optimizers[0].param_groups
    return float(groups[0]["lr"]) if groups else None


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")
    return int(value)
