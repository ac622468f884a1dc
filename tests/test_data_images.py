"""Image DataModules (digits, fashion_mnist, image_folder) and the IndexSampler."""

from __future__ import annotations

import gzip
import math
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from toolkit.data import DigitsDataModule, FashionMNISTDataModule, ImageFolderDataModule, IndexSampler
from toolkit.types import Batch

N_DIGITS = 1797  # scikit-learn's digits
N_DIGITS_TEST = N_DIGITS // 5  # the fixed 20% test split
N_DIGITS_POOL = N_DIGITS - N_DIGITS_TEST


def digits_module(**kw) -> DigitsDataModule:
    dm = DigitsDataModule(**{"batch_size": 64, **kw})
    dm.setup("fit")
    return dm


def val_indices(dm) -> torch.Tensor:
    return dm.val_set.indices


# -- digits: splits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "n_train", "n_val"),
    [
        ({"val_split": 0.1}, N_DIGITS_POOL - round(0.1 * N_DIGITS_POOL), round(0.1 * N_DIGITS_POOL)),
        ({"val_split": 0.25}, N_DIGITS_POOL - round(0.25 * N_DIGITS_POOL), round(0.25 * N_DIGITS_POOL)),
        ({"val_split": 100}, N_DIGITS_POOL - 100, 100),
        ({"val_split": 100, "train_subset": 300}, 300, 100),
        ({"val_split": 100, "train_subset": 0.5}, round(0.5 * (N_DIGITS_POOL - 100)), 100),
        (
            {"val_split": 0.1, "train_subset": 10**6},
            N_DIGITS_POOL - round(0.1 * N_DIGITS_POOL),
            round(0.1 * N_DIGITS_POOL),
        ),
    ],
)
def test_digits_split_sizes(kw, n_train, n_val):
    dm = digits_module(**kw)
    assert len(dm.train_set) == n_train == len(dm.train_indices)
    assert len(dm.val_set) == n_val
    assert len(dm.test_set) == N_DIGITS_TEST
    assert dm.describe() == {
        "name": "digits",
        "num_classes": 10,
        "train": n_train,
        "val": n_val,
        "test": N_DIGITS_TEST,
        "augment": False,
        "augment_views": None,
    }


def test_digits_indices_are_unique_in_the_pool_and_disjoint_from_validation():
    dm = digits_module(val_split=0.2, train_subset=0.7, seed=3)
    train, val = dm.train_indices.tolist(), val_indices(dm).tolist()
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert all(0 <= i < N_DIGITS_POOL for i in train + val)
    assert not set(train) & set(val)
    # every item reports its index in the pool
    assert [int(dm.train_set[i].index) for i in range(len(dm.train_set))] == train
    assert [int(dm.val_set[i].index) for i in range(len(dm.val_set))] == val


def test_digits_without_train_subset_uses_the_whole_rest_of_the_pool():
    dm = digits_module(val_split=50)
    assert sorted(dm.train_indices.tolist() + val_indices(dm).tolist()) == list(range(N_DIGITS_POOL))


def test_digits_test_subset():
    dm = digits_module(test_subset=50)
    idx = dm.test_set.indices.tolist()
    assert len(idx) == 50 == len(set(idx))
    assert all(0 <= i < N_DIGITS_TEST for i in idx)


def test_digits_val_split_zero_validates_on_the_test_split():
    dm = digits_module(val_split=0)
    assert dm.val_set is dm.test_set
    assert len(dm.train_set) == N_DIGITS_POOL


def test_digits_split_depends_on_the_seed():
    a, b, c = (digits_module(val_split=0.1, train_subset=200, test_subset=30, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.train_indices, b.train_indices)
    assert torch.equal(val_indices(a), val_indices(b))
    assert torch.equal(a.test_set.indices, b.test_set.indices)
    assert not torch.equal(a.train_indices, c.train_indices)
    assert not torch.equal(val_indices(a), val_indices(c))
    assert not torch.equal(a.test_set.indices, c.test_set.indices)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"val_split": 1.0}, "leaves no training data"),
        ({"val_split": N_DIGITS_POOL}, "leaves no training data"),
        ({"val_split": 1.5}, "fraction must be in"),
        ({"train_subset": 0}, "train_subset must be >= 1"),
        ({"train_subset": 0.0}, "fraction must be in"),
    ],
)
def test_digits_bad_split_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        digits_module(**bad)


