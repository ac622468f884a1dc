"""The files of a teacher cache on disk (`TeacherCache(directory=...)`), and its fingerprint.

A directory holds, for R = N·K rows (N the sample-index bound of the training set, K the
augmentation views; row = index·K + view):

    manifest.json        layout (rows, views, files, feature shapes) and the fingerprint
    written.u8           R bytes, 1 where the row is filled (one byte per row, not one bit:
                         DDP ranks write disjoint rows, and a bit-packed map would make two
                         ranks read-modify-write the same byte)
    logits.bin           R × C logits                       (full mode)
    topk_values.bin      R × (k+1): the top-k logits, then the fill logit   (top-k mode)
    topk_indices.bin     R × k int32 class indices                          (top-k mode)
    feature_<j>.bin      R × (feature shape), one per cached teacher feature

all raw little-endian arrays read through `numpy.memmap` (bfloat16 as its uint16 bits), so a
run maps them into memory instead of loading them, and several processes on one machine share
the pages: each DDP rank writes its own rows (the sampler deals disjoint indices) into the same
files, with no collective call. A row's values are written before its `written` byte.

**Top-k rule.** A row keeps the k largest logits z_i (i ∈ S, |S| = k) and one fill value
f = log(mean_{j∉S} exp z_j), the log-mean-exp of the other C − k logits; the KD target is
rebuilt as z̃_i = z_i on S and z̃_j = f elsewhere. Then Σ_j exp z̃_j = Σ_j exp z_j: the
partition function is unchanged, so at temperature 1 the rebuilt softmax keeps the top-k
probabilities exactly and spreads the remaining mass 1 − Σ_S p_i uniformly over the other
classes. That is FKD's "marginal smoothing" of stored top-k soft labels (Shen & Xing, "A Fast
Knowledge Distillation Framework for Visual Recognition", ECCV 2022: `Recover_soft_label`,
`marginal_smoothing_k5/k10`, which sets the others to (1 − Σ top-k)/(C − k)), written in logit
space so every logit distiller (kd, dkd, nkd, ... at any temperature) reads ordinary logits.
At a temperature τ ≠ 1 the rebuilt target is an approximation (the tail is flattened); the
top-k probabilities' ordering is kept since f ≤ min_S z_i.

**Fingerprint.** The manifest records what the cached outputs are a function of, in four groups,
each compared key by key when a run opens the directory (`check_manifest`):
- `teacher`: a SHA-256 of every network's state_dict (names, dtypes, shapes and values, buffers
  included), the network classes, the ensemble's `combine`, the teacher's `precision` and its
  `input_transform`;
- `data`: the DataModule class and data set name, the number of training samples and their
  index bound, the split seed, `train_subset`, `val_split`, label-noise and class-split
  settings, the image folder's root and classes where there are some, and SHA-256 hashes of the
  training sample indices and of their labels (image contents are not hashed);
- `transforms`: augmentation on or off, the number of views K, the augmentation's settings and
  its seed (a view is a function of seed, view and index), normalisation, image size, channels,
  and for text the tokenizer and maximum length;
- `storage`: number of classes, full or top-k (and k), storage dtype.
A difference in any group is a `ValueError` naming the group, the keys and both values, and
the fix (another directory, or delete this one).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

MANIFEST = "manifest.json"
FORMAT = "toolkit-teacher-cache"
VERSION = 1
# "auto": full logits up to this many classes, top-k above (FKD's ImageNet setting, k = 10)
FULL_LOGITS_MAX_CLASSES = 100
AUTO_TOP_K = 10
STORAGE = {  # name -> (numpy dtype of the file, torch dtype of the values)
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
}
GROUPS = (
    ("teacher", "teacher weights"),
    ("data", "data"),
    ("transforms", "transforms"),
    ("storage", "storage"),
)


# -- top-k codec ------------------------------------------------------------------------------


def resolve_top_k(top_k: int | str | None, num_classes: int) -> int | None:
    """k for this class count: None (full logits), an int k in [1, C), or "auto"
    (full up to `FULL_LOGITS_MAX_CLASSES` classes, else `AUTO_TOP_K`)."""
    if top_k == "auto":
        return None if num_classes <= FULL_LOGITS_MAX_CLASSES else AUTO_TOP_K
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k < num_classes:
        raise ValueError(
            f"teacher cache top_k must be None (full logits), 'auto' or an integer in [1, {num_classes}) for "
            f"{num_classes} classes, got {top_k!r}"
        )
    return top_k


def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values (B, k+1), indices (B, k)): the k largest logits, the fill logit last (see the
    module docstring); float32 maths whatever the input dtype."""
    z = logits.float()
    c = z.shape[-1]
    if not 1 <= k < c:
        raise ValueError(f"top-k needs 1 <= k < C, got k={k} for C={c}")
    top, idx = torch.topk(z, k, dim=-1)
    rest = z.scatter(-1, idx, float("-inf"))
    fill = torch.logsumexp(rest, dim=-1, keepdim=True) - math.log(c - k)
    return torch.cat([top, fill], -1), idx


