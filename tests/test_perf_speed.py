"""Speed switches (issue 7, item 3): channels-last, torch.compile of student and teacher, the
Trainer's precision and the teacher's own precision. Each is checked for correctness on CPU
against the same run without it, with real Trainer runs on digits and real models:

- channels-last: the same losses and first-step gradients within 1e-5 (only the memory layout
  changes; oneDNN's kernels for the two layouts may round differently);
- compile (inductor): the same per-step losses as eager within 1e-5 (fused kernels round
  differently); the compiled graph holds the whole forward, taps included, in one graph;
- teacher "bf16-true" / "16-true": logits within 4 units of the dtype's rounding (2^-6 / 2^-9
  relative to the largest logit: bf16 keeps 8 significant bits, fp16 11) and the KD loss within
  1e-3 relative;
- Trainer "bf16-mixed": each step's loss within 2^-6 relative (bf16 matmuls and convolutions);
  "16-mixed" on CPU is run as bf16-mixed by Lightning, with its warning.

Bad values are refused at set-up with errors naming the accepted ones.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from recipes.common import common_parser, parse, resolve_config, speed_callback
from recipes.common import make_trainer as recipe_trainer
from toolkit.callbacks import SpeedSwitches
from toolkit.data import DigitsDataModule
from toolkit.distill import FeatureTaps, Teacher
from toolkit.functional.kd import kd_loss
from toolkit.models import compile_model, create_model, forward_output, speed_state, use_channels_last
from toolkit.models.output import eager_forward_output
from toolkit.modules import ClassificationModule, DistillationModule

TERMS = {
    "ce": {"loss": "cross_entropy", "weight": 0.5},
    "kd": {"distiller": "kd", "weight": 0.5, "temperature": 4.0},
    "fitnet": {
        "distiller": "fitnet",
        "weight": 1.0,
        "student_layer": "features.3",
        "teacher_layer": "features.3",
    },
}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Single-threaded: faster on a busy machine, and the same reduction order in both runs."""


