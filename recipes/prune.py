"""Data selection end to end: score, prune, retrain, and compare with a random subset.

    python -m recipes.prune --selector el2n --keep 0.5                 # Fashion-MNIST, 3 scoring runs
    python -m recipes.prune --selector el2n --keep 0.3,0.5,0.7 --seeds 0,1,2
    python -m recipes.prune --selector el2n --scores runs/prune/scores.pt --keep 0.5   # reuse scores
    python -m recipes.prune --selector elr --noisy-labels 0.4 --seeds 0,1,2           # CE vs CE + elr
    python -m recipes.prune --list

Every run uses one data set (`split_seed`, default 0: the validation split, the training subset and
any label noise), whatever its seed. Pruning selectors (el2n, grand, forgetting, ...): `score.seeds` short runs of `score.epochs`
epochs score every training sample (each saved as OUT/scores/seed<S>.pt); their mean (Data Diet
averages independent runs) is saved as OUT/scores.pt and OUT/scores.npy (keyed by sample index,
reusable with --scores). Then, for every fraction in --keep and every seed, a model is trained
from scratch on the kept samples, and on a random subset of the same size; and once per seed on
all the data. Model-free selectors (random, zip_fit) skip the scoring runs.

Reweighters and loss-side selectors (dataset_equity, loss_reweighting, curriculum, elr) train
plain cross-entropy and cross-entropy with the selector on the same data and seeds, with
--noisy-labels RATE symmetric label noise on the training split.

Prints one table (test accuracy, mean ± std over seeds) and writes OUT/results.json,
OUT/results.md and OUT/accuracy_vs_kept.png (accuracy against the fraction kept, error bars over
seeds).
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
    deep_merge,
    is_global_zero,
    list_names,
    mean_std,
    parse,
    resolve_config,
    write_results,
)

DEFAULTS: dict[str, Any] = {
    **copy.deepcopy(CLASSIFIER_DEMO),
    "method": "el2n",
    "terms": {"ce": {"loss": "cross_entropy"}},
    "selector_args": {},
    "keep": [0.5],
    "score": {"seeds": [0, 1, 2], "epochs": 2},
    "noisy_labels": None,
    "split_seed": 0,
    "seeds": [0],
    "out": "runs/prune",
    "trainer": {},
    "fast": {
        "epochs": 1,
        "seeds": [0],
        "score": {"seeds": [0], "epochs": 1},
        "data_args": {"train_subset": 256, "val_split": 128, "test_subset": 256},
    },
}


def is_pruning(name: str) -> bool:
    from toolkit import registry

    return getattr(registry.get("selector", name), "scorer_cls", None) is not None


def needs_scoring_runs(name: str) -> bool:
    from toolkit import registry

    scorer = registry.get("selector", name).scorer_cls
    return scorer.needs_pass or scorer.observes


def train_run(cfg: dict[str, Any], seed: int, out: Path, run_name: str, **changes: Any) -> Any:
    """One classification run of `cfg` with `changes` (selector, selector_args, epochs, ...)."""
    from recipes.tasks import get_task

    c = copy.deepcopy(cfg)
    c.update(changes)
    c["method"], c["run_name"] = "cross_entropy", run_name
    return get_task("classification")(c, seed, out)


def score(cfg: dict[str, Any], out: Path) -> Path:
    """The scoring runs; returns the averaged scores file."""
    from toolkit.selection import SampleScores

    name, sc = cfg["method"], cfg["score"]
    args = {k: v for k, v in cfg["selector_args"].items() if k not in ("keep", "scores", "save_scores")}
    args.setdefault("score_epochs", sc["epochs"])
    epochs = max(args["score_epochs"]) if isinstance(args["score_epochs"], list) else args["score_epochs"]
    # scores at initialisation (GraNd): a run that trains no batch (its one scoring pass is at fit start)
    length = {"epochs": epochs}
    if epochs == 0:
        length = {"epochs": 1, "trainer": {**cfg["trainer"], "limit_train_batches": 0}}
    runs = []
    for seed in sc["seeds"]:
        path = out / "scores" / f"seed{seed}.pt"
        train_run(
            cfg,
            seed,
            out,
            f"score_{name}",
            selector=name,
            selector_args={**args, "keep": 1.0, "save_scores": str(path)},
            **length,
        )
        runs.append(SampleScores.load(path))
    mean = SampleScores.mean_of(runs)
    mean.meta.update(
        {"selector": name, "data": cfg["data"], "score_seeds": sc["seeds"], "score_epochs": epochs}
    )
    if is_global_zero():
        mean.save(out / "scores.npy")
        return mean.save(out / "scores.pt")
    return out / "scores.pt"


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import toolkit  # noqa: F401 - fills the registry
    from toolkit import registry

    name = cfg["method"]
    registry.get("selector", name)
    out = Path(cfg["out"])
    started = time.perf_counter()
    # one data set for every run: the seeds vary the model, the order and the augmentation, not
    # which samples (and noisy labels) there are; scores keyed by sample index need that
    cfg = deep_merge(
        cfg, {"data_args": {"split_seed": cfg["data_args"].get("split_seed", cfg["split_seed"])}}
    )
    if cfg.get("noisy_labels") is not None:
        cfg = deep_merge(cfg, {"data_args": {"label_noise": cfg["noisy_labels"]}})
    runs: dict[str, dict[str, Any]] = {}

    def record(label: str, kept: float | None, result: Any) -> None:
        entry = runs.setdefault(label, {"kept": kept, "acc": [], "seconds": []})
        entry["acc"].append(result.value)
        entry["seconds"].append(result.seconds)

    scores_file = None
    if is_pruning(name):
        fractions = cfg["keep"] if isinstance(cfg["keep"], list) else [cfg["keep"]]
        if cfg.get("scores"):
            scores_file = Path(cfg["scores"])
        elif needs_scoring_runs(name):
            scores_file = score(cfg, out)
        args = {k: v for k, v in cfg["selector_args"].items() if k != "save_scores"}
        if scores_file is not None:
            args = {k: v for k, v in args.items() if k != "score_epochs"} | {"scores": str(scores_file)}
        for seed in cfg["seeds"]:
            record("all data", 1.0, train_run(cfg, seed, out, "all_data"))
            for f in fractions:
                record(
                    f"{name} keep {f}",
                    f,
                    train_run(
                        cfg, seed, out, f"{name}_keep{f}", selector=name, selector_args={**args, "keep": f}
                    ),
                )
                if name != "random":
                    record(
                        f"random keep {f}",
                        f,
                        train_run(
                            cfg,
                            seed,
                            out,
                            f"random_keep{f}",
                            selector="random",
                            selector_args={"keep": f, "seed": seed},
                        ),
                    )
    else:
        for seed in cfg["seeds"]:
            record("cross_entropy", None, train_run(cfg, seed, out, "cross_entropy"))
            record(
                f"cross_entropy + {name}",
                None,
                train_run(cfg, seed, out, name, selector=name, selector_args=cfg["selector_args"]),
            )

    summary = {}
    for label, e in runs.items():
        m, sd = mean_std(e["acc"])
        summary[label] = {
            "kept": e["kept"],
            "acc": m,
            "acc_std": sd,
            "acc_per_seed": e["acc"],
            "train_seconds": e["seconds"],
        }
    results = {
        "selector": name,
        "data": cfg["data"],
        "model": cfg["student"],
        "seeds": cfg["seeds"],
        "keep": cfg["keep"],
        "label_noise": cfg["data_args"].get("label_noise", 0.0),
        "scores_file": str(scores_file) if scores_file else None,
        "runs": summary,
        "wall_seconds": time.perf_counter() - started,
        "command": " ".join(["python -m recipes.prune", *sys.argv[1:]]),
        "config": cfg,
    }
    rows = [
        (
            label,
            f"{100 * s['acc']:.2f} ± {100 * s['acc_std']:.2f}"
            if len(cfg["seeds"]) > 1
            else f"{100 * s['acc']:.2f}",
            f"{sum(s['train_seconds']) / len(s['train_seconds']):.1f}",
        )
        for label, s in summary.items()
    ]
    write_results(out, results, rows)
    if is_pruning(name):
        plot_accuracy_vs_kept(out / "accuracy_vs_kept.png", summary, name, cfg)
    return results


def plot_accuracy_vs_kept(path: Path, summary: dict[str, Any], name: str, cfg: dict[str, Any]) -> None:
    """Test accuracy against the fraction kept, one line per selector (error bars: std over seeds)."""
    if not is_global_zero():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    full = summary.get("all data")
    for selector, colour in ((name, "#4c72b0"), ("random", "#dd8452")):
        points = sorted(
            (s["kept"], s) for label, s in summary.items() if label.startswith(f"{selector} keep ")
        )
        if full is not None:
            points.append((1.0, full))
        xs = [k for k, _ in points]
        ax.errorbar(
            xs,
            [100 * s["acc"] for _, s in points],
            yerr=[100 * s["acc_std"] for _, s in points],
            marker="o",
            capsize=4,
            color=colour,
            label=selector,
        )
    ax.set_xlabel("fraction of the training set kept")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg['data']}: {cfg['student']} ({len(cfg['seeds'])} seeds)")
    ax.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = common_parser("python -m recipes.prune", __doc__.splitlines()[0], "selector")
    parser.add_argument("--keep", help="comma-separated fractions of the training set to keep, e.g. 0.3,0.5")
    parser.add_argument(
        "--scores", help="a scores file (.pt/.npy, keyed by sample index) instead of scoring runs"
    )
    parser.add_argument(
        "--score-seeds", help="comma-separated seeds of the scoring runs (their scores are averaged)"
    )
    parser.add_argument(
        "--noisy-labels",
        type=float,
        metavar="RATE",
        help="symmetric label noise on the training split only (recorded in results.json)",
    )
    args, overrides = parse(parser, argv)
    if args.list:
        list_names("selector")
        return None
    extra: dict[str, Any] = {}
    if args.keep:
        extra["keep"] = [float(k) for k in args.keep.split(",") if k.strip()]
    if args.scores:
        extra["scores"] = args.scores
    if args.score_seeds:
        extra["score"] = {"seeds": [int(s) for s in args.score_seeds.split(",") if s.strip()]}
    if args.noisy_labels is not None:
        extra["noisy_labels"] = args.noisy_labels
    cfg = resolve_config(DEFAULTS, "prune", args, deep_merge(extra, overrides))
    return run(cfg)


if __name__ == "__main__":
    main()
