"""Calibration monitor with temperature scaling (Guo et al., ICML 2017), as a Lightning callback.

The maths (reliability bins, ECE, MCE, the temperature fit) is in `toolkit.functional.calibration`.

Where the fitted temperature lives: in the callback's state (`state_dict()["temperature"]`),
which Lightning writes into every checkpoint (`checkpoint["callbacks"][state_key]`) and restores
when the callback is attached and a checkpoint is loaded (resumed fit, or `trainer.test(...,
ckpt_path=...)` / `trainer.predict(...)`). Without the callback, `load_temperature(ckpt_path)`
reads it back, and `TemperatureScaling(T)` is an `nn.Module` (T a buffer) to append to a model
for export: `nn.Sequential(model, TemperatureScaling(load_temperature(path)))`. The
LightningModule is not modified (no extra key in its `state_dict`, so strict loading of its
checkpoints by code that never saw this callback keeps working).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from toolkit.callbacks._figures import log_figure, new_figure, output_dir
from toolkit.functional.calibration import (
    check_temperature_value,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    reliability_bins,
    temperature_scale,
)
from toolkit.models.output import as_model_output, forward_output
from toolkit.registry import register
from toolkit.types import as_batch


class TemperatureScaling(nn.Module):
    """logits ↦ logits / T with T a buffer (saved in the state dict): append it to a classifier,
    e.g. `nn.Sequential(model, TemperatureScaling(load_temperature("last.ckpt")))`."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        check_temperature_value(temperature)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, logits: Tensor) -> Tensor:
        return temperature_scale(logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):.4f}"


def load_temperature(checkpoint: str | Path | Mapping[str, Any]) -> float:
    """The temperature a `Calibration` callback stored in a Lightning checkpoint (a path to a
    trusted file, loaded with `weights_only=False` like Lightning does, or the loaded dict)."""
    ckpt = (
        torch.load(checkpoint, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, Mapping)
        else checkpoint
    )
    found = {
        k: v.get("temperature")
        for k, v in (ckpt.get("callbacks") or {}).items()
        if str(k).startswith("Calibration") and isinstance(v, Mapping)
    }
    values = {k: v for k, v in found.items() if v is not None}
    if not values:
        raise ValueError(
            "the checkpoint holds no fitted temperature: train or validate with the `calibration` callback "
            f"(fit_temperature=True) before saving it (calibration states found: {sorted(found) or 'none'})"
        )
    if len(set(values.values())) > 1:
        raise ValueError(
            f"the checkpoint holds several different temperatures: {values}; read the one you need"
        )
    return float(next(iter(values.values())))


