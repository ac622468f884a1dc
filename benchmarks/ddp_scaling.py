"""Scale-out on CPU: 2-process DDP (gloo) against one process for the same global batch, and how a
KD step's cost grows with the teacher's size and with the batch (data) size.

    python -m benchmarks.ddp_scaling                  # resnet preset, 3 rounds, all cases: ~10 min on 2 idle cores
    python -m benchmarks.ddp_scaling --quick          # convnet preset, 1 round, the 3 scale-out cases: < 1 min idle
    python -m benchmarks.ddp_scaling --teachers resnet34,resnet50 --rounds 5

Work: the KD step of `benchmarks.overhead` (its presets, models, batches and optimiser are imported
from there): `DistillationModule` with 0.5·CE + 0.5·KD (τ = 4), a frozen `Teacher`, SGD, through
a real `L.Trainer` (CPU, no logger, no checkpointing, no progress bar, no validation). Presets:
`resnet` (timm `resnet18` teacher → `resnet10t` student, 3x32x32; the issue's setting) and
`convnet` (the recipes' small convnets on 1x28x28; `--quick`). Cases, at global batch `--batch`
(128) unless said:

- `ddp 2p x 1t`: `strategy="ddp"`, `accelerator="cpu"`, `devices=2` (gloo), each process with
  one intra-op thread and a batch of 64: 2 cores. Run in a fresh worker process
  (`--worker`); Lightning starts the second rank by re-running that command. The student is
  wrapped in DDP (gradients all-reduced every step); the teacher is replicated, not wrapped;
- `1p x 1t` (the reference) and `1p x 2t`: one process, batch 128, with 1 and with 2 threads;
- full run only: `1p x 1t, batch 64` (data size: time per sample at two batch sizes),
  `1p x 1t, no teacher` (the student alone, `ClassificationModule` with CE) and
  `1p x 1t, teacher NAME` for each of `--teachers` (teacher size).

Time per step is the interval between the starts of two consecutive steps (`benchmarks._steps`):
wall clock of rank 0 (the ranks run in lockstep: the all-reduce waits for the slower one) and CPU
time summed over the processes (all threads). Every round runs every case with `--warmup`
untimed steps then `--steps` timed ones; the order of the cases alternates from round to round
(the one-process cases run in this process, a fresh Trainer per round; the DDP case in a fresh
pair of processes per round); figures are medians over all timed steps.

Printed last: `ddp_scaling_vs_1thread: RATIO` (2 processes x 1 thread over 1 process x 1 thread;
2 cores against 1, ideal 0.5) and, as the last line, `ddp_scaling: RATIO (no goal; ...)`: 2
processes x 1 thread over 1 process x 2 threads, the same 2 cores used by data parallelism
instead of intra-op threads (below 1: DDP uses them better). The issue sets no goal for this one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._steps import Timings, _Ticks, set_threads, trainer_side  # noqa: E402
from benchmarks.overhead import PRESETS, Preset, make_batches, make_module  # noqa: E402

# Teacher variants per preset (the first is the preset's own, used by the scale-out cases).
TEACHERS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "resnet": {
        "resnet18": ("timm:resnet18", {"pretrained": False}),
        "resnet34": ("timm:resnet34", {"pretrained": False}),
        "resnet50": ("timm:resnet50", {"pretrained": False}),
    },
    "convnet": {
        "w16": ("convnet", {"width": 16, "depth": 3}),
        "w32": ("convnet", {"width": 32, "depth": 3}),
        "w64": ("convnet", {"width": 64, "depth": 3}),
    },
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    processes: int
    threads: int
    batch: int  # global batch: each process gets batch // processes
    teacher: str  # a key of TEACHERS[preset], or "none" (the student alone)


def preset_with(preset: str, teacher: str) -> Preset:
    p = PRESETS[preset]
    if teacher == "none":
        return p
    spec, kwargs = TEACHERS[preset][teacher]
    return dataclasses.replace(p, teacher=spec, teacher_kwargs=kwargs)


def build(preset: str, teacher: str, batch: int, count: int, seed: int = 0):
    """(module, batches): the KD module (or the student alone for teacher "none") on `count`
    in-memory batches of `batch` images."""
    p = preset_with(preset, teacher)
    batches = make_batches(p, batch, count, seed)
    case = "classification" if teacher == "none" else "kd"
    return make_module(case, p, batches[0].input[:2]), batches


def worker(spec: dict[str, Any]) -> None:
    """One DDP run (every rank executes this; Lightning starts rank 1 by re-running the command):
    each rank records its step marks to `out/rank{r}.json`."""
    set_threads(spec["threads"])
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    module, batches = build(spec["preset"], spec["teacher"], spec["batch"], spec["batches"], seed=rank)
    ticks = _Ticks()
    trainer_side(module, batches, strategy="ddp", devices=spec["processes"])(spec["n"], ticks)
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps({"marks": ticks.marks}))


def ddp_side(case: Case, args: argparse.Namespace):
    """The DDP case as a side: a fresh worker per run; rank 0's wall clock, CPU summed over ranks."""

    def run(n: int, tick: _Ticks) -> None:
        with tempfile.TemporaryDirectory() as out:
            spec = {
                "preset": args.preset,
                "teacher": case.teacher,
                "batch": case.batch // case.processes,
                "batches": args.batches,
                "threads": case.threads,
                "processes": case.processes,
                "n": n,
                "out": out,
            }
            cmd = [sys.executable, "-m", "benchmarks.ddp_scaling", "--worker", json.dumps(spec)]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise SystemExit(f"the DDP worker failed ({r.returncode}):\n{r.stderr[-3000:]}")
            ranks = [
                json.loads(Path(out, f"rank{i}.json").read_text())["marks"] for i in range(case.processes)
            ]
        # the same tick structure as a one-process side: (rank 0's wall, CPU of all ranks)
        tick.marks.extend((m[0][0], sum(r[1] for r in m)) for m in zip(*ranks))

    return run


