"""`FeatureTaps`: capture intermediate activations by module path, without touching model code.

    taps = FeatureTaps(model, ["layer2", "layer3"])
    logits = model(x)
    feats = taps.pop()          # {"layer2": tensor, "layer3": tensor}

Paths are relative to the unwrapped model (DDP, torch.compile and Lightning wrappers are
stripped), so the same config works on one device and many. A wrong path is an error listing
the closest module names.

A path ending in ":input" records the module's (first positional) *input* instead of its output:
"fc:input" is what the classifier receives, the penultimate embedding, also in models whose
pooling and flattening are functional calls with no module of their own (the toolkit's CIFAR nets
and convnet; timm models name their classifier `fc`, `head.fc`, `classifier`, ...).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import Tensor, nn

from toolkit.models.output import unwrap

INPUT_SUFFIX = ":input"


def split_tap_path(path: str) -> tuple[str, bool]:
    """(module path, whether the tap records the module's input): "fc:input" -> ("fc", True)."""
    if path.endswith(INPUT_SUFFIX):
        return path[: -len(INPUT_SUFFIX)], True
    return path, False


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted `path` ("" or "." is the model itself; a ":input" tap suffix is
    ignored), or a clear error."""
    root = unwrap(model)
    path = split_tap_path(path)[0]
    if path in ("", "."):
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        candidates = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(path, candidates, n=5, cutoff=0.4)
        hint = f" Closest module paths: {', '.join(close)}." if close else ""
        raise ValueError(
            f"{type(root).__name__} has no submodule {path!r}.{hint} "
            f"Top-level modules: {', '.join(n for n, _ in root.named_children())}"
        ) from None


class FeatureTaps:
    """Forward hooks that record the output (or, for "path:input", the input) of chosen modules
    during each forward pass."""

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.paths = tuple(dict.fromkeys(paths))
        self.features: dict[str, Tensor] = {}
        self._handles = [
            resolve_module(model, p).register_forward_hook(self._recorder(p)) for p in self.paths
        ]

    def _recorder(self, path: str):
        take_input = split_tap_path(path)[1]

        def hook(_module: nn.Module, inputs: tuple, output) -> None:
            if take_input:
                if not inputs:
                    raise RuntimeError(
                        f"tap {path!r}: the module was called without positional inputs, so there is no input "
                        "to record; tap its output or the output of the module before it"
                    )
                output = inputs[0]
            if isinstance(output, (tuple, list)):
                output = output[0]
            elif hasattr(output, "last_hidden_state"):
                output = output.last_hidden_state
            self.features[path] = output

        return hook

    def pop(self) -> dict[str, Tensor]:
        """The features of the last forward pass; clears them so stale tensors are never reused."""
        feats, self.features = self.features, {}
        missing = [p for p in self.paths if p not in feats]
        if missing:
            raise RuntimeError(f"tapped modules {missing} did not run in the last forward pass")
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features = {}

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
