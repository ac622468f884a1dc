"""Run by tests/test_perf_cache.py in a subprocess: 2-process DDP (gloo, CPU) distillation with the
teacher cache on disk, in record mode (OUT/record, 2 epochs, 2 augmentation views) and in
precompute mode (OUT/precompute, 1 epoch); each rank writes the (index, view) rows it trained on
and how many samples its teacher ran on."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_perf_cache import module, teacher_net  # noqa: E402

from toolkit.data import DigitsDataModule  # noqa: E402


class RecordKeys(Callback):
    def __init__(self):
        self.keys = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        epoch = trainer.current_epoch
        keys = (outputs["index"] * 2 + epoch % 2).tolist()
        self.keys.setdefault(epoch, []).extend(keys)


def trainer(epochs: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )


def data() -> DigitsDataModule:
    return DigitsDataModule(
        batch_size=32, val_split=0.1, train_subset=300, augment=True, augment_views=2, seed=0
    )


def main(out: Path) -> None:
    L.seed_everything(0, workers=True)
    record_net, rec = teacher_net(), RecordKeys()
    t = trainer(2, [rec])
    t.fit(module(record_net, teacher_cache_dir=out / "record"), datamodule=data())

    pre_net = teacher_net()
    pre = module(pre_net, teacher_cache_dir=out / "precompute", teacher_cache_fill="precompute")
    trainer(1).fit(pre, datamodule=data())
    (out / f"rank{t.global_rank}.json").write_text(
        json.dumps(
            {
                "keys": rec.keys,
                "record_rows": record_net.rows,
                "precompute_rows": pre_net.rows,
                "precompute_misses": pre.teacher_cache.misses,
            }
        )
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
