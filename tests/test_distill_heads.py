"""DHKD and USKD: distillers whose term owns a trainable head on a tapped student feature.

Exact values against formulas written independently here (NumPy loops) and against transcriptions
of the official code, limits, gradients, numerics, errors, the ":input" tap and `HeadSet`, short
Lightning runs, checkpoints and bit-exact resume.
"""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import StopAfter, config_module
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from toolkit import Progress, Step, build
from toolkit.data import DigitsDataModule
from toolkit.distill import FeatureTaps, Head, HeadSet, Teacher
from toolkit.distill.dhkd import DHKDLoss
from toolkit.distill.heads import pool_feature
from toolkit.distill.uskd import USKDLoss
from toolkit.functional import cross_entropy, kd_loss
from toolkit.functional.dhkd import binary_kl_loss, binary_kl_norm_loss
from toolkit.functional.uskd import uskd_loss, uskd_parts, zipf_non_target_labels
from toolkit.models import create_model
from toolkit.models.output import forward_output
from toolkit.modules import ClassificationModule, DistillationModule
from toolkit.types import Batch, ModelOutput

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "distill"


@pytest.fixture
def logits(rng):
    s = torch.randn(8, 7, generator=rng) * 3
    t = torch.randn(8, 7, generator=rng) * 3
    y = torch.tensor([0, 6, 3, 2, 2, 5, 1, 4])
    return s, t, y


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


# == DHKD: the logit-level losses ================================================================
def np_binary_kl_norm(s, t, tau):
    """Per sample: τ²·Σ_c KL(Bern(½) ‖ Bern(σ(d_c))), written with the Bernoulli KL itself."""
    q = np_sigmoid((s.double().numpy() - t.double().numpy()) / tau)
    kl = 0.5 * np.log(0.5 / q) + 0.5 * np.log(0.5 / (1 - q))
    return tau**2 * kl.sum(-1)


def np_binary_kl(s, t, tau):
    p = np_sigmoid(t.double().numpy() / tau)
    q = np_sigmoid(s.double().numpy() / tau)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return tau**2 * kl.sum(-1)


def official_binary_kl_norm(student, teacher, temperature=2, eps=1e-8):
    """penghui-yang/DHKD distiller_zoo/BinaryKLNorm.py, BinaryKLNorm.forward."""
    n, _ = student.shape
    criterion = nn.KLDivLoss(reduction="none")
    diff_st = torch.sigmoid((student - teacher) / temperature)
    diff_st = torch.clamp(diff_st, min=eps, max=1 - eps)
    target = torch.full_like(diff_st, 0.5)
    loss = criterion(torch.log(diff_st), target) + criterion(torch.log(1 - diff_st), 1 - target)
    return temperature**2 * loss.sum() / n


def official_binary_kl(student, teacher, temperature=2, eps=1e-8):
    """penghui-yang/DHKD distiller_zoo/BinaryKL.py, BinaryKL.forward."""
    n, _ = student.shape
    criterion = nn.KLDivLoss(reduction="none")
    student = torch.clamp(torch.sigmoid(student / temperature), min=eps, max=1 - eps)
    teacher = torch.clamp(torch.sigmoid(teacher / temperature), min=eps, max=1 - eps)
    loss = criterion(torch.log(student), teacher) + criterion(torch.log(1 - student), 1 - teacher)
    return temperature**2 * loss.sum() / n


def test_binary_kl_norm_matches_the_bernoulli_kl_and_reductions(logits):
    s, t, _ = logits
    for tau in (1.0, 2.0, 3.5):
        ref = np_binary_kl_norm(s, t, tau)
        per = binary_kl_norm_loss(s, t, tau, reduction="none")
        assert per.shape == (8,) and per.dtype == torch.float32
        np.testing.assert_allclose(per.numpy(), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(binary_kl_norm_loss(s, t, tau)), ref.mean(), rtol=1e-5)
        np.testing.assert_allclose(
            float(binary_kl_norm_loss(s, t, tau, reduction="sum")), ref.sum(), rtol=1e-5
        )
        np.testing.assert_allclose(
            binary_kl_loss(s, t, tau, reduction="none").numpy(), np_binary_kl(s, t, tau), rtol=1e-5
        )
    # the closed form the module docstring states: τ²·Σ log cosh((s − t)/(2τ))
    closed = 4.0 * np.log(np.cosh((s.double().numpy() - t.double().numpy()) / 4.0)).sum(-1)
    np.testing.assert_allclose(binary_kl_norm_loss(s, t, 2.0, reduction="none").numpy(), closed, rtol=1e-5)


