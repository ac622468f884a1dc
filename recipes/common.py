"""What every recipe shares: flags, config merging, trainers, seeds, results files.

Config precedence (later wins): the recipe's defaults, the method's YAML under
`recipes/configs/<recipe>/<method>.yaml`, `--config FILE.yaml`, then command-line flags. Dotted
flags set nested options: `--data.train_subset 1000`, `--trainer.devices 2`,
`--trainer.strategy ddp`, `--method.temperature 2`, `--student.width 8`. Values are parsed as
YAML (`true`, `3`, `0.5`, `[1, 2]`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from toolkit.utils.paths import cache_dir  # noqa: F401 (re-exported for the recipes)

CONFIG_DIR = Path(__file__).parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, except that exponent floats without a dot (`1e-4`, `5E3`) are floats:
    YAML 1.1 reads them as strings, so `--optimizer.lr 1e-4` would reach the optimiser as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


# dotted flag prefix -> config key holding that mapping
NESTED = {
    "data": "data_args",
    "student": "student_args",
    "teacher": "teacher_args",
    "method": "method_args",
    "loss": "method_args",
    "trainer": "trainer",
    "teacher_train": "teacher_train",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
    "selector": "selector_args",
    "callbacks": "callbacks",
    "speed": "speed",
}

# Speed switches (opt-in; `speed:` in a config, `--speed.KEY VALUE`): see `speed_layer`.
PRECISIONS = ("bf16-mixed", "16-mixed", "32")
# --teacher-precision VALUE -> the Teacher precision it sets: weights and forward in that dtype
TEACHER_PRECISIONS = {"bf16": "bf16-true", "16": "16-true", "32": "32"}


# The single-model demonstration of recipes.train and recipes.prune: a small convnet on 10k
# Fashion-MNIST images (a 2k validation split), 10 epochs of Adam with a cosine schedule.
CLASSIFIER_DEMO: dict[str, Any] = {
    "data": "fashion_mnist",
    "data_args": {"batch_size": 128, "train_subset": 10000, "val_split": 2000},
    "student": "convnet",
    "student_args": {"width": 16},
    "epochs": 10,
    "optimizer": {"name": "adam", "lr": 0.002},
    "scheduler": {"name": "cosine"},
}


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_layer(cfg: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """`deep_merge`, except that a layer which changes the data set or a model drops the previous
    layers' arguments for the old one (`data_args`, `student_args`, `teacher_train.model_args`;
    the layer's own arguments for the new one are kept), and a layer's `terms` replace the previous ones (a terms block is the
    whole loss: merging would keep terms of another method)."""
    cfg = copy.deepcopy(cfg)
    layer = lift_trainer_callbacks(dict(layer))  # every spelling of callbacks merges by name
    if "terms" in layer:
        cfg.pop("terms", None)
    for key, args_key in (("student", "student_args"), ("data", "data_args")):
        if key in layer and layer[key] != cfg.get(key):
            cfg[args_key] = {}
    tt = layer.get("teacher_train")
    if isinstance(tt, Mapping) and "model" in tt:
        if tt["model"] != cfg.get("teacher_train", {}).get("model"):
            cfg.setdefault("teacher_train", {})["model_args"] = {}
    return deep_merge(cfg, layer)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    return data


def common_parser(
    prog: str, description: str, method_flag: str, teacher: bool = False
) -> argparse.ArgumentParser:
    """The flags every recipe shares; `teacher=True` adds the teacher's speed switches."""
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    p.add_argument("--list", action="store_true", help="print the registered names, one per line, and exit")
    p.add_argument(f"--{method_flag}", dest="method", help=f"{method_flag} name (see --list)")
    p.add_argument(
        "--data", help="data set name: digits, fashion_mnist, cifar10, cifar100, image_folder, fortunes, ..."
    )
    p.add_argument("--student", help="student model: a toolkit name, timm:NAME, hf:PATH")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--seed", type=int, help="one seed")
    p.add_argument("--seeds", help="comma-separated seeds: reports mean ± std")
    p.add_argument("--out", help="output directory (results.json, TensorBoard logs, checkpoints)")
    p.add_argument("--config", help="YAML file of options (overrides the method's config)")
    p.add_argument("--fast", action="store_true", help="tiny subset, one epoch: the smoke test")
    p.add_argument(
        "--callbacks",
        help="comma-separated registered callbacks to attach (options: --callbacks.NAME.KEY VALUE)",
    )
    p.add_argument(
        "--optimizer", dest="optimizer_name", help="optimizer by name (options: --optimizer.KEY VALUE)"
    )
    speed = p.add_argument_group("speed switches (opt-in; every run the recipe reports)")
    speed.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last memory format for the weights and 4-D inputs of the student (and teacher)",
    )
    speed.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the student's forward (options: --speed.compile '{mode: max-autotune}')",
    )
    speed.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the Trainer's precision (same as --trainer.precision); on CPU Lightning runs 16-mixed as "
        "bf16-mixed, with a warning",
    )
    if teacher:
        speed.add_argument(
            "--compile-teacher",
            action="store_true",
            help="torch.compile the teacher's forward (each network)",
        )
        speed.add_argument(
            "--teacher-precision",
            choices=sorted(TEACHER_PRECISIONS),
            help="the teacher's weights and forward in bf16 or fp16 (16), or 32; its outputs reach the loss "
            "in float32",
        )
    return p


