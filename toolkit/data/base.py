"""`ClassificationDataModule`: the shared behaviour of every toolkit DataModule.

Subclasses implement `load()` returning the full train pool and the test split; this base class
holds out a validation split, takes a training subset, validates labels, and builds the loaders
(training order from `IndexSampler`, so it depends only on seed and epoch). Every item carries
its index in the train pool (`Batch.index`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from toolkit.data.samplers import ClassBalancedSampler, IndexSampler
from toolkit.types import check_targets

CLASS_SPLITS = ("all", "known", "novel")


class _Relabelled(Dataset):
    """Items of `dataset` with their target mapped through `class_map` (by label), then
    replaced by `override` (by sample index, where it is >= 0; label noise). Index kept."""

    def __init__(
        self, dataset: Dataset, class_map: Tensor | None = None, override: Tensor | None = None
    ) -> None:
        self.dataset, self.class_map, self.override = dataset, class_map, override

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        item = self.dataset[key]
        target = item.target if self.class_map is None else self.class_map[item.target]
        if self.override is not None and self.override[item.index] >= 0:
            target = self.override[item.index]
        return item._replace(target=target)


@dataclass
class Splits:
    """What `load()` returns: the train pool and test split, and how to build datasets on them.

    `make(indices, train)` builds a dataset over the pool (or, with `test=True`, the test split)
    restricted to `indices`, with augmentation when `train` is true.
    """

    pool_targets: Tensor
    test_targets: Tensor
    make: Any  # Callable[[Tensor | None, bool, bool], Dataset]  (indices, train, test)


def _split_sizes(n: int, subset: int | float | None, what: str) -> int | None:
    if subset is None:
        return None
    if isinstance(subset, float) and not isinstance(subset, bool):
        if not 0 < subset <= 1:
            raise ValueError(f"{what} as a fraction must be in (0, 1], got {subset}")
        return max(1, int(round(subset * n)))
    if int(subset) < 1:
        raise ValueError(f"{what} must be >= 1 sample, got {subset}")
    return min(int(subset), n)


class ClassificationDataModule(L.LightningDataModule):
    """Base DataModule for classification.

    Args:
        batch_size: training batch size (per process).
        eval_batch_size: validation/test batch size (default: 2 × batch_size).
        train_subset: keep only this many (int) or this fraction (float) of training samples
            (drawn once with `seed`, after the validation split is held out).
        val_split: samples (int) or fraction (float) of the train pool held out for validation;
            0 validates on the test split.
        test_subset: evaluate on only this many test samples (quick runs).
        augment: random training augmentation (data-set specific; see subclass).
        augment_views: with `augment`, repeat the augmentation every this many epochs (a sample's
            random view in epoch e is the one of epoch e mod K), so a `TeacherCache` can store
            the teacher's output for each of the K views; None (default) draws a new view every
            epoch.
        num_workers: DataLoader workers.
        seed: seeds the split, the subset and the shuffling order.
        known_classes: for novel-class discovery and other class-split tasks: the known classes,
            an int K (classes 0..K-1) or a list of class ids; the others are "novel".
        class_split: with `known_classes`, which samples to keep (train, validation and test)
            and how they are labelled: "known" (known classes only, relabelled 0..K-1 in the
            order given; `num_classes` becomes K), "novel" (novel classes only, relabelled
            0..N-1 in class order; `num_classes` becomes N) or "all" (every sample, relabelled so
            the known classes come first, 0..K-1, then the novel ones; an int K changes no
            label). The split and `train_subset` are drawn before the classes are filtered, so
            the known-class samples are the same whatever the `class_split`. After `setup`,
            `num_known` is K and `class_map[original] -> new label` (-1 where dropped).
        samples_per_class: class-balanced training batches for metric learning: each batch holds
            batch_size // samples_per_class classes with samples_per_class samples each
            (`ClassBalancedSampler`, rank-aware, seeded by seed and epoch). None: shuffled batches.
        label_noise: symmetric label noise on the training split only (validation and test stay
            clean): this fraction of the training samples, drawn with `seed`, get a uniformly
            random class (possibly their own, as ELR's code). `clean_train_targets` keeps the
            true labels; `noisy_labels[index]` is the new label (-1 where unchanged).
        split_seed: seeds the data set itself (validation split, `train_subset`, `test_subset`,
            label noise) apart from the run (`seed`: shuffling, augmentation), so runs with
            several seeds can share one training set (data pruning: scores keyed by sample index
            must cover the same samples). Default: `seed`.
        domains: a domain id for every sample of the train pool, for methods that compare
            domains (`hessian_alignment`): an int K (each pool sample drawn into one of K
            domains, balanced, seeded by `split_seed`/`seed`: synthetic domains, for trying a
            method), a sequence / tensor of ids (one per pool sample, in pool order, e.g. the
            hospital or camera of each image), or a callable rule `fn(pool_targets) -> ids`.
            Batches are unchanged (`Batch(input, target, index)`): after `setup`,
            `domain_ids[index]` (or `domain_of(batch.index)`) gives each sample's domain and
            `num_domains` their count. None (default): no domains.
    """

    name = "classification"
    num_classes: int = 0
    in_chans: int = 3
    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        train_subset: int | float | None = None,
        val_split: int | float = 0.1,
        test_subset: int | None = None,
        augment: bool = False,
        augment_views: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        known_classes: int | list[int] | None = None,
        class_split: str = "all",
        samples_per_class: int | None = None,
        label_noise: float = 0.0,
        split_seed: int | None = None,
        domains: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(domains, bool) or (isinstance(domains, int) and domains < 1):
            raise ValueError(
                f"domains must be an int K >= 1, one id per train-pool sample, or a callable rule; got {domains!r}"
            )
        self.domains = domains
        self.domain_ids: Tensor | None = None
        self.num_domains: int | None = None
        if isinstance(label_noise, bool) or not 0 <= label_noise < 1:
            raise ValueError(
                f"label_noise must be a fraction in [0, 1) of training labels to corrupt, got {label_noise!r}"
            )
        self.label_noise = float(label_noise)
        if samples_per_class is not None and (
            isinstance(samples_per_class, bool) or samples_per_class < 2 or batch_size < 2 * samples_per_class
        ):
            raise ValueError(
                f"samples_per_class must be an integer >= 2 with batch_size >= 2 × samples_per_class "
                f"(at least two classes per batch), got samples_per_class={samples_per_class!r}, batch_size={batch_size}"
            )
        self.samples_per_class = samples_per_class
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if class_split not in CLASS_SPLITS:
            raise ValueError(f"class_split must be one of {CLASS_SPLITS}, got {class_split!r}")
        if class_split != "all" and known_classes is None:
            raise ValueError(
                f"class_split={class_split!r} needs known_classes (an int K or a list of class ids)"
            )
        self.known_classes = known_classes
        self.class_split = class_split
        self.num_known: int | None = None
        self.class_map: Tensor | None = None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.train_subset = train_subset
        self.val_split = val_split
        self.test_subset = test_subset
        if augment_views is not None and (isinstance(augment_views, bool) or augment_views < 1):
            raise ValueError(f"augment_views must be an integer >= 1 or None, got {augment_views!r}")
        self.augment = augment
        self.augment_views = augment_views
        self.num_workers = num_workers
        self.seed = seed
        self.split_seed = split_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_indices: Tensor | None = None
        self.train_targets: Tensor | None = None
        self._subset_positions: Tensor | None = None
        self._score_set: Dataset | None = None

    @property
    def data_seed(self) -> int:
        """The seed of the data set's draws (`split_seed`, else `seed`)."""
        return self.seed if self.split_seed is None else self.split_seed

    # -- to implement ---------------------------------------------------------------------
    def load(self) -> Splits:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.load()
        check_targets(splits.pool_targets, self.num_classes, f"{self.name} training data")
        check_targets(splits.test_targets, self.num_classes, f"{self.name} test data")
        n = len(splits.pool_targets)
        if self.domains is not None:
            self._set_domains(splits.pool_targets)
        g = torch.Generator().manual_seed(self.data_seed)
        perm = torch.randperm(n, generator=g)
        n_val = _split_sizes(n, self.val_split, "val_split") if self.val_split else 0
        if n_val >= n:
            raise ValueError(f"val_split={self.val_split} leaves no training data out of {n} samples")
        val_idx, train_pool = perm[:n_val], perm[n_val:]
        n_train = _split_sizes(len(train_pool), self.train_subset, "train_subset")
        train_idx = train_pool if n_train is None else train_pool[:n_train]
        test_idx = None
        if self.test_subset is not None:
            test_idx = torch.randperm(len(splits.test_targets), generator=g)[: self.test_subset]
        make = splits.make
        if self.known_classes is not None:  # filter after drawing: the same samples in every split
            class_map = self._class_map()
            pool_keep = class_map[splits.pool_targets.long()] >= 0
            test_keep = class_map[splits.test_targets.long()] >= 0
            train_idx, val_idx = train_idx[pool_keep[train_idx]], val_idx[pool_keep[val_idx]]
            if test_idx is None:
                test_idx = torch.arange(len(splits.test_targets))
            test_idx = test_idx[test_keep[test_idx]]
            if not len(train_idx):
                raise ValueError(f"no training sample left in class_split={self.class_split!r}")

            def make(indices, train, test):
                return _Relabelled(splits.make(indices, train, test), class_map)

        self.noisy_labels = None
        if self.label_noise:
            override = self._noisy_labels(train_idx, len(splits.pool_targets))
            clean_make = make

            def make(indices, train, test):  # validation samples are never in `override`
                ds = clean_make(indices, train, test)
                return ds if test else _Relabelled(ds, override=override)

        self.train_indices = train_idx.sort().values
        self.train_targets = splits.pool_targets[self.train_indices]
        if self.class_map is not None:
            self.train_targets = self.class_map[self.train_targets.long()]
        if self.noisy_labels is not None:
            self.clean_train_targets = self.train_targets.clone()
            noisy = self.noisy_labels[self.train_indices]
            self.train_targets = torch.where(noisy >= 0, noisy, self.train_targets)
        self._make = make
        self.train_set = make(self.train_indices, True, False)
        self.test_set = make(None if test_idx is None else test_idx.sort().values, False, True)
        self.val_set = make(val_idx.sort().values, False, False) if n_val else self.test_set

    def _set_domains(self, pool_targets: Tensor) -> None:
        """`domain_ids` (one per train-pool sample) and `num_domains` from the `domains` option."""
        n, spec = len(pool_targets), self.domains
        if isinstance(spec, int):
            g = torch.Generator().manual_seed(self.data_seed * 1_000_003 + 104_729)
            ids = torch.empty(n, dtype=torch.long)
            ids[torch.randperm(n, generator=g)] = torch.arange(n) % spec
        else:
            ids = spec(pool_targets) if callable(spec) else spec
            ids = torch.as_tensor(ids)
            if ids.shape != (n,) or ids.is_floating_point() or ids.is_complex():
                raise ValueError(
                    f"domains must give one integer domain id per train-pool sample ({n} samples in pool order), "
                    f"got {ids.dtype} of shape {tuple(ids.shape)}"
                )
            ids = ids.long()
            if n and int(ids.min()) < 0:
                raise ValueError(f"domain ids must be >= 0, found {int(ids.min())}")
        self.domain_ids = ids
        self.num_domains = int(ids.max()) + 1 if n else 0

    def domain_of(self, index: Tensor) -> Tensor:
        """The domain id of each sample index (`Batch.index`), on the index's device."""
        self.setup("fit")
        if self.domain_ids is None:
            raise ValueError(
                f"{type(self).__name__} has no domains: build it with domains=K (synthetic), a list of "
                "per-sample domain ids, or a rule fn(pool_targets) -> ids"
            )
        return self.domain_ids.to(index.device)[index.long()]

    def _noisy_labels(self, train_idx: Tensor, pool_size: int) -> Tensor:
        """Symmetric label noise on the training split (as ELR's code, `symmetric_noise`): exactly
        round(rate · N) training samples, drawn with the seed, each get a class drawn uniformly
        from all classes (which may be its own). Returns the new label per pool index (-1: kept)."""
        g = torch.Generator().manual_seed(self.data_seed * 1_000_003 + 7919)
        train_idx = train_idx.sort().values
        k = int(round(self.label_noise * len(train_idx)))
        chosen = train_idx[torch.randperm(len(train_idx), generator=g)[:k]]
        override = torch.full((pool_size,), -1, dtype=torch.long)
        override[chosen] = torch.randint(0, self.num_classes, (k,), generator=g)
        self.noisy_labels = override
        return override

    def _class_map(self) -> Tensor:
        """original label -> label in this `class_split` (-1: dropped); sets num_classes, num_known."""
        total = self.num_classes
        known = (
            list(range(self.known_classes))
            if isinstance(self.known_classes, int)
            else list(self.known_classes)
        )
        if not known or len(set(known)) != len(known) or not all(0 <= int(k) < total for k in known):
            raise ValueError(
                f"known_classes must be 1..{total - 1} classes, or distinct class ids in [0, {total}), got "
                f"{self.known_classes!r}"
            )
        novel = [c for c in range(total) if c not in set(known)]
        if not novel:
            raise ValueError(f"known_classes={self.known_classes!r} leaves no novel class out of {total}")
        kept = {"known": known, "novel": novel, "all": known + novel}[self.class_split]
        class_map = torch.full((total,), -1, dtype=torch.long)
        class_map[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        self.class_map, self.num_known, self.num_classes = class_map, len(known), len(kept)
        return class_map

    collate_fn: Any = None

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        # Loaders draw their worker base seeds from a generator of their own, never from the
        # global RNG, and augmentation is seeded per (seed, epoch, index) through the sampler's
        # keys: a resumed run (or another process) sees exactly the same data.
        common = {
            "num_workers": self.num_workers,
            "collate_fn": self.collate_fn,
            "generator": torch.Generator().manual_seed(self.seed),
        }
        if train and self.samples_per_class:
            if self._subset_positions is not None:
                raise ValueError(
                    "a training subset (data pruning) and class-balanced batches (samples_per_class) cannot "
                    "be combined: drop one of them"
                )
            sampler = ClassBalancedSampler(
                self.train_targets,
                self.batch_size // self.samples_per_class,
                self.samples_per_class,
                seed=self.seed,
                with_epoch=True,
                views=self.augment_views,
            )
            return DataLoader(
                ds,
                batch_size=sampler.batch_size,
                sampler=sampler,
                persistent_workers=self.num_workers > 0,
                **common,
            )
        if train:
            sampler = IndexSampler(
                ds,
                shuffle=True,
                seed=self.seed,
                with_epoch=True,
                views=self.augment_views,
                subset=self._subset_positions,
                batch_size=self.batch_size,
            )
            return DataLoader(
                ds,
                batch_size=self.batch_size,
                sampler=sampler,
                persistent_workers=self.num_workers > 0,
                **common,
            )
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, **common)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, True)

    # -- data selection ----------------------------------------------------------------------
    def set_train_subset(self, sample_indices: Tensor | None) -> None:
        """Train only on these samples (their `Batch.index` values; None: all) from the next time
        the training loader is built. Used by `DataPruning`."""
        self.setup("fit")
        if sample_indices is None:
            self._subset_positions = None
            return
        idx = torch.as_tensor(sample_indices, dtype=torch.long).flatten()
        pos = torch.searchsorted(self.train_indices, idx).clamp_max(len(self.train_indices) - 1)
        missing = idx[self.train_indices[pos] != idx]
        if len(missing):
            raise ValueError(
                f"{len(missing)} of the {len(idx)} sample indices are not training samples of this "
                f"{type(self).__name__} (e.g. {missing[:5].tolist()}): the subset (or the scores it came "
                "from) belongs to another data set, split or seed"
            )
        self._subset_positions = pos.sort().values

    @property
    def train_sample_indices(self) -> Tensor:
        """Every training sample's index (`Batch.index`), sorted."""
        self.setup("fit")
        return self.train_indices

    def scoring_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The training samples without augmentation, in index order, this rank's share
        (every world_size-th): for scoring passes over the training set."""
        self.setup("fit")
        if self._score_set is None:
            self._score_set = self._make(self.train_indices, False, False)
        positions = list(range(rank, len(self._score_set), world_size))
        return self._loader(torch.utils.data.Subset(self._score_set, positions), False)

    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, False)

    def example_input(self, n: int = 2) -> Any:
        """A few training inputs, for dry runs that size projectors and check class counts."""
        self.setup("fit")
        items = [self.train_set[i] for i in range(min(n, len(self.train_set)))]
        return (self.collate_fn or torch.utils.data.default_collate)(items).input

    def describe(self) -> dict[str, Any]:
        """What the data is, for results files."""
        self.setup("fit")
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "train": len(self.train_set),
            "val": len(self.val_set),
            "test": len(self.test_set),
            "augment": self.augment,
            "augment_views": self.augment_views,
        }