def test_binary_kl_losses_match_the_official_code(rng):
    for scale, tau in [(1.0, 2.0), (4.0, 2.0), (3.0, 1.0)]:
        s = torch.randn(16, 100, generator=rng) * scale
        t = torch.randn(16, 100, generator=rng) * scale
        for ours, official in [
            (binary_kl_norm_loss, official_binary_kl_norm),
            (binary_kl_loss, official_binary_kl),
        ]:
            assert torch.allclose(ours(s, t, tau), official(s, t, tau), rtol=1e-5, atol=1e-6)
            s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
            ours(s1, t, tau).backward()
            official(s2, t, tau).backward()
            assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


def test_binary_kl_norm_limits_and_gradient(logits, rng):
    s, t, _ = logits
    zeros = torch.zeros(8)
    # zero, with zero gradient, exactly at s = t
    sg = t.clone().requires_grad_(True)
    v = binary_kl_norm_loss(sg, t, 2.0, reduction="none")
    v.sum().backward()
    assert torch.equal(v.detach(), zeros) and torch.equal(sg.grad, torch.zeros_like(t))
    assert (binary_kl_norm_loss(s, t, 2.0, reduction="none") > 0).all()
    # symmetric in s − t, and invariant to a common shift of both ...
    assert torch.allclose(
        binary_kl_norm_loss(s, t, reduction="none"), binary_kl_norm_loss(t, s, reduction="none")
    )
    assert torch.allclose(
        binary_kl_norm_loss(s + 7.0, t + 7.0, reduction="none"),
        binary_kl_norm_loss(s, t, reduction="none"),
        atol=1e-5,
    )
    # ... but, unlike KD, it sees a shift of the student's logits alone (the information softmax loses)
    assert torch.allclose(kd_loss(s + 5.0, t, reduction="none"), kd_loss(s, t, reduction="none"), atol=1e-4)
    assert (
        binary_kl_norm_loss(s + 5.0, t, reduction="none") > binary_kl_norm_loss(s, t, reduction="none")
    ).any()
    # gradient: (τ/2)·tanh((s − t)/(2τ)) per class, bounded by τ/2
    for tau in (1.0, 2.0):
        sg = (s * 10).clone().requires_grad_(True)
        binary_kl_norm_loss(sg, t, tau, reduction="sum").backward()
        expected = tau / 2 * torch.tanh((s * 10 - t) / (2 * tau))
        assert torch.allclose(sg.grad, expected, atol=1e-6) and (sg.grad.abs() <= tau / 2 + 1e-6).all()
    # small differences: ≈ ‖s − t‖²/8, whatever τ (a logit MSE); large ones: ≈ τ·Σ|s − t|/2 (an L1)
    d = torch.randn(8, 7, generator=rng) * 1e-2
    for tau in (1.0, 4.0):
        assert torch.allclose(
            binary_kl_norm_loss(t + d, t, tau, reduction="none"), d.pow(2).sum(-1) / 8, rtol=1e-2
        )
    big = torch.randn(8, 7, generator=rng).sign() * (1e3 + 1e3 * torch.rand(8, 7, generator=rng))  # |d| ≫ 1
    lin = 2.0 * big.abs().sum(-1) / 2 - 4.0 * 7 * np.log(2.0)
    assert torch.allclose(
        binary_kl_norm_loss(big, torch.zeros_like(big), 2.0, reduction="none"), lin, rtol=1e-5
    )
    # plain BinaryKL: zero at s = t and a true divergence (non-negative)
    assert torch.allclose(binary_kl_loss(t, t, reduction="none"), zeros, atol=1e-6)
    assert (binary_kl_loss(s, t, reduction="none") >= 0).all()


