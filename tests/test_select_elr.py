"""ELR (early-learning regularisation) as a loss term with a per-sample target memory.

Exact values against a transcription of the official `elr_loss` (a per-sample Python loop), λ = 0
is CE, the target update is the closed-form EMA, the gradient is the paper's analytic form, the
regulariser is ≤ 0 and decreasing in ⟨t, p⟩, numerics (logits 1e4, bf16), errors (a batch without
indices), registry and term specs, a Lightning run on noisy digits and an exact resume.
"""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import StopAfter
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from toolkit import Progress, Step, build, registry
from toolkit.functional import cross_entropy
from toolkit.functional.elr import elr_loss, elr_probs, elr_regularizer, elr_update_target
from toolkit.modules import ClassificationModule
from toolkit.modules.config import build_terms
from toolkit.selection import ELRLoss
from toolkit.types import Batch, ModelOutput

ELR_TERMS = {"ce": "cross_entropy", "elr": {"loss": "elr"}}


def step_of(logits, target=None, index=None, module=None):
    n = logits.shape[0]
    target = target if target is not None else torch.zeros(n, dtype=torch.long)
    return Step(Batch(torch.zeros(n, 1), target, index), ModelOutput(logits), None, Progress(), module)


def official_elr(buffer, index, logits, labels, beta, lam):
    """The official `elr_loss.forward`, one sample at a time with Python floats; updates `buffer`."""
    total_ce, total_reg = 0.0, 0.0
    for i, z in zip(index.tolist(), logits.double().tolist()):
        m = max(z)
        e = [math.exp(v - m) for v in z]
        p = [min(max(v / sum(e), 1e-4), 1 - 1e-4) for v in e]
        s = sum(p)
        buffer[i] = [beta * t + (1 - beta) * v / s for t, v in zip(buffer[i], p)]
        total_reg += math.log(1 - sum(t * v for t, v in zip(buffer[i], p)))
    for z, y in zip(logits.double().tolist(), labels.tolist()):
        m = max(z)
        total_ce += -(z[y] - m - math.log(sum(math.exp(v - m) for v in z)))
    n = len(index)
    return total_ce / n + lam * total_reg / n


# == maths =========================================================================================


def test_exact_values_against_the_official_loss(rng):
    n, c, beta, lam = 10, 4, 0.7, 3.0
    term = ELRLoss(beta=beta, lam=lam)
    buffer = [[0.0] * c for _ in range(n)]
    for index in (torch.tensor([0, 3, 5, 7]), torch.tensor([3, 1, 7, 9]), torch.tensor([0, 3, 2, 8])):
        logits = torch.randn(4, c, generator=rng) * 3
        labels = torch.randint(0, c, (4,), generator=rng)
        ours = cross_entropy(logits, labels) + term(step_of(logits, labels, index)).mean()
        assert float(ours) == pytest.approx(official_elr(buffer, index, logits, labels, beta, lam), rel=1e-5)
        values, written = term.memory.read(torch.arange(n))
        assert torch.allclose(values.double(), torch.tensor(buffer, dtype=torch.float64), atol=1e-6)
    assert written.tolist() == [True, True, True, True, False, True, False, True, True, True]


