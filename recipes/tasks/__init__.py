"""Tasks of `python -m recipes.train`: how one (config, seed) run is built, trained and scored.

A loss config picks its task with `task: NAME` (default "classification"). A task is a function
`(cfg, seed, out) -> TaskResult` registered with `@task("NAME")`; it builds the data, the module
and the trainer (`recipes.common.make_trainer`), trains, and returns its test metric. The recipe
does the rest for every task alike: seeds, `--compare`, the table, results.json and the chart.
Each task lives in its own module here; import it below so it registers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TaskResult:
    """One run's test metric. `higher_is_better` orders the table; `scale` is the display factor
    (100 for accuracies shown in %); `extra` holds further numbers for results.json."""

    metric: str
    value: float
    seconds: float
    higher_is_better: bool = True
    scale: float = 100.0
    unit: str = "%"
    extra: dict[str, float] = field(default_factory=dict)


TaskFn = Callable[[dict[str, Any], int, Path], TaskResult]
TASKS: dict[str, TaskFn] = {}


def task(name: str) -> Callable[[TaskFn], TaskFn]:
    def register(fn: TaskFn) -> TaskFn:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        TASKS[name] = fn
        return fn

    return register


def get_task(name: str) -> TaskFn:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown task {name!r}.{hint} Tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# the tasks register themselves on import
from recipes.tasks import (  # noqa: E402,F401
    causal_lm,
    classification,
    metric_learning,
    regression,
)