@pytest.mark.parametrize("fn", [binary_kl_norm_loss, binary_kl_loss])
def test_binary_kl_losses_finite_for_extreme_logits_and_bf16(fn, rng):
    s = torch.randn(6, 10, generator=rng) * 1e4
    t = torch.randn(6, 10, generator=rng) * 1e4
    for a, b in ((s, t), (s.bfloat16(), t.bfloat16())):
        a = a.clone().requires_grad_(True)
        v = fn(a, b, 2.0)
        v.backward()
        assert torch.isfinite(v) and v.dtype == torch.float32 and torch.isfinite(a.grad).all()
        assert a.grad.abs().sum() > 0  # the true gradient, where the code's clamp gives none
    z, w = torch.randn(6, 10, generator=rng), torch.randn(6, 10, generator=rng)
    assert torch.allclose(fn(z.bfloat16(), w.bfloat16()), fn(z.bfloat16().float(), w.bfloat16().float()))
    far = torch.full((1, 3), 100.0, requires_grad=True)
    official_binary_kl_norm(far, torch.zeros(1, 3)).backward()
    assert torch.equal(far.grad, torch.zeros(1, 3))  # the official clamp flattens beyond 18.4·τ


def test_binary_kl_bad_inputs(logits):
    s, t, _ = logits
    for fn in (binary_kl_norm_loss, binary_kl_loss):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fn(s, t, 0.0)
        with pytest.raises(ValueError, match="same classes"):
            fn(s, t[:, :3])
        with pytest.raises(ValueError, match="same classes"):
            fn(s[0], t[0])
        with pytest.raises(ValueError, match="reduction"):
            fn(s, t, reduction="batchmean")


# == the ":input" tap and HeadSet ===============================================================
@pytest.mark.parametrize("name", ["convnet", "resnet8", "wrn_16_1"])
def test_input_tap_records_the_classifier_input(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=10, in_chans=1)
    x = torch.randn(3, 1, 8, 8)
    with FeatureTaps(net, ["fc:input", "fc"]) as taps:
        out = forward_output(net, x)
        feats = taps.pop()
        # the embedding the classifier reads (pooling and flattening are functional calls here)
        assert torch.equal(feats["fc:input"], out.embedding)
        assert torch.equal(feats["fc"], out.logits)
        assert torch.allclose(net.fc(feats["fc:input"]), out.logits)
        # a plain forward call fires it too, inside the autograd graph
        net(x.requires_grad_(True))
        emb = taps.pop()["fc:input"]
        emb.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_input_tap_errors():
    net = create_model("convnet", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"no submodule 'fcc'.*fc"):
        FeatureTaps(net, ["fcc:input"])

    class KwargsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(input=x)

    m = KwargsOnly()
    with FeatureTaps(m, ["lin"]) as taps:  # its output can be tapped ...
        m(torch.randn(1, 4))
        assert taps.pop()["lin"].shape == (1, 2)
    with FeatureTaps(m, ["lin:input"]), pytest.raises(RuntimeError, match="without positional inputs"):
        m(torch.randn(1, 4))


def test_pool_feature_and_heads():
    x4 = torch.randn(2, 5, 3, 3)
    assert torch.allclose(pool_feature(x4), x4.mean(dim=(2, 3)))
    x3 = torch.randn(2, 6, 4)
    assert torch.equal(pool_feature(x3), x3[:, 0]) and pool_feature(x3[:, 0]) is not None
    with pytest.raises(ValueError, match="cannot pool"):
        pool_feature(torch.randn(2))
    lin, mlp, bn = Head(5, 3), Head(5, 3, "mlp", hidden=7, dropout=0.1), Head(5, 3, "bn_linear", dropout=0.5)
    assert isinstance(lin.net, nn.Linear)
    assert [type(m) for m in mlp.net] == [nn.Linear, nn.Dropout, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp.net[0].out_features == 7 and mlp.net[1].p == 0.1
    assert [type(m) for m in bn.net] == [nn.BatchNorm1d, nn.Dropout, nn.Linear] and bn.net[1].p == 0.5
    assert torch.equal(bn.net[2].bias, torch.zeros(3))  # KD++'s EmbTrans zeroes the bias
    assert lin(x4).shape == (2, 3)
    for kw, match in [({"kind": "conv"}, "kind"), ({"dropout": 1.0}, "dropout"), ({"hidden": 0}, "sizes")]:
        with pytest.raises(ValueError, match=match):
            Head(5, 3, **kw)
    # a HeadSet rebuilds its heads from a state dict alone, and refuses a different spec
    heads = HeadSet()
    heads.ensure("a", x4, 3, "mlp", hidden=4)
    assert heads.ensure("a", torch.randn(2, 9), 3) is heads["a"]  # exists: not rebuilt
    fresh = HeadSet()
    fresh.load_state_dict(heads.state_dict(), strict=True)
    assert (
        fresh["a"].spec
        == heads["a"].spec
        == {"in_dim": 5, "out_dim": 3, "kind": "mlp", "hidden": 4, "dropout": 0.1}
    )
    for k, v in heads.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]) if torch.is_tensor(v) else v == fresh.state_dict()[k]
    other = HeadSet()
    other.ensure("a", x4, 3, "linear")
    with pytest.raises(ValueError, match="checkpoint head 'a' has spec"):
        other.load_state_dict(heads.state_dict())


