"""Teacher cache on disk: a KD training step reading the teacher's outputs from the cache, against
the same step with the live teacher and against the student trained alone.

    python -m benchmarks.teacher_cache                    # timm resnet50 -> resnet10t, batch 128, 3x32x32
    python -m benchmarks.teacher_cache --quick            # batch 32, 1 round of 2 timed steps: a minute or two
    python -m benchmarks.teacher_cache --student convnet  # the recipes' convnet (width 8) as the student
    python -m benchmarks.teacher_cache --threads 2 --rounds 5 --dtype float32

Data: `--batches-per-epoch` × `--batch` random 3x32x32 images (10 classes, seeded) in a toolkit
DataModule (in-memory tensors, `IndexSampler`), with the CIFAR augmentation (pad-4 crop + flip)
repeated every 2 epochs (`augment_views=2`), so the cache holds two views per sample. Models from
config, `pretrained=False`, 10 classes: teacher timm `resnet50` (frozen `Teacher`), student timm
`resnet10t` (or `--student convnet`); SGD (lr 0.01, momentum 0.9); terms 0.5·CE + 0.5·KD (τ = 4).

Three sides, each through a real `L.Trainer` on the DataModule's training loader (data loading
and epoch ends included, no validation, no logger), from the same initial student weights:

- `student`: `ClassificationModule` with cross-entropy: the reference;
- `kd_live`: `DistillationModule` running the teacher every step;
- `kd_cached`: the same with `teacher_cache_dir=DIR` (full logits in `--dtype`, float16 by
  default), filled before timing by `build_teacher_cache` (that pass is timed once and printed,
  not part of the ratio); every step reads its teacher logits from the memory-mapped files.

Timing (`benchmarks/_steps.py`): the interval between the starts of consecutive steps, wall
clock and process CPU time; each round runs every side with `--warmup` untimed steps then
`--steps` timed ones, the order alternating from round to round; medians over all timed steps.

Correctness, before timing: on the first `--check-batches` batches of each view, the KD loss
against the cached logits and against the live teacher's logits on the same views
(`kd_loss_agreement`): the cached loss must equal exactly the live loss on the teacher logits
rounded to the cache's dtype, and differ from the unrounded live loss by no more than the
first-order effect of that rounding; `tests/test_perf_cache.py` runs the same check.

The headline, printed last: `teacher_cache: RATIO (goal <= 1.1)` with RATIO = the cached KD
step's median wall time over the student-only step's (issue 7: a cached KD step costs at most
1.1× a student-only step).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._steps import compare, set_threads, trainer_side  # noqa: E402

GOAL = 1.1
TEMPERATURE = 4.0
OPTIMIZER = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
TERMS = {
    "ce": {"loss": "cross_entropy", "weight": 0.5},
    "kd": {"distiller": "kd", "weight": 0.5, "temperature": TEMPERATURE},
}
STUDENTS = {"resnet10t": ("timm:resnet10t", {}), "convnet": ("convnet", {"width": 8})}


def random_images(samples: int, batch: int, seed: int = 0, views: int = 2) -> Any:
    """A toolkit DataModule over `samples` random 3x32x32 uint8 images (10 classes), CIFAR
    augmentation repeated every `views` epochs."""
    import torch

    from toolkit.data.base import ClassificationDataModule, Splits
    from toolkit.data.datasets import TensorImageDataset
    from toolkit.data.images import RandomCropFlip

    class RandomImages(ClassificationDataModule):
        name = "random_images"
        num_classes = 10
        in_chans = 3
        image_size = (32, 32)
        mean = (0.5, 0.5, 0.5)
        std = (0.25, 0.25, 0.25)
        augmentation = RandomCropFlip()

        def load(self) -> Splits:
            g = torch.Generator().manual_seed(1234)
            x = torch.randint(0, 256, (samples + 64, 3, 32, 32), dtype=torch.uint8, generator=g)
            y = torch.randint(0, 10, (samples + 64,), generator=g)
            xtr, ytr, xte, yte = x[:samples], y[:samples], x[samples:], y[samples:]

            def make(indices, train: bool, test: bool):
                images, targets = (xte, yte) if test else (xtr, ytr)
                aug = self.augmentation if (train and self.augment) else None
                return TensorImageDataset(images, targets, self.mean, self.std, indices, aug, seed=self.seed)

            return Splits(ytr, yte, make)

    return RandomImages(batch_size=batch, val_split=0, augment=True, augment_views=views, seed=seed)


def kd_loss_agreement(
    teacher: Any,
    cache: Any,
    datamodule: Any,
    temperature: float = TEMPERATURE,
    batches: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Cached against live KD loss on the same views.

    For each view v (the training loader of epoch v), the first `batches` batches: the live
    teacher's logits z on the batch, the cache's logits for (index, v) (every row must be
    stored: the cache may not call the teacher), and fixed random student logits s. Per sample,
    L(z) = kd_loss(s, z, τ). Returns the largest |L(cached) − L(z)|, the rounding bound
    2·Σ_j |∂L/∂z_j|·|r(z)_j − z_j| + 1e-6·|L| (r: what the cache stores for z, i.e. its dtype's
    rounding, or the top-k rebuild), whether L(cached) == L(r(z)) exactly for every sample, and
    whether every difference is within its bound.
    """
    import torch

    from toolkit.functional.kd import kd_loss
    from toolkit.types import as_batch

    def refuse(_inputs: Any) -> Any:
        raise AssertionError("kd_loss_agreement: the cache lacks a row it should hold")

    g = torch.Generator().manual_seed(seed)
    files = cache.files
    loader = datamodule.train_dataloader()
    worst, exact, within, bound_at_worst, checked = 0.0, True, True, 0.0, 0
    for view in range(cache.views):
        loader.sampler.set_epoch(view)
        for raw in islice(loader, batches):
            b = as_batch(raw)
            live = teacher(b.input).logits.float()
            cached = cache.outputs(b.index, view, b.input, refuse).logits
            s = torch.randn(live.shape, generator=g) * 3
            z = live.detach().clone().requires_grad_(True)
            loss_live = kd_loss(s, z, temperature, reduction="none")
            (grad,) = torch.autograd.grad(loss_live.sum(), z)
            rounded = files.decode_logits(files.encode_logits(live))
            loss_cached = kd_loss(s, cached, temperature, reduction="none")
            loss_rounded = kd_loss(s, rounded, temperature, reduction="none")
            bound = 2 * (grad.abs() * (rounded - live).abs()).sum(-1) + 1e-6 * loss_live.detach().abs()
            diff = (loss_cached - loss_live.detach()).abs()
            exact &= bool(torch.equal(loss_cached, loss_rounded))
            within &= bool((diff <= bound).all())
            i = int(diff.argmax())
            if float(diff[i]) >= worst:
                worst, bound_at_worst = float(diff[i]), float(bound[i])
            checked += len(diff)
    return {
        "samples": checked,
        "max_abs_diff": worst,
        "bound_at_max": bound_at_worst,
        "equal_to_rounded": exact,
        "within_rounding": within,
    }


