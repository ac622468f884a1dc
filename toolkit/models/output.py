"""Run any supported network and get a `ModelOutput` (logits + penultimate embedding).

No wrapping: the user's model keeps its module paths (so `FeatureTaps` paths stay "layer3", not
"model.layer3"). Dispatch is by what the model offers:
- timm-style `forward_features` + `forward_head(pre_logits=True)` + `get_classifier()` (timm
  models and our CIFAR nets): logits and pooled embedding from one pass;
- Hugging Face `PreTrainedModel`: called with the tokenised dict, `output_hidden_states=True`;
  embedding = first-token state of the last hidden layer;
- anything else: `model(x)`, a tensor of logits, a `ModelOutput`, or a tuple whose first item is
  the logits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.types import ModelOutput


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (`module`), torch.compile (`_orig_mod`) and Lightning/Fabric
    (`_forward_module`) wrappers."""
    while True:
        for attr in ("_forward_module", "_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def _is_timm_like(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier"))


@dataclass
class SpeedState:
    """The speed switches set on one network (see `toolkit.models.speed`)."""

    channels_last: bool = False
    compiled: Callable[[Any, Any], ModelOutput] | None = None
    compile_options: dict[str, Any] | None = None


# network -> its switches. Weak keys: nothing is stored on the network itself, so its state_dict,
# pickling and deep copies (an EMA copy of a student) are unchanged; a copy runs eagerly.
SPEED: weakref.WeakKeyDictionary[nn.Module, SpeedState] = weakref.WeakKeyDictionary()


def forward_output(model: Any, x: Any) -> ModelOutput:
    """Forward `x` through `model` and return a `ModelOutput`.

    A network with speed switches (`toolkit.models.speed`) gets its 4-D inputs in channels-last
    memory format, and runs the compiled version of this whole function (features, embedding,
    logits and any FeatureTaps hooks in one graph)."""
    core = unwrap(model) if isinstance(model, nn.Module) else model
    state = SPEED.get(core) if isinstance(core, nn.Module) else None
    if state is not None:
        if state.channels_last and isinstance(x, Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if state.compiled is not None:
            return state.compiled(model, x)
    return eager_forward_output(model, x)


def eager_forward_output(model: Any, x: Any) -> ModelOutput:
    """`forward_output` without the speed switches (what `torch.compile` traces)."""
    core = unwrap(model) if isinstance(model, nn.Module) else model
    if isinstance(core, nn.Module) and _is_timm_like(core) and isinstance(x, Tensor):
        feats = core.forward_features(x)
        embedding = core.forward_head(feats, pre_logits=True)
        classifier = core.get_classifier()
        logits = classifier(embedding) if isinstance(classifier, nn.Module) else core.forward_head(feats)
        return ModelOutput(logits, embedding)
    if isinstance(x, Mapping):
        out = model(**x, output_hidden_states=True) if _is_hf(core) else model(**x)
    else:
        out = model(x)
    return as_model_output(out)


def _is_hf(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a base dependency
        return False
    return isinstance(model, PreTrainedModel)


def as_model_output(out: Any) -> ModelOutput:
    if isinstance(out, ModelOutput):
        return out
    if isinstance(out, Tensor):
        return ModelOutput(out)
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        hidden = getattr(out, "hidden_states", None)
        embedding = hidden[-1][:, 0] if hidden else None
        return ModelOutput(logits, embedding)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return ModelOutput(out[0])
    raise TypeError(
        f"cannot read logits from a model output of type {type(out).__name__}: return a tensor of logits, "
        "a toolkit ModelOutput, or an object with a .logits tensor"
    )


def num_classes_of(model: Any) -> int | None:
    """The class count a model declares (timm `num_classes`, HF `config.num_labels`), if any."""
    core = unwrap(model) if isinstance(model, nn.Module) else model
    n = getattr(core, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    config = getattr(core, "config", None)
    n = getattr(config, "num_labels", None)
    return n if isinstance(n, int) and n > 0 else None