def speed_layer(args: argparse.Namespace) -> dict[str, Any]:
    """The config layer of the speed flags: `speed: {channels_last, compile, compile_teacher,
    teacher_precision}` (read by `make_trainer`, which attaches `toolkit.callbacks.SpeedSwitches`)
    and `trainer: {precision}`. Flags not given leave the config as it is."""
    speed: dict[str, Any] = {}
    for flag in ("channels_last", "compile", "compile_teacher"):
        if getattr(args, flag, False):
            speed[flag] = True
    if getattr(args, "teacher_precision", None):
        speed["teacher_precision"] = TEACHER_PRECISIONS[args.teacher_precision]
    layer: dict[str, Any] = {"speed": speed} if speed else {}
    if getattr(args, "precision", None):
        layer["trainer"] = {"precision": args.precision}
    return layer


def speed_callback(cfg: Mapping[str, Any]) -> Any:
    """A `SpeedSwitches` callback for the config's `speed:` block, or None when every switch is
    off. Unknown keys and bad values are errors naming the accepted ones."""
    spec = cfg.get("speed") or {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"speed must be a mapping of switches, got {spec!r}")
    from toolkit.callbacks.speed import SpeedSwitches

    known = ("channels_last", "compile", "compile_teacher", "teacher_precision")
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ValueError(f"unknown speed switches {unknown}; known: {', '.join(known)}")
    callback = SpeedSwitches(**spec)
    return callback if callback.active else None


