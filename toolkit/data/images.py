"""Image classification DataModules: digits, fashion_mnist, cifar10, cifar100, image_folder."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset

from toolkit.data.base import ClassificationDataModule, Splits
from toolkit.data.datasets import IndexedDataset, TensorImageDataset
from toolkit.registry import register

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def default_data_dir() -> Path:
    """Where data sets are looked for and downloaded: $TOOLKIT_DATA or ~/.cache/toolkit/data."""
    return Path(os.environ.get("TOOLKIT_DATA", Path.home() / ".cache" / "toolkit" / "data"))


class RandomCropFlip:
    """Pad-and-random-crop plus horizontal flip on a (C, H, W) tensor (the CIFAR augmentation)."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding, self.flip = padding, flip

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        h, w = x.shape[-2:]
        if self.padding:
            x = torch.nn.functional.pad(x, [self.padding] * 4)
            i, j = (int(v) for v in torch.randint(0, 2 * self.padding + 1, (2,), generator=generator))
            x = x[..., i : i + h, j : j + w]
        if self.flip and torch.rand((), generator=generator) < 0.5:
            x = x.flip(-1)
        return x


class _InMemoryImages(ClassificationDataModule):
    augmentation = RandomCropFlip()

    def arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # pragma: no cover - abstract
        """(train images uint8 N×C×H×W, train labels, test images, test labels)."""
        raise NotImplementedError

    def load(self) -> Splits:
        xtr, ytr, xte, yte = self.arrays()

        def make(indices, train: bool, test: bool):
            x, y = (xte, yte) if test else (xtr, ytr)
            aug = self.augmentation if (train and self.augment) else None
            return TensorImageDataset(x, y, self.mean, self.std, indices, aug, seed=self.seed)

        return Splits(ytr, yte, make)


