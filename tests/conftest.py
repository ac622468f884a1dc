import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Teachers trained by recipes are cached per test session, never in the user's home."""
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path_factory.getbasetemp() / "toolkit-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (many tiny ops: threads only wait on a busy
    machine), restored afterwards: a module-level `torch.set_num_threads` would leak into every
    later test, including ones that compare against a subprocess running with the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def digits():
    from toolkit.data import DigitsDataModule

    return DigitsDataModule(batch_size=64, val_split=0.1, seed=0)


def trainer(**kw):
    import lightning as L

    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    base.update(kw)
    return L.Trainer(**base)


@pytest.fixture
def make_trainer():
    return trainer


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
