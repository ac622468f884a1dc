"""Recipe stages (recipes/stages.py): a killed stage resumes from its last checkpoint and ends
with the weights of an uninterrupted run; finished stages are skipped; changed stages are errors;
the plan is checked before anything runs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from recipes import distill, stages
from recipes.distill import DEFAULTS
from recipes.stages import expand_stages, load_matching, run_stages, stage_config

ROOT = Path(__file__).resolve().parents[1]


def two_generation_config(epochs: int = 3) -> dict:
    """gen0 from the labels, gen1 distilled from gen0: tiny digits runs, deterministic."""
    cfg = {k: v for k, v in DEFAULTS.items() if k != "fast"}
    cfg.update(
        method="gt_self_distill",
        data="digits",
        data_args={"batch_size": 64, "train_subset": 256, "val_split": 64, "test_subset": 128},
        student="convnet",
        student_args={"width": 4},
        epochs=epochs,
        optimizer={"name": "adam", "lr": 0.01},
        scheduler={"name": "cosine"},
        method_args={},
        trainer={"deterministic": True, "enable_progress_bar": False, "limit_val_batches": 1},
        terms={"gt": {"distiller": "gt_self_distill", "alpha": 0.5}},
        stages=[
            {
                "name": "gen0",
                "teacher": "none",
                "terms": {"gt": {"distiller": "gt_self_distill", "alpha": 1.0}},
            },
            {"name": "gen1", "teacher": "previous"},
        ],
    )
    return cfg


class CountEpochs(Callback):
    def __init__(self):
        self.started = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.started.append(trainer.current_epoch)


def model_weights(path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.")}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from recipes.stages import run_stages

    class KillAt(Callback):  # SIGKILL: no exception handler, no clean-up, like a machine going down
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg, out = json.loads(sys.argv[1]), sys.argv[2]
    run_stages(cfg, 0, out, callbacks={"gen1": [KillAt()]})
    """
)


