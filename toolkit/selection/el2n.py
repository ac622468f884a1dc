"""`el2n`: prune by EL2N, the error L2 norm early in training (Data Diet, Paul et al. 2021).

A scoring pass (forward only) after `score_epochs` epochs; the paper scores after a few epochs
(20 of 200 on CIFAR-10) and averages over 10 independent runs (`recipes.prune --score-seeds`
averages runs; in one run, several `score_epochs` average passes), then keeps the highest scores.
"""

from __future__ import annotations

from torch import Tensor, nn

from toolkit.functional.el2n import el2n_score
from toolkit.models.output import forward_output
from toolkit.selection.pruning import pruning_selector
from toolkit.selection.scorer import PassScorer
from toolkit.types import Batch


class EL2NScorer(PassScorer):
    """EL2N of every training sample under the current model."""

    name = "el2n"

    def score_batch(self, model: nn.Module, batch: Batch) -> Tensor:
        if batch.target is None:
            raise ValueError("el2n needs class targets in the scoring batches")
        return el2n_score(forward_output(model, batch.input).logits.detach(), batch.target)


el2n = pruning_selector("el2n", EL2NScorer, score_epochs=1)
