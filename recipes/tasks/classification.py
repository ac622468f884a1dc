"""The default task: a classifier trained with the configured loss terms, scored by test accuracy."""

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
    trainer = make_trainer(cfg, out, f"{cfg['method']}_seed{seed}", cfg["epochs"])
    with Timer() as t:
        trainer.fit(module, datamodule=dm)
    return TaskResult("acc", test_accuracy(trainer, module, dm), t.seconds)
