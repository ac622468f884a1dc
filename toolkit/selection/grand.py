"""`grand` and `grand_last_layer`: prune by GraNd, the per-sample gradient norm (Data Diet, Paul
et al. 2021), exactly over every weight or in closed form over the linear head (DeepCore).

`grand`: a scoring pass (one backward per sample) at `score_epochs`; the paper scores at
initialisation (epoch 0) and averages 10 independent initialisations (`recipes.prune
--score-seeds` averages runs; in one run, several `score_epochs` average passes), then keeps the
highest scores. `grand_last_layer`: one forward per sample, from the logits and the penultimate
embedding; DeepCore scores it after a short training run, so its default is one epoch, as `el2n`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.functional.grand import STRATEGIES, grand_last_layer_score, grand_parameters, grand_score
from toolkit.models.output import forward_output
from toolkit.selection.pruning import pruning_selector
from toolkit.selection.scorer import PassScorer
from toolkit.types import Batch

log = logging.getLogger(__name__)


class GraNdScorer(PassScorer):
    """GraNd: ‖∇_w CE(f(w, x), y)‖₂ over every trainable weight, exact per-sample gradients.

    Args:
        strategy: "vmap" (chunked `torch.func.vmap(grad)`), "loop" (one backward per sample), or
            "auto": time both on the first scoring batch and keep the faster for every later
            batch (the choice and the timings are in `state_dict()` and logged at INFO level; a
            model vmap cannot run falls back to the loop). On a CPU the loop can win for conv nets.
        chunk_size: samples per vmap chunk (peak memory: chunk_size per-sample gradients).

    On a CPU whose cores other jobs also use, prefer `torch.set_num_threads(1)`: the loop is made
    of many tiny operations, and intra-op threads waiting for each other at every one of them made
    it about a hundred times slower on a loaded 2-core machine (vmap suffered ~30x).
    """

    name = "grand"

    def __init__(self, strategy: str = "auto", chunk_size: int = 32) -> None:
        if strategy not in ("auto", *STRATEGIES):
            raise ValueError(f"strategy must be 'auto', 'vmap' or 'loop', got {strategy!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        super().__init__()
        self.strategy, self.chunk_size = strategy, chunk_size
        self.chosen: str | None = None if strategy == "auto" else strategy
        self.timings: dict[str, float] = {}
        self.fallback: str | None = None

    def score_batch(self, model: nn.Module, batch: Batch) -> Tensor:
        if batch.target is None:
            raise ValueError("grand needs class targets in the scoring batches")
        params = grand_parameters(model)
        if self.chosen is None:
            return self._choose(model, batch, params)
        return grand_score(model, batch.input, batch.target, self.chosen, self.chunk_size, params)

    def _choose(self, model: nn.Module, batch: Batch, params: dict[str, Tensor]) -> Tensor:
        """Time both strategies on this batch (after a two-sample warm-up each), keep the faster,
        return its scores."""
        scores: dict[str, Tensor] = {}
        warm = _head(batch, 2)
        for strategy in STRATEGIES:
            try:
                grand_score(model, warm.input, warm.target, strategy, self.chunk_size, params)
                start = time.perf_counter()
                scores[strategy] = grand_score(
                    model, batch.input, batch.target, strategy, self.chunk_size, params
                )
                self.timings[strategy] = time.perf_counter() - start
            except (RuntimeError, NotImplementedError) as e:  # an op vmap has no batching rule for
                if strategy == "loop":
                    raise
                self.fallback = f"{type(e).__name__}: {e}"
                log.info("grand: vmap failed on this model (%s); using the per-sample loop", self.fallback)
        self.chosen = min(self.timings, key=self.timings.get)
        n = max(1, len(batch.target))
        log.info(
            "grand: strategy=auto chose %r (%s per sample on a batch of %d)",
            self.chosen,
            ", ".join(f"{k} {v / n * 1e3:.2f} ms" for k, v in self.timings.items()),
            n,
        )
        return scores[self.chosen]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "chosen": self.chosen,
            "timings": dict(self.timings),
            "fallback": self.fallback,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.strategy == "auto":  # a resumed run computes as the interrupted one did
            self.chosen = state.get("chosen")
            self.timings = dict(state.get("timings", {}))
            self.fallback = state.get("fallback")


class GraNdLastLayerScorer(PassScorer):
    """Last-layer GraNd (DeepCore): the norm of the cross-entropy gradient w.r.t. the linear head's
    weight and bias, ‖softmax(z) − onehot(y)‖₂ · sqrt(1 + ‖h‖₂²), from one forward pass.

    Needs the penultimate embedding h that feeds the head: timm-style models
    (`forward_features`, `forward_head(pre_logits=True)`, `get_classifier`, like every toolkit
    model), Hugging Face models (first-token state of the last layer: exact only when the head is
    one linear layer on it), or a model returning a `ModelOutput` with `embedding`.
    """

    name = "grand_last_layer"

    def score_batch(self, model: nn.Module, batch: Batch) -> Tensor:
        if batch.target is None:
            raise ValueError("grand_last_layer needs class targets in the scoring batches")
        with torch.no_grad():
            out = forward_output(model, batch.input)
        if out.embedding is None:
            raise ValueError(
                f"grand_last_layer needs the penultimate embedding, but {type(model).__name__} gives only logits. "
                "Use a timm-style model (forward_features / forward_head(pre_logits=True) / get_classifier, like "
                "every toolkit model), return toolkit.types.ModelOutput(logits, embedding) from forward, or use "
                "the selector 'grand' (full per-sample gradients, no embedding needed)."
            )
        return grand_last_layer_score(out.logits, out.embedding, batch.target)


def _head(batch: Batch, n: int) -> Batch:
    x = batch.input
    x = {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]
    return Batch(x, batch.target[:n], None if batch.index is None else batch.index[:n])


grand = pruning_selector("grand", GraNdScorer, score_epochs=0)
grand_last_layer = pruning_selector("grand_last_layer", GraNdLastLayerScorer, score_epochs=1)