def test_a_killed_stage_resumes_from_its_last_checkpoint(tmp_path):
    cfg = two_generation_config(epochs=3)
    # the reference: the same stages never interrupted
    run_stages(cfg, 0, tmp_path / "straight")
    straight = model_weights(stages.stage_dir(tmp_path / "straight", "gen1", 0) / "model.ckpt")

    out = tmp_path / "killed"
    r = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        # the same intra-op thread count as the reference run (float sums depend on it)
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    gen0, gen1 = stages.stage_dir(out, "gen0", 0), stages.stage_dir(out, "gen1", 0)
    assert json.loads((gen0 / "stage.json").read_text())["status"] == "done"
    assert json.loads((gen1 / "stage.json").read_text())["status"] == "running"
    assert not (gen1 / "model.ckpt").exists()
    last = torch.load(gen1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1  # epochs 0 and 1 finished before the kill

    gen0_mtime = (gen0 / "model.ckpt").stat().st_mtime_ns
    counts = {"gen0": [CountEpochs()], "gen1": [CountEpochs()]}
    records = run_stages(cfg, 0, out, callbacks=counts)
    assert counts["gen0"][0].started == []  # done: skipped
    assert counts["gen1"][0].started == [2]  # resumed: only the epoch that was lost
    assert (gen0 / "model.ckpt").stat().st_mtime_ns == gen0_mtime
    assert [r["status"] for r in records] == ["done", "done"]
    # and it ends exactly where the uninterrupted run ended (CPU, deterministic)
    assert_same_weights(model_weights(gen1 / "model.ckpt"), straight)


def test_an_interrupted_stage_is_not_marked_done(tmp_path):
    class Boom(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("interrupted")

    cfg = two_generation_config(epochs=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_stages(cfg, 0, tmp_path, callbacks={"gen0": [Boom()]})
    record = json.loads((stages.stage_dir(tmp_path, "gen0", 0) / "stage.json").read_text())
    assert record["status"] == "running" and "results" not in record
    assert not (stages.stage_dir(tmp_path, "gen1", 0)).exists()  # later stages never started
    count = CountEpochs()
    run_stages(cfg, 0, tmp_path, callbacks={"gen0": [count]})
    assert count.started == [1]


def test_completed_stages_are_skipped(tmp_path):
    cfg = two_generation_config(epochs=1)
    first = run_stages(cfg, 0, tmp_path)
    mtimes = {r["name"]: Path(r["path"]).stat().st_mtime_ns for r in first}
    counts = {"gen0": [CountEpochs()], "gen1": [CountEpochs()]}
    again = run_stages(cfg, 0, tmp_path, callbacks=counts)
    assert counts["gen0"][0].started == [] and counts["gen1"][0].started == []
    assert again == first  # the recorded results, paths and fingerprints
    assert {r["name"]: Path(r["path"]).stat().st_mtime_ns for r in again} == mtimes
    # gen1 was taught by gen0's model: its record points at gen0's checkpoint as teacher input
    assert first[1]["results"]["test_acc"] >= 0 and Path(first[0]["path"]).name == "model.ckpt"
    # another seed is another set of stages
    other = run_stages(cfg, 1, tmp_path)
    assert all("seed1" in r["path"] for r in other)


def test_changed_stages_are_errors_and_invalidate_later_ones(tmp_path):
    cfg = two_generation_config(epochs=1)
    run_stages(cfg, 0, tmp_path)
    changed_gen1 = two_generation_config(epochs=1)
    changed_gen1["terms"]["gt"]["alpha"] = 0.2  # only gen1 uses the method's terms
    with pytest.raises(ValueError, match="stage 'gen1' .* was run with another configuration"):
        run_stages(changed_gen1, 0, tmp_path)
    changed_gen0 = two_generation_config(epochs=1)
    changed_gen0["stages"][0]["terms"]["gt"]["alpha"] = 0.9
    changed_gen0["stages"][0]["teacher"] = "recipe"
    with pytest.raises(ValueError, match="stage 'gen0'"):
        run_stages(changed_gen0, 0, tmp_path, teacher=object())
    # gen0's fingerprint is part of gen1's: same gen1 settings, another gen0 -> gen1 is stale too
    a = run_stages(two_generation_config(epochs=1), 0, tmp_path)[1]["fingerprint"]
    other = two_generation_config(epochs=1)
    other["stages"][0]["student_args"] = {"width": 6}
    other["stages"][1]["student_args"] = {"width": 4}
    plan = expand_stages(other)
    assert stage_config(other, plan[0])["student_args"] == {"width": 6}
    assert stage_config(other, plan[1])["student_args"] == {"width": 4}
    b = run_stages(other, 0, tmp_path / "other")[1]["fingerprint"]
    assert a != b


def test_method_options_reach_every_stage_but_not_keys_a_stage_sets():
    cfg = two_generation_config()
    cfg["method_args"] = {"alpha": 0.3, "reg_coef": 0.0}
    plan = expand_stages(cfg)
    gen0 = distill.method_terms(stage_config(cfg, plan[0]))["gt"]
    gen1 = distill.method_terms(stage_config(cfg, plan[1]))["gt"]
    assert gen0["alpha"] == 1.0 and gen0["reg_coef"] == 0.0
    assert gen1["alpha"] == 0.3 and gen1["reg_coef"] == 0.0
    # a stage without the method's term does not receive them
    cfg["stages"][0]["terms"] = {"ce": {"loss": "cross_entropy"}}
    assert stage_config(cfg, expand_stages(cfg)[0])["method_args"] == {}


def test_repeat_and_previous_expand_to_a_chain():
    cfg = two_generation_config()
    cfg["stages"] = [
        {"name": "gen0", "teacher": None},
        {"name": "gen", "repeat": 3, "teacher": "previous"},
        {"name": "pre", "kind": "prepass", "term": "gt", "teacher": "gen3"},
        {"name": "last", "init_from": "gen0", "terms": {"x": {"distiller": "kd", "path": "stage:pre"}}},
    ]
    plan = expand_stages(cfg)
    assert [s["name"] for s in plan] == ["gen0", "gen1", "gen2", "gen3", "pre", "last"]
    assert [s["teacher"] for s in plan] == ["none", "gen0", "gen1", "gen2", "gen3", "recipe"]
    assert [s["kind"] for s in plan][-2:] == ["prepass", "train"]
    assert stages._dependencies(plan[-1]) == ["gen0", "pre"]
    assert stages._resolve_refs({"a": ["stage:pre", "x"], "b": "stage:pre"}, {"pre": "/p"}) == {
        "a": ["/p", "x"],
        "b": "/p",
    }


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "non-empty list"),
        ([{"teacher": "none"}], "needs a `name`"),
        ([{"name": "a b"}], "needs a `name`"),
        ([{"name": "a", "colour": 1}], r"unknown keys \['colour'\]"),
        ([{"name": "a"}, {"name": "a"}], "two stages are named 'a'"),
        ([{"name": "a", "kind": "eval"}], "unknown kind 'eval'"),
        ([{"name": "a", "teacher": "previous"}], "no train stage comes before"),
        ([{"name": "a", "teacher": "b"}, {"name": "b"}], "teacher 'b' is not an earlier stage"),
        ([{"name": "a", "init_from": "a"}], "init_from 'a' is not an earlier stage"),
        ([{"name": "p", "kind": "prepass"}], "needs `term`"),
        ([{"name": "a", "term": "x"}], "for prepass stages only"),
        ([{"name": "p", "kind": "prepass", "term": "x"}, {"name": "b", "teacher": "p"}], "not a train stage"),
        ([{"name": "a", "repeat": 0}], "repeat must be an integer >= 1"),
        ([{"name": "a", "epochs": 0}], "epochs must be an integer >= 1"),
        (
            [{"name": "a", "terms": {"k": {"distiller": "kd", "p": "stage:later"}}}, {"name": "later"}],
            "later",
        ),
    ],
)
def test_bad_plans_fail_before_anything_runs(bad, message):
    cfg = two_generation_config()
    cfg["stages"] = bad
    with pytest.raises(ValueError, match=message):
        expand_stages(cfg)


