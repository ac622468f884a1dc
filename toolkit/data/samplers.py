"""`IndexSampler`: a rank-aware, epoch-seeded shuffling sampler.

It subclasses `DistributedSampler` so Lightning does not wrap or replace it, and it reads the
world size and rank when the loader is built, so the same DataModule works on one process and
under DDP. The order depends only on (seed, epoch): a run resumed at an epoch boundary draws the
same order as one that never stopped. Like `DistributedSampler` it pads with the first indices
when the length is not divisible by the world size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


class IndexSampler(DistributedSampler):
    def __init__(self, dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if dist.is_available() and dist.is_initialized():
            replicas, rank = dist.get_world_size(), dist.get_rank()
        else:
            replicas, rank = 1, 0
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def __iter__(self) -> Iterator[int]:
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
        return iter(order[self.rank : self.total_size : self.num_replicas])
