"""Distil a student from a teacher and compare it with the student trained alone.

    python -m recipes.distill                      # the demonstration (Fashion-MNIST, kd)
    python -m recipes.distill --method kd --data digits --fast --out runs/smoke
    python -m recipes.distill --list               # registered distillers
    python -m recipes.distill --compare kd,dkd --seeds 0,1,2   # one table, same teacher and seeds
    python -m recipes.distill --teacher runs/teacher.ckpt --student resnet8x4 --data cifar100 \
        --config recipes/configs/distill/kd_cifar100.yaml --trainer.devices 8 --trainer.strategy ddp
    python -m recipes.distill --method kd --teacher-cache runs/teacher_cache   # teacher outputs on disk

Without `--teacher`, a teacher is trained on a larger subset (options under `teacher_train`) and
cached under $TOOLKIT_CACHE/teachers (default ~/.cache/toolkit), keyed by its configuration, so a
second run reuses it. For every seed the student is trained alone and with the method, from the
same initialisation and data order; the table reports test accuracy, and OUT/results.json holds
the numbers (method, data, seeds, teacher_acc, student_acc, baseline_acc, wall_seconds, ...).

`--teacher a.ckpt,b.ckpt` (or `teacher_train.count: N`, N members trained with seeds 0..N-1 on the
same data, each cached under its own key) gives an ensemble `Teacher` (its `combine` from
`teacher_args.combine`, default mean logits). A config's `callbacks: {NAME: {options}}` adds
registered callbacks (e.g. `knn_probe`) to every student run; the probe accuracies they log
(`val/knn_acc`, `val/linear_probe_acc`) are added to the table and to results.json.

A method whose config lists `stages:` (several generations, a pre-pass, a teacher of its own) runs
them in order instead of the single "student + METHOD" run, each stage under OUT/stages/<name>/:
running the same command again skips the finished stages and resumes an interrupted one from its
last checkpoint (see `recipes/stages.py`). Likewise every finished run (the student alone, or a
method, for one seed) leaves OUT/runs/<name>_seed<S>.json, keyed by its configuration and the
teacher's accuracy: running the command again (after an interruption, or with more methods or
seeds) reads those records instead of training again; a changed configuration trains anew.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from recipes import stages
from recipes.common import (
    Timer,
    build_data,
    cache_dir,
    common_parser,
    fingerprint,
    fmt,
    is_global_zero,
    list_names,
    make_trainer,
    mean_std,
    parse,
    plot_comparison,
    resolve_config,
    test_accuracy,
    write_results,
)

DEFAULTS: dict[str, Any] = {
    "method": "kd",
    "data": "fashion_mnist",
    # A data-limited student (2k images) much smaller than its teacher: where KD pays off, and
    # sized to finish in minutes on 2 CPU cores (measurements in docs/methods.md).
    "data_args": {"batch_size": 128, "train_subset": 2000, "val_split": 2000},
    "teacher": None,
    "teacher_args": {},
    # teacher logits computed once per sample and view, then read back, wherever that is exact
    # (logit-only terms; no augmentation, or augment_views): see toolkit.distill.cache
    "teacher_cache": "auto",
    # --teacher-cache DIR: the cache on disk instead, reused by later runs (one sub-directory per
    # seed, stage and set of teacher features: see teacher_cache_args); top-k as TeacherCache
    "teacher_cache_dir": None,
    "teacher_cache_top_k": "auto",
    "teacher_train": {
        "model": "convnet",
        "model_args": {"width": 16, "depth": 3},
        "epochs": 3,
        "train_subset": 20000,
        "optimizer": {"name": "adam", "lr": 0.002},
        "scheduler": {"name": "cosine"},
    },
    "student": "convnet",
    "student_args": {"width": 8},
    "epochs": 30,
    "optimizer": {"name": "adam", "lr": 0.002},
    "scheduler": {"name": "cosine"},
    "terms": None,
    "method_args": {},
    "seeds": [0, 1],
    "out": "runs/distill",
    "trainer": {"check_val_every_n_epoch": 5},
    "fast": {
        "epochs": 1,
        "seeds": [0],
        "data_args": {"train_subset": 256, "val_split": 128, "test_subset": 256},
        "teacher_train": {"epochs": 1, "train_subset": 512},
        "trainer": {"check_val_every_n_epoch": 1},
    },
}


def method_terms(cfg: dict[str, Any]) -> dict[str, Any]:
    """The terms spec: the config's `terms`, or 0.5·CE + 0.5·METHOD; `method_args` go to the
    method's own term."""
    method = cfg["method"]
    terms = cfg.get("terms") or {
        "ce": {"loss": "cross_entropy", "weight": 0.5},
        method: {"distiller": method, "weight": 0.5},
    }
    terms = {k: dict(v) if isinstance(v, dict) else v for k, v in terms.items()}
    if cfg.get("method_args"):
        owner = next(
            (k for k, v in terms.items() if isinstance(v, dict) and v.get("distiller") == method), None
        )
        if owner is None:
            raise ValueError(f"--method.* options given but no term uses distiller {method!r}")
        terms[owner].update(cfg["method_args"])
    return terms


