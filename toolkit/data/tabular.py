"""Tabular regression data: scikit-learn's bundled diabetes data (offline), float targets."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from toolkit.data.base import ClassificationDataModule, Splits
from toolkit.data.datasets import split_key
from toolkit.registry import register
from toolkit.types import Batch


class TensorRegressionDataset(Dataset):
    """Rows of a feature matrix (N, F) with float targets (N,); `indices` select a subset and
    items report their index in the full matrix (`Batch(input, target, index)`)."""

    def __init__(self, features: Tensor, targets: Tensor, indices: Tensor | None = None) -> None:
        if features.dim() != 2 or targets.shape != features.shape[:1]:
            raise ValueError(
                f"features must be (N, F) and targets (N,), got {tuple(features.shape)} and {tuple(targets.shape)}"
            )
        self.features = features.float()
        self.targets = targets.float()
        self.indices = (
            torch.arange(len(features)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> Batch:
        i, _ = split_key(key)
        idx = int(self.indices[i])
        return Batch(self.features[idx], self.targets[idx], torch.tensor(idx))


class RegressionDataModule(ClassificationDataModule):
    """The shared splits and loaders of `ClassificationDataModule` for float targets (no classes).

    Subclasses implement `arrays()` -> (train features, train targets, test features, test
    targets); features are standardised with the training pool's mean and standard deviation
    when `standardize` is true. `target_range` is the (min, max) of all targets, for choosing
    bins (`hl_gauss`'s support must cover it).
    """

    task = "regression"
    num_classes = 0
    target_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, standardize: bool = True, **kwargs) -> None:
        for bad in ("known_classes", "samples_per_class", "augment"):
            if kwargs.get(bad):
                raise ValueError(f"{bad} does not apply to the regression data set {self.name!r}")
        super().__init__(**kwargs)
        self.standardize = standardize

    def arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self) -> Splits:
        xtr, ytr, xte, yte = self.arrays()
        if self.standardize:
            mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-12)
            xtr, xte = (xtr - mean) / std, (xte - mean) / std

        def make(indices, train: bool, test: bool):
            x, y = (xte, yte) if test else (xtr, ytr)
            return TensorRegressionDataset(x, y, indices)

        return Splits(ytr, yte, make)


@register("data", "diabetes")
class DiabetesDataModule(RegressionDataModule):
    """scikit-learn's bundled diabetes data (Efron et al. 2004): 442 patients, 10 baseline
    features (age, sex, BMI, blood pressure, six serum measurements), target a quantitative
    measure of disease progression one year later (25 to 346). Offline; a fixed 20% (seeded) is
    the test split; features standardised with the training pool's statistics."""

    name = "diabetes"
    in_chans = 10  # input features (the `mlp` model's in_chans)
    target_range = (25.0, 346.0)

    def arrays(self):
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True, scaled=False)
        x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        n_test = len(y) // 5
        te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
        return x[tr], y[tr], x[te], y[te]
