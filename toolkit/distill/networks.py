"""Networks a loss term owns beside the student (an online peer, an EMA copy), built during the
module's dry run and rebuilt from a checkpoint before their weights load.

A term records the `spec` it built its network from ({"name": model name, "kwargs": ...}, the
format of `ClassificationModule.model_spec`) in its extra state; `set_extra_state` runs before the
term's children are loaded, so a strict `load_state_dict` (Lightning resume, `load_from_checkpoint`)
finds the network there. A network built from an `nn.Module` (no spec) cannot be rebuilt that way:
call `module.prepare(example_input)` before loading, as for any module built outside a Trainer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from toolkit.models.factory import create_model


def build_network(spec: dict[str, Any], device: torch.device | None = None) -> nn.Module:
    """`create_model(spec["name"], **spec["kwargs"])`, on `device`."""
    net = create_model(spec["name"], **dict(spec.get("kwargs") or {}))
    return net.to(device) if device is not None else net


def student_spec(module: Any) -> dict[str, Any] | None:
    """The student's model spec ({"name", "kwargs"}) if the module built it from a name, else None."""
    spec = getattr(module, "model_spec", None)
    return copy.deepcopy(spec) if spec else None


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without the forward hooks (feature taps) installed on it, so running
    the copy never writes into the original's taps."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return twin


__all__ = ["build_network", "plain_copy", "student_spec"]
