"""Train one model with a registered loss.

    python -m recipes.train                            # convnet on Fashion-MNIST, cross_entropy
    python -m recipes.train --loss cross_entropy --loss.label_smoothing 0.1 --data digits --fast
    python -m recipes.train --list                     # registered losses

Reports test accuracy per seed (mean ± std over `--seeds`) and writes OUT/results.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from recipes.common import (
    Timer,
    build_data,
    common_parser,
    fmt,
    list_names,
    make_trainer,
    mean_std,
    parse,
    resolve_config,
    test_accuracy,
    write_results,
)

DEFAULTS: dict[str, Any] = {
    "method": "cross_entropy",
    "data": "fashion_mnist",
    "data_args": {"batch_size": 128, "train_subset": 10000, "val_split": 2000},
    "student": "convnet",
    "student_args": {"width": 16},
    "epochs": 10,
    "optimizer": {"name": "adam", "lr": 0.002},
    "scheduler": {"name": "cosine"},
    "terms": None,
    "method_args": {},
    "seeds": [0],
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


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import lightning as L

    import toolkit  # noqa: F401 - fills the registry
    from toolkit import registry
    from toolkit.modules import ClassificationModule

    registry.get("loss", cfg["method"])
    out = Path(cfg["out"])
    started = time.perf_counter()
    terms = loss_terms(cfg)
    accs, seconds = [], []
    for seed in cfg["seeds"]:
        L.seed_everything(seed, workers=True, verbose=False)
        dm = build_data(cfg["data"], cfg["data_args"], seed=seed)
        dm.setup("fit")
        module = ClassificationModule(
            cfg["student"],
            num_classes=dm.num_classes,
            in_chans=dm.in_chans,
            loss=terms,
            model_kwargs=cfg.get("student_args"),
            optimizer=cfg.get("optimizer"),
            scheduler=cfg.get("scheduler"),
        )
        trainer = make_trainer(cfg, out, f"{cfg['method']}_seed{seed}", cfg["epochs"])
        with Timer() as t:
            trainer.fit(module, datamodule=dm)
        seconds.append(t.seconds)
        accs.append(test_accuracy(trainer, module, dm))
    results = {
        "method": cfg["method"],
        "data": cfg["data"],
        "seeds": cfg["seeds"],
        "model": cfg["student"],
        "acc": mean_std(accs)[0],
        "acc_std": mean_std(accs)[1],
        "acc_per_seed": accs,
        "train_seconds": seconds,
        "wall_seconds": time.perf_counter() - started,
        "terms": terms,
        "command": " ".join(["python -m recipes.train", *sys.argv[1:]]),
        "config": cfg,
    }
    write_results(
        out,
        results,
        [(f"{cfg['student']} + {cfg['method']}", fmt(accs), f"{sum(seconds) / len(seconds):.1f}")],
    )
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = common_parser("python -m recipes.train", __doc__.splitlines()[0], "loss")
    parser.add_argument("--model", dest="student", help="model: a toolkit name, timm:NAME, hf:PATH")
    args, overrides = parse(parser, argv)
    if args.list:
        list_names("loss")
        return None
    return run(resolve_config(DEFAULTS, "train", args, overrides))


if __name__ == "__main__":
    main()