PROBE_METRICS = ("val/knn_acc", "val/linear_probe_acc")
TEACHER_KEYS = ("teacher", "teacher_train", "teacher_args")  # what decides a run's teacher


def teacher_cache_args(cfg: dict[str, Any], dm: Any, terms: Any, stage: str | None = None) -> dict[str, Any]:
    """DistillationModule's cache arguments for one run. Without `teacher_cache_dir`: the in-memory
    cache as `teacher_cache` says. With it: the cache on disk in DIR/seed<S>[/stage-<name>][/features-
    <hash>], since a cache holds one training set and augmentation (both follow the seed), one
    teacher (a stage may have its own) and one set of teacher features; logit-only methods of the
    same seed share a directory (`--compare kd,dkd` runs the teacher once)."""
    from toolkit.modules.config import build_terms

    directory = cfg.get("teacher_cache_dir")
    if not directory:
        return {"teacher_cache": cfg.get("teacher_cache", False)}
    path = Path(directory) / f"seed{dm.seed}"
    if stage is not None:
        path = path / f"stage-{stage}"
    tapped = sorted({p for term, _ in build_terms(terms).values() for p in term.teacher_features})
    if tapped:
        path = path / f"features-{fingerprint(tapped)[:8]}"
    return {
        "teacher_cache": cfg.get("teacher_cache") or "auto",
        "teacher_cache_dir": str(path),
        "teacher_cache_top_k": cfg.get("teacher_cache_top_k", "auto"),
    }


def _member_net(cfg: dict[str, Any], dm, out: Path, seed: int):
    """One trained teacher network (and its module): from the cache, or trained now with `seed`.
    Member 0 keeps the single teacher's cache key; member i > 0 adds its seed to the key."""
    import lightning as L

    from toolkit.distill import Teacher
    from toolkit.modules import ClassificationModule

    tt = {k: v for k, v in cfg["teacher_train"].items() if k != "count"}
    data_args = {k: v for k, v in cfg["data_args"].items() if k not in ("train_subset", "batch_size")}
    keyed = {
        "data": cfg["data"],
        "data_args": data_args,
        "teacher_train": tt,
        **({"seed": seed} if seed else {}),
    }
    path = (
        cache_dir() / "teachers" / f"{cfg['data']}-{tt['model'].replace(':', '_')}-{fingerprint(keyed)}.ckpt"
    )
    if path.exists():
        print(f"reusing the teacher trained before: {path}", flush=True)
        net = Teacher.from_checkpoint(path).nets[0]
        return net, ClassificationModule(net, num_classes=dm.num_classes)
    print(
        f"training a teacher ({tt['model']}, {tt['epochs']} epochs, seed {seed}); it will be cached at {path}",
        flush=True,
    )
    L.seed_everything(seed, workers=True, verbose=False)
    # every member sees the same split and subset (data seed 0): they differ by initialisation
    tdm = build_data(cfg["data"], {**cfg["data_args"], "train_subset": tt["train_subset"]}, seed=0)
    module = ClassificationModule(
        tt["model"],
        num_classes=dm.num_classes,
        in_chans=dm.in_chans,
        model_kwargs=tt.get("model_args"),
        optimizer=tt.get("optimizer"),
        scheduler=tt.get("scheduler"),
    )
    trainer = make_trainer(
        cfg,
        out,
        "teacher" if not seed else f"teacher{seed}",
        tt["epochs"],
        checkpoints=False,
        with_callbacks=False,
    )
    trainer.fit(module, datamodule=tdm)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(path))
    return module.model, module


def get_teacher(cfg: dict[str, Any], dm, out: Path) -> tuple[Any, float]:
    """(Teacher, its test accuracy): loaded from --teacher (comma-separated: an ensemble), from the
    cache, or trained now (`teacher_train.count` members: an ensemble)."""
    from toolkit.distill import Teacher
    from toolkit.modules import ClassificationModule

    num_classes, in_chans = dm.num_classes, dm.in_chans
    combine = cfg.get("teacher_args", {}).get("combine", "logits")
    if cfg.get("teacher"):
        specs = [s.strip() for s in str(cfg["teacher"]).split(",") if s.strip()]
        nets = []
        for spec in specs:
            extra = (
                {}
                if spec.endswith((".ckpt", ".pt", ".pth"))
                else {"in_chans": in_chans, **cfg.get("teacher_args", {})}
            )
            extra.pop("combine", None)
            nets.append(Teacher.from_name(spec, num_classes=num_classes, **extra).nets[0])
        teacher = Teacher(nets, combine=combine)
        module = ClassificationModule(nets[0] if len(nets) == 1 else teacher, num_classes=num_classes)
    else:
        count = int(cfg["teacher_train"].get("count", 1))
        if count < 1:
            raise ValueError(f"teacher_train.count must be >= 1, got {count}")
        members = [_member_net(cfg, dm, out, seed) for seed in range(count)]
        teacher = Teacher([net for net, _ in members], combine=combine)
        module = members[0][1] if count == 1 else ClassificationModule(teacher, num_classes=num_classes)
    trainer = make_trainer(cfg, out, "teacher_eval", 1, checkpoints=False, logger=False, with_callbacks=False)
    return teacher, test_accuracy(trainer, module, dm)