# == DHKD: the term ================================================================================
def test_dhkd_term_owns_an_aux_head_on_the_classifier_input(logits):
    s, t, y = logits
    term = build("distiller", "dhkd", temperature=3.0, head="mlp", hidden=16)
    assert isinstance(term, DHKDLoss) and term.needs_teacher and not term.needs_target
    assert term.student_features == ("fc:input",) and term.teacher_features == ()
    feat = torch.randn(8, 12)
    step = Step(Batch(None, y), ModelOutput(s, None, {"fc:input": feat}), ModelOutput(t), Progress())
    with pytest.raises(RuntimeError, match="auxiliary head is not built"):
        term(step)
    term.setup(step)
    head = term.heads["aux"]
    assert head.spec == {"in_dim": 12, "out_dim": 7, "kind": "mlp", "hidden": 16, "dropout": 0.1}
    term.eval()
    expected = binary_kl_norm_loss(head(feat), t, 3.0, reduction="none")
    assert torch.allclose(term(step), expected)
    # the main logits s do not enter: only the aux head's logits h2(f) are matched to the teacher
    other = Step(Batch(None, y), ModelOutput(s + 100, None, {"fc:input": feat}), ModelOutput(t), Progress())
    assert torch.allclose(term(other), expected)
    plain = DHKDLoss(loss="binary_kl", feature="fc:input")
    plain.setup(step)
    assert torch.allclose(plain(step), binary_kl_loss(plain.aux_logits(feat), t, 2.0, reduction="none"))
    assert "head='mlp'" in repr(term)


def test_dhkd_bad_arguments_and_features(logits):
    s, t, y = logits
    for kw, match in [
        ({"temperature": 0.0}, "temperature"),
        ({"head": "conv"}, "head must be one of"),
        ({"loss": "mse"}, "loss must be one of"),
        ({"hidden": 0}, "hidden"),
        ({"dropout": -0.1}, "dropout"),
        ({"feature": ""}, "feature must be a module path"),
    ]:
        with pytest.raises(ValueError, match=match):
            DHKDLoss(**kw)
    term = DHKDLoss()
    with pytest.raises(ValueError, match="no tapped feature 'fc:input'"):
        term.setup(Step(Batch(None, y), ModelOutput(s), ModelOutput(t), Progress()))
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        term.setup(Step(Batch(None, y), ModelOutput(s, None, {"fc:input": torch.randn(8)}), ModelOutput(t)))


def small_teacher(seed=0):
    torch.manual_seed(seed)
    return Teacher(create_model("resnet8", num_classes=10, in_chans=1))


def test_dhkd_keeps_the_main_classifier_out_of_the_logit_loss():
    """The point of the method: BinaryKL trains the backbone and h2, never the student's own fc."""
    torch.manual_seed(0)
    m = DistillationModule(
        "convnet",
        small_teacher(),
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms={"ce": {"loss": "cross_entropy"}, "dhkd": {"distiller": "dhkd", "head": "mlp"}},
    )
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    m.prepare(x[:2])
    b = Batch(x, y)
    step = Step(b, m.student_output(b), m.teacher_output(b), Progress(), m)
    m.loss_terms["dhkd"](step).mean().backward()
    assert m.model.fc.weight.grad is None  # not reached
    assert m.model.features[0].weight.grad.abs().sum() > 0  # the backbone is trained by it
    assert all(p.grad is not None for p in m.loss_terms["dhkd"].parameters())
    m.zero_grad(set_to_none=True)
    step = Step(b, m.student_output(b), m.teacher_output(b), Progress(), m)
    m.loss_terms["ce"](step).mean().backward()
    assert all(p.grad is None for p in m.loss_terms["dhkd"].parameters())  # CE never reaches h2
    assert m.model.fc.weight.grad.abs().sum() > 0


