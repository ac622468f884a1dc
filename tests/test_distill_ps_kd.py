"""PS-KD and the per-sample memory it uses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import toolkit.distill.ps_kd  # noqa: F401 - registers ps_kd
from toolkit import Progress, Step
from toolkit.distill.memory import SampleMemory
from toolkit.distill.ps_kd import PSKDLoss
from toolkit.functional import cross_entropy
from toolkit.functional.ps_kd import ps_kd_alpha, ps_kd_loss
from toolkit.types import Batch, ModelOutput


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def test_loss_matches_formula_and_limits(rng):
    z = torch.randn(5, 4, generator=rng) * 2
    y = torch.tensor([0, 3, 1, 2, 3])
    past = torch.softmax(torch.randn(5, 4, generator=rng), -1)
    a = 0.3
    q = (1 - a) * np.eye(4)[y.numpy()] + a * past.numpy()
    expected = -(q * np_log_softmax(z.numpy())).sum(-1)
    np.testing.assert_allclose(ps_kd_loss(z, y, past, a, reduction="none").numpy(), expected, rtol=1e-5)
    assert torch.allclose(ps_kd_loss(z, y, past, a), torch.tensor(expected.mean(), dtype=torch.float32))
    # official reduction: (-targets * log_probs).mean(0).sum()
    official = (-torch.tensor(q, dtype=torch.float32) * F.log_softmax(z, 1)).mean(0).sum()
    assert torch.allclose(ps_kd_loss(z, y, past, a), official, atol=1e-6)
    # α_t = 0 and one-hot memory both reduce to CE
    assert torch.allclose(ps_kd_loss(z, y, past, 0.0, "none"), cross_entropy(z, y, reduction="none"))
    assert torch.allclose(
        ps_kd_loss(z, y, F.one_hot(y, 4).float(), 0.7, "none"), cross_entropy(z, y, reduction="none")
    )
    # gradient of the summed loss is softmax − ỹ
    s = z.clone().requires_grad_(True)
    ps_kd_loss(s, y, past, a, reduction="sum").backward()
    assert torch.allclose(s.grad, torch.softmax(z, -1) - torch.tensor(q, dtype=torch.float32), atol=1e-6)
    with pytest.raises(ValueError, match="alpha_t"):
        ps_kd_loss(z, y, past, 1.5)


def test_alpha_schedule():
    assert ps_kd_alpha(0, 300, 0.8) == pytest.approx(0.8 / 300)
    assert ps_kd_alpha(299, 300, 0.8) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="alpha_T"):
        PSKDLoss(alpha_T=1.2)


def test_stable_for_extreme_logits_and_bf16(rng):
    z = torch.randn(4, 10, generator=rng) * 1e4
    y = torch.arange(4)
    past = torch.softmax(torch.randn(4, 10, generator=rng), -1)
    for logits in (z.clone(), z.bfloat16()):
        logits.requires_grad_(True)
        v = ps_kd_loss(logits, y, past, 0.5)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(logits.grad).all()


def test_sample_memory_read_write_grow_and_state():
    mem = SampleMemory(3)
    rows, written = mem.read(torch.tensor([0, 4]))
    assert rows.shape == (2, 3) and not written.any() and len(mem) == 5
    mem.write(torch.tensor([4, 1]), torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    rows, written = mem.read(torch.tensor([1, 4, 2]))
    assert written.tolist() == [True, True, False]
    assert rows[0].tolist() == [4, 5, 6] and rows[1].tolist() == [1, 2, 3]
    mem.write(torch.tensor([9]), torch.ones(1, 3))
    assert len(mem) == 10
    fresh = SampleMemory(3)
    fresh.load_state_dict(mem.state_dict(), strict=True)
    assert torch.equal(fresh.values, mem.values) and torch.equal(fresh.written, mem.written)
    with pytest.raises(ValueError, match="rows have shape"):
        SampleMemory(4).load_state_dict(mem.state_dict())
    half = SampleMemory(2, torch.float16)
    half.write(torch.tensor([0]), torch.tensor([[0.1, 0.2]]))
    assert half.values.dtype == torch.float16


def test_term_uses_last_epoch_predictions(rng):
    term = PSKDLoss(alpha_T=0.8)
    z = torch.randn(3, 4, generator=rng)
    y = torch.tensor([1, 0, 3])
    idx = torch.tensor([7, 2, 5])
    step = Step(Batch(None, y, idx), ModelOutput(z), None, Progress(epoch=0, max_epochs=4))
    # first epoch: nothing remembered -> one-hot targets -> plain CE
    assert torch.allclose(term(step), cross_entropy(z, y, reduction="none"))
    z2 = torch.randn(3, 4, generator=rng)
    step2 = Step(Batch(None, y, idx), ModelOutput(z2), None, Progress(epoch=1, max_epochs=4))
    expected = ps_kd_loss(z2, y, torch.softmax(z, -1), 0.8 * 2 / 4, reduction="none")
    assert torch.allclose(term(step2), expected, atol=1e-6)
    # evaluation mode does not write
    term.eval()
    before = term.memory.values.clone()
    term(Step(Batch(None, y, idx), ModelOutput(torch.randn(3, 4)), None, Progress(epoch=2, max_epochs=4)))
    assert torch.equal(term.memory.values, before)


def test_memory_survives_a_checkpoint(tmp_path, make_trainer):
    from toolkit.data import DigitsDataModule
    from toolkit.modules import ClassificationModule

    dm = DigitsDataModule(batch_size=64, train_subset=200, seed=0)
    module = ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        loss={"ps_kd": {"distiller": "ps_kd"}},
    )
    trainer = make_trainer(max_epochs=2, limit_val_batches=1)
    trainer.fit(module, datamodule=dm)
    mem = module.loss_terms["ps_kd"].memory
    assert mem.written.sum() == 200 and set(mem.written.nonzero().flatten().tolist()) == set(
        dm.train_indices.tolist()
    )
    assert torch.allclose(mem.values[mem.written].sum(-1), torch.ones(200), atol=1e-5)
    trainer.save_checkpoint(tmp_path / "ps.ckpt")
    loaded = ClassificationModule.load_from_checkpoint(tmp_path / "ps.ckpt")
    assert torch.equal(loaded.loss_terms["ps_kd"].memory.values, mem.values.cpu())