def teacher_net(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("convnet", num_classes=10, in_chans=1, width=8)


def distiller(teacher=None, terms=TERMS):
    """KD + FitNet (a projector, taps on both networks) with a convnet teacher: every part a
    switch touches."""
    L.seed_everything(0)
    return DistillationModule(
        "convnet",
        Teacher(teacher if teacher is not None else teacher_net()),
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms=terms,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
    )


class Record(Callback):
    """Each step's loss and term values, and the first step's gradients."""

    def __init__(self):
        self.losses, self.grads = [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def run(module, make_trainer, callbacks=(), steps=3, **kw) -> Record:
    rec = Record()
    trainer = make_trainer(
        max_epochs=1, limit_train_batches=steps, limit_val_batches=0, callbacks=[rec, *callbacks], **kw
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, val_split=0.1, seed=0))
    assert len(rec.losses) == steps
    return rec


def assert_same_run(a: Record, b: Record, rtol: float, atol: float, grads: bool = True) -> None:
    torch.testing.assert_close(torch.stack(a.losses), torch.stack(b.losses), rtol=rtol, atol=atol)
    if grads:
        assert a.grads.keys() == b.grads.keys() and a.grads
        for name in a.grads:
            torch.testing.assert_close(a.grads[name], b.grads[name], rtol=rtol, atol=atol, msg=name)


# -- channels-last ------------------------------------------------------------------------------


def test_channels_last_gives_the_same_losses_and_gradients(make_trainer):
    base = run(distiller(), make_trainer)
    module = distiller()
    switched = run(module, make_trainer, [SpeedSwitches(channels_last=True)])
    assert_same_run(base, switched, rtol=1e-5, atol=1e-5)
    channels_last = torch.channels_last
    conv = module.model.features[4].weight  # (8, 4, 3, 3): the layout is unambiguous
    assert conv.is_contiguous(memory_format=channels_last) and not conv.is_contiguous()
    tconv = module.teacher.nets[0].features[4].weight
    assert tconv.is_contiguous(memory_format=channels_last) and not tconv.is_contiguous()
    assert speed_state(module.model) == {"channels_last": True, "compiled": False}
    assert speed_state(module.teacher.nets[0])["channels_last"]
    # the inputs the networks see are converted too (the first conv's input)
    seen = {}
    handle = module.model.features[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    forward_output(module.model, torch.randn(2, 1, 8, 8))
    handle.remove()
    assert seen["x"].is_contiguous(memory_format=channels_last)


# -- compile ------------------------------------------------------------------------------------


def test_compiled_forward_is_one_graph_with_the_taps():
    graphs = []

    def backend(gm, example_inputs):  # records what Dynamo captured, runs it as traced
        graphs.append(gm)
        return gm.forward

    net = teacher_net()
    taps = FeatureTaps(net, ["features.3", "fc:input"])
    x = torch.randn(4, 1, 8, 8)
    eager = eager_forward_output(net, x)
    eager_feats = taps.pop()
    compile_model(net, {"backend": backend})
    out = forward_output(net, x)
    assert len(graphs) == 1  # features, embedding, logits and the hooks: no graph break
    convs = [n for n in graphs[0].graph.nodes if "conv2d" in str(n.target)]
    assert len(convs) == 2  # both of the network's convolutions are inside the graph
    feats = taps.pop()
    assert feats.keys() == eager_feats.keys()
    torch.testing.assert_close(out.logits, eager.logits)
    torch.testing.assert_close(out.embedding, eager.embedding)
    for k in feats:
        torch.testing.assert_close(feats[k], eager_feats[k])
    for _ in range(2):  # as every step: forward, then the module pops the features
        forward_output(net, x)
        assert taps.pop().keys() == eager_feats.keys()
    assert len(graphs) == 1  # cached: no recompilation for the same input
    compile_model(net, {"backend": backend})  # same options: keeps the compiled function
    forward_output(net, x)
    assert len(graphs) == 1
    # a deep copy (an EMA teacher) runs eagerly: nothing is stored on the network
    twin = copy.deepcopy(net)
    assert speed_state(twin) == {"channels_last": False, "compiled": False}
    assert net.state_dict().keys() == twin.state_dict().keys()


@pytest.mark.slow
@pytest.mark.ci
def test_compile_gives_the_same_losses_as_eager(make_trainer):
    """Inductor, student and teacher compiled, KD + FitNet: a real Trainer run on digits (two
    minutes on the loaded 2-core machine, mostly compilation)."""
    from torch._dynamo.utils import counters

    eager = distiller()
    base = run(eager, make_trainer)
    keys = eager.state_dict().keys()
    module = distiller()
    before = counters["stats"]["unique_graphs"]
    switched = run(module, make_trainer, [SpeedSwitches(compile=True, compile_teacher=True)])
    assert counters["stats"]["unique_graphs"] > before  # the compiled path ran
    assert speed_state(module.model)["compiled"] and speed_state(module.teacher.nets[0])["compiled"]
    assert_same_run(base, switched, rtol=1e-5, atol=1e-5, grads=False)
    assert module.state_dict().keys() == keys  # checkpoints unchanged


# -- precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "dtype", "bits"), [("bf16-true", torch.bfloat16, 8), ("16-true", torch.float16, 11)]
)
def test_teacher_true_precision_within_its_rounding(precision, dtype, bits):
    dm = DigitsDataModule(batch_size=64, val_split=0.1, seed=0)
    dm.setup("fit")
    x = next(iter(dm.train_dataloader())).input
    net = teacher_net()
    full = Teacher(copy.deepcopy(net))(x).logits
    teacher = Teacher(copy.deepcopy(net), precision=precision)
    assert all(p.dtype == dtype for p in teacher.nets[0].parameters())
    low = teacher(x).logits
    assert low.dtype == torch.float32 and not torch.equal(low, full)
    assert (low - full).abs().max() <= 2.0 ** (2 - bits) * full.abs().max()
    student = torch.randn_like(full) * 3
    for tau in (1.0, 4.0):
        torch.testing.assert_close(kd_loss(student, low, tau), kd_loss(student, full, tau), rtol=1e-3, atol=0)
    teacher.set_precision(None)  # back to float32 weights (their rounding stays)
    assert all(p.dtype == torch.float32 for p in teacher.nets[0].parameters())


def test_teacher_precision_switch_in_a_trainer_run(make_trainer):
    terms = {k: v for k, v in TERMS.items() if k != "fitnet"}
    base = run(distiller(terms=terms), make_trainer)
    module = distiller(terms=terms)
    switched = run(module, make_trainer, [SpeedSwitches(teacher_precision="bf16-true", channels_last=True)])
    assert module.teacher.precision == "bf16-true"
    assert next(module.teacher.nets[0].parameters()).dtype == torch.bfloat16
    assert next(module.model.parameters()).dtype == torch.float32  # the student is untouched
    # three steps apart only by the teacher's rounding (KD within 1e-3: here on the total)
    torch.testing.assert_close(torch.stack(switched.losses), torch.stack(base.losses), rtol=1e-3, atol=1e-4)


def test_bf16_mixed_steps_within_bf16_rounding(make_trainer):
    base = run(distiller(), make_trainer)
    mixed = run(distiller(), make_trainer, precision="bf16-mixed")
    torch.testing.assert_close(torch.stack(mixed.losses), torch.stack(base.losses), rtol=2.0**-6, atol=1e-3)
    with pytest.warns(UserWarning, match="bf16-mixed"):  # Lightning's: fp16 AMP needs a GPU
        make_trainer(max_epochs=1, precision="16-mixed")


# -- recipes ------------------------------------------------------------------------------------


def resolve(argv, teacher=True):
    from recipes import distill

    args, overrides = parse(common_parser("x", "y", "method", teacher=teacher), argv)
    return resolve_config(distill.DEFAULTS, "distill", args, overrides)


def test_recipe_flags_set_the_config_and_the_callback(tmp_path):
    cfg = resolve(
        [
            "--fast",
            "--channels-last",
            "--compile",
            "--compile-teacher",
            "--precision",
            "bf16-mixed",
            "--teacher-precision",
            "bf16",
        ]
    )
    assert cfg["speed"] == {
        "channels_last": True,
        "compile": True,
        "compile_teacher": True,
        "teacher_precision": "bf16-true",
    }
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["trainer"]["check_val_every_n_epoch"] == 1  # --fast's trainer options are kept
    trainer = recipe_trainer(cfg, tmp_path, "x", 1, checkpoints=False)
    (speed,) = [c for c in trainer.callbacks if isinstance(c, SpeedSwitches)]
    assert speed.channels_last and speed.compile == {} and speed.teacher_precision == "bf16-true"
    # without the flags: no callback, the trainer's precision untouched
    plain = resolve(["--fast"])
    assert "speed" not in plain and "precision" not in plain["trainer"]
    assert speed_callback(plain) is None
    # dotted options reach the same block (and win over the flags)
    cfg = resolve(["--compile", "--speed.compile", "{mode: reduce-overhead}", "--trainer.precision", "32"])
    assert speed_callback(cfg).compile == {"mode": "reduce-overhead"}
    # every recipe has the student flags; the teacher's only where there is a teacher
    for recipe in ("train", "prune"):
        mod = __import__(f"recipes.{recipe}", fromlist=["main"])
        with pytest.raises(SystemExit):
            mod.main(["--teacher-precision", "bf16"])
    args, _ = parse(common_parser("x", "y", "loss"), ["--channels-last", "--precision", "32"])
    assert args.channels_last and args.precision == "32"


def test_bad_values_are_refused_with_clear_errors(make_trainer, capsys):
    with pytest.raises(ValueError, match="channels_last must be true or false"):
        SpeedSwitches(channels_last="yes")
    with pytest.raises(ValueError, match="compile must be true, false or a mapping"):
        SpeedSwitches(compile="fast")
    with pytest.raises(ValueError, match=r"unknown torch.compile options \['modee'\].*mode"):
        SpeedSwitches(compile_teacher={"modee": "max-autotune"})
    with pytest.raises(ValueError, match="teacher precision must be one of"):
        SpeedSwitches(teacher_precision="int8")
    with pytest.raises(ValueError, match="teacher precision must be one of"):
        Teacher(teacher_net(), precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"unknown speed switches \['compile_student'\]"):
        speed_callback({"speed": {"compile_student": True}})
    with pytest.raises(ValueError, match="speed must be a mapping"):
        speed_callback({"speed": "fast"})
    with pytest.raises(TypeError, match="speed switches apply to an nn.Module"):
        use_channels_last(lambda x: x)
    for argv, message in (
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--teacher-precision", "8"], "invalid choice: '8'"),
    ):
        with pytest.raises(SystemExit):
            resolve(argv)
        assert message in capsys.readouterr().err

    class NoModel(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(TypeError, match="keeps its network in `.model`"):
        SpeedSwitches(channels_last=True).setup(make_trainer(), NoModel(), "fit")

    class OwnForward(NoModel):  # a network the module calls itself: compiling it would do nothing
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="does not run its network through"):
        SpeedSwitches(compile=True).setup(make_trainer(), OwnForward(), "fit")


def test_student_alone_gets_the_student_switches_only(make_trainer):
    """The baseline run of recipes.distill has no teacher: the teacher switches pass it by."""
    L.seed_everything(0)
    module = ClassificationModule("convnet", num_classes=10, in_chans=1, model_kwargs={"width": 4})
    run(module, make_trainer, [SpeedSwitches(channels_last=True, teacher_precision="bf16-true")], steps=1)
    assert speed_state(module.model)["channels_last"]


def test_train_recipe_runs_with_the_switches(tmp_path):
    from recipes import train

    res = train.main(
        ["--data", "digits", "--fast", "--channels-last", "--precision", "bf16-mixed", "--out", str(tmp_path)]
    )
    assert res["config"]["speed"] == {"channels_last": True}
    assert res["config"]["trainer"]["precision"] == "bf16-mixed"
    assert 0 <= res["acc"] <= 1