# == USKD: the loss ================================================================================
def np_uskd(s, w, y, alpha, beta, mu):
    """Per sample (L_t, L_n, L_w, total), from the definitions, one sample and one class at a time."""
    s, w, y = s.double().numpy(), w.double().numpy(), y.numpy()
    b, c = s.shape
    log_s, log_w = np_log_softmax(s), np_log_softmax(w)
    s_y2 = np.array([np.exp(log_s[i, y[i]]) ** 2 for i in range(b)])
    p_y = s_y2 + 1 - s_y2.mean()
    lt, ln, lw = np.zeros(b), np.zeros(b), np.zeros(b)
    for i in range(b):
        lt[i] = -p_y[i] * log_s[i, y[i]]
        wp = np.exp(log_w[i])
        score = [wp[k] / (1 - wp[y[i]] + 1e-6) + log_s[i, k] / (1 - log_s[i, y[i]] + 1e-6) for k in range(c)]
        ranked = sorted(range(c), key=lambda k: -score[k])
        zipf = {k: 1.0 / (ranked.index(k) + 1) for k in range(c)}
        others = [k for k in range(c) if k != y[i]]
        total = sum(zipf[k] for k in others)
        nt_logits = np.array([s[i, k] for k in others])
        nt_log = np_log_softmax(nt_logits)
        ln[i] = -sum(zipf[k] / total * nt_log[j] for j, k in enumerate(others))
        q = np.full(c, 0.1 / c)
        q[y[i]] += 0.9
        lw[i] = -mu * (q * log_w[i]).sum()
    return lt, ln, lw, alpha * lt + beta * ln + lw


def official_uskd(fea_mid, logit_s, gt_label, fc, alpha=1.0, beta=0.1, mu=0.005, num_classes=7):
    """yzd-v/cls_KD mmcls/models/dis_losses/uskd.py USKDLoss.forward (hard labels; `.cuda()`
    dropped; `fc` is the weak linear head)."""
    log_softmax = nn.LogSoftmax(dim=1)
    zipf = 1 / torch.arange(1, num_classes + 1)
    label = gt_label.view(len(gt_label), 1)
    value = torch.ones_like(label)
    n, c = logit_s.shape
    s_i = F.softmax(logit_s, dim=1)
    s_t = torch.gather(s_i, 1, label)
    p_t = s_t**2
    p_t = p_t + value - p_t.mean(0, True)
    p_t[value == 0] = 0
    p_t = p_t.detach()
    s_i = log_softmax(logit_s)
    s_t = torch.gather(s_i, 1, label)
    loss_t = -(p_t * s_t).sum(dim=1).mean()
    target = torch.zeros_like(logit_s).scatter_(1, label, 0.9) + 0.1 * torch.ones_like(logit_s) / c
    w_fc = fc(fea_mid)
    w_i = log_softmax(w_fc)
    loss_weak = -(mu * target * w_i).sum(dim=1).mean()
    w_i = F.softmax(w_fc, dim=1)
    w_t = torch.gather(w_i, 1, label)
    rank = w_i / (1 - w_t.sum(1, True) + 1e-6) + s_i / (1 - s_t.sum(1, True) + 1e-6)
    _, rank = torch.sort(rank, descending=True, dim=-1)
    z_i = zipf.repeat(n, 1)
    ids_sort = torch.argsort(rank)
    z_i = torch.gather(z_i, dim=1, index=ids_sort)
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    logit_s = logit_s[mask].reshape(n, -1)
    ns_i = log_softmax(logit_s)
    nz_i = z_i[mask].reshape(n, -1)
    nz_i = nz_i / nz_i.sum(dim=1, keepdim=True)
    nz_i = nz_i.detach()
    loss_non = -(nz_i * ns_i).sum(dim=1).mean()
    return alpha * loss_t + beta * loss_non + loss_weak


def test_uskd_matches_formula_and_reductions(logits):
    s, w, y = logits
    alpha, beta, mu = 0.7, 0.3, 0.05
    lt, ln, lw, total = np_uskd(s, w, y, alpha, beta, mu)
    got_t, got_n, got_w = uskd_parts(s, w, y, mu)
    np.testing.assert_allclose(got_t.numpy(), lt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_n.numpy(), ln, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_w.numpy(), lw, rtol=1e-5, atol=1e-7)
    per = uskd_loss(s, w, y, alpha, beta, mu, reduction="none")
    assert per.shape == (8,) and per.dtype == torch.float32
    np.testing.assert_allclose(per.numpy(), total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(uskd_loss(s, w, y, alpha, beta, mu)), total.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(uskd_loss(s, w, y, alpha, beta, mu, reduction="sum")), total.sum(), rtol=1e-5
    )


