"""σReparam of linear (and optionally convolutional) layers, and the attention-entropy monitor.

    trainer = L.Trainer(callbacks=[SigmaReparamCallback()])          # every nn.Linear of module.model
    python -m recipes.train --callbacks sigma_reparam --callbacks.sigma_reparam.layers '[fc]'

Maths in `toolkit.functional.sigma_reparam`; the surgery (shared with `weight_compander`) in
`toolkit.callbacks.reparam`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from toolkit.callbacks.reparam import (
    ReparamCallback,
    apply_reparametrization,
    find_layers,
    fold_reparametrization,
    log_scalars,
    reparametrized,
)
from toolkit.distill.taps import resolve_module
from toolkit.functional.sigma_reparam import attention_entropy, sigma_reparam_weight, spectral_init
from toolkit.models.output import unwrap
from toolkit.registry import register


class SigmaReparam(nn.Module):
    """Weight parametrization Ŵ = (γ/σ(W))·W (`torch.nn.utils.parametrize`).

    Buffers `u`, `v` (right/left singular-vector estimates) and `sigma` (the last σ used in
    training), initialised from an SVD of the weight given here; γ (`gamma`) is a learnable scalar
    initialised to σ(W), so the layer computes the same function at initialisation. In training
    mode each evaluation of the weight (one per forward pass) takes one power-iteration step and
    stores u, v, σ; in evaluation mode the same step is taken from the stored u without storing.
    `learn_gamma=False` keeps γ fixed (a buffer); `gamma_init` sets another initial γ (the
    function then changes by the factor γ/σ(W) at setup).
    """

    def __init__(self, weight: Tensor, learn_gamma: bool = True, gamma_init: float | None = None) -> None:
        super().__init__()
        sigma, u, v = spectral_init(weight)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.register_buffer("sigma", sigma)
        gamma = sigma.clone() if gamma_init is None else torch.tensor(float(gamma_init))
        if learn_gamma:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)

    def forward(self, weight: Tensor) -> Tensor:
        w_hat, sigma, u, v = sigma_reparam_weight(weight, self.gamma, self.u)
        if self.training:
            with torch.no_grad():
                self.u.copy_(u)
                self.v.copy_(v)
                self.sigma.copy_(sigma.detach())
        return w_hat

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Assigning `layer.weight = W` stores W itself as the latent weight (γ is unchanged).
        return weight

    def extra_repr(self) -> str:
        return f"gamma={float(self.gamma):.4g}, sigma={float(self.sigma):.4g}"


def apply_sigma_reparam(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    types: Iterable[str] = ("linear",),
    exclude: Sequence[str] = (),
    learn_gamma: bool = True,
    gamma_init: float | None = None,
) -> list[str]:
    """σReparam the chosen layers of `model` in place (outside any trainer); returns the paths.
    Call it before building the optimiser and before loading a state dict written with it."""
    chosen = find_layers(model, layers, types, exclude)
    apply_reparametrization(
        model, chosen, lambda _p, w: SigmaReparam(w, learn_gamma, gamma_init), SigmaReparam
    )
    return sorted(chosen)


def remove_sigma_reparam(model: nn.Module) -> list[str]:
    """Fold every σReparam weight into a plain weight (Ŵ as evaluated in eval mode): for export."""
    return fold_reparametrization(model, SigmaReparam)


# -- attention maps ----------------------------------------------------------------------------
def _timm_style(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "scale", None), float)
    )


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose attention maps the monitor can read: `nn.MultiheadAttention` and timm-style
    self-attention (a `qkv` nn.Linear, `num_heads`, `scale`, optional `q_norm`/`k_norm`)."""
    return {
        n: m
        for n, m in unwrap(model).named_modules()
        if isinstance(m, nn.MultiheadAttention) or _timm_style(m)
    }