def make_sides(args: argparse.Namespace, cache_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from toolkit.distill import Teacher, build_teacher_cache
    from toolkit.models import create_model
    from toolkit.modules import ClassificationModule, DistillationModule

    dm = random_images(args.batch * args.batches_per_epoch, args.batch)
    dm.setup("fit")
    torch.manual_seed(0)
    teacher = Teacher(create_model("timm:resnet50", num_classes=10, in_chans=3))
    name, kwargs = STUDENTS[args.student]

    def student() -> Any:
        torch.manual_seed(1)
        return create_model(name, num_classes=10, in_chans=3, **kwargs)

    t0 = time.perf_counter()
    cache = build_teacher_cache(teacher, dm, cache_dir, dtype=args.dtype, batch_size=args.batch)
    fill_seconds = time.perf_counter() - t0
    agreement = kd_loss_agreement(teacher, cache, dm, batches=args.check_batches)
    modules = {
        "student": ClassificationModule(student(), num_classes=10, loss="cross_entropy", optimizer=OPTIMIZER),
        "kd_live": DistillationModule(student(), teacher, num_classes=10, terms=TERMS, optimizer=OPTIMIZER),
        "kd_cached": DistillationModule(
            student(),
            teacher,
            num_classes=10,
            terms=TERMS,
            optimizer=OPTIMIZER,
            teacher_cache_dir=cache_dir,
            teacher_cache_dtype=args.dtype,
        ),
    }
    sides = {k: trainer_side(m, None, datamodule=dm, limit_val_batches=0) for k, m in modules.items()}
    info = {
        "fill_seconds": fill_seconds,
        "rows": len(dm.train_sample_indices) * cache.views,
        "agreement": agreement,
        "cached_module": modules["kd_cached"],
    }
    return sides, info


def main(argv: list[str] | None = None) -> dict[str, float]:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches-per-epoch", type=int, default=8, help="training set size in batches")
    p.add_argument("--student", choices=sorted(STUDENTS), default="resnet10t")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating the side order")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side per round")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side per round")
    p.add_argument("--check-batches", type=int, default=2, help="batches per view for the loss check")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--cache-dir", help="where to build the cache (default: a temporary directory, removed)")
    p.add_argument("--quick", action="store_true", help="batch 32, 4 batches per epoch, 1 round of 1+2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.batches_per_epoch, args.rounds, args.warmup, args.steps = 32, 4, 1, 1, 2
        args.check_batches = 1
    threads = set_threads(args.threads)
    print(
        f"teacher timm resnet50, student {args.student}, 3x32x32, batch {args.batch}, "
        f"{args.batches_per_epoch} batches per epoch, 2 views, cache dtype {args.dtype}, {threads} thread(s); "
        f"{args.rounds} round(s) x ({args.warmup} + {args.steps}) steps; load {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs",
        flush=True,
    )
    tmp = None if args.cache_dir else tempfile.mkdtemp(prefix="teacher_cache_")
    cache_dir = Path(args.cache_dir or tmp)
    try:
        sides, info = make_sides(args, cache_dir)
        a = info["agreement"]
        print(
            f"cache filled: {info['rows']} rows (samples x views) in {info['fill_seconds']:.1f} s\n"
            f"cached vs live KD loss on the same views ({a['samples']} samples): max |diff| {a['max_abs_diff']:.3g} "
            f"(fp16-rounding bound there {a['bound_at_max']:.3g}); within rounding: {a['within_rounding']}; "
            f"equal to the live loss on the stored logits: {a['equal_to_rounded']}",
            flush=True,
        )
        if not (a["within_rounding"] and a["equal_to_rounded"]):
            raise SystemExit("cached and live KD losses disagree beyond the storage rounding")
        timings = compare(sides, args.rounds, args.warmup, args.steps)
        misses = info["cached_module"].teacher_cache.misses
        if misses:
            raise SystemExit(f"the cached side ran the teacher on {misses} rows: the cache was not complete")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ref = timings["student"]
    ratios = {name: t.wall_median / ref.wall_median for name, t in timings.items()}
    print("\nmedian per step (wall, CPU) and wall ratio to the student-only step:")
    for name, t in timings.items():
        print(
            f"  {name:<10} wall {t.wall_median * 1e3:8.1f} ms  CPU {t.cpu_median * 1e3:8.1f} ms  "
            f"ratio {ratios[name]:6.3f}"
        )
    print(f"  kd_cached / kd_live: {ratios['kd_cached'] / ratios['kd_live']:.3f}")
    print()
    print(f"teacher_cache: {ratios['kd_cached']:.3f} (goal <= {GOAL})")
    return ratios


if __name__ == "__main__":
    main()