def test_uskd_matches_the_official_code(rng):
    for alpha, beta, mu, scale in [(1.0, 0.1, 0.005, 2.0), (0.1, 0.1, 0.1, 5.0)]:
        fea = torch.randn(32, 16, generator=rng) * scale
        fc = nn.Linear(16, 7)
        s = torch.randn(32, 7, generator=rng) * scale
        y = torch.randint(0, 7, (32,), generator=rng)
        ref = official_uskd(fea, s, y, fc, alpha, beta, mu)
        assert torch.allclose(uskd_loss(s, fc(fea), y, alpha, beta, mu), ref, rtol=1e-5, atol=1e-6)
        # gradients w.r.t. the final logits and the weak head's weights
        s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        uskd_loss(s1, fc(fea), y, alpha, beta, mu).backward()
        g_ours = fc.weight.grad.clone()
        fc.zero_grad()
        official_uskd(fea, s2, y, fc, alpha, beta, mu).backward()
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)
        assert torch.allclose(g_ours, fc.weight.grad, rtol=1e-4, atol=1e-7)


def test_uskd_zipf_labels_and_limits(logits):
    s, w, y = logits
    rows = torch.arange(8)
    nz = zipf_non_target_labels(s, w, y)
    assert nz.shape == (8, 6) and torch.allclose(nz.sum(-1), torch.ones(8)) and not nz.requires_grad
    # when the target ranks first (a confident model), the non-target labels are 1/2, ..., 1/C renormalised
    confident = s.clone()
    confident[rows, y] = 20.0
    w_conf = w.clone()
    w_conf[rows, y] = 20.0
    harmonic = 1.0 / torch.arange(2, 8, dtype=torch.float32)
    sorted_nz = zipf_non_target_labels(confident, w_conf, y).sort(-1, descending=True).values
    assert torch.allclose(sorted_nz, (harmonic / harmonic.sum()).expand(8, 6))
    # with equal final logits the weak head alone orders the classes: its most likely non-target
    # class gets the largest label
    flat = torch.zeros(8, 7)
    weak_best = (y + 3) % 7
    w2 = torch.zeros(8, 7)
    w2[rows, weak_best] = 5.0
    nz2 = zipf_non_target_labels(flat, w2, y)
    cols = weak_best - (weak_best > y).long()  # the class's column once the target is removed
    assert torch.equal(nz2.argmax(-1), cols)
    # α = β = μ = 0: nothing; β = μ = 0 with equal target probabilities: p_y = 1, plain CE
    assert torch.equal(uskd_loss(s, w, y, 0.0, 0.0, 0.0, reduction="none"), torch.zeros(8))
    same = torch.zeros(8, 7)
    same[rows, y] = 2.0
    assert torch.allclose(
        uskd_loss(same, w, y, 1.0, 0.0, 0.0, reduction="none"), cross_entropy(same, y, reduction="none")
    )
    # the weak term alone is μ·CE with label smoothing 0.1 on the weak logits
    assert torch.allclose(
        uskd_parts(s, w, y, 0.2)[2],
        0.2 * F.cross_entropy(w, y, label_smoothing=0.1, reduction="none"),
        atol=1e-6,
    )
    # p_y is centred with the batch mean: the mean of p_y over the batch is 1
    s_y2 = torch.softmax(s, -1)[rows, y] ** 2
    assert torch.allclose((s_y2 + 1 - s_y2.mean()).mean(), torch.tensor(1.0))


def test_uskd_gradients(logits):
    s, w, y = logits
    rows = torch.arange(8)
    # the non-target term never moves the target logit; it reaches no weak logit (labels detached)
    sg, wg = s.clone().requires_grad_(True), w.clone().requires_grad_(True)
    uskd_parts(sg, wg, y)[1].sum().backward()
    assert torch.equal(sg.grad[rows, y], torch.zeros(8)) and sg.grad.abs().sum() > 0 and wg.grad is None
    # the target term: p_y·(softmax(s) − onehot(y)), p_y treated as a constant
    sg = s.clone().requires_grad_(True)
    uskd_parts(sg, w, y)[0].sum().backward()
    s_y2 = torch.softmax(s, -1)[rows, y] ** 2
    p_y = (s_y2 + 1 - s_y2.mean()).unsqueeze(-1)
    assert torch.allclose(sg.grad, p_y * (torch.softmax(s, -1) - F.one_hot(y, 7)), atol=1e-6)
    # the weak term trains the weak logits only
    sg, wg = s.clone().requires_grad_(True), w.clone().requires_grad_(True)
    uskd_parts(sg, wg, y, 0.5)[2].sum().backward()
    assert sg.grad is None and wg.grad.abs().sum() > 0


