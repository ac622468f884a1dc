"""Text classification DataModules: text (in memory), fortunes, text_file, hf_disk.

Items are raw strings; tokenisation happens per batch in `TextCollator` with dynamic padding, so
batches come out as `Batch(input={"input_ids", "attention_mask", ...}, target, index)`. Every item
carries its index in the train pool (or the test split), like the image DataModules.

    dm = FortunesDataModule(tokenizer="path/to/hf_model_dir", batch_size=32)
    module = ClassificationModule("hf:path/to/hf_model_dir", num_classes=dm.num_classes)

`tokenizer` is a tokenizer object or a string for `transformers.AutoTokenizer.from_pretrained`
(a local directory, or a hub name when the hub or its cache is reachable).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from toolkit.data.base import ClassificationDataModule, Splits
from toolkit.data.datasets import split_key
from toolkit.registry import register
from toolkit.types import Batch

FORTUNES_DIR = Path("/usr/share/games/fortunes")
DEFAULT_FORTUNE_CATEGORIES = ("computers", "food", "literature", "science", "sports")
# Fixed, so the held-out test split (and any per-class cap) is the same data set for every run seed.
DATA_SEED = 1234


# -- tokenisation ---------------------------------------------------------------------------


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object, or one loaded with `AutoTokenizer.from_pretrained` from a string/path."""
    if tokenizer is None:
        raise ValueError(
            "text DataModules need a tokenizer: pass tokenizer=<local model/tokenizer directory or HF name> "
            "(usually the one of the model you train, e.g. the PATH of model 'hf:PATH') or a tokenizer object"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from toolkit.models.factory import resolve_package_path

        spec = resolve_package_path(str(tokenizer))
        try:
            return AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as e:
            where = "the local directory" if Path(spec).exists() else "the Hugging Face hub name"
            raise OSError(
                f"could not load a tokenizer from {where} {spec!r} ({e}). Pass a local directory holding the "
                "tokenizer files (tokenizer.json, or vocab.txt + tokenizer_config.json), a tokenizer object, or "
                "a hub name that is in the local HF cache when offline."
            ) from e
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a string/path or a callable tokenizer, got {type(tokenizer).__name__}"
        )
    return tokenizer