# -- digits: content ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target


def test_digits_images_and_labels_come_from_sklearn(raw_digits):
    images, labels = raw_digits
    labels_of: dict[bytes, set[int]] = {}
    for img, y in zip(images, labels):
        labels_of.setdefault(img.tobytes(), set()).add(int(y))
    dm = digits_module(val_split=0.1)
    # the pool and the test split together are exactly the 1,797 images
    split_images = torch.cat([dm.train_set.images, dm.test_set.images])[:, 0].numpy()
    assert Counter(i.tobytes() for i in split_images) == Counter(i.tobytes() for i in images)
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        for i in range(0, len(ds), 7):
            item = ds[i]
            raw = torch.round((item.input[0] * 0.37 + 0.3) * 255).to(torch.uint8).numpy()
            assert int(item.target) in labels_of[raw.tobytes()]


def test_digits_batches_are_normalised_batch_tuples():
    dm = digits_module(val_split=0.1)
    xs, ys, idx = [], [], []
    for batch in dm.train_dataloader():
        assert isinstance(batch, Batch)
        assert batch.input.dtype == torch.float32 and batch.input.shape[1:] == (1, 8, 8)
        assert batch.target.dtype == torch.long and batch.index.dtype == torch.long
        assert batch.input.shape[0] == batch.target.shape[0] == batch.index.shape[0] <= 64
        xs.append(batch.input)
        ys.append(batch.target)
        idx.append(batch.index)
    x = torch.cat(xs)
    assert abs(float(x.mean())) < 0.05
    assert abs(float(x.std()) - 1) < 0.05
    assert set(torch.cat(ys).tolist()) == set(range(10))
    val = next(iter(dm.val_dataloader()))
    assert isinstance(val, Batch) and val.input.shape[0] == min(128, len(dm.val_set))


def test_train_loader_sees_every_index_once_per_epoch_in_a_seed_epoch_order():
    dm = digits_module(val_split=0.1, seed=7)
    loader = dm.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, IndexSampler)
    expected = sorted(dm.train_indices.tolist())

    def epoch_order(e):
        sampler.set_epoch(e)
        return torch.cat([b.index for b in loader]).tolist()

    e0, e1, e0_again = epoch_order(0), epoch_order(1), epoch_order(0)
    assert sorted(e0) == expected and sorted(e1) == expected
    assert len(e0) == len(set(e0)) == len(dm.train_set)
    assert e0 == e0_again
    assert e0 != e1
    # the order is a permutation seeded by seed + epoch, mapped to pool indices
    perm = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(7 + 1)).tolist()
    assert e1 == [expected[p] for p in perm]
    # a fresh DataModule with the same seed draws the same order; another seed does not
    same = digits_module(val_split=0.1, seed=7).train_dataloader()
    same.sampler.set_epoch(1)
    assert torch.cat([b.index for b in same]).tolist() == e1
    other = digits_module(val_split=0.1, seed=8).train_dataloader()
    other.sampler.set_epoch(1)
    assert torch.cat([b.index for b in other]).tolist() != e1


def test_digits_augmentation_changes_training_inputs_only():
    torch.manual_seed(0)
    dm = digits_module(val_split=0.1, augment=True)
    i = 3
    reads = [dm.train_set[i] for _ in range(10)]
    assert any(not torch.equal(reads[0].input, r.input) for r in reads[1:])
    assert all(int(r.target) == int(reads[0].target) and int(r.index) == int(reads[0].index) for r in reads)
    # shifted by at most one pixel: same shape, values still of the normalised image
    assert all(r.input.shape == (1, 8, 8) for r in reads)
    v = [dm.val_set[i].input for _ in range(5)]
    assert all(torch.equal(v[0], w) for w in v[1:])
    plain = digits_module(val_split=0.1, augment=False)
    t = [plain.train_set[i].input for _ in range(5)]
    assert all(torch.equal(t[0], w) for w in t[1:])


# -- IndexSampler ------------------------------------------------------------------------------


