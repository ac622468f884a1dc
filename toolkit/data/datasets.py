"""Datasets that yield `Batch(input, target, index)` items."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from toolkit.types import Batch

_MASK = (1 << 63) - 1


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """(position, epoch) from a dataset key: a plain position, or `(position, epoch)` as
    yielded by `IndexSampler(with_epoch=True)`."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (run seed, epoch, sample index)."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index * 6_364_136_223_846_793_005) & _MASK


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


class IndexedDataset(Dataset):
    """Wrap any dataset of `(x, y)` items so each item also carries its index in `dataset`.

    `indices` (optional) selects a subset; the reported index is always the index in the
    wrapped dataset, so per-sample memories stay valid across subsets and runs.
    """

    def __init__(self, dataset: Any, indices: Tensor | list[int] | None = None, seed: int = 0) -> None:
        self.dataset = dataset
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> Batch:
        i, epoch = split_key(key)
        idx = int(i if self.indices is None else self.indices[i])
        if epoch is None:
            x, y = self.dataset[idx][:2]
        else:
            # Transforms of the wrapped dataset (e.g. torchvision's) draw from the global RNG:
            # seed it for this (epoch, sample) without disturbing the caller's stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, idx))
                x, y = self.dataset[idx][:2]
        return Batch(x, torch.as_tensor(y), torch.tensor(idx))


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W) float in [0, 1] or uint8, normalised on access.

    `indices` select a subset; items report their index in the full tensor. `transform(x,
    generator)` (e.g. augmentation) is applied to the float image before normalisation, with a
    generator seeded by (seed, epoch, index) when the key carries the epoch.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        indices: Tensor | None = None,
        transform: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        self.images = images
        self.targets = targets.long()
        self.indices = (
            torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        )
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> Batch:
        i, epoch = split_key(key)
        idx = int(self.indices[i])
        x = self.images[idx]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.transform is not None:
            gen = None if epoch is None else sample_generator(self.seed, epoch, idx)
            x = self.transform(x, gen)
        return Batch((x - self.mean) / self.std, self.targets[idx], torch.tensor(idx))
