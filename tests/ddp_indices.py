"""Run by tests/test_ddp.py in a subprocess: 2-process DDP (gloo, CPU) distillation that records
the sample indices each rank trains on, per epoch, and the final weights of each rank."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from toolkit.data import DigitsDataModule
from toolkit.distill import Teacher
from toolkit.models import create_model
from toolkit.modules import DistillationModule


class RecordIndices(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(outputs["index"].tolist())


def main(out: Path) -> None:
    L.seed_everything(0, workers=True)
    teacher = Teacher(create_model("resnet8", num_classes=10, in_chans=1))
    terms = {"kd": {"distiller": "kd", "weight": 0.5}, "ps_kd": {"distiller": "ps_kd", "weight": 0.5}}
    module = DistillationModule(
        "convnet",
        teacher,
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms=terms,
        optimizer={"name": "sgd", "lr": 0.05},
    )
    dm = DigitsDataModule(batch_size=32, val_split=0.1, train_subset=300, augment=True, seed=0)
    rec = RecordIndices()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
        limit_val_batches=2,
    )
    trainer.fit(module, datamodule=dm)
    rank = trainer.global_rank
    digest = float(sum(p.double().sum() for p in module.model.parameters()))
    memory = module.loss_terms["ps_kd"].memory
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "seen": rec.seen,
                "train_indices": dm.train_indices.tolist(),
                "digest": digest,
                "memory_written": memory.written.nonzero().flatten().tolist(),
                "memory_digest": float(memory.values.double().sum()),
                "teacher_params_in_ddp": any(
                    p is q for p in trainer.strategy.model.parameters() for q in teacher.nets[0].parameters()
                ),
            }
        )
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