def as_rank(sampler: IndexSampler, num_replicas: int, rank: int) -> IndexSampler:
    """Make a sampler built on one process act as `rank` of `num_replicas` (the fields
    DistributedSampler.__init__ derives from the world size)."""
    n = len(sampler.dataset)
    sampler.num_replicas, sampler.rank = num_replicas, rank
    if sampler.drop_last and n % num_replicas:
        sampler.num_samples = math.ceil((n - num_replicas) / num_replicas)
    else:
        sampler.num_samples = math.ceil(n / num_replicas)
    sampler.total_size = sampler.num_samples * num_replicas
    return sampler


def rank_orders(n, replicas, seed=0, epoch=0, shuffle=True, drop_last=False):
    out = []
    for r in range(replicas):
        s = as_rank(
            IndexSampler(list(range(n)), shuffle=shuffle, seed=seed, drop_last=drop_last), replicas, r
        )
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(out[-1]) == len(s)
    return out


def test_index_sampler_single_process():
    s = IndexSampler(list(range(10)), seed=4)
    assert (s.num_replicas, s.rank, len(s)) == (1, 0, 10)
    assert list(s) == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    assert list(IndexSampler(list(range(5)), shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("epoch", [0, 3])
def test_index_sampler_two_ranks_partition_an_even_length(epoch):
    a, b = rank_orders(10, 2, seed=1, epoch=epoch)
    assert len(a) == len(b) == 5
    assert sorted(a + b) == list(range(10))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1 + epoch)).tolist()
    assert a == perm[0::2] and b == perm[1::2]


def test_index_sampler_pads_an_odd_length_with_the_first_indices():
    a, b = rank_orders(11, 2, seed=2)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(2)).tolist()
    assert len(a) == len(b) == 6
    counts = Counter(a + b)
    assert set(counts) == set(range(11))
    assert [i for i, c in counts.items() if c == 2] == [perm[0]]
    assert b[-1] == perm[0]  # rank 1's last slot is the padding
    # three ranks over 7 items: 2 padding items, the first two of the order
    parts = rank_orders(7, 3, seed=5)
    perm7 = torch.randperm(7, generator=torch.Generator().manual_seed(5)).tolist()
    flat = [i for p in parts for i in p]
    assert sorted(flat) == sorted(list(range(7)) + perm7[:2])


def test_index_sampler_drop_last_drops_the_tail():
    a, b = rank_orders(11, 2, seed=2, drop_last=True)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(2)).tolist()
    assert len(a) == len(b) == 5
    assert sorted(a + b) == sorted(perm[:10])


@pytest.mark.parametrize(
    ("n", "replicas", "drop_last", "shuffle"),
    [
        (10, 2, False, True),
        (11, 2, False, True),
        (7, 3, False, True),
        (2, 5, False, True),
        (11, 3, True, True),
        (9, 4, False, False),
    ],
)
def test_index_sampler_matches_distributed_sampler(n, replicas, drop_last, shuffle):
    data = list(range(n))
    for rank in range(replicas):
        ours = as_rank(IndexSampler(data, shuffle=shuffle, seed=9, drop_last=drop_last), replicas, rank)
        ref = DistributedSampler(
            data, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=9, drop_last=drop_last
        )
        for e in (0, 2):
            ours.set_epoch(e)
            ref.set_epoch(e)
            assert list(ours) == list(ref)
            assert len(ours) == len(ref)


