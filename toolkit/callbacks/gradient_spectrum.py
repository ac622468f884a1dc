"""`gradient_spectrum`: layer-wise SVD statistics of the gradients, every k steps or epochs.
Maths in `toolkit.functional.gradient_spectrum`."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from toolkit.callbacks._probe import (
    LossFn,
    as_probe_batch,
    check_int,
    collect_batch,
    default_loss,
    device_batch,
    measuring,
    probe_loader,
    select_parameters,
)
from toolkit.distill.taps import resolve_module
from toolkit.functional.gradient_spectrum import spectrum_stats
from toolkit.registry import register
from toolkit.types import Batch


@register("callback", "gradient_spectrum")
class GradientSpectrum(Callback):
    """Log spectral statistics of each layer's weight gradient (SVD).

    Li et al., "How Instruction and Reasoning Data shape Post-Training: Data Quality through the
    Lens of Layer-wise Gradients" (arXiv:2504.10766): per layer, the singular values σ_i of the
    gradient G; nuclear norm Σσ_i and effective rank exp(H(σ/Σσ)) (higher-quality data: lower
    nuclear norm, higher effective rank). Logged for every weight with >= 2 dims (conv kernels
    read as (out, in·kh·kw)), as `{prefix}/{parameter name}/{stat}`:
    `nuclear_norm`, `effective_rank`, `stable_rank` (‖G‖_F²/σ_1²), `spectral_norm`,
    `frobenius_norm`, `top_share` (σ_1/Σσ), `sigma_1..k` and `ratio_2..k` (σ_i/σ_1), plus the
    means over layers `{prefix}/mean_nuclear_norm` and `{prefix}/mean_effective_rank`.

    Two sources, either or both:
    - `every_n_steps`: the training gradient itself, read in `on_before_optimizer_step` (after
      gradient accumulation and AMP unscaling, before clipping) every this many optimiser steps
      (the reference hook, on_after_backward, would see partial sums under accumulation);
    - `every_n_epochs`: the gradient of the loss on a probe batch fixed at setup (the first
      `num_samples` training samples, unaugmented; cross-entropy of the module's forward unless
      `loss_fn(pl_module, batch)` is given), at the end of training epochs, computed with
      `torch.autograd.grad` in eval mode (the run's `.grad`s untouched): comparable across epochs.
    Step values go to the loggers directly (`log_metrics` at the global step, whatever
    `log_every_n_steps`); epoch values through `pl_module.log`. Works with any LightningModule.

    Args:
        every_n_steps: optimiser steps between training-gradient measurements (None: off).
        every_n_epochs: epochs between probe-batch measurements (None: off).
        layers: module paths (under the LightningModule, e.g. ["model.fc"]) whose weights are
            measured; None: every parameter with >= 2 dims.
        top_k: singular values reported per layer.
        per_layer: log each layer's statistics (False: only the means over layers).
        num_samples, loss_fn, batch: the probe batch and its loss (epoch measurements).
        prefix: logged names start with `{prefix}/`.
    """

    def __init__(
        self,
        every_n_steps: int | None = 50,
        every_n_epochs: int | None = None,
        layers: list[str] | str | None = None,
        top_k: int = 3,
        per_layer: bool = True,
        num_samples: int = 256,
        loss_fn: LossFn | None = None,
        batch: Any = None,
        prefix: str = "grad_spectrum",
    ) -> None:
        super().__init__()
        self.every_n_steps = check_int("every_n_steps", every_n_steps, allow_none=True)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, allow_none=True)
        if self.every_n_steps is None and self.every_n_epochs is None:
            raise ValueError("give every_n_steps (training gradients) and/or every_n_epochs (a probe batch)")
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None and (not layers or not all(isinstance(p, str) and p for p in layers)):
            raise ValueError(f"layers must be module paths such as ['model.fc'] or None, got {layers!r}")
        self.layers = None if layers is None else list(layers)
        self.top_k = check_int("top_k", top_k)
        self.per_layer = bool(per_layer)
        self.num_samples = check_int("num_samples", num_samples)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable as fn(pl_module, batch) -> scalar loss")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.loss_fn = loss_fn
        self.probe_batch: Batch | None = None if batch is None else as_probe_batch(batch)
        self.prefix = prefix
        self.last: dict[str, dict[str, float]] = {}
        self._active = self._fitted = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, layers=self.layers)

    # -- set-up ---------------------------------------------------------------------------
    def _named_weights(self, pl_module: Any) -> list[tuple[str, torch.Tensor]]:
        if self.layers is None:
            names, params = select_parameters(pl_module, None)
        else:
            names, params = [], []
            for path in self.layers:
                module = resolve_module(pl_module, path)  # a wrong path lists the closest ones
                for n, p in module.named_parameters():
                    if p.requires_grad:
                        names.append(f"{path}.{n}")
                        params.append(p)
        weights = list(
            {n: p for n, p in zip(names, params) if p.dim() >= 2}.items()
        )  # overlapping paths: once
        if not weights:
            raise ValueError(
                f"GradientSpectrum: no weight with >= 2 dims under {self.layers or 'the module'}; "
                "biases and norms have no spectrum"
            )
        return weights

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            if not self._fitted:  # silent for the test/validate stages that follow a fit
                stage_name = getattr(stage, "value", stage)
                warnings.warn(
                    f"GradientSpectrum measures during fit only; inactive for stage {stage_name!r}",
                    stacklevel=2,
                )
            self._active = False
            return
        self._active = self._fitted = True
        self._named_weights(pl_module)
        if self.every_n_epochs is not None and self.probe_batch is None:
            loader = probe_loader(trainer)
            if loader is not None:
                self.probe_batch = collect_batch(loader, self.num_samples)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._active and self.every_n_epochs is not None and self.probe_batch is None:
            loader = probe_loader(trainer)
            if loader is None:
                raise ValueError(
                    "GradientSpectrum found no training data for its probe batch: give batch=(x, y)"
                )
            self.probe_batch = collect_batch(loader, self.num_samples)

    # -- measurement ----------------------------------------------------------------------
    def stats(self, grads: dict[str, torch.Tensor]) -> dict[str, float]:
        """Flat {name: value} of the statistics of {parameter name: gradient}."""
        per = {n: {k: float(v) for k, v in spectrum_stats(g, self.top_k).items()} for n, g in grads.items()}
        self.last = per
        out: dict[str, float] = {}
        if self.per_layer:
            for name, st in per.items():
                out.update({f"{self.prefix}/{name}/{k}": v for k, v in st.items()})
        if per:
            out[f"{self.prefix}/mean_nuclear_norm"] = sum(s["nuclear_norm"] for s in per.values()) / len(per)
            out[f"{self.prefix}/mean_effective_rank"] = sum(s["effective_rank"] for s in per.values()) / len(
                per
            )
        return out

    def probe_gradients(self, pl_module: Any) -> dict[str, torch.Tensor]:
        """The gradient of the probe-batch loss for each measured weight (eval mode)."""
        if self.probe_batch is None:
            raise ValueError("GradientSpectrum has no probe batch: call it during fit, or give batch=(x, y)")
        weights = self._named_weights(pl_module)
        with measuring(pl_module):
            batch = device_batch(self.probe_batch, pl_module.device)
            loss = (self.loss_fn or default_loss)(pl_module, batch)
            grads = torch.autograd.grad(loss, [p for _, p in weights], allow_unused=True)
        return {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(weights, grads)}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        if not self._active or self.every_n_steps is None or trainer.sanity_checking:
            return
        if trainer.global_step % self.every_n_steps:
            return
        grads = {n: p.grad.detach() for n, p in self._named_weights(pl_module) if p.grad is not None}
        if not grads:
            return
        metrics = self.stats(grads)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self._active or self.every_n_epochs is None or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs - 1
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        metrics = self.stats(self.probe_gradients(pl_module))
        for name, value in metrics.items():
            pl_module.log(name.replace(f"{self.prefix}/", f"{self.prefix}/probe/", 1), value)