class TextCollator:
    """Collate `Batch(text, target, index)` items into one tokenised, dynamically padded `Batch`.

    The input is a plain dict of tensors (`input_ids`, `attention_mask`, and whatever else the
    tokenizer returns, e.g. `token_type_ids`), padded to the longest text in the batch and
    truncated to `max_length` tokens.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = 128) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v for k, v in enc.items()}

    def __call__(self, items: Sequence[Any]) -> Batch:
        texts = [it[0] for it in items]
        target = torch.stack([torch.as_tensor(it[1], dtype=torch.long) for it in items])
        index = torch.stack([torch.as_tensor(it[2], dtype=torch.long) for it in items])
        return Batch(self.tokenize(texts), target, index)


class TextDataset(Dataset):
    """In-memory texts and class targets; item `i` is `Batch(text, target, index)` where `index` is
    the position in `texts` (the full pool or test split), also when `indices` selects a subset."""

    def __init__(self, texts: Sequence[str], targets: Tensor, indices: Tensor | None = None) -> None:
        if len(texts) != len(targets):
            raise ValueError(f"{len(texts)} texts but {len(targets)} targets")
        self.texts = texts
        self.targets = targets.long()
        self.indices = (
            torch.arange(len(texts)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> Batch:
        idx = int(self.indices[split_key(key)[0]])
        return Batch(self.texts[idx], self.targets[idx], torch.tensor(idx))


# -- labels and texts ------------------------------------------------------------------------

_INT_RE = re.compile(r"^[+-]?\d+$")


def _plain_label(v: Any, where: str, row: int) -> int | str:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v != v or not v.is_integer():  # NaN or fractional
            raise ValueError(f"{where}: row {row} has label {v!r}; class labels must be integers or strings")
        return int(v)
    if isinstance(v, str):
        s = v.strip()
        if not s:
            raise ValueError(f"{where}: row {row} has an empty label; fill it in or drop the row")
        return s
    if v is None:
        raise ValueError(f"{where}: row {row} has no label; fill it in or drop the row")
    if hasattr(v, "item"):  # numpy / torch scalars
        return _plain_label(v.item(), where, row)
    raise ValueError(
        f"{where}: row {row} has label {v!r} of type {type(v).__name__}; use integers or strings"
    )


def encode_labels(
    label_sets: Sequence[tuple[str, Sequence[Any]]], class_names: Sequence[str] | None = None
) -> tuple[list[Tensor], list[str]]:
    """Turn labels into class indices, shared across splits; returns (targets per set, class names).

    Integer labels (or strings that all spell integers, as CSV gives) are class indices; other
    strings are class names, mapped to `class_names` when given, else to the sorted set of names
    found in all splits.
    """
    plain = [
        (where, [_plain_label(v, where, i) for i, v in enumerate(labels)]) for where, labels in label_sets
    ]
    values = [v for _, labels in plain for v in labels]
    names = list(class_names) if class_names is not None else None
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    as_names = any(isinstance(v, str) for v in values)
    if as_names and not (names is not None and all(str(v) in names for v in values)):
        # Integer class indices written as text (CSV) stay indices, unless they are class names.
        as_names = not all(isinstance(v, int) or _INT_RE.match(v) for v in values)
    if as_names:
        if any(isinstance(v, int) for v in values):
            ints = sorted({v for v in values if isinstance(v, int)})[:5]
            words = sorted({v for v in values if isinstance(v, str)})[:5]
            raise ValueError(
                f"labels mix integers {ints} and names {words} (across {', '.join(w for w, _ in plain)}): "
                "use class names everywhere or integer class indices everywhere"
            )
        if names is None:
            names = sorted({str(v) for v in values})
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(v) for v in values} - set(lookup))
        if unknown:
            raise ValueError(
                f"labels {unknown[:10]} are not in class_names {names}: add them to class_names or leave "
                "class_names unset to use the sorted label names"
            )
        targets = [torch.tensor([lookup[str(v)] for v in labels], dtype=torch.long) for _, labels in plain]
        return targets, names
    targets = [torch.tensor([int(v) for v in labels], dtype=torch.long) for _, labels in plain]
    for (where, _), t in zip(plain, targets):
        if len(t) and int(t.min()) < 0:
            raise ValueError(
                f"{where} has negative labels (min {int(t.min())}): unlabelled rows, as in GLUE-style test "
                "splits, cannot be evaluated; use a labelled split (e.g. 'validation') as the test split"
            )
    top = max((int(t.max()) for t in targets if len(t)), default=-1)
    if names is None:
        names = [str(i) for i in range(top + 1)]
    elif top >= len(names):
        raise ValueError(
            f"labels go up to {top} but class_names has {len(names)} entries: integer labels are class indices "
            "0..len(class_names)-1"
        )
    return targets, names


def _check_texts(texts: Sequence[Any], where: str) -> list[str]:
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(
                f"{where}: row {i} has text {t!r} of type {type(t).__name__}; every text must be a string"
            )
    return out


def held_out_split(n: int, fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """(rest, held out) sorted row indices: a fixed-seed `fraction` of `n` rows (at least one)."""
    if n < 2:
        raise ValueError(f"need at least 2 samples to hold out a test split, got {n}; pass a test set")
    if not 0 < fraction < 1:
        raise ValueError(f"test_split must be in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(DATA_SEED))
    n_test = max(1, int(n * fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


# -- generic in-memory DataModule --------------------------------------------------------------


@register("data", "text")
class TextClassificationDataModule(ClassificationDataModule):
    """Text classification from in-memory texts and labels.

    Args:
        texts_train, labels_train: the train pool (the base holds out `val_split` of it).
        texts_test, labels_test: the test split; without them a fixed-seed `test_split` (20%) of the
            train data is held out as the test split (the same for every run seed).
        tokenizer: a tokenizer object, or a local directory / HF name for `AutoTokenizer`.
        max_length: truncate texts to this many tokens (None: the tokenizer's model maximum).
        class_names: class names in index order. Labels that are strings are mapped to them
            (default: the sorted label names); integer labels are class indices.
        **kwargs: `ClassificationDataModule` options (batch_size, val_split, train_subset, seed, ...).
    """

    name = "text"

    def __init__(
        self,
        texts_train: Sequence[str],
        labels_train: Sequence[Any],
        texts_test: Sequence[str] | None = None,
        labels_test: Sequence[Any] | None = None,
        tokenizer: Any = None,
        max_length: int | None = 128,
        class_names: Sequence[str] | None = None,
        test_split: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_length = max_length
        self.collate = TextCollator(self.tokenizer, max_length)
        self.collate_fn = self.collate  # the base class's loaders tokenise per batch with it
        if (texts_test is None) != (labels_test is None):
            raise ValueError("pass both texts_test and labels_test, or neither (to hold out a test split)")
        texts = _check_texts(texts_train, f"{self.name} training texts")
        if len(texts) != len(labels_train):
            raise ValueError(f"{len(texts)} training texts but {len(labels_train)} training labels")
        if not texts:
            raise ValueError(f"{self.name}: no training texts")
        if texts_test is not None:
            test_texts = _check_texts(texts_test, f"{self.name} test texts")
            if len(test_texts) != len(labels_test):
                raise ValueError(f"{len(test_texts)} test texts but {len(labels_test)} test labels")
            (ytr, yte), names = encode_labels(
                [(f"{self.name} training data", labels_train), (f"{self.name} test data", labels_test)],
                class_names,
            )
        else:
            (y,), names = encode_labels([(f"{self.name} data", labels_train)], class_names)
            keep, held = held_out_split(len(texts), test_split)
            test_texts = [texts[i] for i in held.tolist()]
            texts = [texts[i] for i in keep.tolist()]
            ytr, yte = y[keep], y[held]
        self.texts_train, self.targets_train = texts, ytr
        self.texts_test, self.targets_test = test_texts, yte
        self.class_names = list(names)
        self.num_classes = len(self.class_names)

    @property
    def classes(self) -> list[str]:
        """Class names in index order (the name `ImageFolderDataModule` uses)."""
        return self.class_names

    def train_texts(self) -> list[str]:
        """The text of every training sample, in `train_sample_indices` order (for model-free
        selectors such as zip_fit)."""
        return [self.texts_train[i] for i in self.train_sample_indices.tolist()]

    def load(self) -> Splits:
        def make(indices, train: bool, test: bool):
            if test:
                return TextDataset(self.texts_test, self.targets_test, indices)
            return TextDataset(self.texts_train, self.targets_train, indices)

        return Splits(self.targets_train, self.targets_test, make)

    def example_input(self, n: int = 2) -> dict[str, Tensor]:
        """A few tokenised training inputs (the dict a batch carries), for dry runs."""
        self.setup("fit")
        items = [self.train_set[i] for i in range(min(n, len(self.train_set)))]
        return self.collate(items).input

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "class_names": list(self.class_names), "max_length": self.max_length}


# -- fortunes -----------------------------------------------------------------------------------


def read_strfile(path: Path) -> list[str]:
    """The entries of a fortune (strfile source) file: text blocks separated by lines holding `%`."""
    entries, lines = [], []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if line.strip() == "%":
            entries.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line)
    entries.append("\n".join(lines).strip())
    return [e for e in entries if e]


def fortune_categories(root: str | Path = FORTUNES_DIR) -> list[str]:
    """Category files in a fortunes directory: regular files, not `.dat`/`.u8` and not symlinks."""
    root = Path(root)
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_file()
        and not p.is_symlink()
        and p.suffix not in (".dat", ".u8")
        and not p.name.startswith(".")
    )


@register("data", "fortunes")
class FortunesDataModule(TextClassificationDataModule):
    """Which `fortune` category a quote comes from: one class per category file.

    Reads the Debian package `fortunes` (/usr/share/games/fortunes, strfile format: entries
    separated by `%` lines). A fixed-seed 20% of each run's data is the test split.

    Args:
        categories: category file names (a list, or a comma-separated string; "all" for every
            category in `root`). Class index = position in this list. Default: computers, food,
            literature, science, sports.
        root: the fortunes directory (default /usr/share/games/fortunes).
        max_per_class: keep at most this many entries per category (a fixed-seed sample), to
            balance the classes.
        tokenizer, max_length, **kwargs: as `TextClassificationDataModule`.
    """

    name = "fortunes"

    def __init__(
        self,
        categories: Sequence[str] | str | None = None,
        root: str | Path | None = None,
        max_per_class: int | None = None,
        tokenizer: Any = None,
        max_length: int | None = 128,
        **kwargs: Any,
    ) -> None:
        self.root = Path(root) if root is not None else FORTUNES_DIR
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"fortune files not found: {self.root} is not a directory. Install them with "
                "`apt-get install fortunes` (Debian/Ubuntu), or pass root=DIR (recipes: --data.root DIR) "
                "pointing at a folder of strfile-format category files."
            )
        available = fortune_categories(self.root)
        if categories is None:
            categories = list(DEFAULT_FORTUNE_CATEGORIES)
        elif isinstance(categories, str):
            categories = (
                available if categories == "all" else [c.strip() for c in categories.split(",") if c.strip()]
            )
        categories = list(categories)
        if not categories:
            raise ValueError(
                f"no fortune categories chosen; available in {self.root}: {', '.join(available)}"
            )
        if len(set(categories)) != len(categories):
            raise ValueError(f"fortune categories repeat: {categories}")
        missing = [c for c in categories if c not in available]
        if missing:
            raise FileNotFoundError(
                f"fortune categories {missing} not found in {self.root}. Available: {', '.join(available) or 'none'}"
            )
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
        self.categories = categories
        self.max_per_class = max_per_class
        texts: list[str] = []
        labels: list[int] = []
        g = torch.Generator().manual_seed(DATA_SEED)
        for c, cat in enumerate(categories):
            entries = read_strfile(self.root / cat)
            if not entries:
                raise ValueError(f"fortune category file {self.root / cat} has no entries")
            if max_per_class is not None and len(entries) > max_per_class:
                pick = torch.randperm(len(entries), generator=g)[:max_per_class].sort().values
                entries = [entries[i] for i in pick.tolist()]
            texts += entries
            labels += [c] * len(entries)
        super().__init__(
            texts, labels, tokenizer=tokenizer, max_length=max_length, class_names=categories, **kwargs
        )


# -- local CSV / JSON files ----------------------------------------------------------------------


def _read_records(path: Path) -> list[Mapping[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8-sig")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _read_jsonl(path)  # JSON lines saved as .json
        if isinstance(data, Mapping) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, Mapping) and data and all(isinstance(v, list) for v in data.values()):
            cols = list(data)
            n = len(data[cols[0]])
            if any(len(data[c]) != n for c in cols):
                raise ValueError(f"{path}: the column lists have different lengths")
            return [{c: data[c][i] for c in cols} for i in range(n)]
        if isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
            return data
        raise ValueError(
            f"{path}: expected a JSON list of records ([{{...}}, ...]), a dict of column lists, or JSON lines"
        )
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl")


def _read_jsonl(path: Path) -> list[Mapping[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from e
            if not isinstance(row, Mapping):
                raise ValueError(
                    f"{path}, line {n}: expected a JSON object per line, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def read_text_table(
    paths: str | Path | Sequence[str | Path], text_column: str, label_column: str
) -> tuple[list[str], list[Any]]:
    """(texts, labels) from one or more CSV/TSV/JSON/JSONL files, with clear errors."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    texts: list[str] = []
    labels: list[Any] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist (looked in {p.resolve().parent})")
        rows = _read_records(p)
        if not rows:
            raise ValueError(f"{p} has no rows")
        cols = list(rows[0])
        for col, opt in ((text_column, "text_column"), (label_column, "label_column")):
            if col not in cols:
                raise ValueError(
                    f"column {col!r} not found in {p}; its columns are {cols}. Pass {opt}=<one of them>"
                )
        for i, r in enumerate(rows):
            if text_column not in r or label_column not in r:
                raise ValueError(f"{p}: row {i} lacks column {text_column!r} or {label_column!r}")
            t = r[text_column]
            if not isinstance(t, str):
                raise ValueError(f"{p}: row {i} has {text_column}={t!r}; texts must be strings")
            texts.append(t)
            labels.append(r[label_column])
    return texts, labels


@register("data", "text_file")
class TextFileDataModule(TextClassificationDataModule):
    """Text classification from local CSV/TSV/JSON/JSONL files.

    Args:
        path: the training file (or a list of files, concatenated).
        test_path: the test file(s); without it a fixed-seed 20% of `path` is held out.
        text_column, label_column: column names. Labels may be strings (class names: sorted, or
            mapped to `class_names`) or integers (class indices).
        tokenizer, max_length, class_names, **kwargs: as `TextClassificationDataModule`.
    """

    name = "text_file"

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        test_path: str | Path | Sequence[str | Path] | None = None,
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: Any = None,
        max_length: int | None = 128,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.path, self.test_path = path, test_path
        texts, labels = read_text_table(path, text_column, label_column)
        test_texts, test_labels = (None, None)
        if test_path is not None:
            test_texts, test_labels = read_text_table(test_path, text_column, label_column)
        super().__init__(
            texts,
            labels,
            test_texts,
            test_labels,
            tokenizer=tokenizer,
            max_length=max_length,
            class_names=class_names,
            **kwargs,
        )


# -- Hugging Face datasets saved to disk -----------------------------------------------------------


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "hf_disk needs the Hugging Face `datasets` package: `pip install datasets` "
            "(or `pip install toolkit[text]`)"
        ) from e
    return datasets


