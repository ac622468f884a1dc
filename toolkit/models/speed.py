"""Speed switches for a network, applied in place: channels-last memory format and `torch.compile`.

    use_channels_last(model)          # 4-D weights channels-last; 4-D inputs converted per forward
    compile_model(model, {"mode": "max-autotune"})   # forward_output(model, x) runs compiled

Both act through `toolkit.models.forward_output`, which every toolkit module (student, eval
steps) and `Teacher` (each member) call, so the compiled path is the one training uses. What is
compiled is that whole function for this network: `forward_features` + `forward_head(pre_logits)`
+ classifier for timm-style models (one graph giving logits and embedding), `model(x)` for
others, and the forward hooks of `FeatureTaps` on its submodules (traced into the graph: the
tapped features come out of the compiled code). Loss terms, projectors, the optimiser and
Lightning's loop stay eager.

Nothing is stored on the network (a weak-keyed table in `toolkit.models.output`): module paths,
`state_dict` keys (checkpoints), pickling and `copy.deepcopy` are unchanged, and a deep copy
(an EMA teacher) runs eagerly. Every network gets its own compiled function, so recompilations
of one (train and eval mode, a last smaller batch) do not use up another's cache.

Lower precision is not here: the student's is the Trainer's (`precision="bf16-mixed"`), the
teacher's its own (`Teacher(precision="bf16-true")`).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from toolkit.models.output import SPEED, SpeedState, eager_forward_output, unwrap

COMPILE_OPTIONS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def _state(model: nn.Module) -> SpeedState:
    if not isinstance(model, nn.Module):
        raise TypeError(f"speed switches apply to an nn.Module, got {type(model).__name__}")
    core = unwrap(model)
    state = SPEED.get(core)
    if state is None:
        state = SPEED[core] = SpeedState()
    return state


def use_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last memory format for the network's 4-D weights and, from now on, for the 4-D
    inputs `forward_output` gives it. The Parameter objects are kept (optimisers keep their
    references); values are unchanged. On CPU (oneDNN) and on GPUs with tensor cores,
    convolutions and pooling are faster in this layout."""
    _state(model).channels_last = True
    unwrap(model).to(memory_format=torch.channels_last)
    return model


def check_compile_options(options: Any) -> dict[str, Any]:
    """`True`/`None` (defaults) or a mapping of `torch.compile` keyword arguments; anything else is
    an error naming the accepted keys."""
    if options is None or options is True:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(
            f"compile options must be true or a mapping of torch.compile arguments ({', '.join(COMPILE_OPTIONS)}), "
            f"got {options!r}"
        )
    unknown = sorted(set(options) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown torch.compile options {unknown}; accepted: {', '.join(COMPILE_OPTIONS)} "
            f"(torch.compile{inspect.signature(torch.compile)})"
        )
    return dict(options)


def _own_forward() -> Any:
    """A copy of `eager_forward_output` with its own code object: Dynamo keeps its compiled
    entries (and their recompilation limit) per code object, so each network gets its own."""
    f = eager_forward_output
    code = f.__code__.replace()
    return types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)


def compile_model(model: nn.Module, options: Mapping[str, Any] | bool | None = None) -> nn.Module:
    """Make `forward_output(model, x)` run `torch.compile` of the whole forward (see the module
    docstring). Compilation happens on the first call (and again when the mode, grad mode or
    input shapes change). Calling it again with other options replaces the compiled function;
    with the same options it keeps it (and what it has compiled)."""
    kwargs = check_compile_options(options)
    state = _state(model)
    if state.compiled is None or state.compile_options != kwargs:
        state.compiled = torch.compile(_own_forward(), **kwargs)
        state.compile_options = kwargs
    return model


def speed_state(model: nn.Module) -> dict[str, bool]:
    """Which switches are on for `model`: {"channels_last": ..., "compiled": ...}."""
    state = SPEED.get(unwrap(model)) or SpeedState()
    return {"channels_last": state.channels_last, "compiled": state.compiled is not None}


def clear_speed(model: nn.Module) -> None:
    """Switch compilation and channels-last inputs off (the weights keep their memory format)."""
    SPEED.pop(unwrap(model), None)


__all__ = [
    "COMPILE_OPTIONS",
    "check_compile_options",
    "clear_speed",
    "compile_model",
    "speed_state",
    "use_channels_last",
]
