"""`DataPruning`: score the training samples, keep a fraction, train on it (Lightning callback).

Timeline (epochs counted as *completed* epochs, so 0 is before any training):

- with `scores` (a file or `SampleScores` from an earlier scoring run, e.g. Data Diet's average
  over seeds) the subset is chosen before the first epoch;
- otherwise the scorer scores during this run: pass scorers run a scoring pass after each count
  in `score_epochs` (0 = at initialisation), observing scorers watch the training batches; the
  subset is chosen after the last of `score_epochs` and used from the next epoch on;
- with `reselect_every=k` the choice is made again every k epochs after that (pass scorers
  re-score every training sample, pruned ones included, with the current model; observing
  scorers keep what they have seen), so a sample pruned once may come back.

The kept samples are served by the DataModule's rank-aware sampler (`set_train_subset`): under DDP
every kept sample is seen exactly once per epoch. Because Lightning measures an epoch when it
builds the training loader, the callback sets `Trainer.reload_dataloaders_every_n_epochs = 1`.

It only observes the model: any LightningModule works (no loss bus needed) whose batches carry
sample indices, with a DataModule offering `set_train_subset`, `train_sample_indices` and
`scoring_dataloader` (every toolkit DataModule does).

Logged: `selection/kept` (fraction of the training set) after every selection, a TensorBoard
histogram of the scores (`selection/<name>/scores`) when a TensorBoard logger is attached.
`save_scores` writes the scores (.pt or .npy, keyed by sample index) after every selection.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from toolkit.functional.subset import MODES, check_keep, select_subset
from toolkit.selection.scorer import Scorer, scoring_mode, scoring_model
from toolkit.selection.scores import SampleScores
from toolkit.types import as_batch

_DM_API = ("set_train_subset", "train_sample_indices", "scoring_dataloader")


class DataPruning(Callback):
    """Keep a `keep` fraction of the training set chosen by `scorer` (see the module docstring).

    Args:
        scorer: a `Scorer` (the selectors registered as `el2n`, `grand`, `forgetting`, ... build one).
        keep: fraction of the training samples kept, in (0, 1].
        mode: "hardest" keeps the highest scores (Data Diet), "easiest" the lowest.
        drop_hardest: with "hardest", a fraction of the very highest scores dropped first.
        score_epochs: completed-epoch counts after which pass scorers score (0: at
            initialisation); the subset is chosen after the last. Observing scorers need one >= 1.
        reselect_every: re-score and re-select every this many epochs after the first choice.
        scores: precomputed scores (path to .pt/.npy, or `SampleScores`): prune from the start.
        save_scores: write the scores here after every selection (.pt or .npy).
        channels_last: run scoring passes of convolutional nets with channels-last weights
            (restored afterwards; see `scoring_mode`): 2-3x faster passes on CPU.
    """

    def __init__(
        self,
        scorer: Scorer,
        keep: float,
        mode: str = "hardest",
        drop_hardest: float = 0.0,
        score_epochs: int | list[int] = 1,
        reselect_every: int | None = None,
        scores: str | Path | SampleScores | None = None,
        save_scores: str | Path | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a toolkit Scorer, got {type(scorer).__name__}")
        check_keep(keep)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if drop_hardest and (mode != "hardest" or not 0 <= drop_hardest <= 1 - keep):
            raise ValueError(f"drop_hardest must be in [0, 1 - keep] with mode='hardest', got {drop_hardest}")
        epochs = [score_epochs] if isinstance(score_epochs, int) else list(score_epochs)
        if not epochs or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs):
            raise ValueError(f"score_epochs must be completed-epoch counts >= 0, got {score_epochs!r}")
        if scorer.observes and scores is None and max(epochs) < 1:
            raise ValueError(f"{scorer.name} scores by watching training: score_epochs must be >= 1")
        if reselect_every is not None and (isinstance(reselect_every, bool) or reselect_every < 1):
            raise ValueError(f"reselect_every must be an integer >= 1 or None, got {reselect_every!r}")
        if save_scores is not None and Path(save_scores).suffix not in (".pt", ".npy"):
            raise ValueError(f"save_scores must end in .pt or .npy, got {save_scores!r}")
        self.scorer, self.keep, self.mode, self.drop_hardest = scorer, keep, mode, drop_hardest
        self.pass_epochs = sorted(set(epochs))
        self.reselect_every = reselect_every
        self.given_scores = SampleScores.load(scores) if isinstance(scores, (str, Path)) else scores
        self.save_scores = Path(save_scores) if save_scores is not None else None
        self.channels_last = channels_last
        self.first_selection = 0 if self.given_scores is not None else self.pass_epochs[-1]
        # state
        self.subset: torch.Tensor | None = None
        self.done_passes: list[int] = []
        self.selections: list[dict[str, Any]] = []
        self._datamodule: Any = None
        self._active = False

    @property
    def state_key(self) -> str:
        return f"DataPruning[{self.scorer.name}, keep={self.keep}, mode={self.mode}]"

    # -- schedule --------------------------------------------------------------------------
    def _selects_at(self, completed: int) -> bool:
        if completed == self.first_selection:
            return True
        k = self.reselect_every
        return (
            k is not None and completed > self.first_selection and (completed - self.first_selection) % k == 0
        )

    def _passes_at(self, completed: int) -> bool:
        if not self.scorer.needs_pass:
            return False
        if self.given_scores is None and completed in self.pass_epochs:
            return True
        return completed != self.first_selection and self._selects_at(completed)  # re-scoring

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            if self._datamodule is None:  # never fitted: the user may expect pruning here
                warnings.warn(
                    f"DataPruning only acts while fitting; it does nothing in stage '{stage}'", stacklevel=2
                )
            return
        dm = trainer.datamodule
        missing = [a for a in _DM_API if not hasattr(dm, a)]
        if dm is None or missing:
            raise TypeError(
                "DataPruning serves the kept samples through the DataModule, which needs "
                f"{', '.join(_DM_API)} ({'no DataModule given' if dm is None else 'missing: ' + ', '.join(missing)}). "
                "Every toolkit DataModule has them: pass one as trainer.fit(..., datamodule=dm)."
            )
        self._datamodule, self._active = dm, True
        indices = dm.train_sample_indices
        self.scorer.bind_data(dm)
        self.scorer.bind(indices)
        if self.given_scores is not None:
            self.given_scores.check_covers(indices, f"this {type(dm).__name__}'s training set")
        n = trainer.reload_dataloaders_every_n_epochs
        if n not in (0, 1):
            warnings.warn(
                f"DataPruning sets reload_dataloaders_every_n_epochs=1 (was {n}): the training subset may change "
                "size between epochs and Lightning measures an epoch when it builds the loader",
                stacklevel=2,
            )
        trainer.reload_dataloaders_every_n_epochs = 1
        dm.set_train_subset(self.subset)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the first loader is built: selections due at this point (at initialisation,
        # from given scores, or one a checkpoint saved before its epoch-end hooks ran).
        if self._active:
            self._catch_up(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active and self.scorer.observes:
            self.scorer.observe(pl_module, as_batch(batch), outputs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        if self.scorer.observes:
            self.scorer.end_epoch()
        completed = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs >= 0 and completed >= trainer.max_epochs
        if last and completed not in self.pass_epochs and completed != self.first_selection:
            return  # a re-selection no epoch would train on (a resumed, longer run catches up)
        self._catch_up(trainer, pl_module, completed)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = False

    # -- scoring and selection -------------------------------------------------------------
    def _catch_up(self, trainer: L.Trainer, pl_module: L.LightningModule, completed: int) -> None:
        if self._passes_at(completed) and completed not in self.done_passes:
            if completed != self.first_selection and completed not in self.pass_epochs:
                self.scorer.reset()  # re-scoring with the current model
            self.scoring_pass(trainer, pl_module)
            self.done_passes.append(completed)
        if self._selects_at(completed) and not any(s["epoch"] == completed for s in self.selections):
            self.select(trainer, completed)

    @torch.no_grad()
    def scoring_pass(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = scoring_model(pl_module)
        loader = self._datamodule.scoring_dataloader(trainer.global_rank, trainer.world_size)
        self.scorer.begin_pass()
        with scoring_mode(model, channels_last=self.channels_last):
            for raw in loader:
                batch = as_batch(raw)
                batch = batch._replace(
                    input=_to(batch.input, pl_module.device),
                    target=None if batch.target is None else batch.target.to(pl_module.device),
                    index=None if batch.index is None else batch.index.to(pl_module.device),
                )
                self.scorer.pass_batch(model, batch)
        self.scorer.end_pass()

    def select(self, trainer: L.Trainer, completed: int) -> None:
        scores = (
            self.given_scores if (completed == 0 and self.given_scores is not None) else self.scorer.scores()
        )
        indices = self._datamodule.train_sample_indices
        scores.check_covers(indices, "the training set")
        self.subset = select_subset(scores.index, scores.score, self.keep, self.mode, self.drop_hardest)
        self._datamodule.set_train_subset(self.subset)
        self.selections.append({"epoch": completed, "kept": len(self.subset)})
        self._report(trainer, scores, completed)

    def _report(self, trainer: L.Trainer, scores: SampleScores, completed: int) -> None:
        kept = len(self.subset) / len(self._datamodule.train_sample_indices)
        for logger in trainer.loggers:
            logger.log_metrics({"selection/kept": kept}, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram") and trainer.is_global_zero:
                experiment.add_histogram(f"selection/{self.scorer.name}/scores", scores.score, completed)
        if self.save_scores is not None and trainer.is_global_zero:
            scores.meta.update({"selector": self.scorer.name, "epoch": completed})
            scores.save(self.save_scores)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "subset": None if self.subset is None else self.subset.clone(),
            "done_passes": list(self.done_passes),
            "selections": [dict(s) for s in self.selections],
            "scorer": self.scorer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.subset = state["subset"]
        self.done_passes = list(state["done_passes"])
        self.selections = [dict(s) for s in state["selections"]]
        self.scorer.load_state_dict(state["scorer"])
        if self._datamodule is not None:  # restored after setup: before the first loader is built
            self._datamodule.set_train_subset(self.subset)


def pruning_selector(name: str, scorer_cls: type[Scorer], **defaults: Any):
    """Register `name` as a selector building `DataPruning(scorer_cls(...), ...)`: keyword
    arguments the scorer's constructor takes go to the scorer, the rest to `DataPruning`
    (`defaults` are the method's own defaults for `DataPruning`)."""
    import inspect

    from toolkit.registry import register

    scorer_args = set(inspect.signature(scorer_cls).parameters) - {"self"}

    def build(keep: float = 0.5, **kwargs: Any) -> DataPruning:
        scorer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in scorer_args}
        return DataPruning(scorer_cls(**scorer_kwargs), keep=keep, **{**defaults, **kwargs})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"DataPruning with the {scorer_cls.__name__} scores. {scorer_cls.__doc__ or ''}"
    build.scorer_cls = scorer_cls  # type: ignore[attr-defined]
    register("selector", name)(build)
    return build


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x