@register("data", "digits")
class DigitsDataModule(_InMemoryImages):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes): offline, tiny,
    for tests and `--fast` runs. A fixed 20% (seeded) is the test split."""

    name = "digits"
    num_classes = 10
    in_chans = 1
    image_size = (8, 8)
    mean = (0.3,)
    std = (0.37,)
    augmentation = RandomCropFlip(padding=1, flip=False)

    def arrays(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
        y = torch.from_numpy(d.target).long()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        n_test = len(y) // 5
        te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
        return x[tr], y[tr], x[te], y[te]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a .gz cut short (interrupted download) or damaged
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if len(data) < 4 or len(data) < 4 + 4 * data[3]:
        raise ValueError(f"{path} is truncated: incomplete idx header ({len(data)} bytes)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


@register("data", "fashion_mnist")
class FashionMNISTDataModule(_InMemoryImages):
    """Fashion-MNIST (60k train / 10k test, 28×28 grey, 10 classes).

    Looked for, in order: `data_dir/fashion_mnist/` (idx files, gzipped or not), the Debian package
    `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), then torchvision's copy under
    `data_dir`, downloaded when `download=True`.
    """

    name = "fashion_mnist"
    num_classes = 10
    in_chans = 1
    image_size = (28, 28)
    mean = (0.2860,)
    std = (0.3530,)
    augmentation = RandomCropFlip(padding=2, flip=True)
    FILES = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )

    def __init__(self, data_dir: str | None = None, download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.download = download

    def _find(self) -> list[Path] | None:
        for folder in (
            self.data_dir / "fashion_mnist",
            FASHION_MNIST_SYSTEM_DIR,
            self.data_dir / "FashionMNIST" / "raw",
        ):
            found = []
            for name in self.FILES:
                cands = [folder / name, folder / f"{name}.gz"]
                hit = next((c for c in cands if c.exists()), None)
                if hit is None:
                    break
                found.append(hit)
            else:
                return found
        return None

    def arrays(self):
        files = self._find()
        if files is None and self.download:
            import torchvision

            torchvision.datasets.FashionMNIST(str(self.data_dir), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(self.data_dir), train=False, download=True)
            files = self._find()
        if files is None:
            raise FileNotFoundError(
                "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                f"put the four idx files in {self.data_dir / 'fashion_mnist'}, or pass download=True "
                "(recipes: --data.download true) to fetch it with torchvision."
            )
        xtr, ytr, xte, yte = (torch.from_numpy(_read_idx(f).copy()) for f in files)
        return xtr.unsqueeze(1), ytr.long(), xte.unsqueeze(1), yte.long()


class _CIFAR(_InMemoryImages):
    tv_class = ""

    def __init__(self, data_dir: str | None = None, download: bool = False, **kwargs) -> None:
        kwargs.setdefault("augment", True)
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.download = download

    def arrays(self):
        import torchvision

        cls = getattr(torchvision.datasets, self.tv_class)
        try:
            tr = cls(str(self.data_dir), train=True, download=self.download)
            te = cls(str(self.data_dir), train=False, download=self.download)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"{self.name} not found under {self.data_dir} ({e}). Pass download=True (recipes: --data.download true) "
                f"or place torchvision's extracted {self.tv_class} folder there."
            ) from e

        def to_t(ds):
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long()

        return (*to_t(tr), *to_t(te))


@register("data", "cifar10")
class CIFAR10DataModule(_CIFAR):
    """CIFAR-10 (torchvision files under data_dir; pad-4 crop + flip augmentation by default)."""

    name = "cifar10"
    tv_class = "CIFAR10"
    num_classes = 10
    image_size = (32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


@register("data", "cifar100")
class CIFAR100DataModule(_CIFAR):
    """CIFAR-100 (torchvision files under data_dir; pad-4 crop + flip augmentation by default)."""

    name = "cifar100"
    tv_class = "CIFAR100"
    num_classes = 100
    image_size = (32, 32)
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


@register("data", "image_folder")
class ImageFolderDataModule(ClassificationDataModule):
    """Images in class sub-folders (torchvision `ImageFolder`): `root/train/<class>/*.jpg` and
    optionally `root/test/` (or `root/val/`) with the same classes; without a test folder a seeded
    20% of `root/train` (or of `root` itself when it holds the class folders) is the test split.
    Images are resized to `image_size` and normalised with ImageNet statistics by default."""

    name = "image_folder"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, root: str, image_size: int = 224, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.image_size = (image_size, image_size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image_folder root {self.root} is not a directory")
        self._classes()

    def _dirs(self) -> tuple[Path, Path | None]:
        train = self.root / "train" if (self.root / "train").is_dir() else self.root
        test = next((self.root / d for d in ("test", "val") if (self.root / d).is_dir()), None)
        if test is not None and train == self.root:
            raise ValueError(
                f"{self.root} has a {test.name}/ folder but no train/ folder: put the training classes in {self.root / 'train'}"
            )
        return train, test

    def _classes(self) -> None:
        train, _ = self._dirs()
        classes = sorted(d.name for d in train.iterdir() if d.is_dir())
        if not classes:
            raise FileNotFoundError(
                f"no class sub-folders in {train}: expected {train}/<class_name>/<image files>"
            )
        self.classes = classes
        self.num_classes = len(classes)

    def load(self) -> Splits:
        from torchvision import datasets, transforms

        train_dir, test_dir = self._dirs()
        norm = [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        plain = transforms.Compose([transforms.Resize(self.image_size), *norm])
        aug = transforms.Compose(
            [
                transforms.RandomResizedCrop(self.image_size, scale=(0.5, 1.0)),
                transforms.RandomHorizontalFlip(),
                *norm,
            ]
        )

        def folder(root: Path, tf):
            ds = datasets.ImageFolder(str(root), transform=tf)
            if ds.classes != self.classes:
                raise ValueError(f"{root} has classes {ds.classes}, expected {self.classes}")
            return ds

        pool = folder(train_dir, plain)
        targets = torch.tensor(pool.targets).long()
        if test_dir is not None:
            test_targets = torch.tensor(folder(test_dir, plain).targets).long()
            held_out = None
        else:
            perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(1234))
            n_test = max(1, len(targets) // 5)
            held_out = perm[:n_test].sort().values
            test_targets, targets = targets[held_out], targets[perm[n_test:].sort().values]

        def source(test: bool, tf):
            if test and test_dir is not None:
                return folder(test_dir, tf)
            rows = held_out if test else keep
            return folder(train_dir, tf) if rows is None else Subset(folder(train_dir, tf), rows.tolist())

        keep = None
        if held_out is not None:
            keep = torch.tensor(sorted(set(range(len(pool))) - set(held_out.tolist())))

        def make(indices, train: bool, test: bool):
            # Items report their position in the pool (or test split): per-sample memories size by it.
            return IndexedDataset(
                source(test, aug if (train and self.augment) else plain), indices, seed=self.seed
            )

        return Splits(targets, test_targets, make)
