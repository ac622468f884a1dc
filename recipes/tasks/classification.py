"""The default task: a classifier trained with the configured loss terms, scored by test accuracy.

`selector: NAME` (with `selector_args`) attaches a data selector (`toolkit.selection`): a callback
(pruning, reweighting) joins the trainer, a loss term (`elr`) joins the loss. `run_name` names the
run's logs and checkpoints (default: the method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recipes.common import Timer, build_data, make_trainer, test_accuracy
from recipes.tasks import TaskResult, task


@task("classification")
def classification(cfg: dict[str, Any], seed: int, out: Path) -> TaskResult:
    import lightning as L

    from recipes.train import loss_terms
    from toolkit.modules import ClassificationModule

    L.seed_everything(seed, workers=True, verbose=False)
    dm = build_data(cfg["data"], cfg["data_args"], seed=seed)
    dm.setup("fit")
    module = ClassificationModule(
        cfg["student"],
        num_classes=dm.num_classes,
        in_chans=dm.in_chans,
        loss=loss_terms(cfg),
        model_kwargs=cfg.get("student_args"),
        optimizer=cfg.get("optimizer"),
        scheduler=cfg.get("scheduler"),
    )
    trainer = make_trainer(cfg, out, f"{cfg.get('run_name') or cfg['method']}_seed{seed}", cfg["epochs"])
    selector = attach_selector(cfg, module, trainer)
    with Timer() as t:
        trainer.fit(module, datamodule=dm)
    extra = {"label_noise": dm.label_noise} if dm.label_noise else {}
    if selector is not None and hasattr(selector, "subset") and selector.subset is not None:
        extra["kept"] = len(selector.subset) / len(dm.train_sample_indices)
    return TaskResult("acc", test_accuracy(trainer, module, dm), t.seconds, extra=extra)


def attach_selector(cfg: dict[str, Any], module: Any, trainer: Any) -> Any:
    """Build the config's selector and attach it: a LossTerm to the loss, a callback to the trainer."""
    if not cfg.get("selector"):
        return None
    from toolkit import registry
    from toolkit.terms import LossTerm

    selector = registry.build("selector", cfg["selector"], **(cfg.get("selector_args") or {}))
    if isinstance(selector, LossTerm):
        module.add_term(cfg["selector"], selector)
    else:
        trainer.callbacks.insert(0, selector)  # before the checkpoint callback, as Lightning orders them
    return selector
