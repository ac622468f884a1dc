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

from collections.abc import Mapping
from typing import Any

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


def forward_output(model: Any, x: Any) -> ModelOutput:
    """Forward `x` through `model` and return a `ModelOutput`."""
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