def run(cfg: dict[str, Any], compare: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train the student alone and with each method (`cfg`, or every config in `compare`) on the
    same teacher, data and seeds; print the table and write the results files."""
    import lightning as L

    import toolkit  # noqa: F401 - fills the registry
    from toolkit import registry
    from toolkit.modules import ClassificationModule, DistillationModule

    cfgs = compare or [cfg]
    for c in cfgs:  # unknown names and bad term specs fail before any training
        registry.get("distiller", c["method"])
        method_terms(c)
        if c.get("stages"):
            stages.expand_stages(c)
    out = Path(cfg["out"])
    started = time.perf_counter()
    seeds = cfg["seeds"]
    dm0 = build_data(cfg["data"], cfg["data_args"], seed=seeds[0])
    dm0.setup("fit")
    # one teacher per distinct teacher setting: in a comparison, a method whose config asks for
    # another teacher (e.g. ensemble_kd's `teacher_train.count: 3`) gets it, not the first one's
    teachers: dict[str, tuple[Any, float]] = {}

    def teacher_of(c: dict[str, Any]) -> tuple[Any, float]:
        key = fingerprint({k: c.get(k) for k in TEACHER_KEYS})
        if key not in teachers:
            teachers[key] = get_teacher(c, dm0, out)
        return teachers[key]

    teacher, teacher_acc = teacher_of(cfg)
    runs: dict[str, dict[str, list[float]]] = {}
    stage_records: dict[str, list] = {}  # method -> per seed, the records of its stages

    def train_once(
        name: str, c: dict[str, Any], seed: int, make_module, teacher_acc: float = teacher_acc
    ) -> None:
        # a finished run leaves its record: the same command run again (after an interruption, or
        # with more methods or seeds) reads it instead of training again
        record = out / "runs" / f"{name}_seed{seed}.json"
        ignored = {"seeds", "out", "fast"} | (
            {"method", "terms", "method_args"} if name == "student" else set()
        )
        key = fingerprint(
            {"config": {k: v for k, v in c.items() if k not in ignored}, "teacher_acc": teacher_acc}
        )
        if record.exists():
            saved = json.loads(record.read_text())
            if saved.get("key") == key:
                run = runs.setdefault(name, {"acc": [], "seconds": []})
                for metric, value in saved["values"].items():
                    run.setdefault(metric, []).append(value)
                print(
                    f"{name} seed {seed}: finished in an earlier run ({record}), accuracy {saved['values']['acc']:.4f}"
                )
                return
        L.seed_everything(seed, workers=True, verbose=False)
        dm = build_data(c["data"], c["data_args"], seed=seed)
        dm.setup("fit")  # the class count of a class split (`known_classes`) is known after setup
        module = make_module(c, dm)
        trainer = make_trainer(c, out, f"{name}_seed{seed}", c["epochs"])
        with Timer() as t:
            trainer.fit(module, datamodule=dm)
        run = runs.setdefault(name, {"acc": [], "seconds": []})
        for metric in PROBE_METRICS:
            if metric in trainer.callback_metrics:
                run.setdefault(metric, []).append(float(trainer.callback_metrics[metric]))
        run["acc"].append(test_accuracy(trainer, module, dm))
        run["seconds"].append(t.seconds)
        if is_global_zero():
            latest = {metric: per_seed[-1] for metric, per_seed in run.items()}
            record.parent.mkdir(parents=True, exist_ok=True)
            partial = record.with_suffix(".json.partial")
            partial.write_text(json.dumps({"key": key, "values": latest}, indent=1))
            partial.replace(record)

    def common(c: dict[str, Any], dm) -> dict[str, Any]:
        return {
            "num_classes": dm.num_classes,
            "in_chans": dm.in_chans,
            "model_kwargs": c.get("student_args"),
            "optimizer": c.get("optimizer"),
            "scheduler": c.get("scheduler"),
        }

    for seed in seeds:
        train_once(
            "student",
            cfg,
            seed,
            lambda c, dm: ClassificationModule(c["student"], loss="cross_entropy", **common(c, dm)),
        )
        for c in cfgs:
            c_teacher, c_teacher_acc = teacher_of(c)
            if c.get("stages"):  # a multi-stage method: resumable stages (recipes/stages.py)
                stage_records.setdefault(c["method"], []).append(
                    stages.run_method(c, seed, out, c_teacher, runs)
                )
                continue
            train_once(
                c["method"],
                c,
                seed,
                lambda c, dm, t=c_teacher: DistillationModule(
                    c["student"],
                    t,
                    terms=method_terms(c),
                    **teacher_cache_args(c, dm, method_terms(c)),
                    **common(c, dm),
                ),
                c_teacher_acc,
            )

    baseline, first = runs["student"], runs[cfgs[0]["method"]]
    results = {
        "method": cfgs[0]["method"] if not compare else ",".join(c["method"] for c in cfgs),
        "data": cfg["data"],
        "seeds": seeds,
        "teacher": cfg.get("teacher") or cfg["teacher_train"]["model"],
        "student": cfg["student"],
        "teacher_acc": teacher_acc,
        "student_acc": mean_std(first["acc"])[0],
        "student_acc_std": mean_std(first["acc"])[1],
        "baseline_acc": mean_std(baseline["acc"])[0],
        "baseline_acc_std": mean_std(baseline["acc"])[1],
        "student_acc_per_seed": first["acc"],
        "baseline_acc_per_seed": baseline["acc"],
        "runs": {
            name: {
                "acc": mean_std(r["acc"])[0],
                "acc_std": mean_std(r["acc"])[1],
                "acc_per_seed": r["acc"],
                "train_seconds": r["seconds"],
                **{m.split("/")[1]: mean_std(r[m])[0] for m in PROBE_METRICS if m in r},
            }
            for name, r in runs.items()
        },
        "wall_seconds": time.perf_counter() - started,
        "terms": {c["method"]: method_terms(c) for c in cfgs} if compare else method_terms(cfg),
        "command": " ".join(["python -m recipes.distill", *sys.argv[1:]]),
        "config": cfg,
    }
    if stage_records:
        results["stages"] = stage_records
    method_teachers = {c["method"]: teacher_of(c) for c in cfgs}
    results["teachers"] = {
        name: {"members": len(t.nets), "acc": acc} for name, (t, acc) in method_teachers.items()
    }
    rows = [("teacher", f"{100 * teacher_acc:.2f}", "-")]
    rows += [
        (f"teacher of {name} ({len(t.nets)} members)", f"{100 * acc:.2f}", "-")
        for name, (t, acc) in method_teachers.items()
        if t is not teacher
    ]
    for name, r in runs.items():
        label = "student alone" if name == "student" else f"student + {name}"
        rows.append((label, fmt(r["acc"]), f"{sum(r['seconds']) / len(seeds):.1f}"))
        rows += [(f"{label}: {m.split('/')[1]} (val)", fmt(r[m]), "-") for m in PROBE_METRICS if m in r]
        if name in stage_records:
            rows += stages.table_rows(next(c for c in cfgs if c["method"] == name), stage_records[name])
    write_results(out, results, rows)
    if compare:
        plot_comparison(
            out / "comparison.png", teacher_acc, runs, f"{cfg['data']}: {cfg['student']} ({len(seeds)} seeds)"
        )
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = common_parser("python -m recipes.distill", __doc__.splitlines()[0], "method", teacher=True)
    parser.add_argument(
        "--teacher", help="teacher: checkpoint path, toolkit name, timm:NAME or hf:PATH (default: train one)"
    )
    parser.add_argument(
        "--compare", help="comma-separated methods to run on the same teacher and seeds (one table)"
    )
    parser.add_argument(
        "--teacher-cache",
        metavar="DIR",
        help="keep the teacher's outputs on disk under DIR and reuse them in later runs (toolkit.distill.cache)",
    )
    args, overrides = parse(parser, argv)
    if args.list:
        list_names("distiller")
        return None
    if args.compare and args.method:
        parser.error("use either --method or --compare")
    methods = [m.strip() for m in (args.compare or "").split(",") if m.strip()]
    if args.compare and not methods:
        parser.error("--compare needs at least one method name")
    if len(set(methods)) != len(methods):
        parser.error(f"--compare lists a method twice: {args.compare}")
    cfgs = []
    for method in methods or [args.method]:
        args.method = method
        cfg = resolve_config(DEFAULTS, "distill", args, overrides)
        if args.teacher:
            cfg["teacher"] = args.teacher
        if args.teacher_cache:
            cfg["teacher_cache_dir"] = args.teacher_cache
        cfgs.append(cfg)
    return run(cfgs[0], compare=cfgs if methods else None)


if __name__ == "__main__":
    main()
