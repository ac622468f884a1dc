"""How a data selector scores the training samples: the `Scorer` interface of `DataPruning`.

Two kinds, one interface:

- pass scorers (`PassScorer`: EL2N, GraNd, last-layer GraNd; VoG) score every training sample in
  a *scoring pass*: the model in eval mode, no gradients into its parameters, the training
  samples without augmentation in index order, each DDP rank its share
  (`DataModule.scoring_dataloader`);
- observing scorers (forgetting events) watch the training batches as they go
  (`observe`) and gather what they saw at the end of every epoch.

`scores()` returns a `SampleScores` identical on every rank (it may call collectives, so every
rank calls it). Every scorer has a `state_dict`, saved with the callback's: a resumed run scores
as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from toolkit.selection.scores import SampleScores
from toolkit.types import Batch, require_index


def scoring_model(pl_module: L.LightningModule) -> nn.Module:
    """The network a scorer runs: the module's `model` (toolkit modules; the student of a
    distillation module), else the LightningModule itself (its `forward` gives the logits)."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def _is_channels_last(model: nn.Module) -> bool:
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights
    )


@contextmanager
def scoring_mode(model: nn.Module, channels_last: bool = True) -> Iterator[None]:
    """The conditions of a scoring pass: eval mode, no autograd graph (gradient scorers enable it
    themselves), and, for convolutional nets, channels-last weights (on CPU the NCHW max-pool
    kernel alone took half of a convnet's forward; channels-last made the whole pass 2-3x faster).
    Everything is restored afterwards: the train/eval flag and the weights' memory format (the
    Parameter objects are kept, so optimisers and DDP keep their references)."""
    was_training = model.training
    convert = channels_last and any(p.dim() == 4 for p in model.parameters()) and not _is_channels_last(model)
    model.eval()
    if convert:
        model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            yield
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)


class Scorer:
    """Base: subclasses set `needs_pass` / `observes` and implement the matching methods."""

    #: the selector's canonical name (for logs and files)
    name = "scorer"
    #: scores come from scoring passes over the training set
    needs_pass = False
    #: scores come from watching the training batches
    observes = False
    #: high score = hard (Data Diet keeps the highest); pruning's mode "hardest" keeps these
    higher_is_harder = True

    def bind(self, sample_indices: Tensor) -> None:
        """Called once with every training sample's index before anything is scored."""
        self.sample_indices = sample_indices

    def bind_data(self, datamodule: Any) -> None:
        """Called with the DataModule just before `bind`, for scorers that read the data itself
        rather than the model (zip_fit reads the training texts). Default: nothing."""

    # -- passes ----------------------------------------------------------------------------
    def begin_pass(self) -> None:
        pass

    def pass_batch(self, model: nn.Module, batch: Batch) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not score in passes")

    def end_pass(self) -> None:
        pass

    # -- observing -------------------------------------------------------------------------
    def observe(self, pl_module: L.LightningModule, batch: Batch, outputs: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not observe training")

    def end_epoch(self) -> None:
        pass

    # -- result ----------------------------------------------------------------------------
    def scores(self) -> SampleScores:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what was scored (before a fresh re-scoring)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PassScorer(Scorer):
    """A scorer whose score of a sample is the mean, over scoring passes, of `score_batch`.

    Subclasses implement `score_batch(model, batch) -> (B,)`. The pass runs under
    `torch.no_grad()` with the model in eval mode; a scorer that needs gradients (GraNd, VoG)
    enables them itself, so forward-only scorers build no autograd graph.
    """

    needs_pass = True

    def __init__(self) -> None:
        self._scores = SampleScores({"selector": self.name})
        self._pending: list[tuple[Tensor, Tensor]] = []

    def score_batch(self, model: nn.Module, batch: Batch) -> Tensor:
        raise NotImplementedError

    def begin_pass(self) -> None:
        self._pending = []

    def pass_batch(self, model: nn.Module, batch: Batch) -> None:
        require_index(batch, f"the {self.name} selector")
        score = self.score_batch(model, batch)
        if score.shape != batch.index.shape:
            raise ValueError(
                f"{type(self).__name__}.score_batch returned {tuple(score.shape)} for a batch of {len(batch.index)}"
            )
        self._pending.append((batch.index.detach().cpu(), score.detach().float().cpu()))

    def end_pass(self) -> None:
        if self._pending:
            index, score = (torch.cat(t) for t in zip(*self._pending))
        else:
            index, score = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        self._scores.add_gathered(index, score)
        self._pending = []

    def scores(self) -> SampleScores:
        return self._scores

    def reset(self) -> None:
        self._scores = SampleScores({"selector": self.name})

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self._scores.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scores.load_state_dict(state["scores"])
