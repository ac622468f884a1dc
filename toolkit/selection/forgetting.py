"""`forgetting`: prune by forgetting events (Toneva et al., ICLR 2019; maths in
`toolkit.functional.forgetting`, with what was confirmed from the official code).

An observing scorer: on every training batch it records whether each sample is classified
correctly, and counts the correct → incorrect transitions between consecutive presentations of
the same sample. The correctness comes from the logits of the training step itself when the module
returns them (`outputs["logits"]`: every toolkit module does, through the loss bus), as the
official code does (train mode, before the optimiser step); otherwise, for a plain LightningModule,
from a no-grad forward of `scoring_model(pl_module)` on the batch input in eval mode, which runs
after the optimiser step (the closest an observer can get; batch-norm statistics are untouched).

Under DDP each rank observes its own batches; at every epoch end (a collective: every rank calls
`end_epoch`) the (index, correct, presentation counter) rows of all ranks are gathered and applied
in presentation order (batch counter, then rank), so every rank holds the same counts.

The paper counts events over a whole training run and removes the least forgotten
("unforgettable") samples before training a new model: `mode="hardest"` (keep the most
forgotten), scores from a full run reused with `DataPruning(scores=...)` (`recipes.prune
--scores FILE`). Within one run, `score_epochs` epochs of observation choose the subset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.distill.memory import gather_rows
from toolkit.functional.forgetting import forgetting_scores, forgetting_update
from toolkit.models.output import forward_output
from toolkit.selection.pruning import pruning_selector
from toolkit.selection.scorer import Scorer, scoring_model
from toolkit.selection.scores import SampleScores
from toolkit.types import Batch, require_index


class ForgettingScorer(Scorer):
    """Number of forgetting events of every training sample; never-learned samples score highest.

    The never-learned score is the number of observed epochs (the official code's
    `npresentations`), raised above the largest count of a learned sample if a sampler presented
    some sample more than once per epoch. Samples never presented count as never learned.

    State (checkpointed, keyed by sample index): the correctness at each sample's last
    presentation, its forgetting count, whether it was ever learned, the observed epochs, and the
    rows of the current epoch not yet applied (a mid-epoch checkpoint; under DDP only rank 0's
    rows are saved, as Lightning saves rank 0's callback state).
    """

    name = "forgetting"
    observes = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.last = torch.zeros(0, dtype=torch.int8)
        self.forgets = torch.zeros(0, dtype=torch.long)
        self.learned = torch.zeros(0, dtype=torch.bool)
        self.epochs = 0
        self._pending: list[tuple[Tensor, Tensor, int]] = []
        self._seq = 0

    # -- observing -------------------------------------------------------------------------
    @torch.no_grad()
    def correct(self, pl_module: L.LightningModule, batch: Batch, outputs: Any) -> Tensor:
        """(B,) bool: is each sample of the batch classified correctly."""
        index = require_index(batch, "forgetting")
        if batch.target is None:
            raise ValueError("forgetting needs class targets in the training batches")
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if not (isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[0] == len(index)):
            model = scoring_model(pl_module)
            was_training = model.training
            model.eval()
            try:
                logits = forward_output(model, batch.input).logits
            finally:
                model.train(was_training)
        if logits.dim() != 2:
            raise ValueError(
                f"forgetting scores classifiers: expected (B, C) logits, got {tuple(logits.shape)}"
            )
        target = batch.target
        if target.dim() == 2:  # soft / one-hot targets: the class with the most mass
            target = target.argmax(-1)
        return logits.detach().argmax(-1) == target.to(logits.device).long()

    def observe(self, pl_module: L.LightningModule, batch: Batch, outputs: Any) -> None:
        ok = self.correct(pl_module, batch, outputs)
        self._pending.append((batch.index.detach().long().cpu(), ok.cpu(), self._seq))
        self._seq += 1

    def end_epoch(self) -> None:
        if self._pending:
            index = torch.cat([i for i, _, _ in self._pending])
            rows = torch.stack(
                [
                    torch.cat([c.long() for _, c, _ in self._pending]),
                    torch.cat([torch.full((len(i),), s, dtype=torch.long) for i, _, s in self._pending]),
                ],
                dim=1,
            )
        else:
            index, rows = torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long)
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())  # NCCL gathers CUDA tensors only
            index, rows = index.to(device), rows.to(device)
        index, rows = gather_rows(index, rows)  # rank order: ties in the counter keep it
        index, rows = index.cpu(), rows.cpu()
        self.last, self.forgets, self.learned = forgetting_update(
            index, rows[:, 0], self.last, self.forgets, self.learned, order=rows[:, 1]
        )
        self.epochs += 1
        self._pending, self._seq = [], 0

    # -- result ----------------------------------------------------------------------------
    def scores(self) -> SampleScores:
        indices = torch.as_tensor(self.sample_indices).long()
        n = max(len(self.forgets), int(indices.max()) + 1 if len(indices) else 0)
        forgets, learned = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        forgets[: len(self.forgets)], learned[: len(self.learned)] = (
            self.forgets,
            self.learned,
        )  # unseen: never learned
        forgets, learned = forgets[indices], learned[indices]
        top = int(forgets[learned].max()) if learned.any() else 0
        never = max(self.epochs, top + 1)
        out = SampleScores({"selector": self.name, "epochs": self.epochs})
        out.add(indices, forgetting_scores(forgets, learned, float(never)))
        return out

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "last": self.last.clone(),
            "forgets": self.forgets.clone(),
            "learned": self.learned.clone(),
            "epochs": self.epochs,
            "pending": [(i.clone(), c.clone(), s) for i, c, s in self._pending],
            "seq": self._seq,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = state["last"].clone().to(torch.int8)
        self.forgets = state["forgets"].clone().long()
        self.learned = state["learned"].clone().bool()
        self.epochs = int(state["epochs"])
        self._pending = [(i.clone(), c.clone(), int(s)) for i, c, s in state["pending"]]
        self._seq = int(state["seq"])


# two epochs: the fewest in which a forgetting event can happen (the paper counts over a whole run)
forgetting = pruning_selector("forgetting", ForgettingScorer, score_epochs=2)

__all__ = ["ForgettingScorer", "forgetting"]
