"""`IndexSampler`: a rank-aware, epoch-seeded shuffling sampler.

It subclasses `DistributedSampler` so Lightning does not wrap or replace it, and it reads the
world size and rank when the loader is built, so the same DataModule works on one process and
under DDP. The order depends only on (seed, epoch): a run resumed at an epoch boundary draws the
same order as one that never stopped. Like `DistributedSampler` it pads with the first indices
when the length is not divisible by the world size.

With `with_epoch=True` it yields `(position, epoch)` keys instead of plain positions; toolkit
datasets accept both and seed their augmentation from (seed, epoch, sample index), so the random
view of a sample is a pure function of those three, in any process, worker or resumed run.
With `views=K` the key carries `epoch mod K` instead: the augmentation repeats every K epochs
(what a teacher-output cache needs), while the order still changes every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


class IndexSampler(DistributedSampler):
    def __init__(
        self,
        dataset,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        with_epoch: bool = False,
        views: int | None = None,
    ) -> None:
        if views is not None and (isinstance(views, bool) or views < 1):
            raise ValueError(f"views must be an integer >= 1 or None, got {views!r}")
        self.with_epoch = with_epoch
        self.views = views
        if dist.is_available() and dist.is_initialized():
            replicas, rank = dist.get_world_size(), dist.get_rank()
        else:
            replicas, rank = 1, 0
        super().__init__(
            dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            pad = self.total_size - n
            order += (order * (pad // max(1, n) + 1))[:pad]
        mine = order[self.rank : self.total_size : self.num_replicas]
        if self.with_epoch:
            view = self.epoch if self.views is None else self.epoch % self.views
            return iter([(i, view) for i in mine])
        return iter(mine)
