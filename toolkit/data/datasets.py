"""Datasets that yield `Batch(input, target, index)` items."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from toolkit.types import Batch


class IndexedDataset(Dataset):
    """Wrap any dataset of `(x, y)` items so each item also carries its index in `dataset`.

    `indices` (optional) selects a subset; the reported index is always the index in the
    wrapped dataset, so per-sample memories stay valid across subsets and runs.
    """

    def __init__(self, dataset: Any, indices: Tensor | list[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> Batch:
        idx = int(i if self.indices is None else self.indices[i])
        x, y = self.dataset[idx][:2]
        return Batch(x, torch.as_tensor(y), torch.tensor(idx))


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W) float in [0, 1] or uint8, normalised on access.

    `indices` select a subset; items report their index in the full tensor. `transform` (e.g.
    augmentation) is applied to the float image before normalisation.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        indices: Tensor | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        self.images = images
        self.targets = targets.long()
        self.indices = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Batch:
        idx = int(self.indices[i])
        x = self.images[idx]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.transform is not None:
            x = self.transform(x)
        return Batch((x - self.mean) / self.std, self.targets[idx], torch.tensor(idx))
