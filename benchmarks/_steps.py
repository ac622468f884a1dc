"""Per-step timing shared by `benchmarks.overhead` and `benchmarks.speed_switches`.

A "side" is something that runs training steps over a list of in-memory batches: our
LightningModule through a real `L.Trainer` (`trainer_side`), or a hand-written loop
(`loop_side`). A side is timed step by step: the interval between the starts of two consecutive
steps (a run of n + 1 steps gives n intervals; the last step, followed by the end of training,
is not timed) (so everything the Trainer does between steps is inside, hooks, logging, the optimiser
closure, fetching the next batch), wall clock (`perf_counter`) and the process's CPU time
(`process_time`, all threads). `compare` runs the sides in alternating order, `rounds` times, each
run with `warmup` untimed steps first, and reports the median over every timed step of every
round: the load of a shared machine drifts, and alternation gives both sides the same drift.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# A side: run `n` steps over the batches, calling `tick()` at the start of each step.
Side = Callable[[int, Callable[[], None]], None]


@dataclass
class Timings:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


class _Ticks:
    """Records (wall, cpu) at every tick; the intervals after `skip` ticks are the timed steps."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def __call__(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def intervals(self, skip: int) -> tuple[list[float], list[float]]:
        m = self.marks[skip:]
        return [b[0] - a[0] for a, b in zip(m, m[1:])], [b[1] - a[1] for a, b in zip(m, m[1:])]


def cycle(batches: Sequence[Any], n: int) -> list[Any]:
    """`n` references to the batches, cycled: exactly `n` steps without copying data."""
    return [batches[i % len(batches)] for i in range(n)]


class _Loader:
    """An iterable of batches with a length: Lightning's train loader for in-memory batches (a
    plain list would be read as a list of loaders). One epoch is the whole run, so no epoch
    boundary falls inside the timed steps."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def trainer_side(
    module: Any, batches: Sequence[Any] | None, datamodule: Any = None, **trainer_kw: Any
) -> Side:
    """Training steps of `module` through a fresh `L.Trainer` per run (CPU, no logger, no
    checkpointing, no progress bar, no model summary, no validation). With `datamodule` (and
    `batches=None`) the steps read its training loader instead (epoch boundaries included), for
    modules that need the DataModule (the teacher cache on disk fingerprints it)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class Tick(Callback):
        def __init__(self, tick: Callable[[], None]) -> None:
            self.tick = tick

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.tick()

    extra_callbacks = list(trainer_kw.pop("callbacks", []))

    def run(n: int, tick: Callable[[], None]) -> None:
        kw = {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "max_steps": n,
            "callbacks": [*extra_callbacks, Tick(tick)],
            **trainer_kw,
        }
        if datamodule is not None:
            L.Trainer(**kw).fit(module, datamodule=datamodule)
        else:
            L.Trainer(**kw).fit(module, train_dataloaders=_Loader(cycle(batches, n)))

    return run


def loop_side(step: Callable[[Any], None], batches: Sequence[Any]) -> Side:
    """A hand-written loop calling `step(batch)` for each batch."""

    def run(n: int, tick: Callable[[], None]) -> None:
        for batch in cycle(batches, n):
            tick()
            step(batch)

    return run


def compare(
    sides: dict[str, Side], rounds: int, warmup: int, steps: int, label: str = ""
) -> dict[str, Timings]:
    """Median-ready per-step timings of every side, alternating their order round by round."""
    names = list(sides)
    out = {name: Timings() for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            ticks = _Ticks()
            sides[name](warmup + steps + 1, ticks)  # the last step only closes the last interval
            wall, cpu = ticks.intervals(warmup)
            out[name].wall += wall
            out[name].cpu += cpu
            print(
                f"  round {r + 1} {label}{name:<24} median {statistics.median(wall) * 1e3:8.2f} ms/step "
                f"(CPU {statistics.median(cpu) * 1e3:8.2f} ms; load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    return out


def quiet_lightning() -> None:
    """No "GPU available" / "`Trainer.fit` stopped" lines for every run, nor the same warnings."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")


def set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def timing_parser(description: str, rounds: int = 5, threads: bool = True) -> argparse.ArgumentParser:
    """The flags every step benchmark shares: batch, in-memory batches, alternating rounds, warm-up
    and timed steps, threads, and `--quick` (apply it with `apply_quick`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="distinct in-memory batches, cycled")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help="rounds, alternating the order of the sides"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    if threads:
        parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="one round, 2 warm-up + 3 timed steps")
    return parser


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.rounds, args.warmup, args.steps = 1, 2, 3
    return args
