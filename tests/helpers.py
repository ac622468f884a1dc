"""Test helpers shared by several test files (importable: pytest puts tests/ on sys.path)."""

from lightning.pytorch.callbacks import Callback


class StopAfter(Callback):
    """Interrupt a run after `epochs` epochs, as a killed job would (max_epochs unchanged)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def config_module(name, input_shape):
    """(resolved config, DistillationModule) for `recipes/configs/distill/NAME.yaml`, as
    `--config` alone resolves it, with a teacher of the config's architecture; prepared (the dry
    run resolves every tapped path and sizes projectors and heads) on a random input."""
    import torch

    from recipes import distill
    from recipes.common import CONFIG_DIR, common_parser, parse, resolve_config
    from toolkit import registry
    from toolkit.models import create_model
    from toolkit.modules import DistillationModule

    argv = ["--config", str(CONFIG_DIR / "distill" / f"{name}.yaml")]
    args, overrides = parse(common_parser("x", "y", "method"), argv)
    cfg = resolve_config(distill.DEFAULTS, "distill", args, overrides)
    data_cls = registry.get("data", cfg["data"])
    tt = cfg["teacher_train"]
    teacher = create_model(
        tt["model"],
        num_classes=data_cls.num_classes,
        in_chans=data_cls.in_chans,
        **(tt.get("model_args") or {}),
    )
    module = DistillationModule(
        cfg["student"],
        teacher,
        num_classes=data_cls.num_classes,
        in_chans=data_cls.in_chans,
        model_kwargs=cfg.get("student_args"),
        terms=distill.method_terms(cfg),
    )
    module.prepare(torch.randn(*input_shape))
    return cfg, module


# A small KD set-up shared by the teacher-cache tests: CE + KD (0.5 each), Adam.
KD_TERMS = {"ce": {"loss": "cross_entropy", "weight": 0.5}, "kd": {"distiller": "kd", "weight": 0.5}}
ADAM = {"name": "adam", "lr": 0.01}


def small_kd_module(teacher, terms=None, **kw):
    """A width-4 convnet student for 10-class one-channel data (digits), seeded, CE + KD."""
    import torch

    from toolkit.modules import DistillationModule

    torch.manual_seed(1)
    return DistillationModule(
        "convnet",
        teacher,
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms=KD_TERMS if terms is None else terms,
        optimizer=ADAM,
        **kw,
    )


def run_ddp_script(script: str, out) -> list[dict]:
    """Run tests/SCRIPT (a 2-process gloo job writing OUT/rank<i>.json) and return both ranks' records."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    r = subprocess.run(
        [sys.executable, str(here / script), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=here.parent,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads((Path(out) / f"rank{i}.json").read_text()) for i in range(2)]
