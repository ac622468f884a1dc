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
from toolkit.data.lm import CausalLMDataModule, FortunesLMDataModule
from toolkit.data.samplers import ClassBalancedSampler, IndexSampler
from toolkit.data.tabular import DiabetesDataModule, RegressionDataModule, TensorRegressionDataset
from toolkit.data.text import (
    FortunesDataModule,
    HFDiskDataModule,
    TextClassificationDataModule,
    TextFileDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CausalLMDataModule",
    "ClassBalancedSampler",
    "ClassificationDataModule",
    "DiabetesDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "FortunesDataModule",
    "FortunesLMDataModule",
    "HFDiskDataModule",
    "ImageFolderDataModule",
    "IndexSampler",
    "IndexedDataset",
    "RegressionDataModule",
    "Splits",
    "TensorImageDataset",
    "TensorRegressionDataset",
    "TextClassificationDataModule",
    "TextFileDataModule",
]