@register("data", "hf_disk")
class HFDiskDataModule(TextClassificationDataModule):
    """A Hugging Face `datasets` data set saved with `save_to_disk` (loaded with `load_from_disk`).

    Args:
        path: the saved `DatasetDict` (or single `Dataset`) directory.
        train_split: the split used as the train pool.
        test_split: the test split; None (or a single saved `Dataset`) holds out a fixed-seed 20%
            of the train split. GLUE-style unlabelled test splits (label -1) are refused: use
            "validation".
        text_column, label_column: column names. A `ClassLabel` label column gives the class names.
        tokenizer, max_length, class_names, **kwargs: as `TextClassificationDataModule`.

    The text and label columns are read into memory.
    """

    name = "hf_disk"

    def __init__(
        self,
        path: str | Path,
        train_split: str = "train",
        test_split: str | None = "test",
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: Any = None,
        max_length: int | None = 128,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        hf = _import_datasets()
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"{self.path} does not exist: hf_disk reads a data set saved with `dataset.save_to_disk(PATH)`"
            )
        try:
            saved = hf.load_from_disk(str(self.path))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{self.path} is not a data set saved with `save_to_disk` ({e}); save one with "
                "`datasets.load_dataset(...).save_to_disk(PATH)`"
            ) from e
        if isinstance(saved, hf.DatasetDict):
            splits = list(saved)
            if train_split not in saved:
                raise ValueError(
                    f"split {train_split!r} not in {self.path}; its splits are {splits}. Pass train_split="
                )
            train = saved[train_split]
            if test_split is not None and test_split not in saved:
                raise ValueError(
                    f"split {test_split!r} not in {self.path}; its splits are {splits}. Pass test_split=<one of "
                    "them>, or test_split=None to hold out 20% of the train split"
                )
            test = saved[test_split] if test_split is not None else None
        else:
            train, test = saved, None
        names = class_names
        texts, labels = self._columns(train, text_column, label_column, train_split)
        feature = train.features[label_column]
        if names is None and isinstance(feature, hf.ClassLabel):
            names = list(feature.names)
        test_texts = test_labels = None
        if test is not None:
            test_texts, test_labels = self._columns(test, text_column, label_column, test_split)
        super().__init__(
            texts,
            labels,
            test_texts,
            test_labels,
            tokenizer=tokenizer,
            max_length=max_length,
            class_names=names,
            **kwargs,
        )

    def _columns(self, ds: Any, text_column: str, label_column: str, split: str) -> tuple[list, list]:
        cols = list(ds.column_names)
        for col, opt in ((text_column, "text_column"), (label_column, "label_column")):
            if col not in cols:
                raise ValueError(
                    f"column {col!r} not found in split {split!r} of {self.path}; its columns are {cols}. "
                    f"Pass {opt}=<one of them>"
                )
        return list(ds[text_column]), list(ds[label_column])


__all__ = [
    "DEFAULT_FORTUNE_CATEGORIES",
    "FORTUNES_DIR",
    "FortunesDataModule",
    "HFDiskDataModule",
    "TextClassificationDataModule",
    "TextCollator",
    "TextDataset",
    "TextFileDataModule",
    "encode_labels",
    "fortune_categories",
    "held_out_split",
    "load_tokenizer",
    "read_strfile",
    "read_text_table",
]