class AttentionEntropyMonitor:
    """Hooks recording Ent(A) per head of each attention module while `active` is True.

    nn.MultiheadAttention: its forward is asked for per-head weights (`need_weights=True`,
    `average_attn_weights=False`; the output itself is unchanged). timm-style attention: the maps
    are recomputed from the output of its `qkv` layer (captured by a hook, so the layer's weight is
    not evaluated again) as softmax(q·kᵀ·scale), after `q_norm`/`k_norm`; attention masks passed to
    such modules are not applied. Results: {path: (H,) entropy per head, averaged over the batch}.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.active = False
        self.results: dict[str, Tensor] = {}
        self._qkv: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        for path, m in modules.items():
            if isinstance(m, nn.MultiheadAttention):
                self._handles.append(m.register_forward_pre_hook(self._ask_weights, with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._mha_hook(path)))
            else:
                self._handles.append(m.qkv.register_forward_hook(self._qkv_hook(path)))
                self._handles.append(m.register_forward_hook(self._timm_hook(path, m)))

    def _ask_weights(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.active:
            return None
        args, kwargs = list(args), dict(kwargs)
        # forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        for pos, name, value in ((4, "need_weights", True), (6, "average_attn_weights", False)):
            if len(args) > pos:
                args[pos] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def _mha_hook(self, path: str):
        def hook(_m: nn.Module, _args: tuple, output: Any) -> None:
            if self.active and isinstance(output, tuple) and output[1] is not None:
                attn = output[1].detach()
                if attn.dim() == 3:  # unbatched (H, T, S)
                    attn = attn.unsqueeze(0)
                self.results[path] = attention_entropy(attn).mean(0)

        return hook

    def _qkv_hook(self, path: str):
        def hook(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            if self.active:
                self._qkv[path] = output.detach()

        return hook

    def _timm_hook(self, path: str, module: nn.Module):
        def hook(_m: nn.Module, _args: tuple, _output: Any) -> None:
            qkv = self._qkv.pop(path, None)
            if not self.active or qkv is None or qkv.dim() != 3:
                return
            b, n, three_c = qkv.shape
            h = module.num_heads
            d = three_c // (3 * h)
            with torch.no_grad():
                q, k, _ = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
                q = getattr(module, "q_norm", nn.Identity())(q)
                k = getattr(module, "k_norm", nn.Identity())(k)
                attn = (q.float() @ k.float().transpose(-2, -1) * module.scale).softmax(-1)
            self.results[path] = attention_entropy(attn).mean(0)

        return hook

    def pop(self) -> dict[str, Tensor]:
        out, self.results = self.results, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@register("callback", "sigma_reparam")
class SigmaReparamCallback(ReparamCallback):
    """σReparam: Ŵ = (γ/σ(W))·W on linear layers, plus the attention-entropy monitor.

    Zhai et al., "Stabilizing Transformer Training by Preventing Attention Entropy Collapse"
    (ICML 2023). σ(W) is the spectral norm by power iteration (one step per training forward, u/v
    buffers), γ a learnable scalar initialised to σ(W_init), so the model's function is unchanged
    at setup. The paper trains ViTs without warm-up, weight decay or LayerNorm with it; its main
    claim is stability (no attention-entropy collapse), not accuracy on small CNNs.

    At `setup` (before the optimiser is built) the chosen layers of `pl_module.model` get a
    `SigmaReparam` weight parametrization (state in checkpoints: latent weight, γ, u, v, σ);
    `fold_on_fit_end=True` or `remove_sigma_reparam(model)` folds Ŵ back into plain layers.
    Every `log_every_n_steps` training steps it logs `sigma_reparam/<layer>/gamma` and `/sigma`
    and, for models with attention modules (nn.MultiheadAttention, timm ViT attention), the
    attention entropy per module `attention_entropy/<path>` (mean over heads), its lowest head
    `attention_entropy/<path>/min_head`, and `attention_entropy/mean`. A model without attention
    is reported at setup.

    Args:
        layers, types, exclude, target, fold_on_fit_end: which layers (see `ReparamCallback`);
            default every nn.Linear (the official code also converts Conv2d: types=["linear", "conv"]).
        learn_gamma: γ trainable (the paper) or fixed.
        gamma_init: initial γ; None: σ(W_init), which keeps the function (the official code).
        monitor_attention: record attention entropies (on the logging steps only).
        attention_modules: module paths of the attention modules to monitor; None: all found.
        log_every_n_steps: logging period in training steps (default: the trainer's).
    """

    kind = SigmaReparam
    name = "sigma_reparam"
    default_types = ("linear",)

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        types: Iterable[str] | None = None,
        exclude: Sequence[str] = (),
        target: str | None = "model",
        fold_on_fit_end: bool = False,
        learn_gamma: bool = True,
        gamma_init: float | None = None,
        monitor_attention: bool = True,
        attention_modules: Sequence[str] | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(layers, types, exclude, target, fold_on_fit_end)
        if log_every_n_steps is not None and (
            int(log_every_n_steps) != log_every_n_steps or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be None or an integer >= 1, got {log_every_n_steps}")
        if attention_modules is not None and (
            isinstance(attention_modules, str) or not all(isinstance(p, str) for p in attention_modules)
        ):
            raise TypeError(f"attention_modules must be a list of module paths, got {attention_modules!r}")
        if gamma_init is not None and not gamma_init > 0:
            raise ValueError(f"gamma_init must be None (σ(W_init)) or > 0, got {gamma_init}")
        self.learn_gamma = bool(learn_gamma)
        self.gamma_init = None if gamma_init is None else float(gamma_init)
        self.monitor_attention = bool(monitor_attention)
        self.attention_paths = None if attention_modules is None else list(attention_modules)
        self.log_every_n_steps = None if log_every_n_steps is None else int(log_every_n_steps)
        self.monitor: AttentionEntropyMonitor | None = None
        self._log_now = False
        self._step = 0
        self.last_metrics: dict[str, float] = {}

    def make(self, path: str, weight: Tensor) -> nn.Module:
        return SigmaReparam(weight, self.learn_gamma, self.gamma_init)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.monitor_attention or self.monitor is not None:
            return
        net = self.network(pl_module)
        found = attention_modules(net)
        if self.attention_paths is not None:
            chosen = {}
            for path in self.attention_paths:
                m = resolve_module(net, path)
                if path not in found:
                    raise ValueError(
                        f"sigma_reparam: {path!r} is a {type(m).__name__}, not an attention module the monitor can "
                        f"read (nn.MultiheadAttention or timm-style qkv attention); found: {', '.join(found) or 'none'}"
                    )
                chosen[path] = m
            found = chosen
        if not found:
            rank_zero_warn(
                f"sigma_reparam: {type(unwrap(net)).__name__} has no attention module (nn.MultiheadAttention or "
                "timm-style qkv attention), so no attention entropy is logged; only γ and σ per layer. "
                "Pass monitor_attention=False to silence this."
            )
            return
        self.monitor = AttentionEntropyMonitor(found)

    def _period(self, trainer: L.Trainer) -> int:
        return self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step
        self._log_now = self._step % self._period(trainer) == 0
        if self.monitor is not None:
            self.monitor.active = self._log_now
            self.monitor.results = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not getattr(self, "_log_now", False):
            return
        self._log_now = False
        metrics: dict[str, float] = {}
        for path, p in sorted(reparametrized(self.network(pl_module), SigmaReparam).items()):
            metrics[f"sigma_reparam/{path}/gamma"] = float(p.gamma.detach())
            metrics[f"sigma_reparam/{path}/sigma"] = float(p.sigma)
        if self.monitor is not None:
            self.monitor.active = False
            entropies = self.monitor.pop()
            for path, ent in sorted(entropies.items()):
                metrics[f"attention_entropy/{path}"] = float(ent.mean())
                metrics[f"attention_entropy/{path}/min_head"] = float(ent.min())
            if entropies:
                metrics["attention_entropy/mean"] = float(
                    torch.stack([e.mean() for e in entropies.values()]).mean()
                )
        self.last_metrics = metrics
        log_scalars(trainer, metrics, self._step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.remove()
            self.monitor = None