def topk_expand(values: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """(B, C) float32 logits rebuilt from `topk_compress`'s output: the fill logit everywhere,
    the top-k logits at their indices."""
    v = values.float()
    out = v[:, -1:].expand(v.shape[0], num_classes).clone()
    return out.scatter_(-1, indices.long(), v[:, :-1])


# -- fingerprint ------------------------------------------------------------------------------


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


def weights_digest(nets: Iterable[nn.Module]) -> str:
    """SHA-256 over every network's state_dict (parameters and buffers), in order."""
    h = hashlib.sha256()
    for i, net in enumerate(nets):
        for name, value in net.state_dict().items():
            if not isinstance(value, Tensor):
                h.update(f"{i}:{name}={value!r}".encode())
                continue
            h.update(f"{i}:{name}:{value.dtype}:{tuple(value.shape)}".encode())
            h.update(_tensor_bytes(value))
    return h.hexdigest()


def describe(obj: Any) -> Any:
    """A JSON-able description of a setting or transform object: its value, its repr when that
    is informative (torchvision transforms), else its class and public attributes (tensors by
    digest)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Tensor):
        return {"tensor": tensor_digest(obj)}
    if isinstance(obj, Mapping):
        return {str(k): describe(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    text = repr(obj)
    if " at 0x" not in text:
        return text
    attrs = (
        {k: describe(v) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}
        if hasattr(obj, "__dict__")
        else {}
    )
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **attrs}


def teacher_identity(teacher: Any) -> dict[str, Any]:
    """The `teacher` group of the fingerprint, from a `toolkit.distill.Teacher`."""
    nets = list(teacher.nets)
    for net in nets:
        if not isinstance(net, nn.Module):
            raise ValueError(
                "teacher_cache_dir fingerprints the teacher's weights, but a teacher network is a plain callable "
                f"({type(net).__name__}): wrap it in an nn.Module holding its weights, or use the in-memory "
                "cache (teacher_cache=True without a directory)"
            )
    return {
        "weights_sha256": weights_digest(nets),
        "networks": [f"{type(n).__module__}.{type(n).__qualname__}" for n in nets],
        "combine": teacher.combine if len(nets) > 1 else None,
        "precision": teacher.precision,
        "input_transform": describe(teacher.input_transform),
    }


def training_indices(datamodule: Any) -> tuple[Tensor, Tensor]:
    """(sorted training sample indices, their labels) of a toolkit DataModule."""
    indices = getattr(datamodule, "train_sample_indices", None)
    targets = getattr(datamodule, "train_targets", None)
    if not isinstance(indices, Tensor) or not isinstance(targets, Tensor) or not len(indices):
        raise ValueError(
            f"a teacher cache on disk needs to identify the training data, but {type(datamodule).__name__} has no "
            "`train_sample_indices` / `train_targets` (toolkit DataModules have both): fit with a toolkit "
            "DataModule, or use the in-memory cache (teacher_cache=True without a directory)"
        )
    return indices.long(), targets.long()


def data_identity(datamodule: Any) -> dict[str, Any]:
    """The `data` group of the fingerprint."""
    indices, targets = training_indices(datamodule)
    dm = datamodule
    return {
        "datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}",
        "name": getattr(dm, "name", None),
        "num_train_samples": len(indices),
        "index_bound": int(indices.max()) + 1,
        "split_seed": getattr(dm, "data_seed", None),
        "train_subset": describe(getattr(dm, "train_subset", None)),
        "val_split": describe(getattr(dm, "val_split", None)),
        "label_noise": describe(getattr(dm, "label_noise", None)),
        "known_classes": describe(getattr(dm, "known_classes", None)),
        "class_split": describe(getattr(dm, "class_split", None)),
        "root": describe(getattr(dm, "root", None)),
        "classes": describe(getattr(dm, "classes", None)),
        "train_indices_sha256": tensor_digest(indices),
        "train_labels_sha256": tensor_digest(targets),
    }


def transform_identity(datamodule: Any, views: int) -> dict[str, Any]:
    """The `transforms` group of the fingerprint; `views` is K (1 without augmentation)."""
    dm = datamodule
    augment = bool(getattr(dm, "augment", False))
    tokenizer = getattr(dm, "tokenizer", None)
    return {
        "augment": augment,
        "views": views,
        "augmentation": describe(getattr(dm, "augmentation", None)) if augment else None,
        "augmentation_seed": getattr(dm, "seed", None) if augment else None,
        "mean": describe(getattr(dm, "mean", None)),
        "std": describe(getattr(dm, "std", None)),
        "image_size": describe(getattr(dm, "image_size", None)),
        "in_chans": describe(getattr(dm, "in_chans", None)),
        "max_length": describe(getattr(dm, "max_length", None)),
        "tokenizer": None
        if tokenizer is None
        else str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
    }


def storage_identity(num_classes: int, top_k: int | None, dtype: str) -> dict[str, Any]:
    return {
        "num_classes": num_classes,
        "mode": "full" if top_k is None else "top_k",
        "top_k": top_k,
        "dtype": dtype,
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    if len(text) == 64 and all(ch in "0123456789abcdef" for ch in text):
        return text[:12] + "…"
    return text if len(text) <= 80 else text[:77] + "…"


def check_manifest(stored: Mapping[str, Any], expected: Mapping[str, Any], path: Path) -> None:
    """Raise a ValueError naming every fingerprint group (and key) where `stored` differs."""
    problems = []
    for key, label in GROUPS:
        a, b = stored.get(key) or {}, _jsonable(expected[key])
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            details = ", ".join(f"{k}: {_short(a.get(k))} in the cache, {_short(b.get(k))} now" for k in diff)
            problems.append(f"{label} ({details})")
    if problems:
        raise ValueError(
            f"the teacher cache in {path} was built for another run: {'; '.join(problems)}. Use another "
            f"teacher_cache_dir for this run, or delete {path} to rebuild the cache"
        )


# -- the files --------------------------------------------------------------------------------


def _memmap(path: Path, storage: str | type, shape: Sequence[int], create: bool) -> tuple[np.memmap, Tensor]:
    np_dtype, torch_dtype = STORAGE[storage] if isinstance(storage, str) else (storage, None)
    mm = np.memmap(path, dtype=np_dtype, mode="w+" if create else "r+", shape=tuple(shape))
    t = torch.from_numpy(mm)
    if torch_dtype is not None and torch_dtype != t.dtype:
        t = t.view(torch_dtype)
    return mm, t


def read_manifest(path: Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not a toolkit teacher cache manifest: use another teacher_cache_dir")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"the teacher cache in {path} has format version {manifest.get('version')}, this toolkit writes "
            f"{VERSION}: delete {path} to rebuild it, or use another teacher_cache_dir"
        )
    return manifest


class CacheFiles:
    """The memory-mapped arrays of one cache directory (see the module docstring)."""

    def __init__(self, path: Path, manifest: Mapping[str, Any], create: bool = False) -> None:
        self.path = Path(path)
        self.manifest = dict(manifest)
        layout = manifest["layout"]
        storage = manifest["storage"]
        self.rows, self.views = int(layout["rows"]), int(layout["views"])
        self.num_classes, self.top_k, self.dtype = storage["num_classes"], storage["top_k"], storage["dtype"]
        self._maps: list[np.memmap] = []

        def open_(name: str, kind: str | type, shape: Sequence[int]) -> Tensor:
            mm, t = _memmap(self.path / name, kind, (self.rows, *shape), create)
            self._maps.append(mm)
            return t

        self.written = open_("written.u8", np.uint8, ())
        if self.top_k is None:
            self.logits = open_("logits.bin", self.dtype, (self.num_classes,))
        else:
            self.topk_values = open_("topk_values.bin", self.dtype, (self.top_k + 1,))
            self.topk_indices = open_("topk_indices.bin", np.int32, (self.top_k,))
        self.features = {
            key: open_(spec["file"], self.dtype, spec["shape"]) for key, spec in layout["features"].items()
        }

    @classmethod
    def create(cls, path: Path, manifest: Mapping[str, Any]) -> CacheFiles:
        """New zero-filled (sparse) files, then the manifest, written atomically last: a
        directory with a manifest always has complete files."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        files = cls(path, manifest, create=True)
        files.flush()
        tmp = path / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(_jsonable(manifest), indent=1, sort_keys=True))
        os.replace(tmp, path / MANIFEST)
        return files

    def encode_logits(self, logits: Tensor) -> Any:
        """What a row stores for these (B, C) logits."""
        if self.top_k is None:
            return logits.detach().float().cpu()
        values, indices = topk_compress(logits.detach().float().cpu(), self.top_k)
        return values, indices

    def decode_logits(self, stored: Any) -> Tensor:
        """(B, C) float32 logits from stored rows (after the storage dtype's rounding)."""
        if self.top_k is None:
            return stored.to(STORAGE[self.dtype][1]).float()
        values, indices = stored
        return topk_expand(values.to(STORAGE[self.dtype][1]), indices, self.num_classes)

    def read(self, keys: Tensor, features: Sequence[str]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(logits (B, C) float32, {feature: (B, ...) float32}, written (B,) bool) for these rows
        (rows not written are zeros)."""
        keys = keys.cpu()
        if self.top_k is None:
            logits = self.logits[keys].float()
        else:
            logits = topk_expand(self.topk_values[keys], self.topk_indices[keys], self.num_classes)
        feats = {k: self.features[k][keys].float() for k in features}
        return logits, feats, self.written[keys].bool()

    def write(self, keys: Tensor, logits: Tensor, features: Mapping[str, Tensor]) -> None:
        """Store rows (values first, the written flags last)."""
        keys = keys.cpu()
        torch_dtype = STORAGE[self.dtype][1]
        stored = self.encode_logits(logits)
        if self.top_k is None:
            self.logits[keys] = stored.to(torch_dtype)
        else:
            self.topk_values[keys] = stored[0].to(torch_dtype)
            self.topk_indices[keys] = stored[1].to(torch.int32)
        for key, table in self.features.items():
            table[keys] = features[key].detach().cpu().to(torch_dtype)
        self.written[keys] = 1

    def filled(self, keys: Tensor) -> bool:
        return bool(self.written[keys.cpu()].all())

    def flush(self) -> None:
        for mm in self._maps:
            mm.flush()
