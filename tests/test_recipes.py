"""The recipes end to end: flags, configs, results files, errors, DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import distill, train
from toolkit import registry

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_list_prints_registered_names():
    r = run_module("recipes.distill", "--list")
    assert r.returncode == 0, r.stderr
    assert "kd" in r.stdout.split()
    assert all(len(line.split()) == 1 for line in r.stdout.splitlines())
    r = run_module("recipes.train", "--list")
    assert "cross_entropy" in r.stdout.split()


def test_distill_fast_writes_results(tmp_path):
    out = tmp_path / "kd"
    r = run_module("recipes.distill", "--method", "kd", "--data", "digits", "--fast", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for key in ("method", "data", "seeds", "teacher_acc", "student_acc", "baseline_acc", "wall_seconds"):
        assert key in res
    assert res["method"] == "kd" and res["data"] == "digits" and res["seeds"] == [0]
    assert 0 <= res["student_acc"] <= 1 and 0 <= res["teacher_acc"] <= 1
    assert "| student + kd" in r.stdout and (out / "results.md").exists()
    events = list((out / "tb").rglob("events.out.tfevents*"))
    assert any("kd_seed0" in str(e) for e in events) and any("student_seed0" in str(e) for e in events)
    assert (out / "checkpoints" / "kd_seed0" / "last.ckpt").exists()


def test_seeds_config_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "terms:\n  ce: {loss: cross_entropy, weight: 0.3}\n  kd: {distiller: kd, weight: 0.7, temperature: 3.0}\n"
    )
    res = distill.main(
        [
            "--data",
            "digits",
            "--fast",
            "--seeds",
            "0,1",
            "--config",
            str(cfg),
            "--method.temperature",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["seeds"] == [0, 1] and len(res["student_acc_per_seed"]) == 2
    assert res["terms"]["kd"] == {"distiller": "kd", "weight": 0.7, "temperature": 2}
    assert res["terms"]["ce"]["weight"] == 0.3
    assert "±" in capsys.readouterr().out
    # the second run reuses the cached teacher
    distill.main(
        ["--data", "digits", "--fast", "--out", str(tmp_path / "p"), "--trainer.enable_progress_bar", "false"]
    )
    assert "reusing the teacher" in capsys.readouterr().out


def test_given_teacher_checkpoint(tmp_path):
    first = distill.main(
        ["--data", "digits", "--fast", "--out", str(tmp_path / "a"), "--trainer.enable_progress_bar", "false"]
    )
    ckpt = tmp_path / "a" / "checkpoints" / "student_seed0" / "last.ckpt"
    res = distill.main(
        [
            "--data",
            "digits",
            "--fast",
            "--teacher",
            str(ckpt),
            "--out",
            str(tmp_path / "b"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["teacher"] == str(ckpt)
    assert res["teacher_acc"] == pytest.approx(first["baseline_acc"], abs=1e-6)


def test_train_recipe_fast(tmp_path):
    res = train.main(
        [
            "--data",
            "digits",
            "--fast",
            "--loss.label_smoothing",
            "0.1",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["method"] == "cross_entropy" and 0 <= res["acc"] <= 1
    assert res["terms"]["cross_entropy"]["label_smoothing"] == 0.1
    assert json.loads((tmp_path / "results.json").read_text())["acc"] == res["acc"]


def compare_argv(out) -> list[str]:
    """Two seeds of the --fast digits run, quiet, into OUT."""
    return [
        "--data",
        "digits",
        "--fast",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_train_compare_and_tasks(tmp_path):
    out = tmp_path / "cmp"
    argv = compare_argv(out)
    res = train.main(["--compare", "cross_entropy", *argv])
    run = res["runs"]["cross_entropy"]
    assert run["metric"] == "acc" and len(run["acc_per_seed"]) == 2 and run["acc"] == res["acc"]
    assert (out / "comparison.png").stat().st_size > 0 and (out / "results.md").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: cross_entropy\ntask: classificaton\n")
    with pytest.raises(KeyError, match="Did you mean 'classification'"):
        train.main(["--config", str(bad), *argv])
    r = run_module("recipes.train", "--compare", "cross_entropy,cross_entropy", "--fast")
    assert r.returncode != 0 and "lists a loss twice" in r.stderr


def test_recipe_errors():
    r = run_module("recipes.distill", "--method", "kdd", "--data", "digits", "--fast")
    assert r.returncode != 0 and "Did you mean 'kd'" in r.stderr
    r = run_module("recipes.distill", "--bogus.x", "1")
    assert r.returncode != 0 and "unknown option group 'bogus'" in r.stderr
    r = run_module("recipes.train", "--loss", "cross_entropyy", "--fast", "--data", "digits")
    assert r.returncode != 0 and "Did you mean 'cross_entropy'" in r.stderr
    with pytest.raises(KeyError, match="unknown data"):
        distill.main(["--data", "digitz", "--fast"])


@pytest.mark.slow
@pytest.mark.ci
def test_distill_fast_under_two_process_ddp(tmp_path):
    out = tmp_path / "ddp"
    r = run_module(
        "recipes.distill",
        "--method",
        "kd",
        "--data",
        "digits",
        "--fast",
        "--out",
        str(out),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.accelerator",
        "cpu",
        env={"TOOLKIT_CACHE": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["trainer"]["devices"] == 2
    assert 0 <= res["student_acc"] <= 1


@pytest.mark.slow
def test_default_demonstration(tmp_path):
    """The README's `make run`: under 5 minutes on 2 cores, and KD beats the student alone."""
    out = tmp_path / "demo"
    r = run_module(
        "recipes.distill", "--out", str(out), env={"TOOLKIT_CACHE": str(tmp_path / "cache")}, timeout=900
    )
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["data"] == "fashion_mnist" and res["method"] == "kd"
    assert res["wall_seconds"] < 300
    assert res["student_acc"] > res["baseline_acc"]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_resolves_and_builds(path):
    """Each shipped config names registered methods and builds its modules (no training)."""
    from recipes.common import common_parser, parse, resolve_config
    from toolkit import registry
    from toolkit.modules import ClassificationModule, DistillationModule

    recipe = path.parent.name
    if recipe == "prune":
        from recipes import prune

        args, overrides = parse(common_parser("x", "y", "method"), ["--config", str(path)])
        cfg = resolve_config(prune.DEFAULTS, recipe, args, overrides)
        selector_args = {k: v for k, v in cfg["selector_args"].items() if k != "scores"}
        if prune.is_pruning(cfg["method"]):
            selector_args["keep"] = cfg["keep"][0]
        built = registry.build("selector", cfg["method"], **selector_args)
        registry.get("data", cfg["data"])
        assert built is not None and cfg["method"] == path.stem
        return
    module = {"distill": distill, "train": train}[recipe]
    args, overrides = parse(common_parser("x", "y", "method"), ["--config", str(path)])
    cfg = resolve_config(module.DEFAULTS, recipe, args, overrides)
    data_cls = registry.get("data", cfg["data"])
    kw = {
        "num_classes": data_cls.num_classes,
        "in_chans": data_cls.in_chans,
        "model_kwargs": cfg.get("student_args"),
        "optimizer": cfg.get("optimizer"),
        "scheduler": cfg.get("scheduler"),
    }
    if recipe == "distill":
        tt = cfg["teacher_train"]
        teacher = ClassificationModule(tt["model"], **{**kw, "model_kwargs": tt.get("model_args")}).model
        built = DistillationModule(cfg["student"], teacher, terms=distill.method_terms(cfg), **kw)
        assert cfg["method"] in registry.names("distiller")
    elif cfg.get("task", "classification") == "classification":
        built = ClassificationModule(cfg["student"], loss=train.loss_terms(cfg), **kw)
        assert cfg["method"] in registry.names("loss")
        from recipes.common import config_callbacks
        from toolkit.optim import build_optimizer

        config_callbacks(cfg)  # the callbacks a config names exist and take its options
        build_optimizer(built.parameters(), cfg.get("optimizer"))
    else:  # another task builds its own module: recipes/tasks/<task>.py defines build_module(cfg, data)
        import importlib

        task_module = importlib.import_module(f"recipes.tasks.{cfg['task']}")
        assert hasattr(task_module, "build_module"), (
            f"recipes/tasks/{cfg['task']}.py needs build_module(cfg, data)"
        )
        built = task_module.build_module(cfg, data_cls)
        assert cfg["method"] in registry.names("loss")
    assert len(built.loss_terms) >= 1


