"""DataModules that yield `Batch(input, target, index)`, and the pieces to build your own."""

from toolkit.data.base import ClassificationDataModule, Splits
from toolkit.data.datasets import IndexedDataset, TensorImageDataset
from toolkit.data.images import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
)
from toolkit.data.samplers import IndexSampler
from toolkit.data.text import (
    FortunesDataModule,
    HFDiskDataModule,
    TextClassificationDataModule,
    TextFileDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "FortunesDataModule",
    "HFDiskDataModule",
    "ImageFolderDataModule",
    "IndexSampler",
    "IndexedDataset",
    "Splits",
    "TensorImageDataset",
    "TextClassificationDataModule",
    "TextFileDataModule",
]