def test_uskd_finite_for_extreme_logits_and_bf16(rng):
    s = torch.randn(6, 10, generator=rng) * 1e4
    w = torch.randn(6, 10, generator=rng) * 1e4
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    s[torch.arange(6), y] = 3e4  # saturated: S_y = 1 exactly
    w[torch.arange(6), y] = 3e4
    for a, b in ((s, w), (s.bfloat16(), w.bfloat16()), (-s, -w)):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        v = uskd_loss(a, b, y, 0.1, 0.1, 0.1)
        v.backward()
        assert torch.isfinite(v) and v.dtype == torch.float32
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        assert torch.allclose(zipf_non_target_labels(a, b, y).sum(-1), torch.ones(6))
    z, u = torch.randn(6, 10, generator=rng), torch.randn(6, 10, generator=rng)
    assert torch.allclose(
        uskd_loss(z.bfloat16(), u.bfloat16(), y), uskd_loss(z.bfloat16().float(), u.bfloat16().float(), y)
    )


def test_uskd_bad_inputs(logits):
    s, w, y = logits
    for kw, name in [({"alpha": -1.0}, "alpha"), ({"beta": -0.1}, "beta"), ({"mu": float("nan")}, "mu")]:
        with pytest.raises(ValueError, match=name):
            uskd_loss(s, w, y, **kw)
        with pytest.raises(ValueError, match=name):
            USKDLoss("layer2", **kw)
    with pytest.raises(ValueError, match="weak head's logits"):
        uskd_loss(s, w[:, :4], y)
    with pytest.raises(ValueError, match="class-index targets"):
        uskd_loss(s, w, F.one_hot(y, 7).float())
    with pytest.raises(ValueError, match="class indices"):
        uskd_loss(s, w, torch.full((8,), 7))
    with pytest.raises(ValueError, match="target must be"):
        uskd_loss(s, w, y[:3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        uskd_loss(s[:, :1], w[:, :1], torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        uskd_loss(s, w, y, reduction="avg")
    with pytest.raises(ValueError, match="student_layer must be a module path"):
        USKDLoss("")


def test_uskd_term_owns_a_weak_head_on_a_pooled_mid_feature(logits):
    s, _, y = logits
    term = build("distiller", "uskd", student_layer="layer2", alpha=0.1, beta=0.2, mu=0.3)
    assert isinstance(term, USKDLoss) and not term.needs_teacher and term.needs_target
    assert term.student_features == ("layer2",) and term.teacher_features == ()
    fmap = torch.randn(8, 5, 4, 4)
    step = Step(Batch(None, y), ModelOutput(s, None, {"layer2": fmap}), None, Progress())
    with pytest.raises(RuntimeError, match="weak head is not built"):
        term(step)
    term.setup(step)
    head = term.heads["weak"]
    assert head.spec["in_dim"] == 5 and head.spec["out_dim"] == 7 and head.spec["kind"] == "linear"
    weak = head.net(fmap.mean(dim=(2, 3)))  # global average pooling, then one linear layer
    assert torch.allclose(term(step), uskd_loss(s, weak, y, 0.1, 0.2, 0.3, reduction="none"))
    with pytest.raises(ValueError, match="no tapped feature 'layer2'"):
        USKDLoss("layer2").setup(Step(Batch(None, y), ModelOutput(s), None, Progress()))
    assert "mu=0.3" in repr(term)


# == real runs, checkpoints, resume ===============================================================
DHKD = {"ce": {"loss": "cross_entropy"}, "dhkd": {"distiller": "dhkd", "head": "mlp", "hidden": 16}}
USKD = {
    "ce": {"loss": "cross_entropy"},
    "uskd": {"distiller": "uskd", "student_layer": "features.3", "mu": 0.1},
}


def make_module(terms, seed=1, teacher=None):
    torch.manual_seed(seed)
    kw = dict(num_classes=10, in_chans=1, model_kwargs={"width": 4}, optimizer={"name": "adam", "lr": 0.01})
    if "dhkd" in terms:
        return DistillationModule("convnet", teacher or small_teacher(), terms=terms, **kw)
    return ClassificationModule("convnet", loss=terms, **kw)  # USKD: self-distillation, no teacher


def digits():
    return DigitsDataModule(batch_size=64, val_split=0.1, seed=0, augment=True)


@pytest.mark.parametrize("terms", [DHKD, USKD], ids=["dhkd", "uskd"])
def test_short_lightning_run_trains_the_head_and_checkpoints_it(terms, make_trainer, tmp_path):
    name = next(k for k in terms if k != "ce")
    m = make_module(terms)
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(m, datamodule=digits())
    assert torch.isfinite(trainer.callback_metrics[f"train/loss/{name}"])
    head = m.loss_terms[name].heads.items
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in head.parameters()} <= opt_params and len(list(head.parameters())) > 0
    if name == "uskd":
        assert m.teacher_output(Batch(torch.zeros(1))) is None  # no teacher anywhere
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    cls = DistillationModule if name == "dhkd" else ClassificationModule
    extra = {"teacher": m.teacher, "terms": terms} if name == "dhkd" else {}
    loaded = cls.load_from_checkpoint(path, **extra)  # no dry run: the head is rebuilt from its spec
    assert set(loaded.state_dict()) == set(m.state_dict())
    for k, v in m.state_dict().items():
        other = loaded.state_dict()[k]
        assert torch.equal(v, other) if torch.is_tensor(v) else v == other, k


def final_weights(terms, tmp_path, stop_after=None):
    teacher = small_teacher() if "dhkd" in terms else None
    kw = dict(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    L.seed_everything(7)
    module = make_module(terms, seed=3, teacher=teacher)
    if stop_after is None:
        L.Trainer(enable_checkpointing=False, **kw).fit(module, datamodule=digits())
        return module.state_dict()
    cb = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb, StopAfter(stop_after)], **kw).fit(module, datamodule=digits())
    L.seed_everything(99)
    resumed = make_module(terms, seed=42, teacher=teacher)  # other initial weights: the checkpoint wins
    cb = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb], **kw).fit(resumed, datamodule=digits(), ckpt_path=str(tmp_path / "last.ckpt"))
    return resumed.state_dict()