# -- Fashion-MNIST from idx files --------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = True, truncate: int = 0) -> None:
    """An idx file: 2 zero bytes, type code 0x08 (ubyte), ndim, big-endian int32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    data = header + array.tobytes()
    if truncate:
        data = data[:-truncate]
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fashion_arrays(n_train=50, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    xte = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    ytr = np.arange(n_train, dtype=np.uint8) % 10
    yte = (np.arange(n_test, dtype=np.uint8) * 3) % 10
    return xtr, ytr, xte, yte


def write_fashion(root: Path, arrays, compress=True, truncate_file: int | None = None) -> Path:
    folder = root / "fashion_mnist"
    folder.mkdir(parents=True)
    for i, (name, arr) in enumerate(zip(FashionMNISTDataModule.FILES, arrays)):
        write_idx(folder / name, arr, compress, truncate=5 if i == truncate_file else 0)
    return root


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr("toolkit.data.images.FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-such-system-dir")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, no_system_fashion, compress):
    arrays = fashion_arrays()
    xtr, ytr, xte, yte = arrays
    root = write_fashion(tmp_path / "data", arrays, compress=compress)
    dm = FashionMNISTDataModule(data_dir=str(root), batch_size=8, val_split=10, seed=0)
    dm.setup("fit")
    assert dm.train_set.images.shape == (50, 1, 28, 28) and dm.train_set.images.dtype == torch.uint8
    assert dm.test_set.images.shape == (20, 1, 28, 28)
    assert np.array_equal(dm.train_set.images[:, 0].numpy(), xtr)
    assert np.array_equal(dm.test_set.images[:, 0].numpy(), xte)
    assert np.array_equal(dm.train_set.targets.numpy(), ytr) and np.array_equal(
        dm.test_set.targets.numpy(), yte
    )
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 20)
    # items: normalised pixels that map back to the written bytes, with their labels
    for ds, x, y in ((dm.train_set, xtr, ytr), (dm.val_set, xtr, ytr), (dm.test_set, xte, yte)):
        for i in range(len(ds)):
            item = ds[i]
            j = int(item.index)
            back = torch.round((item.input[0] * 0.3530 + 0.2860) * 255).to(torch.uint8).numpy()
            assert np.array_equal(back, x[j])
            assert int(item.target) == int(y[j])
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.input.shape == (8, 1, 28, 28)
    assert set(int(t) for t in dm.train_set.targets) == set(range(10))


def test_fashion_mnist_truncated_idx_file(tmp_path, no_system_fashion):
    root = write_fashion(tmp_path / "data", fashion_arrays(), truncate_file=0)
    dm = FashionMNISTDataModule(data_dir=str(root))
    with pytest.raises(ValueError, match="truncated: expected 39200 values, found 39195"):
        dm.setup("fit")


def test_fashion_mnist_truncated_label_file(tmp_path, no_system_fashion):
    root = write_fashion(tmp_path / "data", fashion_arrays(), truncate_file=3)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is truncated"):
        FashionMNISTDataModule(data_dir=str(root)).setup("fit")


def test_fashion_mnist_gzip_cut_short(tmp_path, no_system_fashion):
    # an interrupted download: the compressed stream itself ends early
    root = write_fashion(tmp_path / "data", fashion_arrays())
    gz = root / "fashion_mnist" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is truncated or corrupt"):
        FashionMNISTDataModule(data_dir=str(root)).setup("fit")


@pytest.mark.parametrize("keep", [0, 2, 9])
def test_fashion_mnist_file_cut_inside_the_header(tmp_path, no_system_fashion, keep):
    root = write_fashion(tmp_path / "data", fashion_arrays(), compress=False)
    path = root / "fashion_mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte is truncated"):
        FashionMNISTDataModule(data_dir=str(root)).setup("fit")


def test_fashion_mnist_missing_files_explains_how_to_get_them(tmp_path, no_system_fashion):
    (tmp_path / "empty" / "fashion_mnist").mkdir(parents=True)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "download" in msg
    assert str(tmp_path / "empty" / "fashion_mnist") in msg


def test_fashion_mnist_incomplete_folder_is_not_used(tmp_path, no_system_fashion):
    root = write_fashion(tmp_path / "data", fashion_arrays())
    (root / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="not found"):
        FashionMNISTDataModule(data_dir=str(root)).setup("fit")


def test_fashion_mnist_labels_out_of_range(tmp_path, no_system_fashion):
    xtr, ytr, xte, yte = fashion_arrays()
    ytr = ytr.copy()
    ytr[7] = 12
    root = write_fashion(tmp_path / "data", (xtr, ytr, xte, yte))
    dm = FashionMNISTDataModule(data_dir=str(root))
    with pytest.raises(ValueError, match="labels out of range") as e:
        dm.setup("fit")
    assert "[0, 12]" in str(e.value) and "10 classes" in str(e.value)


# -- ImageFolder -------------------------------------------------------------------------------

CLASSES = ["cat", "ant", "bird"]  # sorted: ant, bird, cat


def color(c: int, j: int) -> tuple[int, int, int]:
    """A colour that encodes (class position, image number)."""
    return 40 + 60 * c, 10 + 20 * j, 200


def decode(x: torch.Tensor) -> tuple[int, int]:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rgb = ((x * std + mean) * 255).mean(dim=(1, 2))
    assert torch.allclose((x * std + mean) * 255, rgb.view(3, 1, 1).expand_as(x), atol=1.0)  # a flat colour
    return round((float(rgb[0]) - 40) / 60), round((float(rgb[1]) - 10) / 20)


def write_images(folder: Path, per_class: int, size=(12, 10)) -> None:
    from PIL import Image

    for c, name in enumerate(sorted(CLASSES)):
        d = folder / name
        d.mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", size, color(c, j)).save(d / f"{j:02d}.png")


def test_image_folder_without_test_folder(tmp_path):
    write_images(tmp_path / "root" / "train", per_class=5)
    dm = ImageFolderDataModule(str(tmp_path / "root"), image_size=6, batch_size=4, val_split=3, seed=0)
    assert dm.classes == ["ant", "bird", "cat"] and dm.num_classes == 3
    dm.setup("fit")
    n_test = 15 // 5
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15 - n_test - 3, 3, n_test)

    def decoded(ds):
        out = {}
        for i in range(len(ds)):
            item = ds[i]
            assert item.input.shape == (3, 6, 6)
            c, j = decode(item.input)
            assert int(item.target) == c
            out[int(item.index)] = c * 5 + j  # position in the sorted ImageFolder listing
        return out

    train, val, test = decoded(dm.train_set), decoded(dm.val_set), decoded(dm.test_set)
    # the three splits are disjoint and together hold every image once
    positions = list(train.values()) + list(val.values()) + list(test.values())
    assert sorted(positions) == list(range(15))
    # pool items report their rank among the pool's images; test items theirs in the test split
    pool = sorted(list(train.values()) + list(val.values()))
    assert all(pool.index(pos) == idx for idx, pos in {**train, **val}.items())
    assert sorted(train) == dm.train_indices.tolist()
    held_out = sorted(test.values())
    assert all(held_out[idx] == pos for idx, pos in test.items())
    assert not set(train) & set(val)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.input.shape == (4, 3, 6, 6) and batch.index.dtype == torch.long


def test_image_folder_with_test_folder(tmp_path):
    write_images(tmp_path / "root" / "train", per_class=4)
    write_images(tmp_path / "root" / "test", per_class=2, size=(7, 9))
    dm = ImageFolderDataModule(
        str(tmp_path / "root"), image_size=5, batch_size=4, val_split=0.25, train_subset=6, seed=1
    )
    dm.setup("fit")
    assert dm.num_classes == 3
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 3, 6)
    for i in range(len(dm.test_set)):
        item = dm.test_set[i]
        assert item.input.shape == (3, 5, 5)
        c, j = decode(item.input)
        assert int(item.target) == c and int(item.index) == c * 2 + j == i
    seen = set()
    for ds in (dm.train_set, dm.val_set):
        for i in range(len(ds)):
            item = ds[i]
            c, j = decode(item.input)
            assert int(item.target) == c and int(item.index) == c * 4 + j
            seen.add(int(item.index))
    assert len(seen) == 9


def test_image_folder_classes_directly_under_root(tmp_path):
    write_images(tmp_path / "root", per_class=5)
    dm = ImageFolderDataModule(str(tmp_path / "root"), image_size=4, val_split=0)
    dm.setup("fit")
    assert dm.classes == ["ant", "bird", "cat"]
    assert len(dm.train_set) + len(dm.test_set) == 15 and len(dm.test_set) == 3


def test_image_folder_test_without_train_is_an_error(tmp_path):
    write_images(tmp_path / "root", per_class=1)
    write_images(tmp_path / "root" / "test", per_class=1)
    with pytest.raises(ValueError, match="has a test/ folder but no train/ folder"):
        ImageFolderDataModule(str(tmp_path / "root"))


def test_image_folder_without_class_folders(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderDataModule(str(tmp_path / "root"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolderDataModule(str(tmp_path / "missing"))


def test_image_folder_test_classes_must_match(tmp_path):
    write_images(tmp_path / "root" / "train", per_class=2)
    (tmp_path / "root" / "test" / "ant").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "root" / "test" / "ant" / "0.png")
    dm = ImageFolderDataModule(str(tmp_path / "root"), image_size=4)
    with pytest.raises(ValueError, match="expected \\['ant', 'bird', 'cat'\\]"):
        dm.setup("fit")
