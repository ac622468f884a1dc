"""Run by tests/test_losses_metric.py in a subprocess: 2-process DDP (gloo, CPU) metric learning
that records the P×K batches each rank trains on, per epoch, the Recall@K each rank logs, and its
final weights."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from toolkit.data import DigitsDataModule
from toolkit.modules import EmbeddingModule


class RecordBatches(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).append(outputs["index"].tolist())


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, workers=True)
    module = EmbeddingModule(
        "convnet", embedding_dim=16, loss="multi_similarity", in_chans=1, model_kwargs={"width": 4}
    )
    dm = DigitsDataModule(batch_size=32, samples_per_class=4, val_split=0.1, train_subset=320, seed=0)
    rec = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[rec],
    )
    trainer.fit(module, datamodule=dm)
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    rank = trainer.global_rank
    digest = float(sum(p.detach().double().sum() for p in module.model.parameters()))
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "seen": rec.seen,
                "train_indices": dm.train_indices.tolist(),
                "train_targets": dm.train_targets.tolist(),
                "recall": {k: float(v) for k, v in metrics.items()},
                "digest": digest,
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