def local_side(case: Case, args: argparse.Namespace):
    module, batches = build(args.preset, case.teacher, case.batch, args.batches)
    side = trainer_side(module, batches)

    def run(n: int, tick: _Ticks) -> None:
        set_threads(case.threads)
        side(n, tick)

    return run


def cases_of(args: argparse.Namespace) -> list[Case]:
    main_teacher = next(iter(TEACHERS[args.preset]))
    b = args.batch
    cases = [
        Case("ddp 2p x 1t", 2, 1, b, main_teacher),
        Case("1p x 1t", 1, 1, b, main_teacher),
        Case("1p x 2t", 1, 2, b, main_teacher),
    ]
    if not args.quick:
        cases += [
            Case(f"1p x 1t, batch {b // 2}", 1, 1, b // 2, main_teacher),
            Case("1p x 1t, no teacher", 1, 1, b, "none"),
        ]
        cases += [Case(f"1p x 1t, teacher {t}", 1, 1, b, t) for t in args.teachers if t != main_teacher]
    return cases


def measure(args: argparse.Namespace) -> dict[str, Timings]:
    cases = cases_of(args)
    sides = {c.name: (ddp_side(c, args) if c.processes > 1 else local_side(c, args)) for c in cases}
    out = {c.name: Timings() for c in cases}
    names = list(sides)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            ticks = _Ticks()
            sides[name](args.warmup + args.steps + 1, ticks)  # the last step only closes the last interval
            wall, cpu = ticks.intervals(args.warmup)
            out[name].wall += wall
            out[name].cpu += cpu
            print(
                f"  round {r + 1} {name:<26} median {statistics.median(wall) * 1e3:9.2f} ms/step "
                f"(CPU {statistics.median(cpu) * 1e3:9.2f} ms; load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    return out


def report(args: argparse.Namespace, t: dict[str, Timings]) -> float:
    cases = {c.name: c for c in cases_of(args)}
    ref = t["1p x 1t"].wall_median
    print("\nmedian per global step | CPU (all processes) | per sample | against 1p x 1t")
    for name, tm in t.items():
        c = cases[name]
        print(
            f"  {name:<26} {tm.wall_median * 1e3:9.2f} ms | {tm.cpu_median * 1e3:9.2f} ms | "
            f"{tm.wall_median / c.batch * 1e3:7.3f} ms | {tm.wall_median / ref:6.3f}"
        )
    ddp, one, two = (t[n].wall_median for n in ("ddp 2p x 1t", "1p x 1t", "1p x 2t"))
    print(
        f"\nprocesses: 2 processes x 1 thread take {ddp / one:.3f}x the time of 1 process x 1 thread "
        f"(ideal 0.5) and {ddp / two:.3f}x that of 1 process x 2 threads, per global step of {args.batch}"
    )
    if not args.quick:
        half = f"1p x 1t, batch {args.batch // 2}"
        per_64, per_128 = t[half].wall_median / (args.batch // 2), one / args.batch
        print(
            f"data: {per_64 * 1e3:.3f} ms per sample at batch {args.batch // 2}, {per_128 * 1e3:.3f} ms at "
            f"{args.batch} (ratio {per_64 / per_128:.2f}): an epoch of N samples costs N x the time per sample "
            f"(N / batch steps), linear in N"
        )
        alone = t["1p x 1t, no teacher"].wall_median
        main_teacher = next(iter(TEACHERS[args.preset]))
        teachers = {main_teacher: one} | {
            n.rsplit(" ", 1)[-1]: tm.wall_median for n, tm in t.items() if n.startswith("1p x 1t, teacher ")
        }
        shares = ", ".join(
            f"{k}: step {v * 1e3:.1f} ms = student {alone * 1e3:.1f} + teacher {(v - alone) * 1e3:.1f} ms"
            for k, v in teachers.items()
        )
        print(f"teacher: the student alone {alone * 1e3:.1f} ms per step; {shares}")
    print(
        f"\nddp_scaling_vs_1thread: {ddp / one:.3f} (2 processes x 1 thread over 1 process x 1 thread; ideal 0.5)"
    )
    print(f"ddp_scaling: {ddp / two:.3f} (no goal; 2 processes x 1 thread over 1 process x 2 threads)")
    return ddp / two


def main(argv: list[str] | None = None) -> float | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="resnet (default), convnet (--quick)")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--batches", type=int, default=4, help="distinct in-memory batches, cycled")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the order of the cases")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case per round")
    parser.add_argument("--teachers", help="teacher-size variants (default resnet50 | w64)")
    parser.add_argument("--quick", action="store_true", help="convnet preset, 1 round, 2 + 3 steps, 3 cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one DDP run
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return None
    if args.quick:
        args.rounds, args.warmup, args.steps = 1, 2, 3
        args.preset = args.preset or "convnet"
    args.preset = args.preset or "resnet"
    variants = TEACHERS[args.preset]
    default_teachers = list(variants)[-1]
    args.teachers = [t for t in (args.teachers or default_teachers).split(",") if t]
    unknown = sorted(set(args.teachers) - set(variants))
    if unknown:
        parser.error(
            f"unknown teachers {unknown} for preset {args.preset}; choose from {', '.join(variants)}"
        )
    if args.batch % 2:
        parser.error("--batch must be even (2 processes share it)")
    import lightning.pytorch  # noqa: F401 - imported before timing
    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    p = PRESETS[args.preset]
    print(
        f"preset {args.preset}: teacher {p.teacher} {p.teacher_kwargs}, student {p.student} {p.student_kwargs}, "
        f"{p.in_chans}x{p.size}x{p.size}, global batch {args.batch}; torch {torch.__version__}; "
        f"{args.rounds} round(s) x ({args.warmup} warm-up + {args.steps} timed steps); "
        f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    return report(args, measure(args))


if __name__ == "__main__":
    main()
