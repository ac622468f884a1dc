"""Weight reparameterisation by module surgery, shared by `sigma_reparam` and `weight_compander`.

    layers = find_layers(model, layers=None, types=("linear",))       # {path: module}
    apply_reparametrization(model, layers, lambda path, w: SigmaReparam(w), SigmaReparam)
    fold_reparametrization(model, SigmaReparam)                       # plain weights again (export)

The reparameterisation is a `torch.nn.utils.parametrize` parametrization of each chosen layer's
`weight`: the layer class is unchanged, the trained tensor lives in
`<layer>.parametrizations.weight.original` (plus the parametrization's own parameters and
buffers), so the optimiser, checkpoints and `load_state_dict` see it like any other state.
Folding evaluates the reparameterised weight in evaluation mode and leaves it as the layer's
plain `weight` Parameter, so the exported model is a standard one with the same outputs.

`ReparamCallback` is the Lightning side: surgery in `setup` (before the optimisers are built, and
before a checkpoint is restored, so resumed runs load the reparameterised state), on
`pl_module.model` (or the whole module), optional folding at the end of `fit`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.utils import parametrize

from toolkit.distill.taps import resolve_module
from toolkit.models.output import unwrap

LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
}


def _check_types(types: Iterable[str]) -> tuple[str, ...]:
    if isinstance(types, str):
        types = (types,)
    types = tuple(types)
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad or not types:
        raise ValueError(f"types must be a non-empty list of {sorted(LAYER_TYPES)}, got {list(types)}")
    return types


def _eligible(module: nn.Module, types: tuple[str, ...]) -> bool:
    classes = tuple(c for t in types for c in LAYER_TYPES[t])
    return isinstance(module, classes) and isinstance(getattr(module, "weight", None), Tensor)


def find_layers(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    types: Iterable[str] = ("linear",),
    exclude: Sequence[str] = (),
) -> dict[str, nn.Module]:
    """The layers to reparameterise, by module path: every layer of `types` ("linear", "conv")
    when `layers` is None, else exactly the named ones (each must exist and be of `types`).
    Paths in `exclude` are skipped. A wrong path is an error listing the eligible paths; so is a
    choice that leaves no layer. A model that is itself a layer has the path ""."""
    types = _check_types(types)
    root = unwrap(model)
    eligible = {n: m for n, m in root.named_modules() if _eligible(m, types)}  # "" is the model itself
    if isinstance(layers, str) or isinstance(exclude, str):
        raise TypeError("layers and exclude are lists of module paths, e.g. ['fc'], not a single string")
    for path in [*(layers or ()), *exclude]:
        module = resolve_module(root, path)  # a path that does not exist lists the closest ones
        if path not in eligible:
            close = difflib.get_close_matches(path, list(eligible), n=5, cutoff=0.3)
            raise ValueError(
                f"{path!r} is a {type(module).__name__}, not a layer of types {list(types)}; eligible layers: "
                f"{', '.join(close or list(eligible)[:20]) or 'none'}"
            )
    chosen = {p: eligible[p] for p in (layers if layers is not None else eligible)}
    chosen = {p: m for p, m in chosen.items() if p not in set(exclude)}
    if not chosen:
        raise ValueError(
            f"{type(root).__name__} has no layer of types {list(types)} to reparameterise (after exclude); "
            "choose other types=[...] or layers=[...]"
        )
    return chosen


def apply_reparametrization(
    model: nn.Module,
    layers: dict[str, nn.Module],
    make: Callable[[str, Tensor], nn.Module],
    kind: type[nn.Module],
) -> list[str]:
    """Register `make(path, weight)` (an instance of `kind`) as the parametrization of each
    layer's weight. A layer that already carries a `kind` parametrization is left as it is
    (idempotent); one with another weight parametrization is an error (a composition would change
    the function). Returns the paths newly reparameterised."""
    done = []
    for path, module in layers.items():
        if parametrize.is_parametrized(module, "weight"):
            existing = list(module.parametrizations["weight"])
            if not all(isinstance(p, kind) for p in existing):
                kinds = ", ".join(type(p).__name__ for p in existing)
                raise ValueError(
                    f"layer {path!r} already has a weight parametrization ({kinds}); apply one weight "
                    "reparameterisation per layer (choose others with layers=[...] or exclude=[...])"
                )
            continue
        p = make(path, module.weight)
        p.eval()  # registration evaluates the parametrization once: no state update from that
        parametrize.register_parametrization(module, "weight", p)
        p.train(module.training)
        done.append(path)
    return done


def reparametrized(model: nn.Module, kind: type[nn.Module]) -> dict[str, nn.Module]:
    """{layer path: parametrization} for every weight parametrized by an instance of `kind`."""
    out = {}
    for path, module in unwrap(model).named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations["weight"]:
                if isinstance(p, kind):
                    out[path] = p
    return out


def fold_reparametrization(model: nn.Module, kind: type[nn.Module]) -> list[str]:
    """Replace each `kind`-parametrized weight by its current value (computed in evaluation mode,
    so no power-iteration or other state update) as a plain Parameter: the model becomes a
    standard one with the same evaluation outputs. Returns the folded layer paths."""
    root = unwrap(model)
    paths = sorted(reparametrized(root, kind))
    for path in paths:
        module = root.get_submodule(path) if path else root
        chain = module.parametrizations["weight"]
        modes = [p.training for p in chain]
        chain.eval()
        try:
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        except Exception:
            for p, m in zip(chain, modes):
                p.train(m)
            raise
    return paths


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write scalars straight to every logger of the trainer at `step` (once: values logged with
    `pl_module.log` from a callback would be repeated at later steps until logged again)."""
    if not metrics or getattr(trainer, "sanity_checking", False):
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class ReparamCallback(Callback):
    """Base of the weight-reparameterisation callbacks: surgery at `setup`, folding on request.

    Subclasses set `kind` (the parametrization class) and implement `make(path, weight)`.

    Args:
        layers: module paths (relative to the target) to reparameterise; None: every layer of `types`.
        types: layer types considered: "linear" (nn.Linear), "conv" (nn.Conv1d/2d/3d).
        exclude: module paths to leave alone.
        target: attribute of the LightningModule holding the network ("model" for the toolkit's
            modules, the student in distillation); None: the whole LightningModule.
        fold_on_fit_end: fold the reparameterised weights back into plain weights when `fit` ends
            (for export; checkpoints written during training keep the reparameterised state).
    """

    kind: type[nn.Module] = nn.Module
    name = "reparam"
    default_types: tuple[str, ...] = ("linear",)

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        types: Iterable[str] | None = None,
        exclude: Sequence[str] = (),
        target: str | None = "model",
        fold_on_fit_end: bool = False,
    ) -> None:
        super().__init__()
        if layers is not None and (isinstance(layers, str) or not all(isinstance(p, str) for p in layers)):
            raise TypeError(
                f"{self.name}: layers must be a list of module paths such as ['fc'], got {layers!r}"
            )
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"{self.name}: exclude must be a list of module paths, got {exclude!r}")
        if layers is not None and not layers:
            raise ValueError(f"{self.name}: layers is empty; give None for every layer of the chosen types")
        self.layers = None if layers is None else list(layers)
        self.types = _check_types(types if types is not None else self.default_types)
        self.exclude = list(exclude)
        self.target = target
        self.fold_on_fit_end = bool(fold_on_fit_end)
        self.applied: list[str] = []
        self._folded: set[int] = set()
        self._hooked: set[int] = set()

    # -- to implement ---------------------------------------------------------------------
    def make(self, path: str, weight: Tensor) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- surgery --------------------------------------------------------------------------
    def network(self, pl_module: nn.Module) -> nn.Module:
        if self.target is None:
            return pl_module
        net = getattr(pl_module, self.target, None)
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"{self.name}: the LightningModule {type(pl_module).__name__} has no network attribute "
                f"{self.target!r}; give target=<attribute name>, or target=None for the whole module"
            )
        return net

    def apply(self, model: nn.Module) -> list[str]:
        """Reparameterise the chosen layers of `model` (idempotent); returns every reparameterised path."""
        layers = find_layers(model, self.layers, self.types, self.exclude)
        apply_reparametrization(model, layers, self.make, self.kind)
        self.applied = sorted(reparametrized(model, self.kind))
        return self.applied

    def fold(self, model: nn.Module) -> list[str]:
        """Fold the reparameterised weights of `model` into plain weights (for export)."""
        return fold_reparametrization(model, self.kind)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every stage: the surgery keeps the function, and a checkpoint written with it must load
        # (validate/test/predict with ckpt_path) into the same parameter layout. A network this
        # callback folded at the end of fit stays plain (it was exported on purpose).
        net = self.network(pl_module)
        if id(net) not in self._folded:
            self.apply(net)
        self._stage = stage
        if id(net) not in self._hooked:
            net._register_load_state_dict_pre_hook(self._folded_weights_hook, with_module=True)
            self._hooked.add(id(net))

    def _folded_weights_hook(
        self, net: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """A checkpoint written after `fold_on_fit_end` holds plain weights for the reparameterised
        layers. Evaluating it (validate/test/predict) folds the same layers here, so it loads into the
        model it was exported as; resuming training from it is refused: the reparameterised state is
        gone, and training on without it would silently be another method."""
        root = unwrap(net)
        plain = [
            path
            for path in reparametrized(root, self.kind)
            if f"{prefix}{path}.weight" in state_dict
            and f"{prefix}{path}.parametrizations.weight.original" not in state_dict
        ]
        if not plain:
            return
        if getattr(self, "_stage", None) == "fit":
            raise ValueError(
                f"{self.name}: the checkpoint holds plain (folded) weights for {plain}, written after "
                "fold_on_fit_end folded them; resume from a checkpoint written during training (e.g. "
                "last.ckpt), or load these weights into a model without this callback"
            )
        for path in plain:
            module = root.get_submodule(path)
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.applied = sorted(reparametrized(root, self.kind))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fold_on_fit_end:
            net = self.network(pl_module)
            self.fold(net)
            self._folded.add(id(net))

    # -- state ----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, types=self.types, target=self.target)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": list(self.applied)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = list(state_dict.get("applied", []))
        if self.applied and saved and saved != self.applied:
            raise ValueError(
                f"{self.name}: the checkpoint reparameterised layers {saved} but this run reparameterises "
                f"{self.applied}; use the same layers/types/exclude as the run that wrote it"
            )
