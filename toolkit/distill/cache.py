"""`TeacherCache`: the teacher's logits remembered per (sample index, augmentation view).

A frozen teacher gives the same logits for the same input, so after the first pass over the
data its forward passes can be skipped: logit-only distillers (kd, dkd, nkd, pld, sinkd, ...)
then cost about as much as training the student alone.

Unlike caches keyed by the sample index alone (which replay one random crop's logits for every
other crop), the key here is (index, view). Without augmentation there is one view per sample.
With augmentation, the DataModule's `augment_views=K` makes a sample's random view in epoch e
the one of epoch e mod K (`toolkit.data.IndexSampler(views=K)`), and the cache stores the
teacher's logits for each of the K views; the module refuses a cache on randomly augmented data
without views, since its entries would not match the inputs.

The table is a `SampleMemory` (rows of C logits, keyed by index·K + view): saved in checkpoints so
a resumed run reads exactly the logits the interrupted one would have (a teacher evaluated on a
different batch can differ in the last bits), and grown on demand. Under DDP each process caches
the samples it sees (no gathering: a process whose batch is fully cached must not wait for the
others); as the sampler reshuffles every epoch, each process fills its table within a few epochs.
Checkpoints are written by rank 0, so a resumed run starts from rank 0's table on every rank;
entries are valid wherever they came from.

Only logits are cached: a term that reads teacher features or the teacher's embedding needs the
live teacher, and the module says so at set-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.distill.memory import SampleMemory


def select_rows(inputs: Any, mask: Tensor) -> Any:
    """The rows of a batch input where `mask` is true: a tensor, or a dict of tensors (tokenised text)."""
    if isinstance(inputs, Tensor):
        return inputs[mask]
    if isinstance(inputs, dict):
        return {k: v[mask] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    raise TypeError(f"TeacherCache can only split tensor or dict inputs, got {type(inputs).__name__}")


class TeacherCache(nn.Module):
    """Teacher logits per (sample index, view), computed once and then read back.

    Args:
        num_classes: C, the width of the cached logits.
        views: K ≥ 1, the number of augmentation views per sample (1 without augmentation);
            must equal the DataModule's `augment_views` when it augments.
        dtype: storage type; float16/bfloat16 halve the memory (N·K·C values) at a small
            rounding cost, float32 (default) keeps the live teacher's values exactly.
    """

    def __init__(self, num_classes: int, views: int = 1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an integer >= 1, got {views!r}")
        self.num_classes = num_classes
        self.views = views
        self.table = SampleMemory(num_classes, dtype=dtype)
        self.hits = 0
        self.misses = 0

    def set_views(self, views: int) -> None:
        """Fix K from the DataModule; an error if a restored table was built with another K."""
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an integer >= 1, got {views!r}")
        if views != self.views and bool(self.table.written.any()):
            raise ValueError(
                f"the teacher cache holds entries for {self.views} augmentation view(s) but the data now has "
                f"{views}: keep augment_views as in the run that filled it, or start without its checkpoint"
            )
        self.views = views
        self._views_set = True

    def get_extra_state(self) -> Any:
        return {"views": self.views}

    def set_extra_state(self, state: Any) -> None:
        views = int(state["views"])
        if getattr(self, "_views_set", False) and views != self.views:
            raise ValueError(
                f"the checkpoint's teacher cache was filled with {views} augmentation view(s), this run's data "
                f"has {self.views}: keep augment_views as in that run, or resume without the cache"
            )
        self.views = views

    def keys(self, index: Tensor, epoch: int) -> Tensor:
        return index.long() * self.views + epoch % self.views

    def logits(self, index: Tensor, epoch: int, inputs: Any, teacher: Callable[[Any], Tensor]) -> Tensor:
        """(B, C) teacher logits for this batch: cached rows, and `teacher(inputs[missing])` for
        the rest, which are stored."""
        keys = self.keys(index, epoch)
        rows, written = self.table.read(keys)
        missing = ~written
        n_missing = int(missing.sum())
        self.hits += len(keys) - n_missing
        self.misses += n_missing
        if n_missing == 0:
            return rows.float()
        live = teacher(inputs if n_missing == len(keys) else select_rows(inputs, missing)).float()
        if live.shape[-1] != self.num_classes:
            raise ValueError(
                f"the teacher gives {live.shape[-1]} logits, the cache was built for {self.num_classes}"
            )
        self.table.write(keys[missing], live, gather=False)
        out = rows.float()
        out[missing] = live
        return out

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, views={self.views}, entries={int(self.table.written.sum())}"
