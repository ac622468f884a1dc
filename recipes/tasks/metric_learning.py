"""Metric learning: an embedding network (`EmbeddingModule`) trained with a metric-learning loss
on class-balanced P×K batches, scored by test Recall@1 (leave-one-out retrieval within the test
split; Recall@2/4/8 in `extra`).

    python -m recipes.train --loss multi_similarity --data digits --fast

Config keys of this task: `embedding: {dim: D}` (a linear embedding layer of D outputs; `dim: null`
uses the backbone's pooled penultimate features), `sampler: {classes_per_batch: P,
samples_per_class: K}` (sets the data options `batch_size` = P·K and `samples_per_class` = K),
`recall_ks: [1, 2, 4, 8]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recipes.common import Timer, build_data, make_trainer
from recipes.tasks import TaskResult, task

SAMPLER = {"classes_per_batch": 8, "samples_per_class": 4}


def data_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """The data options with the P×K batches of `sampler:` (batch_size = P·K)."""
    sampler = {**SAMPLER, **(cfg.get("sampler") or {})}
    p, k = int(sampler["classes_per_batch"]), int(sampler["samples_per_class"])
    return {**(cfg.get("data_args") or {}), "batch_size": p * k, "samples_per_class": k}


def build_module(cfg: dict[str, Any], data: Any):
    """The config's `EmbeddingModule` for a labelled data set (a DataModule or its class)."""
    from recipes.train import loss_terms
    from toolkit.modules.metric_learning import EmbeddingModule

    if getattr(data, "task", "classification") != "classification":
        raise ValueError(
            "task 'metric_learning' needs a labelled (classification) data set, e.g. --data digits"
        )
    return EmbeddingModule(
        cfg["student"],
        embedding_dim=(cfg.get("embedding") or {}).get("dim", 64),
        loss=loss_terms(cfg),
        in_chans=data.in_chans,
        model_kwargs=cfg.get("student_args"),
        optimizer=cfg.get("optimizer"),
        scheduler=cfg.get("scheduler"),
        recall_ks=cfg.get("recall_ks", (1, 2, 4, 8)),
    )


@task("metric_learning")
def metric_learning(cfg: dict[str, Any], seed: int, out: Path) -> TaskResult:
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)
    dm = build_data(cfg["data"], data_args(cfg), seed=seed)
    module = build_module(cfg, dm)
    dm.setup("fit")
    trainer = make_trainer(cfg, out, f"{cfg['method']}_seed{seed}", cfg["epochs"])
    with Timer() as t:
        trainer.fit(module, datamodule=dm)
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    extra = {k.removeprefix("test/"): float(v) for k, v in metrics.items() if k.startswith("test/recall@")}
    return TaskResult("recall@1", float(metrics["test/recall@1"]), t.seconds, extra=extra)