@register("callback", "calibration")
class Calibration(Callback):
    """ECE / MCE / NLL of the model's confidences, reliability diagrams, and temperature scaling.

    Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017. With
    p̂ the top-1 softmax confidence binned into M equal-width bins B_m:
    ECE = Σ_m |B_m|/n·|acc(B_m) − conf(B_m)|, MCE = max_m |acc(B_m) − conf(B_m)|; temperature
    scaling divides the logits by one scalar T > 0 fitted to minimise the validation NLL (it does
    not change the predictions, only their confidence).

    Validation (every `every_n_epochs` epochs of a fit, after the last one, and in
    `trainer.validate`; never during the sanity check): the callback evaluates the model's logits
    on each validation batch (one extra forward pass in eval mode, no gradients), then logs
    `val/ece`, `val/mce`, `val/nll`, fits T on those logits (LBFGS on the NLL) and logs
    `val/temperature`, `val/ece_scaled`, `val/nll_scaled`. The temperature is refitted at each
    such epoch, so every checkpoint carries the T of its own weights; the last one is the
    end-of-fit T. A reliability diagram (before | after scaling) goes to TensorBoard
    (`val/reliability_diagram`, when a TensorBoardLogger is attached) and to
    `reliability_val.png` (overwritten with the latest).

    Test: `test/ece`, `test/mce`, `test/nll` and, with the fitted (or checkpoint-restored) T,
    `test/ece_scaled`, `test/mce_scaled`, `test/nll_scaled`, `test/temperature`, plus the
    diagram (`test/reliability_diagram`, `reliability_test.png`). Predict: with
    `scale_predictions=True`, tensor outputs of `predict_step` (B, C) are divided by T in place.
    `calibrate(logits)` applies T anywhere; see the module docstring for use without the callback.

    Works with any LightningModule whose logits it can get: `logits_fn(pl_module, x)`, else the
    module's `model` (through `toolkit.models.forward_output`), else `pl_module(x)`. Under DDP the
    logits are gathered from every process (equal per-process counts, as the distributed sampler
    gives) before the metrics and the fit.

    Args:
        n_bins: confidence bins M (Guo et al.: 15).
        every_n_epochs: evaluate every this many epochs during fit (and after the last epoch).
        fit_temperature: fit T on the validation logits (False: metrics only).
        max_iter: LBFGS iterations of the temperature fit.
        scale_predictions: divide (B, C) tensor predictions by T in `trainer.predict`.
        logits_fn: `fn(pl_module, x) -> (B, C)` logits.
        plot: draw the reliability diagrams.
        save_dir: directory of the PNG files (default: `trainer.log_dir/calibration`).
    """

    def __init__(
        self,
        n_bins: int = 15,
        every_n_epochs: int = 1,
        fit_temperature: bool = True,
        max_iter: int = 100,
        scale_predictions: bool = False,
        logits_fn: Callable[[Any, Any], Tensor] | None = None,
        plot: bool = True,
        save_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("n_bins", n_bins), ("every_n_epochs", every_n_epochs), ("max_iter", max_iter)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value}")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError("logits_fn must be callable as fn(pl_module, x) -> (B, C) logits")
        self.n_bins = int(n_bins)
        self.every_n_epochs = int(every_n_epochs)
        self.fit_temperature = bool(fit_temperature)
        self.max_iter = int(max_iter)
        self.scale_predictions = bool(scale_predictions)
        self.logits_fn = logits_fn
        self.plot = bool(plot)
        self.save_dir = save_dir
        self.temperature: float | None = None
        self.history: list[dict[str, float]] = []
        self._logits: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._collecting = False
        self._warned_predict = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(n_bins=self.n_bins)

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        has_model = isinstance(getattr(pl_module, "model", None), nn.Module)
        has_forward = type(pl_module).forward is not L.LightningModule.forward
        if self.logits_fn is None and not has_model and not has_forward:
            raise ValueError(
                f"Calibration needs the model's logits: {type(pl_module).__name__} has no `model` attribute and "
                "does not define forward(x) -> logits; give logits_fn=fn(pl_module, x) -> (B, C) logits"
            )
        if stage == "fit" and trainer.limit_val_batches == 0:
            raise ValueError(
                "Calibration measures and fits the temperature on validation data, but limit_val_batches=0 "
                "disables validation: give the run validation batches (limit_val_batches > 0)"
            )

    def calibrate(self, logits: Tensor) -> Tensor:
        """`logits / T` with the fitted temperature (the logits unchanged before any fit)."""
        return logits if self.temperature is None else temperature_scale(logits, self.temperature)

    # -- collecting logits ----------------------------------------------------------------
    def _model_logits(self, pl_module: Any, x: Any) -> Tensor:
        if self.logits_fn is not None:
            logits = self.logits_fn(pl_module, x)
        elif isinstance(getattr(pl_module, "model", None), nn.Module):
            logits = forward_output(pl_module.model, x).logits
        else:
            logits = as_model_output(pl_module(x)).logits
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError(
                f"Calibration needs (B, C) class logits, got {getattr(logits, 'shape', type(logits).__name__)}; "
                "give logits_fn=fn(pl_module, x) -> (B, C) logits"
            )
        return logits

    def _start(self) -> None:
        self._logits, self._targets = [], []

    def _collect(self, pl_module: Any, batch: Any) -> None:
        b = as_batch(batch)
        if b.target is None:
            raise ValueError("Calibration needs labelled evaluation batches (targets)")
        if b.target.is_floating_point() or b.target.dim() != 1:
            raise ValueError(
                f"Calibration needs (B,) class-index targets, got {tuple(b.target.shape)} {b.target.dtype}"
            )
        with torch.no_grad():
            logits = self._model_logits(pl_module, b.input)
        self._logits.append(logits.detach().float())
        self._targets.append(b.target.detach().to(logits.device).long())

    def _gathered(self, trainer: L.Trainer, pl_module: Any) -> tuple[Tensor, Tensor] | None:
        if not self._logits:
            return None
        z, y = torch.cat(self._logits), torch.cat(self._targets)
        self._logits, self._targets = [], []
        if trainer.world_size > 1:
            z = pl_module.all_gather(z).flatten(0, 1)
            y = pl_module.all_gather(y).flatten(0, 1)
        return z, y

    def _metrics(self, z: Tensor, y: Tensor) -> dict[str, float]:
        return {
            "ece": float(expected_calibration_error(z, y, self.n_bins)),
            "mce": float(maximum_calibration_error(z, y, self.n_bins)),
            "nll": float(F.cross_entropy(z.float(), y)),
        }

    # -- validation -----------------------------------------------------------------------
    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":  # trainer.validate(...): always
            return True
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs - 1
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collecting = self._due(trainer)
        self._start()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._collecting and not trainer.sanity_checking:
            self._collect(pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._collecting:
            return
        self._collecting = False
        data = self._gathered(trainer, pl_module)
        if data is None:
            return
        z, y = data
        out = self._metrics(z, y)
        if self.fit_temperature:
            self.temperature = fit_temperature(z, y, max_iter=self.max_iter)
            scaled = self._metrics(temperature_scale(z, self.temperature), y)
            out.update(temperature=self.temperature, ece_scaled=scaled["ece"], nll_scaled=scaled["nll"])
        for name, value in out.items():
            pl_module.log(f"val/{name}", value)
        self.history.append({"epoch": trainer.current_epoch, **out})
        self._diagram(trainer, z, y, "val")

    # -- test and predict -----------------------------------------------------------------
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(pl_module, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = self._gathered(trainer, pl_module)
        if data is None:
            return
        z, y = data
        out = self._metrics(z, y)
        if self.temperature is not None:
            scaled = self._metrics(temperature_scale(z, self.temperature), y)
            out.update({f"{k}_scaled": v for k, v in scaled.items()}, temperature=self.temperature)
        for name, value in out.items():
            pl_module.log(f"test/{name}", value)
        self._diagram(trainer, z, y, "test")

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.scale_predictions:
            return
        if self.temperature is None:
            if not self._warned_predict:
                warnings.warn(
                    "Calibration(scale_predictions=True): no temperature fitted or restored yet; predictions "
                    "are left unscaled (validate first, or predict with ckpt_path=...)",
                    stacklevel=2,
                )
                self._warned_predict = True
            return
        if not (isinstance(outputs, Tensor) and outputs.is_floating_point() and outputs.dim() == 2):
            raise ValueError(
                "Calibration(scale_predictions=True) scales (B, C) logit tensors returned by predict_step, got "
                f"{type(outputs).__name__}; return the logits or use callback.calibrate(logits) yourself"
            )
        outputs.div_(self.temperature)

    # -- the reliability diagram ----------------------------------------------------------
    def _diagram(self, trainer: L.Trainer, z: Tensor, y: Tensor, split: str) -> None:
        if not self.plot or not trainer.is_global_zero:
            return
        panels = [("uncalibrated", z)]
        if self.temperature is not None:
            panels.append(
                (f"temperature scaled (T = {self.temperature:.3f})", temperature_scale(z, self.temperature))
            )
        fig = new_figure(4.0 * len(panels), 4.0)
        for i, (title, logits) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            bins = reliability_bins(logits, y, self.n_bins)
            edges = bins.edges.cpu().numpy()
            width = edges[1] - edges[0]
            centres = edges[:-1] + width / 2
            acc = bins.accuracy.cpu().numpy()
            conf = bins.confidence.cpu().numpy()
            filled = bins.count.cpu().numpy() > 0
            ax.bar(
                centres[filled],
                acc[filled],
                width=width,
                edgecolor="black",
                color="tab:blue",
                label="accuracy",
            )
            ax.bar(
                centres[filled],
                (conf - acc)[filled],
                bottom=acc[filled],
                width=width,
                edgecolor="tab:red",
                color="tab:red",
                alpha=0.3,
                hatch="//",
                label="gap",
            )
            ax.plot([0, 1], [0, 1], "k--", linewidth=1)
            ece = float(expected_calibration_error(logits, y, self.n_bins))
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
            ax.set_title(f"{split} {title}\nECE = {100 * ece:.2f}%", fontsize=9)
            ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        png = output_dir(trainer, "calibration", self.save_dir) / f"reliability_{split}.png"
        log_figure(trainer, f"{split}/reliability_diagram", fig, png)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        t = state_dict.get("temperature")
        self.temperature = None if t is None else float(t)
        self.history = [dict(h) for h in state_dict.get("history", [])]
