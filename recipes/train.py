"""Train one model with a registered loss.

    python -m recipes.train                            # convnet on Fashion-MNIST, cross_entropy
    python -m recipes.train --loss cross_entropy --loss.label_smoothing 0.1 --data digits --fast
    python -m recipes.train --list                     # registered losses
    python -m recipes.train --compare cross_entropy,comp_sum --seeds 0,1,2   # one table + comparison.png
    python -m recipes.train --selector elr --noisy-labels 0.4    # a data selector (toolkit.selection) on noisy labels

Reports the task's test metric (accuracy for classification) per seed, mean ± std over `--seeds`,
and writes OUT/results.json. A loss config's `task:` picks how the run is built (`recipes/tasks/`:
classification by default).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

from recipes.common import (
    CLASSIFIER_DEMO,
    common_parser,
    list_names,
    mean_std,
    parse,
    plot_comparison,
    resolve_config,
    write_results,
)

DEFAULTS: dict[str, Any] = {
    **copy.deepcopy(CLASSIFIER_DEMO),
    "method": "cross_entropy",
    "terms": None,
    "method_args": {},
    "seeds": [0],
    "selector": None,
    "selector_args": {},
    "out": "runs/train",
    "trainer": {},
    "fast": {
        "epochs": 1,
        "seeds": [0],
        "data_args": {"train_subset": 256, "val_split": 128, "test_subset": 256},
    },
}


def loss_terms(cfg: dict[str, Any]) -> dict[str, Any]:
    terms = cfg.get("terms") or {cfg["method"]: {"loss": cfg["method"]}}
    terms = {k: dict(v) if isinstance(v, dict) else v for k, v in terms.items()}
    if cfg.get("method_args"):
        owner = next(
            (k for k, v in terms.items() if isinstance(v, dict) and v.get("loss") == cfg["method"]), None
        )
        if owner is None:
            raise ValueError(f"--loss.* options given but no term uses loss {cfg['method']!r}")
        terms[owner].update(cfg["method_args"])
    return terms


def with_selection_flags(args: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """`--selector NAME` (its prune config's selector_args under the command line's) and
    `--noisy-labels RATE` as config overrides."""
    from recipes.common import deep_merge, selector_defaults

    extra: dict[str, Any] = {}
    if getattr(args, "selector", None):
        extra["selector"] = args.selector
        extra["selector_args"] = selector_defaults(args.selector)
    if getattr(args, "noisy_labels", None) is not None:
        extra["data_args"] = {"label_noise": args.noisy_labels}
    return deep_merge(extra, overrides)


def run(cfg: dict[str, Any], compare: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train with the loss of `cfg` (or with each config of `compare`, on the same data and seeds)
    through the config's task; print the table and write the results files."""
    import toolkit  # noqa: F401 - fills the registry
    from recipes.tasks import get_task
    from toolkit import registry

    cfgs = compare or [cfg]
    tasks = []
    for c in cfgs:  # unknown names fail before any training
        registry.get("loss", c["method"])
        loss_terms(c)
        tasks.append(get_task(c.get("task", "classification")))
    out = Path(cfg["out"])
    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    for seed in cfg["seeds"]:
        for c, run_task in zip(cfgs, tasks):
            r = run_task(c, seed, out)
            entry = runs.setdefault(c["method"], {"result": r, "values": [], "seconds": [], "extra": []})
            entry["values"].append(r.value)
            entry["seconds"].append(r.seconds)
            entry["extra"].append(r.extra)
    first = runs[cfgs[0]["method"]]
    metric = first["result"].metric

    def summary(entry: dict[str, Any]) -> dict[str, Any]:
        m, sd = mean_std(entry["values"])
        r = entry["result"]
        return {
            "metric": r.metric,
            r.metric: m,
            f"{r.metric}_std": sd,
            f"{r.metric}_per_seed": entry["values"],
            "higher_is_better": r.higher_is_better,
            "train_seconds": entry["seconds"],
            **({"extra_per_seed": entry["extra"]} if any(entry["extra"]) else {}),
        }

    results = {
        "method": ",".join(c["method"] for c in cfgs) if compare else cfg["method"],
        "data": cfg["data"],
        "seeds": cfg["seeds"],
        "model": cfg["student"],
        "selector": cfg.get("selector"),
        "label_noise": cfg["data_args"].get("label_noise", 0.0),
        **summary(first),
        "wall_seconds": time.perf_counter() - started,
        "terms": {c["method"]: loss_terms(c) for c in cfgs} if compare else loss_terms(cfg),
        "command": " ".join(["python -m recipes.train", *sys.argv[1:]]),
        "config": cfg,
    }
    if compare:
        results["runs"] = {name: summary(entry) for name, entry in runs.items()}
    r0 = first["result"]

    def shown(values: list[float]) -> str:
        m, sd = mean_std([r0.scale * v for v in values])
        return f"{m:.2f} ± {sd:.2f}" if len(values) > 1 else f"{m:.2f}"

    rows = [
        (
            f"{cfg['student']} + {name}" + (f" + {cfg['selector']}" if cfg.get("selector") else ""),
            shown(e["values"]),
            f"{sum(e['seconds']) / len(e['seconds']):.1f}",
        )
        for name, e in runs.items()
    ]
    label = (
        f"test {metric}"
        + (f" ({r0.unit})" if r0.unit else "")
        + ("" if r0.higher_is_better else ", lower is better")
    )
    write_results(out, results, rows, metric_label=label)
    if compare:
        plot_comparison(
            out / "comparison.png",
            None,
            {name: {"v": e["values"]} for name, e in runs.items()},
            f"{cfg['data']}: {cfg['student']} ({len(cfg['seeds'])} seeds)",
            key="v",
            ylabel=label,
            scale=r0.scale,
        )
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = common_parser("python -m recipes.train", __doc__.splitlines()[0], "loss")
    parser.add_argument("--model", dest="student", help="model: a toolkit name, timm:NAME, hf:PATH")
    parser.add_argument(
        "--compare", help="comma-separated losses to run on the same data and seeds (one table)"
    )
    parser.add_argument(
        "--selector",
        help="a data selector to attach (see python -m recipes.prune --list), with its "
        "config's selector_args (recipes/configs/prune/NAME.yaml); --selector.KEY VALUE overrides them",
    )
    parser.add_argument(
        "--noisy-labels",
        type=float,
        metavar="RATE",
        help="symmetric label noise on the training split only: this fraction of training samples get a "
        "uniformly random class (recorded in results.json)",
    )
    args, overrides = parse(parser, argv)
    if args.list:
        list_names("loss")
        return None
    overrides = with_selection_flags(args, overrides)
    if args.compare and args.method:
        parser.error("use either --loss or --compare")
    methods = [m.strip() for m in (args.compare or "").split(",") if m.strip()]
    if args.compare and not methods:
        parser.error("--compare needs at least one loss name")
    if len(set(methods)) != len(methods):
        parser.error(f"--compare lists a loss twice: {args.compare}")
    cfgs = []
    for method in methods or [args.method]:
        args.method = method
        cfgs.append(resolve_config(DEFAULTS, "train", args, overrides))
    if methods and len({(c.get("task", "classification"), c["data"]) for c in cfgs}) > 1:
        parser.error("--compare needs losses of the same task and data set; their configs differ")
    return run(cfgs[0], compare=cfgs if methods else None)


if __name__ == "__main__":
    main()
