"""Run by tests/test_select_core.py in a subprocess: 2-process DDP (gloo, CPU) training with
`DataPruning` re-selecting every epoch. Records, per rank, the sample indices trained on per epoch,
and at every selection the model weights, the scores and the subset chosen."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from toolkit import build
from toolkit.modules import ClassificationModule


class Record(Callback):
    def __init__(self, pruning):
        self.pruning, self.seen, self.selections = pruning, {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch.index.tolist())

    def on_train_epoch_end(self, trainer, pl_module):  # runs after DataPruning's (callback order)
        if self.pruning.selections and self.pruning.selections[-1]["epoch"] == trainer.current_epoch + 1:
            self.selections.append(
                {
                    "epoch": trainer.current_epoch + 1,
                    "subset": self.pruning.subset.tolist(),
                    "scores": self.pruning.scorer.scores().dense().tolist(),
                    "weights": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                }
            )


def main(out: Path) -> None:
    L.seed_everything(0, workers=True)
    module = ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        loss="cross_entropy",
        model_kwargs={"width": 4},
        optimizer={"name": "sgd", "lr": 0.05},
    )
    dm = build("data", "digits", batch_size=32, val_split=0.1, train_subset=301, augment=True, seed=0)
    pruning = build("selector", "el2n", keep=0.47, score_epochs=1, reselect_every=1)
    rec = Record(pruning)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, rec],
        limit_val_batches=2,
    )
    trainer.fit(module, datamodule=dm)
    rank = trainer.global_rank
    torch.save([s.pop("weights") for s in rec.selections], out / f"weights{rank}.pt")
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "seen": rec.seen,
                "selections": rec.selections,
                "train_indices": dm.train_sample_indices.tolist(),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