def parse(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Known flags plus `--prefix.key value` overrides as a nested dict."""
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or "." not in tok:
            parser.error(f"unrecognised argument {tok!r}; dotted options look like --trainer.devices 2")
        key, _, inline = tok[2:].partition("=")
        if inline:
            value, i = inline, i + 1
        else:
            if i + 1 >= len(rest):
                parser.error(f"{tok} needs a value")
            value, i = rest[i + 1], i + 2
        prefix, _, sub = key.partition(".")
        prefix = prefix.replace("-", "_")
        if prefix not in NESTED:
            parser.error(f"unknown option group {prefix!r} in {tok}; groups: {', '.join(sorted(NESTED))}")
        target = overrides.setdefault(NESTED[prefix], {})
        parts = sub.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = yaml_load(value)
    return args, overrides


def resolve_config(
    defaults: dict[str, Any], recipe: str, args: argparse.Namespace, overrides: dict[str, Any]
) -> dict[str, Any]:
    cfg = copy.deepcopy(defaults)
    user_cfg = load_yaml(args.config) if args.config else {}
    # the method's own YAML is the layer under --config: the method named on the command line,
    # else the one --config names, else the recipe's default
    method = args.method or user_cfg.get("method") or cfg.get("method")
    method_cfg = CONFIG_DIR / recipe / f"{method}.yaml"
    if method and method_cfg.exists() and method_cfg.resolve() != Path(args.config or "").resolve():
        cfg = merge_layer(cfg, load_yaml(method_cfg))
    cfg = merge_layer(cfg, user_cfg)
    flags = {
        "method": args.method,
        "data": args.data,
        "student": args.student,
        "epochs": args.epochs,
        "out": args.out,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if getattr(args, "callbacks", None):
        given["callbacks"] = {n.strip(): {} for n in args.callbacks.split(",") if n.strip()}
    if getattr(args, "optimizer_name", None):
        given["optimizer"] = {"name": args.optimizer_name}
    if args.seeds:
        given["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
    elif args.seed is not None:
        given["seeds"] = [args.seed]
    fast = cfg.pop("fast", {})
    cfg = merge_layer(cfg, given)
    if args.fast:  # shrinks the run, but never overrides what the command line set
        cfg = deep_merge(cfg, {k: v for k, v in fast.items() if k not in given})
    cfg = merge_layer(cfg, speed_layer(args))  # after --fast: its trainer block must not hide them
    return merge_layer(cfg, overrides)


def callback_entries(spec: Any, where: str) -> dict[str, dict[str, Any]]:
    """`{key: options}` from the spellings a config may use for its callbacks: a mapping
    `{NAME: {options}}`, a list of `NAME` / `{NAME: {options}}` items, or LightningCLI's
    `{class_path: pkg.mod.Class, init_args: {...}}` items (the key is then the class path)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        if "class_path" in spec:
            spec = [spec]
        else:
            spec = [{name: opts} for name, opts in spec.items()]
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if not isinstance(spec, list):
        raise ValueError(f"{where} must be a mapping or a list of callbacks, got {type(spec).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for item in spec:
        if isinstance(item, str):
            key, opts = item, {}
        elif isinstance(item, Mapping) and "class_path" in item:
            extra = set(item) - {"class_path", "init_args"}
            if extra:
                raise ValueError(f"{where}: unknown keys {sorted(extra)} beside class_path (use init_args)")
            key, opts = str(item["class_path"]), item.get("init_args") or {}
        elif isinstance(item, Mapping) and len(item) == 1:
            key, opts = next(iter(item.items()))
            opts = opts or {}
        else:
            raise ValueError(
                f"{where}: each callback is a NAME, a {{NAME: {{options}}}} mapping or a "
                f"{{class_path: ..., init_args: {{...}}}} mapping, got {item!r}"
            )
        if not isinstance(opts, Mapping):
            raise ValueError(f"{where}: the options of callback {key!r} must be a mapping, got {opts!r}")
        out[str(key)] = dict(opts)
    return out


def lift_trainer_callbacks(cfg: dict[str, Any]) -> dict[str, Any]:
    """Move `trainer.callbacks` (the spelling of Lightning's own YAML) into the config's `callbacks`
    block, so both spellings build the same callbacks and the Trainer never receives raw names."""
    trainer = cfg.get("trainer")
    lift = isinstance(trainer, Mapping) and "callbacks" in trainer
    if not lift and "callbacks" not in cfg:
        return cfg
    cfg = dict(cfg)
    lifted = {}
    if lift:
        trainer = dict(trainer)
        lifted = callback_entries(trainer.pop("callbacks"), "trainer.callbacks")
        cfg["trainer"] = trainer
    cfg["callbacks"] = {**callback_entries(cfg.get("callbacks"), "callbacks"), **lifted}
    return cfg


def build_callback(key: str, options: Mapping[str, Any]) -> Any:
    """A registered callback by name, or (a dotted key) a class imported from its path."""
    from toolkit import registry

    if "." not in key:
        return registry.build("callback", key, **options)
    module_name, _, class_name = key.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"callback class_path {key!r} cannot be imported ({e}); give a module path and class name"
        ) from e
    return cls(**options)


def config_callbacks(cfg: Mapping[str, Any]) -> list[Any]:
    """The callbacks a config names (`callbacks: {NAME: {options}}`, `trainer.callbacks: [...]`,
    or `--callbacks a,b`), built from the registry (kind "callback") or from a class path."""
    entries = callback_entries(lift_trainer_callbacks(dict(cfg)).get("callbacks"), "callbacks")
    return [build_callback(key, opts) for key, opts in entries.items()]


def make_trainer(
    cfg: dict[str, Any],
    out: Path,
    name: str,
    epochs: int,
    checkpoints: bool = True,
    with_callbacks: bool = True,
    **extra: Any,
):
    """A Trainer with TensorBoard logs under OUT/tb/NAME and checkpoints under OUT/checkpoints/NAME,
    and (unless `with_callbacks=False`: e.g. a teacher's training) the config's callbacks."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    kw: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": TensorBoardLogger(str(out / "tb"), name=name, version=""),
        "enable_model_summary": False,
        "log_every_n_steps": 10,
        "num_sanity_val_steps": 0,
        "callbacks": [],
    }
    if checkpoints:
        kw["callbacks"].append(
            ModelCheckpoint(dirpath=str(out / "checkpoints" / name), save_last=True, save_top_k=0)
        )
    else:
        kw["enable_checkpointing"] = False
    kw.update(extra)
    cfg = lift_trainer_callbacks(cfg)
    kw.update(cfg.get("trainer", {}))
    if with_callbacks:  # before the checkpoint callback, as Lightning orders them
        speed = speed_callback(cfg)
        kw["callbacks"] = [*config_callbacks(cfg), *([speed] if speed else []), *kw["callbacks"]]
    return L.Trainer(**kw)


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}" if len(values) > 1 else f"{100 * m:.2f}"


def is_global_zero() -> bool:
    return (
        int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
        and int(os.environ.get("NODE_RANK", "0")) == 0
    )


def write_results(
    out: Path,
    results: dict[str, Any],
    table_rows: list[tuple[str, str, str]],
    metric_label: str = "test accuracy (%)",
) -> None:
    """results.json + results.md, and the table on stdout (rank 0 only)."""
    if not is_global_zero():
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    header = ("run", metric_label, "wall (s)")
    widths = [max(len(r[i]) for r in (header, *table_rows)) for i in range(3)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table_rows]
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print("\n" + table + f"\n\nresults written to {out / 'results.json'}", flush=True)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def list_names(kind: str) -> None:
    import toolkit  # noqa: F401 - fills the registry
    from toolkit import registry

    print("\n".join(registry.names(kind)))
    sys.stdout.flush()


def selector_defaults(name: str) -> dict[str, Any]:
    """The `selector_args` of a selector's config (recipes/configs/prune/NAME.yaml), checking the
    name against the registry first."""
    import toolkit  # noqa: F401 - fills the registry
    from toolkit import registry

    registry.get("selector", name)
    path = CONFIG_DIR / "prune" / f"{name}.yaml"
    return dict(load_yaml(path).get("selector_args") or {}) if path.exists() else {}


def build_data(name: str, args: Mapping[str, Any], seed: int):
    """A registered DataModule; data sets that can download do so when absent (unless told not to)."""
    import inspect

    from toolkit import registry

    cls = registry.get("data", name)
    kw = dict(args)
    if "download" in inspect.signature(cls.__init__).parameters:
        kw.setdefault("download", True)
    return cls(seed=seed, **kw)


def test_accuracy(trainer, module, datamodule) -> float:
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return float(metrics["test/acc"])


def plot_comparison(
    path: Path,
    teacher_acc: float | None,
    runs: Mapping[str, Mapping[str, list[float]]],
    title: str,
    key: str = "acc",
    ylabel: str = "test accuracy (%)",
    scale: float = 100.0,
) -> None:
    """A bar chart of `runs[name][key]` (mean ± std over seeds, times `scale`) per run, the
    teacher (when given) as a line (rank 0)."""
    if not is_global_zero():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    stats = [mean_std(runs[n][key]) for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 3.5))
    ax.bar(
        names, [scale * m for m, _ in stats], yerr=[scale * s for _, s in stats], capsize=4, color="#4c72b0"
    )
    tops = [scale * (m + s) for m, s in stats]
    if teacher_acc is not None:
        ax.axhline(
            scale * teacher_acc, color="#c44e52", linestyle="--", label=f"teacher {scale * teacher_acc:.2f}"
        )
        tops.append(scale * teacher_acc)
        ax.legend(loc="best")
    lo, hi = min(scale * (m - s) for m, s in stats), max(tops)
    pad = 0.05 * max(hi - lo, 1e-6)
    bottom = lo - pad if lo - pad < 0 or scale != 100.0 else max(0.0, lo - 2.0)
    ax.set_ylim(bottom, hi + pad if scale != 100.0 else min(100.0, hi + 1.0))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
