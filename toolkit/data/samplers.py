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

With `subset` (dataset positions) it serves only those positions: what data pruning trains on.
The subset may change between epochs (`set_subset`; Lightning must then rebuild the loader to
learn the new length, which `DataPruning` arranges). Given the loader's `batch_size`, the
positions are dealt so that every kept sample is seen exactly once per epoch and every rank runs
the same number of batches (ranks' counts differ by at most one); only when that is impossible
(fewer than world-size samples would be left for the last global step, K mod (W·B) in [1, W-1])
does it pad, by repeating at most W-1 samples, as `DistributedSampler` always does.

`ClassBalancedSampler`: the same contract (rank-aware, a pure function of seed and epoch) for the
class-balanced P×K batches of metric learning.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
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
        subset: Tensor | None = None,
        batch_size: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if views is not None and (isinstance(views, bool) or views < 1):
            raise ValueError(f"views must be an integer >= 1 or None, got {views!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        self.with_epoch = with_epoch
        self.views = views
        self.batch_size = batch_size
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.subset: Tensor | None = None
        self.set_subset(subset)

    def set_subset(self, subset: Tensor | None) -> None:
        """Serve only these dataset positions (None: all); sizes the epoch for them."""
        n = len(self.dataset)
        if subset is not None:
            subset = torch.as_tensor(subset, dtype=torch.long).flatten()
            if not len(subset):
                raise ValueError("the training subset is empty: keep at least one sample")
            if int(subset.min()) < 0 or int(subset.max()) >= n:
                raise ValueError(
                    f"subset positions must be in [0, {n}), got [{int(subset.min())}, {int(subset.max())}]"
                )
            if len(torch.unique(subset)) != len(subset):
                raise ValueError("subset positions must be distinct")
            n = len(subset)
        self.subset = subset
        w, b = self.num_replicas, self.batch_size
        if self.drop_last:
            self.total_size = (n // w) * w
        elif b is None or w == 1:
            self.total_size = -(-n // w) * w
        else:
            last_step = n - (-(-n // (w * b)) - 1) * w * b  # samples left for the last global step
            self.total_size = n + (w - last_step if last_step < w else 0)
        self.num_samples = len(range(self.rank, self.total_size, w))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        n = len(self.dataset) if self.subset is None else len(self.subset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.subset is not None:
            order = self.subset[torch.tensor(order, dtype=torch.long)].tolist()
        if self.total_size <= n:
            order = order[: self.total_size]
        else:
            pad = self.total_size - n
            order += (order * (pad // max(1, n) + 1))[:pad]
        mine = order[self.rank : self.total_size : self.num_replicas]
        if self.with_epoch:
            view = self.epoch if self.views is None else self.epoch % self.views
            return iter([(i, view) for i in mine])
        return iter(mine)


class ClassBalancedSampler(DistributedSampler):
    """Class-balanced P×K batches for metric learning: each batch holds `classes_per_batch` (P)
    distinct classes drawn uniformly and `samples_per_class` (K) samples of each.

    Use it as the loader's `sampler` with `batch_size = P·K` (not as a batch sampler): it yields
    the batches back to back, so the loader's consecutive chunks are exactly the P×K groups, and,
    being a `DistributedSampler`, Lightning neither wraps nor replaces it under DDP. Each rank
    takes its own batches (every world-size-th of one global sequence), all ranks the same number.
    The sequence depends only on (seed, epoch), like `IndexSampler` (Lightning calls
    `set_epoch`). A class's samples are drawn without replacement from a reshuffled cycle of its
    samples; a class with fewer than K samples repeats some within a batch.

    Args:
        labels: the class of every dataset position (N,).
        batches_per_epoch: global batches per epoch (default N // (P·K), at least 1).
        with_epoch, views: as `IndexSampler` (yield `(position, epoch)` keys for seeded
            augmentation).
        num_replicas, rank: the process group's size and this rank (default: read from
            `torch.distributed` when it is initialised, else 1 and 0).
    """

    def __init__(
        self,
        labels,
        classes_per_batch: int,
        samples_per_class: int,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        with_epoch: bool = False,
        views: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"labels must be (N,) integer classes, got {labels.dtype} {tuple(labels.shape)}")
        for name, v in (("classes_per_batch", classes_per_batch), ("samples_per_class", samples_per_class)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if samples_per_class < 2:
            raise ValueError(
                "samples_per_class must be >= 2: metric-learning losses need a positive pair per class"
            )
        if views is not None and (isinstance(views, bool) or views < 1):
            raise ValueError(f"views must be an integer >= 1 or None, got {views!r}")
        self.classes = [int(c) for c in torch.unique(labels)]
        if len(self.classes) < classes_per_batch:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} but the data has {len(self.classes)} classes: lower "
                "it (batch_size = classes_per_batch × samples_per_class)"
            )
        self.members = [torch.nonzero(labels == c).flatten() for c in self.classes]
        self.p, self.k = classes_per_batch, samples_per_class
        self.batch_size = classes_per_batch * samples_per_class
        self.with_epoch, self.views = with_epoch, views
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        replicas = num_replicas
        super().__init__(labels, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        total = batches_per_epoch if batches_per_epoch is not None else max(1, len(labels) // self.batch_size)
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"batches_per_epoch must be an integer >= 1, got {batches_per_epoch!r}")
        self.batches_per_rank = -(-total // replicas)
        self.num_samples = self.batches_per_rank * self.batch_size
        self.total_size = self.num_samples * replicas

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch (lists of dataset positions)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        streams: list[list[int]] = [[] for _ in self.classes]
        out = []
        for _ in range(self.batches_per_rank * self.num_replicas):
            batch = []
            for c in torch.randperm(len(self.classes), generator=g)[: self.p].tolist():
                while len(streams[c]) < self.k:
                    members = self.members[c]
                    streams[c] += members[torch.randperm(len(members), generator=g)].tolist()
                batch += streams[c][: self.k]
                del streams[c][: self.k]
            out.append(batch)
        return out[self.rank :: self.num_replicas]

    def __iter__(self):
        flat = [i for batch in self.batches() for i in batch]
        if self.with_epoch:
            view = self.epoch if self.views is None else self.epoch % self.views
            return iter([(i, view) for i in flat])
        return iter(flat)