@pytest.mark.parametrize("terms", [DHKD, USKD], ids=["dhkd", "uskd"])
def test_resume_continues_exactly(terms, tmp_path):
    straight = final_weights(terms, tmp_path / "a")
    resumed = final_weights(terms, tmp_path / "b", stop_after=1)
    assert straight.keys() == resumed.keys()
    for k in straight:
        if torch.is_tensor(straight[k]):
            assert torch.equal(straight[k], resumed[k]), k
        else:
            assert straight[k] == resumed[k], k


# == configs ======================================================================================


@pytest.mark.parametrize(
    "name, shape, head",
    [
        ("dhkd", (2, 1, 28, 28), {"in_dim": 256, "out_dim": 10, "kind": "linear"}),
        ("dhkd_cifar100", (2, 3, 32, 32), {"in_dim": 256, "out_dim": 100, "kind": "mlp", "hidden": 200}),
        ("uskd", (2, 1, 28, 28), {"in_dim": 8, "out_dim": 10, "kind": "linear"}),
        ("uskd_cifar100", (2, 3, 32, 32), {"in_dim": 128, "out_dim": 100, "kind": "linear"}),
    ],
)
def test_configs_build_with_the_papers_settings(name, shape, head):
    cfg, m = config_module(name, shape)
    method = cfg["method"]
    assert name.split("_")[0] == method and set(cfg["terms"]) == {"ce", method}
    # dhkd's demo: the paper's ImageNet setting (linear head, α = 0.1); CIFAR-100: α = 1
    weight = 0.1 if name == "dhkd" else 1.0
    assert cfg["terms"]["ce"]["weight"] == 1.0 and cfg["terms"][method]["weight"] == weight
    key = "aux" if method == "dhkd" else "weak"
    spec = m.loss_terms[method].heads[key].spec
    assert {k: spec[k] for k in head} == head
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["terms"][method]
    if method == "dhkd":
        assert raw["temperature"] == 2.0
    else:
        assert (raw["alpha"], raw["beta"], raw["mu"]) == (0.1, 0.1, 0.1)
        assert not m._needs_teacher()  # self-distillation: the teacher is never run
    if name.endswith("cifar100"):
        assert cfg["data"] == "cifar100"
