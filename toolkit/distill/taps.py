"""`FeatureTaps`: capture intermediate activations by module path, without touching model code.

    taps = FeatureTaps(model, ["layer2", "layer3"])
    logits = model(x)
    feats = taps.pop()          # {"layer2": tensor, "layer3": tensor}

Paths are relative to the unwrapped model (DDP, torch.compile and Lightning wrappers are
stripped), so the same config works on one device and many. A wrong path is an error listing
the closest module names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import Tensor, nn

from toolkit.models.output import unwrap


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted `path` ("" or "." is the model itself), or a clear error."""
    root = unwrap(model)
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
    """Forward hooks that record the output of chosen modules during each forward pass."""

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.paths = tuple(dict.fromkeys(paths))
        self.features: dict[str, Tensor] = {}
        self._handles = [resolve_module(model, p).register_forward_hook(self._recorder(p)) for p in self.paths]

    def _recorder(self, path: str):
        def hook(_module: nn.Module, _inputs: tuple, output) -> None:
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
