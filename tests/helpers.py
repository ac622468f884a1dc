"""Test helpers shared by several test files (importable: pytest puts tests/ on sys.path)."""

from lightning.pytorch.callbacks import Callback


class StopAfter(Callback):
    """Interrupt a run after `epochs` epochs, as a killed job would (max_epochs unchanged)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
