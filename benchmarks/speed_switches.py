"""Each speed switch's training step against the default step: the ratio of their times.

    python -m benchmarks.speed_switches                    # KD, resnet18 -> resnet10t, batch 128, 3x32x32
    python -m benchmarks.speed_switches --quick            # one round of 3 timed steps per side
    python -m benchmarks.speed_switches --preset convnet   # the recipes' small convnets on 1x28x28
    python -m benchmarks.speed_switches --switches channels_last,teacher_bf16 --case fitnet

The step is `benchmarks.overhead`'s (same presets, data, models and optimiser): by default the
`kd` case, a `DistillationModule` (0.5·CE + 0.5·KD, frozen teacher) through a real `L.Trainer`.
For every switch, a module built from the same seeds with the switch on runs against the
default module, alternating round by round, `--warmup` untimed steps first in every run (the
first run's warm-up also pays torch.compile's compilation); figures are medians of the per-step
times, wall clock and process CPU time. The switches are the recipes' flags:

- `channels_last` (`--channels-last`): `SpeedSwitches(channels_last=True)`;
- `compile` (`--compile`): `SpeedSwitches(compile=True)`, the student's forward (inductor);
- `compile_teacher` (`--compile-teacher`): `SpeedSwitches(compile_teacher=True)`;
- `bf16_mixed` (`--precision bf16-mixed`): `Trainer(precision="bf16-mixed")` (`16-mixed` is the
  same on CPU: Lightning runs it as bf16-mixed);
- `teacher_bf16`, `teacher_16` (`--teacher-precision bf16|16`): the teacher's weights and forward
  in bf16 / fp16 (`Teacher` precision "bf16-true" / "16-true").

No goal: the last lines are `speed_<switch>: RATIO` (switch over default; below 1 is faster). On
CPUs without native bf16/fp16 arithmetic (no AVX-512 BF16 / AMX) the low precisions are emulated
and slower; their use is memory, and GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._steps import apply_quick, compare, quiet_lightning, set_threads, timing_parser, trainer_side  # noqa: E402
from benchmarks.overhead import CASES, PRESETS, make_batches, make_module  # noqa: E402

SWITCHES = ("channels_last", "compile", "compile_teacher", "bf16_mixed", "teacher_bf16", "teacher_16")
TEACHER_SWITCHES = {"compile_teacher", "teacher_bf16", "teacher_16"}


def switch_trainer_kw(switch: str) -> dict[str, Any]:
    """The Trainer arguments that turn `switch` on."""
    from toolkit.callbacks import SpeedSwitches

    if switch == "bf16_mixed":
        return {"precision": "bf16-mixed"}
    options = {
        "channels_last": {"channels_last": True},
        "compile": {"compile": True},
        "compile_teacher": {"compile_teacher": True},
        "teacher_bf16": {"teacher_precision": "bf16-true"},
        "teacher_16": {"teacher_precision": "16-true"},
    }[switch]
    return {"callbacks": [SpeedSwitches(**options)]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    import torch

    parser = timing_parser(__doc__.splitlines()[0], rounds=3)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="resnet")
    parser.add_argument("--case", choices=CASES, default="kd", help="the step (see benchmarks.overhead)")
    parser.add_argument("--switches", default=",".join(SWITCHES), help=f"subset of {','.join(SWITCHES)}")
    args = apply_quick(parser.parse_args(argv))
    switches = [s for s in args.switches.split(",") if s]
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        parser.error(f"unknown switches {unknown}; choose from {', '.join(SWITCHES)}")
    if args.case == "classification":
        dropped = [s for s in switches if s in TEACHER_SWITCHES]
        if dropped:
            print(f"case classification has no teacher: skipping {', '.join(dropped)}")
        switches = [s for s in switches if s not in TEACHER_SWITCHES]
    quiet_lightning()
    threads = set_threads(args.threads)
    p = PRESETS[args.preset]
    batches = make_batches(p, args.batch, args.batches)
    print(
        f"preset {args.preset}, case {args.case}: teacher {p.teacher}, student {p.student}, "
        f"batch {args.batch}x{p.in_chans}x{p.size}x{p.size}, {threads} thread(s), torch {torch.__version__}; "
        f"{args.rounds} round(s) x ({args.warmup} warm-up + {args.steps} timed steps); "
        f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    example = batches[0].input[:2]
    default = trainer_side(make_module(args.case, p, example), batches)
    ratios: dict[str, float] = {}
    rows = []
    for switch in switches:
        side = trainer_side(make_module(args.case, p, example), batches, **switch_trainer_kw(switch))
        t = compare(
            {"default": default, switch: side}, args.rounds, args.warmup, args.steps, label=f"{switch:<16}"
        )
        ratios[switch] = t[switch].wall_median / t["default"].wall_median
        rows.append((switch, t["default"], t[switch]))
    print("\nmedian per step: default | with the switch | wall ratio | CPU ratio")
    for switch, base, on in rows:
        print(
            f"  {switch:<16} {base.wall_median * 1e3:9.2f} ms | {on.wall_median * 1e3:9.2f} ms | "
            f"{on.wall_median / base.wall_median:6.3f} | {on.cpu_median / max(base.cpu_median, 1e-12):6.3f}"
        )
    print()
    for switch in switches:
        print(f"speed_{switch}: {ratios[switch]:.3f} (no goal; below 1 is faster)")
    return ratios


if __name__ == "__main__":
    main()
