"""`hessian_monitor`: trace and top eigenvalues of the loss Hessian on a fixed batch, per epoch,
against the 2/η stability line. Maths in `toolkit.functional.hessian`."""

from __future__ import annotations

import math
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
    current_lr,
    default_loss,
    device_batch,
    measuring,
    probe_loader,
    select_parameters,
)
from toolkit.functional.hessian import HessianOperator, hutchinson_trace, lanczos_top_eigenvalues
from toolkit.registry import register
from toolkit.types import Batch


@register("callback", "hessian_monitor")
class HessianMonitor(Callback):
    """Log the curvature of the training loss every `every_n_epochs` epochs (after each epoch's
    training, before the learning rate of the next epoch is set).

    On a probe batch fixed at setup (the first `num_samples` training samples, unaugmented, in
    index order for toolkit DataModules; or the `batch` given), with the module in eval mode:

    - `{prefix}/loss`: the loss on the probe batch;
    - `{prefix}/trace`: Hutchinson's estimate of tr(H), `hutchinson_probes` Rademacher probes,
      and `{prefix}/trace_stderr` its standard error;
    - `{prefix}/eig_1` … `eig_k`: the `top_k` largest eigenvalues by `lanczos_iters` Lanczos steps
      on Hessian-vector products (double backward), largest first;
    - `{prefix}/stability_threshold` = 2/η and `{prefix}/lr` = η, the learning rate of the epoch's
      last optimiser step (first parameter group; before an LR scheduler moves it),
      with `{prefix}/lambda_max_lr_over_2` = η·λ_max/2 (GD's linear stability needs ≤ 1) and
      `{prefix}/trace_lr_over_2` = η·tr(H)/2 (SGD's, by Wu & Su 2023, needs ≤ 1).

    Papers: Sagun et al., "Empirical Analysis of the Hessian of Over-Parametrized Neural
    Networks" (arXiv:1706.04454): spectrum = bulk near 0 + outliers, the top eigenvalues track
    the number of classes; Wu & Su, "The Implicit Regularization of Dynamical Stability in
    SGD" (ICML 2023, arXiv:2305.17490): a minimum linearly stable for SGD has tr(H) ≤ 2/η, for
    GD only λ_max(H) ≤ 2/η. The 2/η line is that of plain (S)GD: for adaptive optimisers (Adam)
    the relevant curvature is the preconditioned one, which is not computed here.

    H is the Hessian of the mean loss over the probe batch with respect to the trainable
    parameters of the LightningModule (or of the submodule at `parameters`, e.g. "model.fc").
    The loss is the cross-entropy of the module's forward (`pl_module(x)`, logits or an object
    with `.logits`) unless `loss_fn(pl_module, batch) -> scalar` is given; it works with any
    LightningModule. Eval mode by default (BatchNorm uses its running statistics and is not
    updated; `train_mode=True` measures in training mode, which updates BatchNorm running
    statistics); modes and `.grad`s are restored afterwards. Probes and the Lanczos start are
    drawn from a generator seeded by (`seed`, epoch): the run's random stream is untouched.

    Cost per measurement: about (hutchinson_probes + lanczos_iters) Hessian-vector products, each
    roughly two backward passes over the probe batch; the Lanczos basis is kept in float64 on the
    CPU (lanczos_iters × P × 8 bytes for P parameters: restrict `parameters` on large models).

    Args:
        every_n_epochs: measure every this many epochs (and after the last one).
        num_samples: size of the probe batch (default 256).
        top_k: eigenvalues to report (default 3; 0 skips Lanczos).
        lanczos_iters: Lanczos steps (default 20; more steps, more accurate lower eigenvalues).
        hutchinson_probes: Rademacher probes for the trace (default 20; 0 skips the trace).
        parameters: a module path under the LightningModule restricting H to its parameters.
        loss_fn: `fn(pl_module, batch) -> scalar loss`; batch is a `Batch(input, target)`.
        batch: an explicit probe batch `(x, y)` instead of the training data.
        train_mode: measure in training mode instead of eval mode.
        seed: seeds the probes.
        prefix: the logged names are `{prefix}/...`.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 256,
        top_k: int = 3,
        lanczos_iters: int = 20,
        hutchinson_probes: int = 20,
        parameters: str | None = None,
        loss_fn: LossFn | None = None,
        batch: Any = None,
        train_mode: bool = False,
        seed: int = 0,
        prefix: str = "hessian",
    ) -> None:
        super().__init__()
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs)
        self.num_samples = check_int("num_samples", num_samples)
        self.top_k = check_int("top_k", top_k, minimum=0)
        self.lanczos_iters = check_int("lanczos_iters", lanczos_iters)
        self.hutchinson_probes = check_int("hutchinson_probes", hutchinson_probes, minimum=0)
        if self.top_k and self.lanczos_iters < self.top_k:
            raise ValueError(f"lanczos_iters ({lanczos_iters}) must be >= top_k ({top_k})")
        if not self.top_k and not self.hutchinson_probes:
            raise ValueError("nothing to measure: top_k and hutchinson_probes are both 0")
        if parameters is not None and (not isinstance(parameters, str) or not parameters):
            raise ValueError(
                f"parameters must be a module path such as 'model.fc' or None, got {parameters!r}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable as fn(pl_module, batch) -> scalar loss")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.parameters = parameters
        self.loss_fn = loss_fn
        self.given_batch = None if batch is None else as_probe_batch(batch)
        self.train_mode = bool(train_mode)
        self.seed = int(seed)
        self.prefix = prefix
        self.probe_batch: Batch | None = self.given_batch
        self.history: list[dict[str, float]] = []
        self._active = self._fitted = False
        self._last_lr: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, parameters=self.parameters)

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            if not self._fitted:  # silent for the test/validate stages that follow a fit
                stage_name = getattr(stage, "value", stage)
                warnings.warn(
                    f"HessianMonitor measures during fit only; inactive for stage {stage_name!r}",
                    stacklevel=2,
                )
            self._active = False
            return
        self._active = self._fitted = True
        select_parameters(pl_module, self.parameters)  # a wrong path fails now, listing candidates
        if self.probe_batch is None:
            loader = probe_loader(trainer)
            if loader is not None:
                self.probe_batch = collect_batch(loader, self.num_samples)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._active and self.probe_batch is None:  # a module with its own train_dataloader
            loader = probe_loader(trainer)
            if loader is None:
                raise ValueError(
                    "HessianMonitor found no training data for its probe batch: use a DataModule, or give "
                    "batch=(x, y)"
                )
            self.probe_batch = collect_batch(loader, self.num_samples)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._active:  # the learning rate of the step about to be taken (before a scheduler moves it)
            self._last_lr = current_lr(trainer)

    # -- measurement ----------------------------------------------------------------------
    def measure(self, pl_module: Any, epoch: int = 0, lr: float | None = None) -> dict[str, float]:
        """Trace, top eigenvalues and stability ratios on the probe batch (floats)."""
        if self.probe_batch is None:
            raise ValueError(
                "HessianMonitor has no probe batch yet: call it during fit, or give batch=(x, y)"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        _, params = select_parameters(pl_module, self.parameters)
        out: dict[str, float] = {}
        with measuring(pl_module, self.train_mode):
            batch = device_batch(self.probe_batch, pl_module.device)
            loss = (self.loss_fn or default_loss)(pl_module, batch)
            op = HessianOperator(loss, params)
            out["loss"] = float(loss.detach())
            if self.hutchinson_probes:
                trace, samples = hutchinson_trace(op, self.hutchinson_probes, g, return_samples=True)
                out["trace"] = float(trace)
                n = samples.numel()
                out["trace_stderr"] = float(samples.std() / math.sqrt(n)) if n > 1 else 0.0
            if self.top_k:
                k = min(self.top_k, op.dim)
                eigs = lanczos_top_eigenvalues(op, k, num_iters=min(self.lanczos_iters, op.dim), generator=g)
                out.update({f"eig_{i + 1}": float(v) for i, v in enumerate(eigs)})
            del op, loss
        if lr is not None and lr > 0:
            out["lr"] = lr
            out["stability_threshold"] = 2.0 / lr
            if "eig_1" in out:
                out["lambda_max_lr_over_2"] = lr * out["eig_1"] / 2.0
            if "trace" in out:
                out["trace_lr_over_2"] = lr * out["trace"] / 2.0
        return out

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self._active or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs - 1
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        lr = self._last_lr if self._last_lr is not None else current_lr(trainer)
        out = self.measure(pl_module, epoch, lr)
        self.history.append({"epoch": epoch, "step": trainer.global_step, **out})
        for name, value in out.items():
            pl_module.log(f"{self.prefix}/{name}", value)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
