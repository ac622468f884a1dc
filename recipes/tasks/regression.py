"""Regression: a scalar regressor (`RegressionModule`) trained with a regression loss (`mse`, or
`hl_gauss` = classification over bins), scored by test MAE (lower is better; RMSE in `extra`).

    python -m recipes.train --loss hl_gauss --data diabetes --fast
    python -m recipes.train --compare hl_gauss,mse --seeds 0,1,2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recipes.common import Timer, build_data, make_trainer
from recipes.tasks import TaskResult, task


def build_module(cfg: dict[str, Any], data: Any):
    """The config's `RegressionModule` for a regression data set (a DataModule or its class)."""
    from recipes.train import loss_terms
    from toolkit.modules.regression import RegressionModule

    if getattr(data, "task", None) != "regression":
        name = getattr(data, "name", type(data).__name__)
        raise ValueError(
            f"task 'regression' needs a regression data set (float targets), e.g. --data diabetes; got {name!r}"
        )
    return RegressionModule(
        cfg["student"],
        loss=loss_terms(cfg),
        in_chans=data.in_chans,
        model_kwargs=cfg.get("student_args"),
        optimizer=cfg.get("optimizer"),
        scheduler=cfg.get("scheduler"),
    )


@task("regression")
def regression(cfg: dict[str, Any], seed: int, out: Path) -> TaskResult:
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)
    dm = build_data(cfg["data"], cfg["data_args"], seed=seed)
    module = build_module(cfg, dm)
    dm.setup("fit")
    trainer = make_trainer(cfg, out, f"{cfg['method']}_seed{seed}", cfg["epochs"])
    with Timer() as t:
        trainer.fit(module, datamodule=dm)
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    return TaskResult(
        "mae",
        float(metrics["test/mae"]),
        t.seconds,
        higher_is_better=False,
        scale=1.0,
        unit="",
        extra={"rmse": float(metrics["test/rmse"])},
    )
