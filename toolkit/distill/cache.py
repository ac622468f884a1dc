"""`TeacherCache`: the teacher's logits remembered per (sample index, augmentation view).

A frozen teacher gives the same logits for the same input, so after the first pass over the
data its forward passes can be skipped: logit-only distillers (kd, dkd, nkd, pld, sinkd, ...)
then cost about as much as training the student alone.

Unlike caches keyed by the sample index alone (which replay one random crop's logits for every
other crop), the key here is (index, view). Without augmentation there is one view per sample.
With augmentation, the DataModule's `augment_views=K` makes a sample's random view in epoch e
the one of epoch e mod K (`toolkit.data.IndexSampler(views=K)`), and the cache stores the
teacher's logits for each of the K views; the module refuses a cache on randomly augmented data
without views, since its entries would not match the inputs.

The table is a `SampleMemory` (rows of C logits, keyed by index·K + view): saved in checkpoints so
a resumed run reads exactly the logits the interrupted one would have (a teacher evaluated on a
different batch can differ in the last bits), and grown on demand. Under DDP each process caches
the samples it sees (no gathering: a process whose batch is fully cached must not wait for the
others); as the sampler reshuffles every epoch, each process fills its table within a few epochs.
Checkpoints are written by rank 0, so a resumed run starts from rank 0's table on every rank;
entries are valid wherever they came from.

In memory only logits are cached: a term that reads teacher features or the teacher's embedding
needs the live teacher (or the cache on disk), and the module says so at set-up.

**On disk** (`TeacherCache(directory=PATH)`, `DistillationModule(teacher_cache_dir=PATH)`): the
same (index, view) rows, in memory-mapped files under PATH that outlive the run
(`toolkit.distill.cache_store` describes the files). A row holds either the full logits (the
default up to 100 classes, `top_k=None`) or the top-k logits and one fill value from which the
KD target is rebuilt (FKD's marginal smoothing: top-k probabilities exact, the remaining mass
spread uniformly; the default above 100 classes, k = 10), plus the teacher features the terms
tap (so feature distillers are served too). A `written` byte per row says which rows are filled.
The directory's manifest fingerprints the teacher's weights, the training data and the
transforms; a run whose teacher, data or transforms differ is refused at set-up with a
`ValueError` naming what differs. Two ways to fill it:
- record (default): rows are written as training first sees them and read in later epochs;
- precompute: `build_teacher_cache(teacher, datamodule, PATH)` before training, or
  `DistillationModule(teacher_cache_fill="precompute")`, which runs the pass in `on_train_start`;
  only missing rows are computed, so an interrupted pass resumes.
A later run on the same directory (a new process, a resumed run, another logit distiller) reads
every row and never runs the teacher, not even for the dry run (`example_output`). Rows handed
to the loss are always the stored ones (after the storage dtype's rounding and the top-k
rebuild), also in the epoch that writes them: a run reading a complete cache trains bit for bit
like the run that recorded it, and record and precompute train alike (up to the last bits a
teacher's output may change with its batch's composition).
Under DDP every rank maps the same files and writes the rows of the samples its sampler deals
it (disjoint), with no collective call on reads or writes; rank 0 creates the files at set-up
(a barrier there, and one after a precompute pass), and every rank flushes at each epoch end. The files are shared through the
page cache, so record mode needs the ranks on one machine (or a file system that keeps
memory-mapped files coherent); across machines, precompute first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from toolkit.distill.cache_store import (
    FORMAT,
    STORAGE,
    VERSION,
    CacheFiles,
    check_manifest,
    data_identity,
    read_manifest,
    resolve_top_k,
    storage_identity,
    teacher_identity,
    training_indices,
    transform_identity,
)
from toolkit.distill.memory import SampleMemory
from toolkit.types import ModelOutput, as_batch, to_device_input


def select_rows(inputs: Any, mask: Tensor) -> Any:
    """The rows of a batch input where `mask` is true: a tensor, or a dict of tensors (tokenised text)."""
    if isinstance(inputs, Tensor):
        return inputs[mask]
    if isinstance(inputs, dict):
        return {k: v[mask] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    raise TypeError(f"TeacherCache can only split tensor or dict inputs, got {type(inputs).__name__}")


def cache_views(datamodule: Any) -> tuple[int, str | None]:
    """(K, problem): the views a cache keeps for this DataModule (1 without augmentation), and
    why it cannot serve it (None: it can)."""
    views = getattr(datamodule, "augment_views", None)
    if getattr(datamodule, "augment", False):
        if views is None:
            return 1, (
                "random augmentation would replay one view's teacher logits for another: set the "
                "DataModule's augment_views=K (the augmentation repeats every K epochs and K views are cached) "
                "or augment=False"
            )
        return int(views), None
    return 1, None


def feature_keys(teacher: Any, paths: Sequence[str]) -> list[str]:
    """The keys under which `teacher` reports the features tapped at `paths` (`"{i}:{path}"` for
    an ensemble's member i)."""
    nets = getattr(teacher, "nets", [teacher])
    if len(nets) > 1:
        return [f"{i}:{p}" for i in range(len(nets)) for p in paths]
    return list(paths)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def batch_rows(inputs: Any) -> int:
    """The number of samples in a batch input (a tensor, or a dict of tensors)."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        return next(v for v in inputs.values() if isinstance(v, Tensor)).shape[0]
    return len(inputs)


def _storage_name(dtype: torch.dtype | str | None, top_k: int | None) -> str:
    if dtype is None:
        return "float16" if top_k is not None else "float32"
    if isinstance(dtype, str):
        name = dtype
    else:
        name = next((n for n, (_, t) in STORAGE.items() if t == dtype), str(dtype))
    if name not in STORAGE:
        raise ValueError(f"teacher cache dtype must be one of {sorted(STORAGE)}, got {dtype!r}")
    return name


class TeacherCache(nn.Module):
    """Teacher logits per (sample index, view), computed once and then read back.

    Args:
        num_classes: C, the width of the cached logits.
        views: K ≥ 1, the number of augmentation views per sample (1 without augmentation);
            must equal the DataModule's `augment_views` when it augments.
        dtype: storage type; float16/bfloat16 halve the memory (N·K·C values) at a small
            rounding cost, float32 keeps the live teacher's values exactly. Default (None):
            float32, except float16 for a top-k cache on disk.
        directory: None (default): an in-memory table saved in checkpoints. A path: the cache
            on disk (see the module docstring); open it with `attach` + `create` (the module
            does at set-up) or build it with `build_teacher_cache`.
        top_k: on disk only: None (full logits), k (the top-k logits and the fill value), or
            "auto" (default: full logits up to 100 classes, k = 10 above).
    """

    def __init__(
        self,
        num_classes: int,
        views: int = 1,
        dtype: torch.dtype | str | None = None,
        directory: str | Path | None = None,
        top_k: int | str | None = "auto",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an integer >= 1, got {views!r}")
        self.num_classes = num_classes
        self.views = views
        self.hits = 0
        self.misses = 0
        self.directory = None if directory is None else Path(directory)
        if self.directory is None:
            if top_k not in ("auto", None):
                raise ValueError("top_k applies to the teacher cache on disk: give a directory too")
            self.top_k = None
            self.table = SampleMemory(num_classes, dtype=STORAGE[_storage_name(dtype, None)][1])
        else:
            self.top_k = resolve_top_k(top_k, num_classes)
            self.storage = _storage_name(dtype, self.top_k)
            self.files: CacheFiles | None = None
            self.feature_names: tuple[str, ...] = ()
            self._expected: dict[str, Any] | None = None
            self._train_keys: Tensor | None = None

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    def set_views(self, views: int) -> None:
        """Fix K from the DataModule; an error if a restored table was built with another K."""
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an integer >= 1, got {views!r}")
        if views != self.views and not self.on_disk and bool(self.table.written.any()):
            raise ValueError(
                f"the teacher cache holds entries for {self.views} augmentation view(s) but the data now has "
                f"{views}: keep augment_views as in the run that filled it, or start without its checkpoint"
            )
        self.views = views
        self._views_set = True

    def get_extra_state(self) -> Any:
        return {"views": self.views}

    def set_extra_state(self, state: Any) -> None:
        views = int(state["views"])
        if getattr(self, "_views_set", False) and views != self.views:
            raise ValueError(
                f"the checkpoint's teacher cache was filled with {views} augmentation view(s), this run's data "
                f"has {self.views}: keep augment_views as in that run, or resume without the cache"
            )
        self.views = views

    def keys(self, index: Tensor, epoch: int) -> Tensor:
        return index.long() * self.views + epoch % self.views

    def logits(self, index: Tensor, epoch: int, inputs: Any, teacher: Callable[[Any], Tensor]) -> Tensor:
        """(B, C) teacher logits for this batch: cached rows, and `teacher(inputs[missing])` for
        the rest, which are stored."""
        if self.on_disk:
            return self.outputs(index, epoch, inputs, lambda x: ModelOutput(teacher(x))).logits
        keys = self.keys(index, epoch)
        rows, written = self.table.read(keys)
        missing = ~written
        n_missing = int(missing.sum())
        self.hits += len(keys) - n_missing
        self.misses += n_missing
        if n_missing == 0:
            return rows.float()
        live = teacher(inputs if n_missing == len(keys) else select_rows(inputs, missing)).float()
        if live.shape[-1] != self.num_classes:
            raise ValueError(
                f"the teacher gives {live.shape[-1]} logits, the cache was built for {self.num_classes}"
            )
        self.table.write(keys[missing], live, gather=False)
        out = rows.float()
        out[missing] = live
        return out

    # -- on disk ----------------------------------------------------------------------------
    def attach(self, teacher: Any, datamodule: Any, features: Sequence[str] = ()) -> None:
        """Fingerprint this run (teacher weights, data, transforms, storage) and, when the
        directory holds a cache, check it against the fingerprint and map its files. `features`:
        the teacher feature keys the terms read. Every DDP rank calls it (no collective)."""
        self._need_disk()
        indices, _ = training_indices(datamodule)
        self._train_keys = (indices[:, None] * self.views + torch.arange(self.views)).flatten()
        self._expected = {
            "teacher": teacher_identity(teacher),
            "data": data_identity(datamodule),
            "transforms": transform_identity(datamodule, self.views),
            "storage": storage_identity(self.num_classes, self.top_k, self.storage),
        }
        self.feature_names = tuple(features)
        self.files = None
        manifest = read_manifest(self.directory)
        if manifest is not None:
            self.files = self._check_and_map(manifest)

    def create(self, feature_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        """Create the files when the directory has none (rank 0 under DDP, the others wait at the
        one barrier), then check the stored feature shapes against `feature_shapes` (per sample,
        from the dry run). Call after `attach`, on every rank."""
        if self._expected is None:
            raise RuntimeError("TeacherCache.create needs attach(teacher, datamodule) first")
        if self.files is None:
            rank, _ = _rank_world()
            error: Exception | None = None
            if rank == 0:
                try:
                    if read_manifest(self.directory) is None:
                        CacheFiles.create(self.directory, self._manifest(feature_shapes or {}))
                except Exception as e:  # raised after the barrier, so no rank waits forever
                    error = e
            _barrier()
            if error is not None:
                raise error
            manifest = read_manifest(self.directory)
            if manifest is None:
                raise RuntimeError(
                    f"rank 0 failed to create the teacher cache in {self.directory} (see its error)"
                )
            self.files = self._check_and_map(manifest)
        else:
            _barrier()
        stored = self.files.manifest["layout"]["features"]
        for key, shape in (feature_shapes or {}).items():
            if key in stored and list(stored[key]["shape"]) != list(shape):
                raise ValueError(
                    f"the teacher cache in {self.directory} stores teacher feature {key!r} with shape "
                    f"{tuple(stored[key]['shape'])}, this run's teacher gives {tuple(shape)}: use another "
                    "teacher_cache_dir, or delete it to rebuild the cache"
                )

    def _manifest(self, feature_shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        missing = [k for k in self.feature_names if k not in feature_shapes]
        if missing:
            raise ValueError(
                f"the teacher cache needs the shapes of the teacher features {missing} to create its files"
            )
        bound = self._expected["data"]["index_bound"]
        features = {
            key: {"file": f"feature_{j}.bin", "shape": [int(d) for d in feature_shapes[key]]}
            for j, key in enumerate(self.feature_names)
        }
        return {
            "format": FORMAT,
            "version": VERSION,
            "layout": {
                "rows": bound * self.views,
                "views": self.views,
                "index_bound": bound,
                "features": features,
            },
            **self._expected,
        }

    def _check_and_map(self, manifest: Mapping[str, Any]) -> CacheFiles:
        check_manifest(manifest, self._expected, self.directory)
        stored = manifest["layout"]["features"]
        missing = [k for k in self.feature_names if k not in stored]
        if missing:
            raise ValueError(
                f"the teacher cache in {self.directory} stores the teacher features {sorted(stored)}, but this run's "
                f"terms also read {missing}: use another teacher_cache_dir (a cache is filled for one set of "
                "features), or delete it to rebuild the cache"
            )
        files = CacheFiles(self.directory, manifest)
        extra = [k for k in stored if k not in self.feature_names]
        if extra and not files.filled(self._train_keys):
            raise ValueError(
                f"the teacher cache in {self.directory} also stores the teacher features {extra}, which this run "
                "does not tap, and is not complete, so this run could not fill its missing rows: tap the same "
                "features, use another teacher_cache_dir, or delete it to rebuild the cache"
            )
        return files

    def _need_disk(self) -> None:
        if not self.on_disk:
            raise RuntimeError("this TeacherCache lives in memory: give it a directory for the files on disk")

    def _opened(self) -> CacheFiles:
        self._need_disk()
        if self.files is None:
            raise RuntimeError(
                f"the teacher cache in {self.directory} is not open: the module opens it at set-up "
                "(trainer.fit), or call attach(teacher, datamodule) and create()"
            )
        return self.files

    @property
    def complete(self) -> bool:
        """Every (training sample, view) row is written (on disk)."""
        return self.files is not None and self.files.filled(self._train_keys)

    def outputs(
        self, index: Tensor, epoch: int, inputs: Any, teacher: Callable[[Any], ModelOutput]
    ) -> ModelOutput:
        """The teacher's output for this batch (logits and the cached features), on the index's
        device: stored rows, and `teacher(inputs[missing])` for the rest, which are stored and
        returned as stored (rounded / top-k rebuilt)."""
        if not self.on_disk:
            return ModelOutput(self.logits(index, epoch, inputs, lambda x: teacher(x).logits))
        files = self._opened()
        keys = self.keys(index, epoch).cpu()
        logits, feats, written = files.read(keys, self.feature_names)
        missing = ~written
        n_missing = int(missing.sum())
        self.hits += len(keys) - n_missing
        self.misses += n_missing
        if n_missing:
            rows = inputs if n_missing == len(keys) else select_rows(inputs, missing.to(index.device))
            live = teacher(rows)
            self._check_live(live)
            files.write(keys[missing], live.logits, live.features)
            logits[missing] = files.decode_logits(files.encode_logits(live.logits))
            storage = STORAGE[files.dtype][1]
            for k in feats:
                feats[k][missing] = live.features[k].detach().cpu().to(storage).float()
        device = index.device
        return ModelOutput(logits.to(device), None, {k: v.to(device) for k, v in feats.items()})

    def _check_live(self, live: ModelOutput) -> None:
        if live.logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the teacher gives {live.logits.shape[-1]} logits, the cache was built for {self.num_classes}"
            )
        absent = [k for k in self.files.features if k not in live.features]
        if absent:
            raise ValueError(
                f"the teacher cache stores teacher features {absent} but the teacher did not produce them: "
                "tap them (the module does for the terms' teacher_features)"
            )

    def example_output(self, n: int) -> ModelOutput | None:
        """The stored outputs of the first `n` training rows when the cache is complete (the
        module's dry run then needs no teacher forward); None otherwise."""
        if not self.complete:
            return None
        logits, feats, _ = self.files.read(self._train_keys[:n], self.feature_names)
        return ModelOutput(logits, None, feats)

    @torch.no_grad()
    def fill(
        self,
        teacher: Callable[[Any], ModelOutput],
        datamodule: Any,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> int:
        """Precompute: run `teacher` on every (training sample, view) row not written yet, in
        key order; under DDP this process takes every world-size-th row, then waits for the
        others. Returns the number of rows written here."""
        files = self._opened()
        dm = datamodule
        indices, _ = training_indices(dm)
        k = self.views
        pairs = [(pos, v) for pos in range(len(indices)) for v in range(k)]
        keys = (indices[:, None] * k + torch.arange(k)).flatten()
        rank, world = _rank_world()
        written = files.written[keys].bool()
        mine = [j for j in range(rank, len(pairs), world) if not written[j]]
        size = batch_size or getattr(dm, "eval_batch_size", None) or 256
        loader = torch.utils.data.DataLoader(
            dm.train_set,
            batch_size=size,
            sampler=[pairs[j] for j in mine],
            collate_fn=getattr(dm, "collate_fn", None),
            num_workers=getattr(dm, "num_workers", 0),
        )
        done = 0
        for start, raw in zip(range(0, len(mine), size), loader):
            b = as_batch(raw)
            chunk = torch.tensor(mine[start : start + size], dtype=torch.long)
            if b.index is None or not torch.equal(b.index.long().cpu(), indices[chunk // k]):
                raise ValueError(
                    "the training set's items do not carry the indices of train_sample_indices in order: the "
                    "precompute pass cannot key its rows"
                )
            out = teacher(b.input if device is None else to_device_input(b.input, torch.device(device)))
            self._check_live(out)
            files.write(keys[chunk], out.logits, out.features)
            done += len(chunk)
        files.flush()
        _barrier()
        return done

    def flush(self) -> None:
        """Write the mapped pages to disk (each epoch end)."""
        if self.on_disk and self.files is not None:
            self.files.flush()

    def extra_repr(self) -> str:
        if self.on_disk:
            return (
                f"num_classes={self.num_classes}, views={self.views}, directory={str(self.directory)!r}, "
                f"top_k={self.top_k}, dtype={self.storage}"
            )
        return f"num_classes={self.num_classes}, views={self.views}, entries={int(self.table.written.sum())}"


def build_teacher_cache(
    teacher: Any,
    datamodule: Any,
    path: str | Path,
    *,
    top_k: int | str | None = "auto",
    dtype: torch.dtype | str | None = None,
    features: Sequence[str] = (),
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> TeacherCache:
    """Precompute the teacher cache on disk in `path` for `datamodule`'s training set: the
    teacher's output for every (sample, view) row not stored yet (K views when the DataModule
    augments with `augment_views=K`). A training run with `DistillationModule(teacher_cache_dir=
    path)` on the same teacher, data and transforms then never runs the teacher.

    Args:
        teacher: a `Teacher` or an `nn.Module` (wrapped in one).
        features: teacher module paths whose outputs to store too (those a feature term taps);
            taps installed for the pass are removed afterwards.
        top_k, dtype: as `TeacherCache`.
        batch_size: teacher batch (default: the DataModule's evaluation batch size).
        device: where the teacher runs (default: where its first parameter is).
    Under DDP call it on every rank: each computes its share of the rows.
    """
    from toolkit.distill.teacher import Teacher

    t = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
    dm = datamodule
    if hasattr(dm, "setup"):
        dm.setup("fit")
    views, problem = cache_views(dm)
    if problem is not None:
        raise ValueError(f"build_teacher_cache cannot serve this data: {problem}")
    if device is None:
        net = next((n for n in t.nets if isinstance(n, nn.Module)), None)
        param = next(iter(net.parameters()), None) if net is not None else None
        device = param.device if param is not None else None
    num_classes = t.num_classes or getattr(dm, "num_classes", None)
    if not num_classes:
        raise ValueError(
            "build_teacher_cache needs the class count: the teacher and the DataModule declare none"
        )
    cache = TeacherCache(num_classes, views, dtype=dtype, directory=path, top_k=top_k)
    if features:
        t.tap(list(features))
    try:
        cache.attach(t, dm, feature_keys(t, list(features)))
        shapes = None
        if cache.files is None and features:
            example = dm.example_input()
            out = t(example if device is None else to_device_input(example, torch.device(device)))
            shapes = {k: tuple(v.shape[1:]) for k, v in out.features.items()}
        cache.create(shapes)
        cache.fill(t, dm, batch_size=batch_size, device=device)
    finally:
        if features:
            t.tap([])
    return cache
