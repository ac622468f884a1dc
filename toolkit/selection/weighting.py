"""`SampleWeighting`: the base of the sample reweighters (`dataset_equity`, `loss_reweighting`,
`curriculum`), Lightning callbacks that weight each training sample's loss through the loss bus.

A weighter registers itself on the module's `LossBus` in `setup("fit")`
(`pl_module.add_weighter(name, self)`) and removes itself in `teardown`. For every training step
the bus calls it with the step and the per-sample loss (detached) and multiplies each per-sample
term by the returned (B,) weights before the mean over the batch:

    loss = Σ_k w_k · (1/B)·Σ_i s_i·ℓ_k,i

Several weighters multiply. Outside training (a module in eval mode) the weights are 1.

Logged every `log_every_n_steps` training steps (the Trainer's by default): the weights' mean, min
and max (`selection/<name>/weight_mean|min|max`) to every logger, and a TensorBoard histogram
(`selection/<name>/weights`) when a TensorBoard logger is attached.

The per-sample state a weighter computes before training (cluster likelihoods, easiness) is
computed once in `on_fit_start`, with the model on its device and after a checkpoint restored the
callback's state (a resumed run keeps what the first run computed), by a pass over
`datamodule.scoring_dataloader(rank, world_size)` (`training_pass`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from toolkit.distill.memory import gather_rows
from toolkit.selection.scores import SampleScores
from toolkit.terms import Step
from toolkit.types import Batch, as_batch


class SampleWeighting(Callback):
    """Base class: subclasses set `name` and implement `weights(step, per_sample_loss) -> (B,)`.

    Args:
        log_every_n_steps: log the weights' statistics every this many training steps (default:
            the Trainer's `log_every_n_steps`); 0 never logs.
    """

    #: canonical selector name (registry, logs, the bus's weighter name)
    name = "weighting"

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool) or log_every_n_steps < 0):
            raise ValueError(f"log_every_n_steps must be an integer >= 0 or None, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self._module: Any = None
        self._last: Tensor | None = None

    @property
    def state_key(self) -> str:
        return f"SampleWeighting[{self.name}]"

    # -- the weights -----------------------------------------------------------------------
    def weights(self, step: Step, per_sample_loss: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, step: Step, per_sample_loss: Tensor) -> Tensor:
        module = step.module
        if module is not None and not getattr(module, "training", True):
            return torch.ones_like(per_sample_loss)
        w = self.weights(step, per_sample_loss)
        if w.shape != per_sample_loss.shape:
            raise ValueError(
                f"{type(self).__name__} returned weights of shape {tuple(w.shape)} for a batch of "
                f"{tuple(per_sample_loss.shape)}"
            )
        w = w.to(per_sample_loss.device, torch.float32)
        self._last = w.detach()
        return w

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            warnings.warn(
                f"{type(self).__name__} weights training samples only: nothing to do in {stage!r}",
                stacklevel=2,
            )
            return
        if not callable(getattr(pl_module, "add_weighter", None)):
            raise TypeError(
                f"{type(self).__name__} ({self.name!r}) reweights the training loss through the loss bus, but "
                f"{type(pl_module).__name__} has no add_weighter: use a toolkit module (ClassificationModule, "
                "DistillationModule, ...) or put toolkit.modules.LossBus before L.LightningModule in your "
                "module's bases and return self.loss_from(logits, batch) from training_step"
            )
        self.check_setup(trainer, pl_module)
        if self._module is not None:  # a second fit with the same callback
            self._remove()
        pl_module.add_weighter(self.name, self)
        self._module = pl_module

    def check_setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hook: validate what the weighter needs (called in `setup("fit")` before registering)."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove()

    def _remove(self) -> None:
        if self._module is not None and self.name in getattr(self._module, "_weighters", {}):
            self._module.remove_weighter(self.name)
        self._module = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        w, self._last = self._last, None
        if w is None or not every or not trainer.loggers or (trainer.global_step - 1) % every:
            return
        w = w.float()
        stats = {
            f"selection/{self.name}/weight_mean": float(w.mean()),
            f"selection/{self.name}/weight_min": float(w.min()),
            f"selection/{self.name}/weight_max": float(w.max()),
        }
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if trainer.is_global_zero and hasattr(experiment, "add_histogram"):
                experiment.add_histogram(f"selection/{self.name}/weights", w.cpu(), trainer.global_step)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# -- helpers shared by the weighters ---------------------------------------------------------


def training_pass(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    fn: Callable[[Batch], Tensor],
    who: str,
    grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """(index, rows) of `fn(batch)` over every training sample (no augmentation, eval mode;
    gradients only with `grad`, for scorers that need them), each rank its share, gathered so
    every rank holds all rows sorted by index."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "scoring_dataloader"):
        raise TypeError(
            f"{who} computes its per-sample values with a pass over the training set, which needs a DataModule "
            "with scoring_dataloader(rank, world_size) (every toolkit DataModule has it): pass one as "
            "trainer.fit(..., datamodule=dm), or give the values precomputed"
        )
    was_training = pl_module.training
    pl_module.eval()
    index, rows = [], []
    try:
        with torch.set_grad_enabled(grad):
            for raw in dm.scoring_dataloader(trainer.global_rank, trainer.world_size):
                batch = as_batch(raw)
                if batch.index is None:
                    raise ValueError(
                        f"{who} keys its values by sample index but the scoring batches have none"
                    )
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                out = fn(batch)
                index.append(batch.index.long())
                rows.append(out.detach().float())
    finally:
        pl_module.train(was_training)
    if index:
        idx, val = torch.cat(index), torch.cat(rows)
    else:
        idx = torch.zeros(0, dtype=torch.long, device=pl_module.device)
        val = torch.zeros(0, device=pl_module.device)
    idx, val = gather_rows(idx, val)
    order = torch.argsort(idx.cpu())
    return idx.cpu()[order], val.cpu()[order]


def as_sample_scores(values: Any, what: str) -> SampleScores:
    """A `SampleScores` from a file (.pt/.npy), a `SampleScores`, or a dense (N,) tensor / array
    with values[i] for sample index i (NaN where a sample has none)."""
    from pathlib import Path

    if isinstance(values, SampleScores):
        return values
    if isinstance(values, (str, Path)):
        return SampleScores.load(values)
    dense = torch.as_tensor(values).detach().double().cpu()
    if dense.dim() != 1:
        raise ValueError(
            f"{what} as a tensor must be dense (N,) values keyed by sample index, got {tuple(dense.shape)}"
        )
    out = SampleScores({"source": "tensor"})
    seen = ~torch.isnan(dense)
    out.add(torch.nonzero(seen).flatten(), dense[seen])
    return out


def lookup(table: Tensor, index: Tensor, who: str) -> Tensor:
    """table[index] for a dense per-sample table (NaN = unknown sample), with a clear error."""
    cpu = index.device.type == "cpu"  # checked on CPU only: on accelerators a check would sync every step
    if cpu and index.numel() and int(index.max()) >= len(table):
        raise ValueError(
            f"{who} has values for sample indices < {len(table)} but the batch has index {int(index.max())}: "
            "the values were computed for another data set, split or seed"
        )
    out = table.to(index.device)[index]
    if cpu and torch.isnan(out).any():
        missing = index[torch.isnan(out)][:5].tolist()
        raise ValueError(
            f"{who} has no value for samples {missing}: they were not in the training set when the values were "
            "computed (another data set, split or seed)"
        )
    return out
