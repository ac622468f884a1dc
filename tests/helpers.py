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