def test_lambda_zero_is_cross_entropy(rng):
    logits, y = torch.randn(6, 5, generator=rng) * 2, torch.randint(0, 5, (6,), generator=rng)
    t = torch.softmax(torch.randn(6, 5, generator=rng), -1)
    assert torch.allclose(elr_loss(logits, y, t, lam=0.0), F.cross_entropy(logits, y))
    module = ClassificationModule(
        "convnet",
        num_classes=5,
        in_chans=1,
        loss={"ce": "cross_entropy", "elr": {"loss": "elr", "lam": 0.0}},
        model_kwargs={"width": 8},
    )
    out = module.compute_loss(step_of(logits, y, torch.arange(6), module))
    assert float(out["loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


def test_target_update_is_the_closed_form_ema(rng):
    beta, k = 0.9, 6
    zs = [torch.randn(1, 3, generator=rng) * 2 for _ in range(k)]
    term = ELRLoss(beta=beta)
    for z in zs:
        term(step_of(z, index=torch.tensor([4])))
    qs = [elr_probs(z)[0] / elr_probs(z)[0].sum() for z in zs]
    closed = sum((1 - beta) * beta ** (k - 1 - j) * q for j, q in enumerate(qs))
    assert torch.allclose(term.memory.read(torch.tensor([4]))[0][0], closed, atol=1e-6)
    assert float(closed.sum()) == pytest.approx(1 - beta**k, rel=1e-5)
    # the functional update, once
    t = torch.rand(2, 3, generator=rng)
    z = torch.randn(2, 3, generator=rng)
    p = z.softmax(-1).clamp(1e-4, 1 - 1e-4)
    assert torch.allclose(elr_update_target(t, z, beta), beta * t + (1 - beta) * p / p.sum(-1, keepdim=True))


def test_gradient_is_the_analytic_form(rng):
    z = (torch.randn(5, 4, generator=rng) * 1.5).requires_grad_(True)
    t = torch.softmax(torch.randn(5, 4, generator=rng), -1) * 0.8
    elr_regularizer(z, t, reduction="sum").backward()
    p = z.detach().softmax(-1)
    inner = (t * p).sum(-1, keepdim=True)
    analytic = -p * (t - inner) / (1 - inner)
    assert torch.allclose(z.grad, analytic, atol=1e-6)
    # central finite differences of the per-sample value
    h = 1e-2
    zd = z.detach()
    for i, c in [(0, 0), (2, 3), (4, 1)]:
        up, down = zd.clone(), zd.clone()
        up[i, c] += h
        down[i, c] -= h
        fd = (elr_regularizer(up, t, reduction="sum") - elr_regularizer(down, t, reduction="sum")) / (2 * h)
        assert float(fd) == pytest.approx(float(analytic[i, c]), rel=2e-2, abs=1e-4)


def test_regulariser_is_nonpositive_and_decreasing_in_the_inner_product(rng):
    t = torch.tensor([[0.1, 0.6, 0.2]]).expand(50, 3)
    z = torch.zeros(50, 3)
    z[:, 1] = torch.linspace(-6, 6, 50)  # more mass on t's main class: larger ⟨t, p⟩
    reg = elr_regularizer(z, t, reduction="none")
    inner = (t * elr_probs(z)).sum(-1)
    assert (torch.diff(inner) > 0).all()
    assert (torch.diff(reg) < 0).all()
    assert (reg <= 0).all()
    r = elr_regularizer(
        torch.randn(30, 7, generator=rng) * 4,
        torch.softmax(torch.randn(30, 7, generator=rng), -1),
        reduction="none",
    )
    assert (r <= 0).all()
    assert elr_regularizer(z, t).item() == pytest.approx(reg.mean().item())
    assert elr_regularizer(z, t, reduction="sum").item() == pytest.approx(reg.sum().item(), rel=1e-6)


def test_finite_with_extreme_logits_and_bf16(rng):
    t = torch.softmax(torch.randn(4, 6, generator=rng), -1) * 0.99
    for z in (torch.randn(4, 6, generator=rng) * 1e4, (torch.randn(4, 6, generator=rng) * 5).bfloat16()):
        z = z.requires_grad_(True)
        y = torch.randint(0, 6, (4,), generator=rng)
        loss = elr_loss(z, y, t, lam=3.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    term = ELRLoss()
    out = term(step_of((torch.randn(4, 6, generator=rng) * 1e4).bfloat16(), index=torch.arange(4)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# == the term ======================================================================================


def test_registered_as_selector_and_loss_and_resolvable_as_a_term():
    assert registry.get("selector", "elr") is ELRLoss is registry.get("loss", "elr")
    assert isinstance(build("selector", "elr", beta=0.9, lam=7.0), ELRLoss)
    terms = build_terms(
        {"ce": "cross_entropy", "elr": {"loss": "elr", "beta": 0.9, "lam": 7.0, "weight": 0.5}}
    )
    term, weight = terms["elr"]
    assert isinstance(term, ELRLoss) and (term.beta, term.lam, weight) == (0.9, 7.0, 0.5)


def test_evaluation_reads_without_updating(rng):
    term = ELRLoss()
    term(step_of(torch.randn(3, 4, generator=rng), index=torch.tensor([0, 1, 2])))
    before = term.memory.values.clone()
    term.eval()
    z = torch.randn(3, 4, generator=rng)
    out = term(step_of(z, index=torch.tensor([0, 1, 2])))
    assert torch.equal(term.memory.values, before)
    assert torch.allclose(out, 3.0 * elr_regularizer(z, before[:3], reduction="none"))


def test_errors(rng):
    with pytest.raises(ValueError, match="beta"):
        ELRLoss(beta=1.0)
    with pytest.raises(ValueError, match="lam"):
        ELRLoss(lam=-1)
    with pytest.raises(ValueError, match="clamp"):
        ELRLoss(clamp=0.0)
    with pytest.raises(ValueError, match="memory_dtype"):
        ELRLoss(memory_dtype="int8")
    term = ELRLoss()
    with pytest.raises(ValueError, match="elr keeps per-sample memory.*index"):
        term(step_of(torch.randn(2, 3)))
    term(step_of(torch.randn(2, 3), index=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="3 classes but the logits have 5"):
        term(step_of(torch.randn(2, 5), index=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        elr_regularizer(torch.randn(2, 3), torch.rand(2, 4))


def test_a_batch_without_indices_is_a_clear_error_in_training():
    module = ClassificationModule(
        "convnet", num_classes=10, in_chans=1, loss=ELR_TERMS, model_kwargs={"width": 8}
    )
    batch = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="loss term 'elr' keeps per-sample memory.*IndexedDataset"):
        module.training_step(batch, 0)


# == Lightning =====================================================================================

KW = dict(
    accelerator="cpu",
    max_epochs=2,
    limit_train_batches=3,
    limit_val_batches=1,
    num_sanity_val_steps=0,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    deterministic=True,
)


def make_module(seed):
    L.seed_everything(seed)
    return ClassificationModule(
        "convnet", num_classes=10, in_chans=1, loss=ELR_TERMS, model_kwargs={"width": 8}
    )


def noisy_digits():
    return build("data", "digits", batch_size=32, label_noise=0.4)


class Seen(Callback):
    def __init__(self):
        self.index = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.index.append(outputs["index"].clone())


def test_lightning_run_on_noisy_digits():
    module, seen = make_module(0), Seen()
    trainer = L.Trainer(callbacks=[seen], enable_checkpointing=False, **{**KW, "limit_train_batches": 10})
    trainer.fit(module, datamodule=noisy_digits())
    memory = module.terms["elr"].memory
    visits = torch.bincount(torch.cat(seen.index), minlength=len(memory))
    assert torch.equal(memory.written, visits > 0)
    assert torch.isin(torch.nonzero(memory.written).flatten(), noisy_digits().train_sample_indices).all()
    # a sample seen k times has Σ_c t_c = 1 − β^k
    k = visits[memory.written].double()
    assert torch.allclose(memory.values[memory.written].sum(-1).double(), 1 - 0.7**k, atol=1e-5)
    assert set(k.tolist()) == {1.0, 2.0}
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert trainer.callback_metrics["train/loss/elr"].item() <= 0


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_resume_continues_exactly(tmp_path):
    straight = make_module(3)
    L.Trainer(enable_checkpointing=False, **KW).fit(straight, datamodule=noisy_digits())
    first = make_module(3)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[ckpt, StopAfter(1)], **KW).fit(first, datamodule=noisy_digits())
    resumed = make_module(42)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[ckpt], **KW).fit(
        resumed, datamodule=noisy_digits(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    a, b = straight.state_dict(), resumed.state_dict()
    assert any("elr" in k and "extra_state" in k for k in a)
    assert_same(a, b)
    assert torch.equal(straight.terms["elr"].memory.values, resumed.terms["elr"].memory.values)
