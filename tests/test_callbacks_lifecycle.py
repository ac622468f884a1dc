"""Every registered callback through a whole Lightning life: sanity check, fit, a checkpoint, a
resumed fit, then validate and test outside fit — with the options of its shipped config."""

from __future__ import annotations

import warnings

import pytest
import torch

import toolkit  # noqa: F401 - fills the registry
from recipes.common import CONFIG_DIR, load_yaml
from toolkit import registry

# options that keep each run to seconds (the shipped configs size them for the demonstration)
SMALL = {
    "grad_cam": {"num_samples": 4},
    "grad_cam_pp": {"num_samples": 4},
    "smooth_grad_cam_pp": {"num_samples": 4, "n_samples": 2},
    "eigen_cam": {"num_samples": 4},
    "normgrad": {"num_samples": 4},
    "hessian_monitor": {"num_samples": 32, "lanczos_iters": 4, "top_k": 2, "hutchinson_probes": 2},
    "gradient_spectrum": {"every_n_steps": 1},
    "saf": {"start_epoch": 0, "minus_epoch": 1},
}


def options(name: str) -> dict:
    path = CONFIG_DIR / "train" / f"{name}.yaml"
    shipped = (load_yaml(path).get("callbacks") or {}).get(name) if path.exists() else None
    return {**(shipped or {}), **SMALL.get(name, {})}


def build_callback(name: str):
    import inspect

    cls = registry.get("callback", name)
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options(name).items() if k in accepted})


@pytest.mark.parametrize("name", registry.names("callback"))
def test_callback_survives_sanity_check_resume_validate_and_test(name, tmp_path, one_torch_thread):
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from toolkit.data import DigitsDataModule
    from toolkit.modules import ClassificationModule

    def run(max_epochs: int, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=64, val_split=0.1, seed=0, domains=2)
        module = ClassificationModule("convnet", num_classes=10, in_chans=1, model_kwargs={"width": 8})
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=max_epochs,
            limit_train_batches=3,
            limit_val_batches=2,
            limit_test_batches=2,
            num_sanity_val_steps=1,
            log_every_n_steps=1,
            default_root_dir=str(tmp_path),
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[build_callback(name)],
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, module, dm

    trainer, _, _ = run(1)
    ckpt = trainer.checkpoint_callback.best_model_path  # written during training, as a resume uses
    callback = trainer.callbacks[0]
    if type(callback).state_dict is not Callback.state_dict:  # a stateful callback: its state is saved
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert callback.state_key in saved["callbacks"], f"{name}: no state in {list(saved['callbacks'])}"
    trainer, module, dm = run(2, ckpt_path=ckpt)  # resumed: the callback's state is loaded
    assert trainer.current_epoch == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a callback may warn that it only acts during fit
        (val,) = trainer.validate(module, datamodule=dm, verbose=False)
        (test,) = trainer.test(module, datamodule=dm, verbose=False)
    assert torch.isfinite(torch.tensor(val["val/loss"])) and 0 <= test["test/acc"] <= 1


def test_a_folded_checkpoint_evaluates_as_exported_but_cannot_resume_training(tmp_path, one_torch_thread):
    """sigma_reparam's shipped config folds at fit end: a checkpoint saved afterwards holds plain
    weights. Testing from it folds the same layers (same outputs); resuming fit from it says why not."""
    import lightning as L

    from toolkit.callbacks.sigma_reparam import SigmaReparamCallback
    from toolkit.data import DigitsDataModule
    from toolkit.modules import ClassificationModule

    def setup():
        L.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=64, val_split=0.1, seed=0)
        module = ClassificationModule("convnet", num_classes=10, in_chans=1, model_kwargs={"width": 8})
        trainer = L.Trainer(
            max_epochs=1,
            limit_train_batches=2,
            limit_test_batches=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[SigmaReparamCallback(types=["linear"], fold_on_fit_end=True)],
        )
        return trainer, module, dm

    trainer, module, dm = setup()
    trainer.fit(module, datamodule=dm)
    (exported,) = trainer.test(module, datamodule=dm, verbose=False)
    folded = tmp_path / "folded.ckpt"
    trainer.save_checkpoint(folded)
    trainer, module, dm = setup()
    (reloaded,) = trainer.test(module, datamodule=dm, ckpt_path=str(folded), verbose=False)
    assert reloaded["test/loss"] == pytest.approx(exported["test/loss"], rel=1e-6)
    trainer, module, dm = setup()
    with pytest.raises(ValueError, match="plain \\(folded\\) weights for \\['fc'\\].*last.ckpt"):
        trainer.fit(module, datamodule=dm, ckpt_path=str(folded))
