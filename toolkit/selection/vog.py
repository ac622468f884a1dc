"""`vog`: prune by VoG, the variance of input gradients across checkpoints (Agarwal et al.,
CVPR 2022; used for pruning in "Influence Scores at Scale", Anand et al., EMNLP 2023).

One scoring pass per checkpoint (each of `score_epochs`, default after epochs 1, 2 and 3: the
paper's "early" stage of three snapshots); each pass adds S_t = ∂A_y/∂x of every training sample
to per-sample running statistics (Welford: count, mean and M2 per input dimension), kept on the
CPU keyed by sample index and saved in the scorer's `state_dict`, so a resumed run scores as one
that never stopped. The scores are the class-normalised VoG (see `toolkit.functional.vog`).

Memory: two float32 values per input dimension per training sample (the mean and M2; after the
channel mean for images: 60k × 784 × 8 bytes ≈ 380 MB for Fashion-MNIST), on every DDP rank
(each pass's gradients are gathered so every rank holds the same statistics). The checkpoint
carries them too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from toolkit.distill.memory import gather_rows
from toolkit.functional.vog import class_normalize, input_gradients, vog_from_moments, welford_update
from toolkit.selection.pruning import pruning_selector
from toolkit.selection.scorer import Scorer
from toolkit.selection.scores import SampleScores
from toolkit.types import Batch


class VoGScorer(Scorer):
    """Variance of gradients of every training sample over the scoring passes (checkpoints).

    Args:
        normalize: z-score the VoG within each class (the paper's class-normalised VoG).
        channel_mean: average image gradients over the channels before the variance (the
            official code); no effect on one-channel images.

    Needs at least two passes (checkpoints) before `scores()`. A re-selection
    (`reselect_every`) adds the current model as one more checkpoint: the statistics are kept
    across re-scoring (`reset` keeps them), since one checkpoint has no variance.
    """

    name = "vog"
    needs_pass = True
    higher_is_harder = True

    def __init__(self, normalize: bool = True, channel_mean: bool = True) -> None:
        self.normalize, self.channel_mean = bool(normalize), bool(channel_mean)
        self.count = torch.zeros(0, dtype=torch.long)
        self.mean = torch.zeros(0, 0)
        self.m2 = torch.zeros(0, 0)
        self.label = torch.zeros(0, dtype=torch.long)
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []

    # -- passes ----------------------------------------------------------------------------
    def begin_pass(self) -> None:
        self._pending = []

    def pass_batch(self, model: nn.Module, batch: Batch) -> None:
        if batch.index is None:
            raise ValueError("vog scores are keyed by sample index but the scoring batch has none")
        if batch.target is None:
            raise ValueError(
                "vog needs class targets in the scoring batches (the label's logit is differentiated)"
            )
        grads = input_gradients(model, batch.input, batch.target, self.channel_mean)
        self._pending.append(
            (batch.index.detach().cpu(), grads.detach().cpu(), batch.target.detach().long().cpu())
        )

    def end_pass(self) -> None:
        if self._pending:
            index, grads, label = (torch.cat(t) for t in zip(*self._pending))
        else:  # a rank with no share still joins the gather
            index, label = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
            grads = torch.zeros(0, self.mean.shape[1])
        self._pending = []
        index, grads, label = _gather(index, grads, label)
        if not len(index):
            return
        if len(index.unique()) != len(index):
            raise ValueError(
                "vog: a scoring pass gave some sample twice; every sample must be scored once per pass"
            )
        self._grow(int(index.max()) + 1, grads.shape[1])
        count, mean, m2 = welford_update(self.count[index], self.mean[index], self.m2[index], grads.float())
        self.count[index], self.mean[index], self.m2[index] = count, mean, m2
        seen = self.label[index]
        if bool(((seen >= 0) & (seen != label)).any()):
            raise ValueError(
                "vog: a sample's label changed between scoring passes; VoG is normalised per class"
            )
        self.label[index] = label

    def _grow(self, n: int, dim: int) -> None:
        if self.mean.shape[1] != dim:
            if self.count.numel() and bool((self.count > 0).any()):
                raise ValueError(
                    f"vog: the input gradients have {dim} values per sample but earlier passes had {self.mean.shape[1]}"
                )
            self.mean, self.m2 = torch.zeros(len(self.count), dim), torch.zeros(len(self.count), dim)
        old = len(self.count)
        if n > old:
            self.count = torch.cat([self.count, self.count.new_zeros(n - old)])
            self.label = torch.cat([self.label, self.label.new_full((n - old,), -1)])
            self.mean = torch.cat([self.mean, self.mean.new_zeros(n - old, dim)])
            self.m2 = torch.cat([self.m2, self.m2.new_zeros(n - old, dim)])

    # -- result ----------------------------------------------------------------------------
    @property
    def checkpoints(self) -> int:
        """How many passes every scored sample has seen (the smallest count)."""
        seen = self.count[self.count > 0]
        return int(seen.min()) if len(seen) else 0

    def scores(self) -> SampleScores:
        index = torch.nonzero(self.count > 0).flatten()
        if not len(index):
            raise ValueError("vog has no scores yet: no scoring pass has run")
        if self.checkpoints < 2:
            raise ValueError(
                f"vog needs at least 2 checkpoints (scoring passes) per sample, got {self.checkpoints}: give "
                "score_epochs two or more epochs, e.g. score_epochs=[1, 2, 3]"
            )
        raw = vog_from_moments(self.count[index], self.m2[index])
        score = class_normalize(raw, self.label[index]) if self.normalize else raw
        out = SampleScores(
            {"selector": self.name, "checkpoints": self.checkpoints, "normalize": self.normalize}
        )
        out.add(index, score)
        return out

    def reset(self) -> None:
        """Keep the checkpoints' statistics: a re-scoring adds one more checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count.clone(),
            "mean": self.mean.clone(),
            "m2": self.m2.clone(),
            "label": self.label.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.label = state["count"].clone(), state["label"].clone()
        self.mean, self.m2 = state["mean"].clone(), state["m2"].clone()


def _gather(index: Tensor, grads: Tensor, label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's rows of this pass (a collective call under DDP)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return index, grads, label
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())  # NCCL gathers CUDA tensors only
    rows = torch.cat([grads.float(), label.float().unsqueeze(1)], 1).to(device)
    index, rows = gather_rows(index.long().to(device), rows)
    return index.cpu(), rows[:, :-1].cpu(), rows[:, -1].round().long().cpu()


vog = pruning_selector("vog", VoGScorer, score_epochs=[1, 2, 3])
