"""`random`: a uniformly random subset, the baseline every selector is compared with.

Its "scores" are uniform draws from a generator seeded by (`seed`, selection round), a pure
function of both: the same subset in every process and in a resumed run, a fresh one at every
re-selection.
"""

from __future__ import annotations

from typing import Any

import torch

from toolkit.selection.pruning import pruning_selector
from toolkit.selection.scorer import Scorer
from toolkit.selection.scores import SampleScores


class RandomScorer(Scorer):
    """Uniform random scores over the training samples."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rounds = 0

    def scores(self) -> SampleScores:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds)
        self.rounds += 1
        out = SampleScores({"selector": self.name, "seed": self.seed})
        out.add(self.sample_indices, torch.rand(len(self.sample_indices), generator=g))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])


random = pruning_selector("random", RandomScorer, score_epochs=0)
