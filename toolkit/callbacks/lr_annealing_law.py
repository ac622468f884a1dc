"""Fit the scaling law with LR annealing (Tissue et al., 2024) to a run's own training curve.

The maths (S1, S2, the law, the fit) is in `toolkit.functional.lr_annealing_law`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from toolkit.callbacks._figures import log_figure, new_figure, output_dir
from toolkit.functional.lr_annealing_law import (
    OBJECTIVES,
    fit_lr_annealing_law,
    lr_annealing_areas,
    lr_annealing_law,
)
from toolkit.registry import register


@register("callback", "lr_annealing_law")
class LRAnnealingLaw(Callback):
    """Record (learning rate, training loss) at every optimiser step and, at the end of fit, fit
    L(s) = L0 + A·S1^(−α) − C·S2 (Tissue, Wang & Wang, "Scaling Law with Learning Rate
    Annealing", arXiv 2408.11029) to the curve; log the parameters and plot the curve and the fit.

    S1(s) = Σ_{i≤s} η_i is the forward area (area under the LR curve) and S2(s) = Σ_{i≤s} m_i the
    annealing area, m_i = λ·m_{i−1} + (η_{i−1} − η_i) (the annealing momentum, λ = `decay`). The
    paper fits one or two curves and then predicts the loss of any schedule at any step; here
    the fit of the run's own curve tells how much of the loss drop came from annealing (C·S2)
    and the irreducible part L0. Defaults follow the paper (λ = 0.999) and the fit the authors'
    code is reported to use (Huber loss, δ = 1e-3, on log L): see the functional's docstring.

    Recording: the LR of the first optimiser's param group `param_group` just before each
    optimiser step (`on_before_optimizer_step`: after the schedulers of the previous step, the
    LR that step uses) and the training loss returned by `training_step` (the mean over the
    accumulated batches of that step). The loss of step k is measured before update k, so the
    fit pairs the loss of step k + 1 with the areas after update k (S1 = η_0 + … + η_k). The
    loss is the process-local one under DDP.

    Fit (`on_train_end`): skips the first `skip_steps` steps (default: the warm-up), needs
    `min_points` points, then logs `{prefix}/L0`, `/A`, `/alpha`, `/C`, `/r2`, `/rmse` to the
    loggers, and draws the loss, the fitted law and the LR against the step to TensorBoard
    (`{prefix}/fit`) and to `fit.png` (`trainer.log_dir/lr_annealing_law`, or `save_dir`).
    The result is kept in `self.result`. The recorded curve is checkpointed, so a resumed run
    fits its whole curve.

    Args:
        decay: λ of the annealing momentum (paper: 0.999).
        warmup_steps: steps counted at the peak LR with no annealing momentum; "auto": the steps
            before the first maximum of the recorded LRs.
        skip_steps: first steps left out of the fit (None: the warm-up steps).
        min_points: fewest points to attempt a fit (fewer: a warning, no fit).
        objective: "huber_log" (paper) or "squares" (least squares on L).
        huber_delta: δ of the Huber loss on log L.
        param_group: the param group of the first optimiser whose LR is recorded.
        plot: draw the figure. save_dir: directory of `fit.png`.
        prefix: name prefix of the logged parameters.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup_steps: int | str = "auto",
        skip_steps: int | None = None,
        min_points: int = 20,
        objective: str = "huber_log",
        huber_delta: float = 1e-3,
        param_group: int = 0,
        plot: bool = True,
        save_dir: str | Path | None = None,
        prefix: str = "lr_annealing_law",
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay (λ) must be in [0, 1], got {decay}; the paper uses 0.999")
        if warmup_steps != "auto" and (
            isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be 'auto' or an integer >= 0, got {warmup_steps!r}")
        if skip_steps is not None and (
            isinstance(skip_steps, bool) or int(skip_steps) != skip_steps or skip_steps < 0
        ):
            raise ValueError(f"skip_steps must be None or an integer >= 0, got {skip_steps}")
        if isinstance(min_points, bool) or int(min_points) != min_points or min_points < 5:
            raise ValueError(
                f"min_points must be an integer >= 5 (4 parameters are fitted), got {min_points}"
            )
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if not huber_delta > 0:
            raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
        if isinstance(param_group, bool) or int(param_group) != param_group or param_group < 0:
            raise ValueError(f"param_group must be an integer >= 0, got {param_group}")
        if not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty name, e.g. 'lr_annealing_law'; got {prefix!r}")
        self.decay = float(decay)
        self.warmup_steps = warmup_steps
        self.skip_steps = None if skip_steps is None else int(skip_steps)
        self.min_points = int(min_points)
        self.objective = objective
        self.huber_delta = float(huber_delta)
        self.param_group = int(param_group)
        self.plot = bool(plot)
        self.save_dir = save_dir
        self.prefix = prefix
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.result: dict[str, float] | None = None
        self._pending_loss: list[Tensor | float] = []
        self._pending_lr: float | None = None
        self._pending_step = 0
        self._warned_loss = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # -- recording ------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" and not self.steps:  # after a fit, testing with the same trainer is normal
            warnings.warn(
                "LRAnnealingLaw records training steps and fits at the end of fit; it does nothing in "
                f"{getattr(stage, 'value', stage)!r}",
                stacklevel=2,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.optimizers:
            raise ValueError("LRAnnealingLaw needs an optimiser (configure_optimizers returned none)")
        groups = trainer.optimizers[0].param_groups
        if self.param_group >= len(groups):
            raise ValueError(
                f"param_group={self.param_group} but the first optimiser has {len(groups)} param group(s): "
                f"use one of {list(range(len(groups)))}"
            )
        self._pending_loss, self._pending_lr = [], None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if trainer.optimizers and optimizer is trainer.optimizers[0]:
            self._pending_lr = float(optimizer.param_groups[self.param_group]["lr"])
            self._pending_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._pending_loss.append(loss.detach().reshape(()))
        elif not self._warned_loss:
            warnings.warn(
                "LRAnnealingLaw: training_step returned no scalar loss (a tensor or {'loss': tensor}); "
                "such steps are not recorded",
                stacklevel=2,
            )
            self._warned_loss = True
        if self._pending_lr is not None:  # an optimiser step happened in this batch
            if self._pending_loss:
                self.steps.append(self._pending_step)
                self.lrs.append(self._pending_lr)
                # kept as a tensor until the epoch ends: no device sync per step
                self.losses.append(sum(self._pending_loss) / len(self._pending_loss))  # type: ignore[arg-type]
            self._pending_loss, self._pending_lr = [], None

    def _materialise(self) -> None:
        self.losses = [float(v) for v in self.losses]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._materialise()

    # -- the fit --------------------------------------------------------------------------
    def _warmup(self, lrs: np.ndarray) -> int:
        if self.warmup_steps == "auto":
            return int(np.argmax(lrs)) if len(lrs) else 0
        return int(self.warmup_steps)

    def fit(self) -> dict[str, float] | None:
        """Fit the law to the recorded curve (None when there are too few points)."""
        self._materialise()
        lrs = np.asarray(self.lrs, dtype=np.float64)
        losses = np.asarray(self.losses, dtype=np.float64)
        warmup = self._warmup(lrs)
        s1, s2 = lr_annealing_areas(lrs, self.decay, warmup)
        skip = warmup if self.skip_steps is None else self.skip_steps
        # loss of step k+1 ↔ areas after update k
        y, x1, x2 = losses[1:], s1[:-1], s2[:-1]
        keep = np.arange(len(y)) + 1 >= max(skip, 1)
        keep &= np.isfinite(y) & (x1 > 0)
        if int(keep.sum()) < self.min_points:
            return None
        fit = fit_lr_annealing_law(y[keep], x1[keep], x2[keep], self.objective, self.huber_delta)
        return {name: float(getattr(fit, name)) for name in ("L0", "A", "alpha", "C", "r2", "rmse")} | {
            "points": float(keep.sum()),
            "warmup_steps": float(warmup),
        }

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            result = self.fit()
        except ValueError as e:
            warnings.warn(f"LRAnnealingLaw: the fit failed ({e})", stacklevel=2)
            return
        if result is None:
            warnings.warn(
                f"LRAnnealingLaw: {len(self.losses)} recorded steps leave fewer than min_points={self.min_points} "
                "points after the warm-up: no fit (train longer or lower min_points)",
                stacklevel=2,
            )
            return
        self.result = result
        metrics = {f"{self.prefix}/{k}": v for k, v in result.items() if k not in ("points", "warmup_steps")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.plot and trainer.is_global_zero:
            self._plot(trainer, result)

    def _plot(self, trainer: L.Trainer, result: dict[str, float]) -> None:
        steps = np.asarray(self.steps)
        lrs = np.asarray(self.lrs)
        losses = np.asarray(self.losses)
        s1, s2 = lr_annealing_areas(lrs, self.decay, int(result["warmup_steps"]))
        fit_steps = steps[1:]
        law = lr_annealing_law(
            np.maximum(s1[:-1], 1e-12), s2[:-1], result["L0"], result["A"], result["alpha"], result["C"]
        )
        skip = int(result["warmup_steps"]) if self.skip_steps is None else self.skip_steps
        shown = np.arange(len(law)) + 1 >= max(skip, 1)
        fig = new_figure(7.0, 5.5)
        ax, ax_lr = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="training loss")
        ax.plot(fit_steps[shown], law[shown], "r--", linewidth=1.5, label="fitted law")
        ax.set_ylabel("loss")
        ax.set_title(
            f"L = {result['L0']:.3g} + {result['A']:.3g}·S1^-{result['alpha']:.3g} − {result['C']:.3g}·S2"
            f"   (R² = {result['r2']:.3f})",
            fontsize=9,
        )
        ax.legend(fontsize=8)
        ax_lr.plot(steps, lrs, color="tab:green")
        ax_lr.set(xlabel="optimiser step", ylabel="learning rate")
        fig.tight_layout()
        png = output_dir(trainer, "lr_annealing_law", self.save_dir) / "fit.png"
        log_figure(trainer, f"{self.prefix}/fit", fig, png)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._materialise()
        return {
            "steps": list(self.steps),
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "result": None if self.result is None else dict(self.result),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state_dict.get("steps", [])]
        self.lrs = [float(v) for v in state_dict.get("lrs", [])]
        self.losses = [float(v) for v in state_dict.get("losses", [])]
        result = state_dict.get("result")
        self.result = None if result is None else dict(result)