def test_recipe_runs_stages_and_reruns_skip_them(tmp_path):
    config = tmp_path / "two.yaml"
    config.write_text(
        "method: gt_self_distill\n"
        "terms: {gt: {distiller: gt_self_distill, alpha: 0.5}}\n"
        "stages:\n"
        "  - {name: gen0, teacher: none, terms: {gt: {distiller: gt_self_distill, alpha: 1.0}}}\n"
        "  - {name: gen1, teacher: previous}\n"
    )
    args = ["--config", str(config), "--data", "digits", "--fast", "--out", str(tmp_path / "run")]
    args += ["--trainer.enable_progress_bar", "false"]
    res = distill.main(args)
    (records,) = res["stages"]["gt_self_distill"]
    assert [r["name"] for r in records] == ["gen0", "gen1"]
    assert res["student_acc"] == records[-1]["results"]["test_acc"]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "gt_self_distill stage gen0" in table and "gt_self_distill stage gen1" in table
    again = distill.main(args)
    assert again["stages"] == res["stages"] and again["student_acc"] == res["student_acc"]
    with pytest.raises(ValueError, match="teacher 'gen2' is not an earlier stage"):
        config.write_text(config.read_text().replace("teacher: previous", "teacher: gen2"))
        distill.main(args)


def test_load_matching_copies_shared_tensors_and_leading_classifier_rows(tmp_path):
    from toolkit.models import create_model

    small = create_model("convnet", num_classes=3, in_chans=1, width=4)
    big = create_model("convnet", num_classes=5, in_chans=1, width=4)
    path = tmp_path / "small.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in small.state_dict().items()}}, path)
    before = big.fc.weight.detach().clone()
    copied = load_matching(big, path)
    assert "fc.weight" in copied and "features.0.weight" in copied
    assert torch.equal(big.fc.weight[:3], small.fc.weight) and torch.equal(big.fc.weight[3:], before[3:])
    assert torch.equal(big.features[0].weight, small.features[0].weight)
    other = create_model("convnet", num_classes=7, in_chans=3, width=8, depth=1)
    other_path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, other_path)
    with pytest.raises(ValueError, match="no tensor .* matches"):
        load_matching(create_model("resnet8", num_classes=5, in_chans=1), other_path)