@pytest.mark.parametrize(
    "selector", [n for n in registry.names("selector") if n != "zip_fit"]
)  # zip_fit: text
def test_prune_recipe_runs_every_selector_fast(selector, tmp_path):
    from recipes import prune

    res = prune.main(
        [
            "--selector",
            selector,
            "--data",
            "digits",
            "--fast",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    accs = [r["acc"] for r in res["runs"].values()]
    assert len(accs) >= 2 and all(0.0 <= a <= 1.0 for a in accs)
    assert (tmp_path / "results.md").exists()


def test_compare_runs_methods_on_one_teacher(tmp_path):
    out = tmp_path / "cmp"
    argv = compare_argv(out)
    res = distill.main(["--compare", "kd", *argv])
    assert set(res["runs"]) == {"student", "kd"}
    assert len(res["runs"]["kd"]["acc_per_seed"]) == 2 and res["student_acc"] == res["runs"]["kd"]["acc"]
    assert (out / "comparison.png").stat().st_size > 1000 and "student + kd" in (
        out / "results.md"
    ).read_text()
    # run again with one more method: the finished runs are read from their records, only the
    # new one trains (its TensorBoard run is the only one written)
    shutil.rmtree(out / "tb")
    again = distill.main(["--compare", "kd,dkd", *argv])
    assert sorted(p.name for p in (out / "tb").iterdir()) == ["dkd_seed0", "dkd_seed1"]
    assert again["runs"]["kd"]["acc_per_seed"] == res["runs"]["kd"]["acc_per_seed"]
    assert again["runs"]["student"]["acc_per_seed"] == res["runs"]["student"]["acc_per_seed"]
    # a changed configuration (here the epochs, which the student alone shares) does not reuse a record
    shutil.rmtree(out / "tb")
    distill.main(["--compare", "kd", *argv, "--epochs", "2"])
    assert sorted(p.name for p in (out / "tb").iterdir()) == [
        "kd_seed0",
        "kd_seed1",
        "student_seed0",
        "student_seed1",
    ]
    r = run_module("recipes.distill", "--compare", "kd,kd", "--fast")
    assert r.returncode != 0 and "lists a method twice" in r.stderr
    r = run_module("recipes.distill", "--compare", "kd,dkdx", "--data", "digits", "--fast")
    assert r.returncode != 0 and "unknown distiller 'dkdx'" in r.stderr


def test_compare_gives_each_method_the_teacher_its_config_asks_for(tmp_path):
    # ensemble_kd's config trains 3 members; kd's the single teacher (member 0 of the same cache)
    res = distill.main(["--compare", "kd,ensemble_kd", *compare_argv(tmp_path)])
    assert res["teachers"]["kd"]["members"] == 1
    assert res["teachers"]["ensemble_kd"]["members"] == 3
    assert res["teachers"]["kd"]["acc"] == res["teacher_acc"]
    assert "teacher of ensemble_kd (3 members)" in (tmp_path / "results.md").read_text()


def test_distill_on_a_class_split_builds_the_student_for_the_kept_classes(tmp_path):
    # the student used to be built for all 10 classes before the split was applied
    res = distill.main(
        [
            "--compare",
            "kd",
            *compare_argv(tmp_path),
            "--data.known_classes",
            "[0, 6]",
            "--data.class_split",
            "known",
        ]
    )
    assert 0.0 <= res["runs"]["kd"]["acc"] <= 1.0 and 0.0 <= res["runs"]["student"]["acc"] <= 1.0


def test_config_layering_rules():
    from recipes.common import common_parser, parse, resolve_config

    def resolve(*argv):
        args, overrides = parse(common_parser("x", "y", "method"), list(argv))
        return resolve_config(distill.DEFAULTS, "distill", args, overrides)

    default = resolve()
    assert default["data"] == "fashion_mnist" and default["data_args"]["train_subset"] == 2000
    # another data set or model: the old one's arguments do not leak
    assert resolve("--data", "digits")["data_args"] == {}
    assert resolve("--student", "resnet8")["student_args"] == {}
    # --fast shrinks the run but never overrides what the command line gave
    fast = resolve("--fast", "--epochs", "3", "--seeds", "4,5", "--data", "digits", "--data.batch_size", "16")
    assert fast["epochs"] == 3 and fast["seeds"] == [4, 5]
    assert fast["data_args"] == {"train_subset": 256, "val_split": 128, "test_subset": 256, "batch_size": 16}
    # --config alone: its method's terms only, never merged with the default method's terms
    cifar = resolve("--config", "recipes/configs/distill/dkd_cifar100.yaml")
    assert cifar["method"] == "dkd" and set(cifar["terms"]) == {"ce", "dkd"}
    assert set(resolve("--method", "dkd")["terms"]) == {"ce", "dkd"}
    assert set(resolve()["terms"]) == {"ce", "kd"}
    # a config that changes the data set starts from its own data arguments only
    assert "train_subset" not in cifar["data_args"] and cifar["data_args"]["batch_size"] == 64


@pytest.mark.parametrize("method", sorted(registry.names("distiller")))
def test_every_distiller_runs_on_digits_fast(method, tmp_path):
    """`python -m recipes.distill --method NAME --data digits --fast` for every registered name."""
    res = distill.main(
        [
            "--method",
            method,
            "--data",
            "digits",
            "--fast",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["method"] == method and res["data"] == "digits"
    assert 0 <= res["student_acc"] <= 1 and 0 <= res["baseline_acc"] <= 1
    assert (tmp_path / "results.json").exists()


def test_callbacks_and_optimizer_flags_reach_every_recipe_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train.main(
        [
            "--data",
            "digits",
            "--fast",
            "--callbacks",
            "knn_probe",
            "--callbacks.knn_probe.k",
            "5",
            "--optimizer",
            "adamw",
            "--optimizer.lr",
            "0.001",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["config"]["callbacks"] == {"knn_probe": {"k": 5}}
    assert res["config"]["optimizer"] == {"name": "adamw", "lr": 0.001}
    tags = set()
    for events in (tmp_path / "tb").rglob("events.out.tfevents*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert "val/knn_acc" in tags
    with pytest.raises(KeyError, match="unknown callback 'knn_prob'"):
        train.main(["--data", "digits", "--fast", "--callbacks", "knn_prob", "--out", str(tmp_path / "x")])


def test_trainer_callbacks_in_yaml_build_the_same_callbacks_as_the_callbacks_block(tmp_path):
    """Lightning's own spelling, `trainer: {callbacks: [...]}`, with names, options and class paths."""
    from lightning.pytorch.callbacks import EarlyStopping

    from recipes.common import common_parser, config_callbacks, make_trainer, parse, resolve_config
    from toolkit.callbacks import KNNProbe

    config = tmp_path / "run.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - knn_probe\n"
        "    - calibration: {n_bins: 7}\n"
        "    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
        "      init_args: {monitor: val/acc, patience: 3, mode: max}\n"
    )
    args, overrides = parse(
        common_parser("x", "y", "method"), ["--config", str(config), "--callbacks.knn_probe.k", "5"]
    )
    cfg = resolve_config(train.DEFAULTS, "train", args, overrides)
    assert "callbacks" not in cfg["trainer"]
    assert cfg["callbacks"] == {
        "knn_probe": {"k": 5},
        "calibration": {"n_bins": 7},
        "lightning.pytorch.callbacks.EarlyStopping": {"monitor": "val/acc", "patience": 3, "mode": "max"},
    }
    trainer = make_trainer(cfg, tmp_path, "run", epochs=1, checkpoints=False)
    probe = next(cb for cb in trainer.callbacks if isinstance(cb, KNNProbe))
    stop = next(cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping))
    assert probe.k == 5 and stop.patience == 3 and stop.monitor == "val/acc"
    # a config that was never resolved still reaches the Trainer without raw names
    raw = {"trainer": {"callbacks": {"knn_probe": {"k": 3}}}}
    assert [type(cb) for cb in config_callbacks(raw)] == [KNNProbe]
    assert any(
        isinstance(cb, KNNProbe) for cb in make_trainer(raw, tmp_path, "raw", 1, checkpoints=False).callbacks
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"trainer": {"callbacks": ["knn_prob"]}}, "unknown callback 'knn_prob'"),
        ({"trainer": {"callbacks": [3]}}, "each callback is a NAME"),
        ({"trainer": {"callbacks": [{"knn_probe": 5}]}}, "options of callback 'knn_probe' must be a mapping"),
        ({"trainer": {"callbacks": [{"class_path": "nowhere.Callback"}]}}, "cannot be imported"),
        ({"trainer": {"callbacks": [{"class_path": "a.B", "args": {}}]}}, "use init_args"),
    ],
)
def test_trainer_callbacks_bad_entries_say_what_to_write(spec, match):
    from recipes.common import config_callbacks

    with pytest.raises((KeyError, ValueError), match=match):
        config_callbacks(spec)


def test_train_recipe_with_saliency_calibration_and_curvature_callbacks_writes_images_and_scalars(tmp_path):
    """The issue's evidence command, on digits: images and scalars land in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(
        [
            "--data",
            "digits",
            "--fast",
            "--callbacks",
            "grad_cam,calibration,hessian_monitor",
            "--callbacks.grad_cam.num_samples",
            "4",
            "--callbacks.hessian_monitor.num_samples",
            "32",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    scalars, images = set(), {}
    for events in (tmp_path / "tb").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
        scalars |= set(acc.Tags()["scalars"])
        for tag in acc.Tags()["images"]:
            images[tag] = acc.Images(tag)[-1]
    assert {
        "val/ece",
        "val/temperature",
        "hessian/trace",
        "hessian/eig_1",
        "hessian/stability_threshold",
    } <= scalars
    assert "saliency/grad_cam" in images and "val/reliability_diagram" in images
    grid = images["saliency/grad_cam"]
    assert grid.width > 0 and grid.height > 0
    assert list(tmp_path.rglob("saliency/grad_cam/*.png")) and list(tmp_path.rglob("reliability_val.png"))
