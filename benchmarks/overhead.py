"""The toolkit's training step through the Lightning Trainer against a hand-written PyTorch loop
doing the same work: the overhead the toolkit adds.

    python -m benchmarks.overhead                     # resnet18 -> resnet10t, batch 128, 3x32x32 (the issue's setting)
    python -m benchmarks.overhead --quick             # one round of 3 timed steps per side: a minute or two
    python -m benchmarks.overhead --preset convnet    # the recipes' small convnets on 1x28x28: per-step work shows
    python -m benchmarks.overhead --preset convnet --profile kd   # cProfile of our side's steps, then exit
    python -m benchmarks.overhead --cases kd --threads 2 --rounds 7

Three cases, each ours against its hand-written twin, on the same data (`--batches` distinct
random batches of `--batch` images held in memory, cycled), with models built from config
(`create_model`, `pretrained=False`, 10 classes) twice from the same seeds, so both sides start
from the same weights, and the same optimiser (SGD, lr 0.01, momentum 0.9):

- `kd`: `DistillationModule` with 0.5·CE + 0.5·KD (τ = 4) and a frozen `Teacher`, against a loop
  that runs the teacher under `no_grad` in eval mode, the student, `F.cross_entropy` and
  `F.kl_div(..., log_target=True, reduction="batchmean")·τ²`, backward, `opt.step()`;
- `classification`: `ClassificationModule` with cross-entropy against the plain loop;
- `fitnet`: `DistillationModule` with CE + 100·FitNet (its 1x1-conv + BN projector, built by the
  module's dry run) against a loop with forward hooks on the same layers and a copy of that
  projector (`F.mse_loss(relu(proj(F_s)), F_t)`).

Before timing, each case checks that both sides compute the same loss on the first batch (so
the loop is the same work). Ours runs through a real `L.Trainer` (CPU, no logger, no
checkpointing, no progress bar, `enable_model_summary=False`, no validation), a fresh Trainer per
round; time per step is the interval between the starts of two consecutive steps, wall clock and
process CPU time (all threads). Every round runs both sides with `--warmup` untimed steps then
`--steps` timed ones, in alternating order from round to round; the figures are medians over all
timed steps. The headline ratio is ours over the hand-written loop's median wall time per step,
printed last, one line per case: `overhead_<case>: RATIO (goal <= 1.05)`.

Presets: `resnet` (default; the issue's: timm `resnet18` teacher, `resnet10t` student, batch
128, 3x32x32, fitnet on `layer3` of both) and `convnet` (the recipes' demonstration models:
`convnet` width 16 depth 3 teacher, width 8 student, 1x28x28, fitnet on `features.7`): on these
small models a step lasts milliseconds, so the toolkit's per-step Python work is visible.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._steps import (  # noqa: E402
    apply_quick,
    compare,
    loop_side,
    quiet_lightning,
    set_threads,
    timing_parser,
    trainer_side,
)

CASES = ("kd", "classification", "fitnet")
GOAL = 1.05
OPTIMIZER = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
TEMPERATURE = 4.0
HINT_WEIGHT = 100.0


@dataclass(frozen=True)
class Preset:
    teacher: str
    student: str
    in_chans: int
    size: int
    fitnet_layers: tuple[str, str]  # (student, teacher)
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student_kwargs: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    "resnet": Preset(
        "timm:resnet18",
        "timm:resnet10t",
        3,
        32,
        ("layer3", "layer3"),
        {"pretrained": False},
        {"pretrained": False},
    ),
    "convnet": Preset(
        "convnet", "convnet", 1, 28, ("features.7", "features.7"), {"width": 16, "depth": 3}, {"width": 8}
    ),
}


def build_nets(p: Preset, seed: int = 0):
    """(teacher, student), the same weights for the same seed."""
    import torch

    from toolkit.models import create_model

    torch.manual_seed(seed)
    teacher = create_model(p.teacher, num_classes=10, in_chans=p.in_chans, **p.teacher_kwargs)
    torch.manual_seed(seed + 1)
    student = create_model(p.student, num_classes=10, in_chans=p.in_chans, **p.student_kwargs)
    return teacher, student


def make_batches(p: Preset, batch: int, count: int, seed: int = 0) -> list:
    import torch

    from toolkit.types import Batch

    g = torch.Generator().manual_seed(seed)
    return [
        Batch(
            torch.randn(batch, p.in_chans, p.size, p.size, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
            torch.arange(i * batch, (i + 1) * batch),
        )
        for i in range(count)
    ]


def terms_of(case: str, p: Preset) -> Any:
    if case == "classification":
        return "cross_entropy"
    if case == "kd":
        return {
            "ce": {"loss": "cross_entropy", "weight": 0.5},
            "kd": {"distiller": "kd", "weight": 0.5, "temperature": TEMPERATURE},
        }
    return {
        "ce": {"loss": "cross_entropy", "weight": 1.0},
        "fitnet": {
            "distiller": "fitnet",
            "weight": HINT_WEIGHT,
            "student_layer": p.fitnet_layers[0],
            "teacher_layer": p.fitnet_layers[1],
        },
    }


def make_module(case: str, p: Preset, example: Any, seed: int = 0, **module_kw: Any):
    """Our module for `case`, prepared (taps installed, projector sized) on `example`."""
    from toolkit.distill import Teacher
    from toolkit.modules import ClassificationModule, DistillationModule

    teacher, student = build_nets(p, seed)
    if case == "classification":
        module = ClassificationModule(
            student, num_classes=10, loss=terms_of(case, p), optimizer=OPTIMIZER, **module_kw
        )
    else:
        module = DistillationModule(
            student,
            Teacher(teacher),
            num_classes=10,
            terms=terms_of(case, p),
            optimizer=OPTIMIZER,
            **module_kw,
        )
    module.prepare(example)
    return module


def hand_written(case: str, p: Preset, module: Any, seed: int = 0):
    """(loss_of(batch), step(batch)): the same work as `module`'s training step, in plain PyTorch,
    on fresh networks with the same weights (and, for fitnet, a copy of the module's projector)."""
    import torch
    import torch.nn.functional as F

    teacher, student = build_nets(p, seed)
    teacher.eval().requires_grad_(False)
    student.train()
    params = list(student.parameters())
    feats: dict[str, Any] = {}
    if case == "fitnet":
        proj = copy.deepcopy(module.loss_terms["fitnet"].projectors["hint"]).train()
        params += list(proj.parameters())
        student.get_submodule(p.fitnet_layers[0]).register_forward_hook(
            lambda m, i, o: feats.__setitem__("s", o)
        )
        teacher.get_submodule(p.fitnet_layers[1]).register_forward_hook(
            lambda m, i, o: feats.__setitem__("t", o)
        )
    opt = torch.optim.SGD(params, lr=OPTIMIZER["lr"], momentum=OPTIMIZER["momentum"])

    def loss_of(batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if case == "classification":
            return F.cross_entropy(student(x), y)
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        ce = F.cross_entropy(s, y)
        if case == "kd":
            log_ps = F.log_softmax(s / TEMPERATURE, dim=-1)
            log_pt = F.log_softmax(t / TEMPERATURE, dim=-1)
            kd = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * TEMPERATURE**2
            return 0.5 * ce + 0.5 * kd
        hint = F.mse_loss(F.relu(proj(feats.pop("s"))), feats.pop("t"))
        return ce + HINT_WEIGHT * hint

    def step(batch) -> None:
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return loss_of, step


def check_same_work(case: str, module: Any, loss_of: Any, batch: Any) -> None:
    """Both sides give the same loss on `batch` from the same weights (one train-mode forward
    each: the BatchNorm statistics move the same way on both)."""
    import torch

    with torch.no_grad():
        ours = float(module.training_step(batch, 0)["loss"])
        theirs = float(loss_of(batch))
    if abs(ours - theirs) > 1e-4 * max(1.0, abs(theirs)):
        raise SystemExit(
            f"{case}: the two sides compute different losses ({ours} vs {theirs}): not the same work"
        )
    print(f"  {case}: same loss on the first batch (ours {ours:.6f}, hand-written {theirs:.6f})", flush=True)


def profile(case: str, p: Preset, batches: list, steps: int) -> None:
    """cProfile of our side's steps (after a warm-up run), sorted by own time, then cumulative."""
    import cProfile
    import pstats

    from benchmarks._steps import _Ticks

    module = make_module(case, p, batches[0].input[:2])
    run = trainer_side(module, batches)
    run(3, _Ticks())
    prof = cProfile.Profile()
    prof.enable()
    run(steps, _Ticks())
    prof.disable()
    stats = pstats.Stats(prof).strip_dirs()
    print(f"\n{case}: {steps} steps through the Trainer (setup included), by own time")
    stats.sort_stats("tottime").print_stats(30)
    print("by cumulative time")
    stats.sort_stats("cumulative").print_stats(45)


def main(argv: list[str] | None = None) -> dict[str, float]:
    import os

    import torch

    parser = timing_parser(__doc__.splitlines()[0], rounds=5)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="resnet")
    parser.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    parser.add_argument("--profile", metavar="CASE", help="cProfile our side of CASE and exit")
    args = apply_quick(parser.parse_args(argv))
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES) | ({args.profile} - set(CASES) if args.profile else set()))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    quiet_lightning()
    threads = set_threads(args.threads)
    p = PRESETS[args.preset]
    batches = make_batches(p, args.batch, args.batches)
    print(
        f"preset {args.preset}: teacher {p.teacher} {p.teacher_kwargs}, student {p.student} {p.student_kwargs}, "
        f"batch {args.batch}x{p.in_chans}x{p.size}x{p.size}, {threads} thread(s), torch {torch.__version__}; "
        f"{args.rounds} round(s) x ({args.warmup} warm-up + {args.steps} timed steps); "
        f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    if args.profile:
        profile(args.profile, p, batches, max(args.steps, 20))
        return {}
    ratios: dict[str, float] = {}
    rows = []
    for case in cases:
        module = make_module(case, p, batches[0].input[:2])
        loss_of, step = hand_written(case, p, module)
        check_same_work(case, module, loss_of, batches[0])
        t = compare(
            {"ours": trainer_side(module, batches), "hand-written": loop_side(step, batches)},
            args.rounds,
            args.warmup,
            args.steps,
            label=f"{case:<15}",
        )
        ours, ref = t["ours"], t["hand-written"]
        ratios[case] = ours.wall_median / ref.wall_median
        rows.append((case, ours, ref))
    print("\nmedian per step: ours (Trainer) | hand-written loop | wall ratio | CPU ratio")
    for case, ours, ref in rows:
        print(
            f"  {case:<15} {ours.wall_median * 1e3:9.2f} ms | {ref.wall_median * 1e3:9.2f} ms | "
            f"{ours.wall_median / ref.wall_median:6.3f} | {ours.cpu_median / max(ref.cpu_median, 1e-12):6.3f}"
        )
    print()
    for case in cases:
        print(f"overhead_{case}: {ratios[case]:.3f} (goal <= {GOAL})")
    return ratios


if __name__ == "__main__":
    main()
