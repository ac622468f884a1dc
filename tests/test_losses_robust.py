"""spherical_z, anyloss, ldr_kl, aldr_kl: exact values against independent formulas, limits,
invariances, reductions, gradients, numerics, bad inputs, configs, Lightning runs and the recipe."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import StopAfter
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, fbeta_score, recall_score

from toolkit import Progress, Step, registry
from toolkit.functional import aldr_kl_lambda, aldr_kl_loss, anyloss, ldr_kl_loss, spherical_z_loss
from toolkit.functional.anyloss import soft_confusion
from toolkit.functional.ldr_kl import ldr_normalize
from toolkit.functional.spherical_z import z_scores
from toolkit.losses import ALDRKLLoss, AnyLoss, LDRKLLoss, SphericalZLoss
from toolkit.modules.config import build_terms
from toolkit.types import Batch, ModelOutput

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs" / "train"
NAMES = ("spherical_z", "anyloss", "ldr_kl", "aldr_kl")


@pytest.fixture
def batch(rng):
    z = torch.randn(12, 7, generator=rng) * 2
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4])
    return z, y


def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------------------
# spherical_z
# ------------------------------------------------------------------------------------------------
def np_spherical_z(o, y, a, b):
    """Per sample, from the paper's statistics: μ = Σo/D, σ² = Σo²/D − μ² (float64 loop)."""
    out = []
    for row, c in zip(np.asarray(o, dtype=np.float64), y):
        d = len(row)
        mu = sum(row) / d
        sigma = np.sqrt(sum(v * v for v in row) / d - mu * mu)
        z = (row[c] - mu) / sigma
        out.append(np_softplus(a * (b - z)) / a)
    return np.array(out)


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (0.5, 2.0), (3.0, -0.5)])
def test_spherical_z_matches_formula_and_reductions(batch, a, b):
    z, y = batch
    expected = np_spherical_z(z.numpy(), y.numpy(), a, b)
    per = spherical_z_loss(z, y, a, b, reduction="none")
    assert per.shape == (12,)
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5)
    assert spherical_z_loss(z, y, a, b) == pytest.approx(expected.mean(), rel=1e-5)
    assert spherical_z_loss(z, y, a, b, reduction="sum") == pytest.approx(expected.sum(), rel=1e-5)
    term = SphericalZLoss(a=a, b=b)
    assert torch.allclose(term(Step(Batch(None, y), ModelOutput(z))), per)


def test_spherical_z_shift_and_scale_invariance(batch):
    z, y = batch
    base = spherical_z_loss(z.double(), y, reduction="none")
    for scale, shift in [(3.0, 0.0), (0.01, -5.0), (250.0, 1e3), (1.0, torch.randn(12, 1).double())]:
        assert torch.allclose(spherical_z_loss(scale * z.double() + shift, y, reduction="none"), base)
    # a negative scale flips z (not invariant); permuting classes together with the labels is
    perm = torch.randperm(7)
    inv = torch.argsort(perm)
    assert not torch.allclose(spherical_z_loss(-z, y, reduction="none"), base.float())
    assert torch.allclose(spherical_z_loss(z[:, perm], inv[y], reduction="none"), base.float(), atol=1e-6)


def test_spherical_z_limits_and_bounds():
    d = 10
    onehot = torch.eye(d)
    y = torch.arange(d)
    # |z_c| ≤ √(D − 1), reached by a one-hot row: the smallest possible loss
    assert torch.allclose(z_scores(onehot)[y, y], torch.full((d,), (d - 1) ** 0.5))
    best = spherical_z_loss(onehot, y, 1.0, 1.0, reduction="none")
    assert torch.allclose(best, torch.full((d,), float(np_softplus(1.0 - 3.0))))
    worst = spherical_z_loss(-onehot, y, 1.0, 1.0, reduction="none")
    assert torch.allclose(worst, torch.full((d,), float(np_softplus(1.0 + 3.0))))
    rnd = torch.randn(64, d) * 10
    yr = torch.randint(0, d, (64,))
    vals = spherical_z_loss(rnd, yr, reduction="none")
    assert (vals >= best[0] - 1e-6).all() and (vals <= worst[0] + 1e-6).all()
    # constant logits: z = 0, loss softplus(a·b)/a, zero gradient
    const = torch.full((3, d), 4.2, requires_grad=True)
    v = spherical_z_loss(const, y[:3], 2.0, 0.7, reduction="sum")
    v.backward()
    assert v.item() == pytest.approx(3 * float(np_softplus(1.4)) / 2.0, rel=1e-6)
    assert torch.equal(const.grad, torch.zeros_like(const))
    # a → ∞: hinge max(0, b − z_c); b − z_c ≫ 1: ≈ b − z_c
    zc = z_scores(rnd)[torch.arange(64), yr]
    hinge = (1.5 - zc).clamp_min(0)
    assert torch.allclose(spherical_z_loss(rnd, yr, 1e4, 1.5, reduction="none"), hinge, atol=1e-4)
    assert torch.allclose(spherical_z_loss(rnd, yr, 1.0, 40.0, reduction="none"), 40.0 - zc, atol=1e-5)


def test_spherical_z_gradient_closed_form(batch):
    z, y = batch
    a, b = 1.7, 0.8
    zz = z.double().requires_grad_(True)
    spherical_z_loss(zz, y, a, b, reduction="sum").backward()
    o = z.double().numpy()
    d = o.shape[1]
    mu = o.mean(1, keepdims=True)
    sigma = o.std(1, keepdims=True)  # population std
    zs = (o - mu) / sigma
    rows = np.arange(len(y))
    zc = zs[rows, y.numpy()][:, None]
    dz = (np.eye(d)[y.numpy()] - 1.0 / d - zc * zs / d) / sigma  # ∂z_c/∂o_k
    expected = -np_sigmoid(a * (b - zc)) * dz
    np.testing.assert_allclose(zz.grad.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: spherical_z_loss(t, y, a, b), (z.double().requires_grad_(),))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=12, max_size=12),
    st.integers(0, 3),
    st.sampled_from(["float32", "bfloat16"]),
)
def test_spherical_z_property_gradient_orthogonal_to_shift_and_scale(values, label, dtype):
    """Shift and scale invariance ⇒ Σ_k ∂L/∂o_k = 0 and Σ_k (o_k − μ)·∂L/∂o_k = 0 (in float64,
    on logits rounded to float32 / bf16 first); always finite."""
    o = torch.tensor(values, dtype=torch.float32).view(3, 4).to(getattr(torch, dtype)).double()
    o.requires_grad_(True)
    y = torch.full((3,), label)
    v = spherical_z_loss(o, y, reduction="sum")
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(o.grad).all()
    # the gradient's entries are O(1/σ) (σ the row's standard deviation): round-off is relative to that
    centred = o.detach() - o.detach().mean(1, keepdim=True)
    sd = centred.pow(2).mean(1)
    unit = torch.where(sd > 0, 1 / sd.sqrt(), torch.zeros_like(sd))
    g = o.grad
    assert (g.sum(1).abs() <= 1e-9 * (g.abs().sum(1) + unit)).all()
    assert ((g * centred).sum(1).abs() <= 1e-9 * ((g * centred).abs().sum(1) + 1)).all()


# ------------------------------------------------------------------------------------------------
# anyloss
# ------------------------------------------------------------------------------------------------
def np_anyloss_binary(p, y, metric, beta=1.0, L=73.0, s=1e-5):
    """1 − metric from the official README forms (sums ΣY, ΣŶ, ΣYŶ), float64."""
    yh = np_sigmoid(L * (np.asarray(p, dtype=np.float64) - 0.5))
    y = np.asarray(y, dtype=np.float64)
    n, sy, syh, syy = len(y), y.sum(), yh.sum(), (y * yh).sum()
    if metric == "accuracy":
        m = (n - sy - syh + 2 * syy) / n
    elif metric in ("f1", "fbeta"):
        m = (1 + beta**2) * syy / (beta**2 * sy + syh + s)
    elif metric == "balanced_accuracy":
        m = (n * (syy + sy) - sy * (syh + sy)) / (2 * sy * (n - sy) + s)
    elif metric == "gmean":
        m = np.sqrt(syy * (n - syh - sy + syy) / (sy * (n - sy) + s))
    else:  # gmean_surrogate
        m = syy * (n - syh - sy + syy) / (sy * (n - sy) + s)
    return 1.0 - m


METRICS = ["accuracy", "f1", "fbeta", "balanced_accuracy", "gmean", "gmean_surrogate"]


@pytest.mark.parametrize("metric", METRICS)
def test_anyloss_binary_matches_official_forms(rng, metric):
    z = torch.randn(40, generator=rng) * 0.3
    y = (torch.rand(40, generator=rng) < 0.3).long()
    beta = 2.0 if metric == "fbeta" else 1.0
    expected = np_anyloss_binary(torch.sigmoid(z).double().numpy(), y.numpy(), metric, beta)
    for logits in (z, z.unsqueeze(1)):
        got = anyloss(logits, y, metric=metric, beta=beta)
        assert got.shape == () and got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # float 0/1 targets are accepted for binary logits; "mean" and "sum" are the one batch value
    assert anyloss(z, y.float(), metric=metric, beta=beta, reduction="sum").item() == pytest.approx(
        expected, rel=1e-5, abs=1e-6
    )
    with pytest.raises(ValueError, match="no per-sample form"):
        anyloss(z, y, metric=metric, beta=beta, reduction="none")


@pytest.mark.parametrize("metric", METRICS)
def test_anyloss_multiclass_one_vs_rest(batch, metric):
    z, y = batch
    z = z * 0.1
    beta = 0.5 if metric == "fbeta" else 1.0
    p = torch.sigmoid(z).double().numpy()
    per_class = [np_anyloss_binary(p[:, c], (y.numpy() == c), metric, beta) for c in range(7)]
    macro = anyloss(z, y, metric=metric, beta=beta)
    assert macro.item() == pytest.approx(np.mean(per_class), rel=1e-5, abs=1e-6)
    assert anyloss(z, y, metric=metric, beta=beta, average="macro") == macro
    # micro: the per-class confusion matrices are pooled first (loop over classes and samples)
    yh = np_sigmoid(73.0 * (p - 0.5))
    tp = fn = fp = tn = 0.0
    for i in range(12):
        for c in range(7):
            t = float(y[i] == c)
            tp, fn = tp + t * yh[i, c], fn + t * (1 - yh[i, c])
            fp, tn = fp + (1 - t) * yh[i, c], tn + (1 - t) * (1 - yh[i, c])
    pos, neg = tp + fn, fp + tn
    m = {
        "accuracy": (tp + tn) / (pos + neg),
        "f1": 2 * tp / (pos + tp + fp + 1e-5),
        "fbeta": (1 + beta**2) * tp / (beta**2 * pos + tp + fp + 1e-5),
        "balanced_accuracy": 0.5 * (tp / pos + tn / neg),
        "gmean": np.sqrt(tp * tn / (pos * neg)),
        "gmean_surrogate": tp * tn / (pos * neg),
    }[metric]
    micro = anyloss(z, y, metric=metric, beta=beta, average="micro")
    assert micro.item() == pytest.approx(1 - m, rel=1e-4, abs=1e-5)
    # binary average on (B, 2) logits scores class 1 only
    z2, y2 = z[:, :2], (y % 2)
    p1 = torch.sigmoid(z2[:, 1]).double().numpy()
    assert anyloss(z2, y2, metric=metric, beta=beta, average="binary").item() == pytest.approx(
        np_anyloss_binary(p1, y2.numpy(), metric, beta), rel=1e-5, abs=1e-6
    )


def test_anyloss_large_L_gives_the_thresholded_metric(rng):
    """L → ∞: A → 1[p > 0.5], and the loss is 1 − the metric of the hard predictions (sklearn)."""
    z = torch.randn(200, generator=rng)
    z = torch.where(z.abs() < 0.05, z.sign() * 0.05, z)  # keep p away from 0.5
    y = (torch.rand(200, generator=rng) < 0.35).long()
    pred = (z > 0).long().numpy()
    yn = y.numpy()
    gmean = np.sqrt(recall_score(yn, pred) * recall_score(yn, pred, pos_label=0))
    reference = {
        "accuracy": accuracy_score(yn, pred),
        "f1": f1_score(yn, pred),
        "fbeta": fbeta_score(yn, pred, beta=2.0),
        "balanced_accuracy": balanced_accuracy_score(yn, pred),
        "gmean": gmean,
        "gmean_surrogate": gmean**2,
    }
    for metric, value in reference.items():
        beta = 2.0 if metric == "fbeta" else 1.0
        got = anyloss(z, y, metric=metric, beta=beta, L=1e5, eps=0.0)
        assert got.item() == pytest.approx(1 - value, abs=1e-5), metric
    # multi-class one-vs-rest at L → ∞: sklearn's multilabel macro / micro F1 of sigmoid > 0.5
    zc = torch.randn(300, 5, generator=rng)
    zc = torch.where(zc.abs() < 0.05, zc.sign() * 0.05, zc)
    yc = torch.arange(300) % 5
    onehot, hard = F.one_hot(yc, 5).numpy(), (zc > 0).long().numpy()
    for average in ("macro", "micro"):
        ref = f1_score(onehot, hard, average=average)
        got = anyloss(zc, yc, metric="f1", L=1e5, eps=0.0, average=average)
        assert got.item() == pytest.approx(1 - ref, abs=1e-5)


def test_anyloss_gradient_closed_form_and_symmetry(rng):
    z = torch.randn(30, generator=rng, dtype=torch.float64) * 0.2
    y = (torch.rand(30, generator=rng) < 0.4).double()
    beta, big_l = 1.5, 20.0
    zz = z.clone().requires_grad_(True)
    anyloss(zz, y, metric="fbeta", beta=beta, L=big_l).backward()
    p = torch.sigmoid(z).numpy()
    a = np_sigmoid(big_l * (p - 0.5))
    yn = y.numpy()
    tp, den = (yn * a).sum(), beta**2 * yn.sum() + a.sum() + 1e-5
    d_loss_d_a = -(1 + beta**2) * (yn * den - tp) / den**2  # from the paper's derivative of F_β
    expected = d_loss_d_a * big_l * a * (1 - a) * p * (1 - p)
    np.testing.assert_allclose(zz.grad.numpy(), expected, rtol=1e-9, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda t: anyloss(t, y, metric="balanced_accuracy", L=big_l), (z.clone().requires_grad_(),)
    )
    # accuracy, balanced accuracy and G-mean do not care which class is called positive; F1 does
    for metric in ("accuracy", "balanced_accuracy", "gmean", "gmean_surrogate"):
        assert anyloss(z, y, metric=metric).item() == pytest.approx(
            anyloss(-z, 1 - y, metric=metric).item(), rel=1e-9
        )
    assert anyloss(z, y, metric="f1").item() != pytest.approx(anyloss(-z, 1 - y, metric="f1").item())
    # the soft confusion matrix sums to the batch (per class) and its marginals are the labels
    tp, fn, fp, tn = soft_confusion(z, y, big_l)
    assert (tp + fn).item() == pytest.approx(yn.sum()) and (tp + fn + fp + tn).item() == pytest.approx(30)


def test_anyloss_term_and_batch_level(batch):
    z, y = batch
    term = AnyLoss(metric="balanced_accuracy", L=10.0)
    v = term(Step(Batch(None, y), ModelOutput(z)))
    assert v.shape == () and v == anyloss(z, y, metric="balanced_accuracy", L=10.0)
    terms = build_terms({"a": {"loss": "anyloss", "metric": "gmean", "average": "micro"}})
    assert terms["a"][0].average == "micro" and terms["a"][0].metric == "gmean"


# ------------------------------------------------------------------------------------------------
# ldr_kl / aldr_kl
# ------------------------------------------------------------------------------------------------
def np_normalize(f, how):
    f = np.asarray(f, dtype=np.float64)
    k = f.shape[1]
    if how == "none":
        return f
    if how == "softplus_l1":
        f = np_softplus(f)
        return f / f.mean(1, keepdims=True)
    return k * f / np.abs(f).sum(1, keepdims=True)


def np_psi(scores, y, lam, margin):
    """Per sample: max over p of Σ p_k δ_k − λ·KL(p ‖ 1/K), evaluated at p* = softmax(δ/λ)."""
    out = []
    lams = np.broadcast_to(np.asarray(lam, dtype=np.float64), (len(y),))
    for row, c, la in zip(scores, y, lams):
        k = len(row)
        delta = np.array([(margin if j != c else 0.0) + row[j] - row[c] for j in range(k)])
        w = np.exp((delta - delta.max()) / la)
        p = w / w.sum()
        kl = float(np.sum(p * np.log(p * k)))
        out.append(float(p @ delta) - la * kl)
    return np.array(out)


@pytest.mark.parametrize("normalize", ["none", "l1", "softplus_l1"])
@pytest.mark.parametrize("lam, margin", [(1.0, 0.1), (0.3, 0.0), (5.0, 2.0)])
def test_ldr_kl_matches_the_dro_maximum(batch, normalize, lam, margin):
    z, y = batch
    scores = np_normalize(z.numpy(), normalize)
    expected = np_psi(scores, y.numpy(), lam, margin)
    per = ldr_kl_loss(z, y, lam, margin, normalize, reduction="none")
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert ldr_kl_loss(z, y, lam, margin, normalize).item() == pytest.approx(expected.mean(), rel=1e-5)
    assert ldr_kl_loss(z, y, lam, margin, normalize, reduction="sum").item() == pytest.approx(
        expected.sum(), rel=1e-5
    )
    assert torch.allclose(ldr_normalize(z, normalize), torch.tensor(scores, dtype=torch.float32), atol=1e-5)
    term = LDRKLLoss(lam=lam, margin=margin, normalize=normalize)
    assert torch.allclose(term(Step(Batch(None, y), ModelOutput(z))), per)


def test_ldr_kl_is_a_maximum_over_label_distributions(batch, rng):
    z, y = batch
    lam, margin = 0.7, 0.2
    psi = ldr_kl_loss(z.double(), y, lam, margin, "none", reduction="none")
    f = z.double()
    delta = f - f.gather(1, y[:, None]) + margin * (1 - F.one_hot(y, 7).double())
    for _ in range(20):
        p = torch.softmax(torch.randn(12, 7, generator=rng, dtype=torch.float64) * 3, -1)
        value = (p * delta).sum(1) - lam * (p * torch.log(p * 7)).sum(1)
        assert (value <= psi + 1e-12).all()


def test_ldr_kl_limits(batch):
    z, y = batch
    k = 7
    ce = F.cross_entropy(z, y, reduction="none")
    # λ = 1, c = 0, no normalisation: CE − log K; any λ with c = 0: temperature-scaled CE
    assert torch.allclose(ldr_kl_loss(z, y, 1.0, 0.0, "none", reduction="none"), ce - np.log(k), atol=1e-6)
    for lam in (0.25, 4.0):
        tce = lam * (F.cross_entropy(z / lam, y, reduction="none") - np.log(k))
        assert torch.allclose(ldr_kl_loss(z, y, lam, 0.0, "none", reduction="none"), tce, atol=1e-5)
    # λ → 0: Crammer–Singer max_k (c·1[k≠y] + f_k − f_y); λ → ∞: the mean of the differences
    delta = z - z.gather(1, y[:, None]) + 0.5 * (1 - F.one_hot(y, k).float())
    cs = ldr_kl_loss(z.double(), y, 1e-4, 0.5, "none", reduction="none")
    assert torch.allclose(cs, delta.double().amax(1), atol=2e-3)
    mean = ldr_kl_loss(z.double(), y, 1e5, 0.5, "none", reduction="none")
    assert torch.allclose(mean, delta.double().mean(1), atol=1e-3)
    # shift invariance without normalisation; positive scale invariance with l1 normalisation
    base = ldr_kl_loss(z, y, 1.0, 0.1, "none", reduction="none")
    assert torch.allclose(ldr_kl_loss(z + 100.0, y, 1.0, 0.1, "none", reduction="none"), base, atol=1e-4)
    l1 = ldr_kl_loss(z, y, 1.0, 0.1, "l1", reduction="none")
    assert torch.allclose(ldr_kl_loss(z * 37.0, y, 1.0, 0.1, "l1", reduction="none"), l1, atol=1e-5)


def test_ldr_kl_gradient_is_p_star_minus_onehot(batch):
    z, y = batch
    lam, margin = 0.6, 0.3
    zz = z.double().requires_grad_(True)
    ldr_kl_loss(zz, y, lam, margin, "none", reduction="sum").backward()
    delta = z.double() - z.double().gather(1, y[:, None]) + margin * (1 - F.one_hot(y, 7).double())
    expected = torch.softmax(delta / lam, -1) - F.one_hot(y, 7).double()
    assert torch.allclose(zz.grad, expected, atol=1e-12)
    for normalize in ("l1", "softplus_l1"):
        assert torch.autograd.gradcheck(
            lambda t, n=normalize: ldr_kl_loss(t, y, lam, margin, n), (z.double().requires_grad_(),)
        )


def np_aldr(f, y, lam_prev, lam0, alpha, margin, normalize):
    """(λ_new, loss) per sample, from the adaptive rule written out with a loop."""
    scores = np_normalize(f, normalize)
    k = scores.shape[1]
    lams = []
    for row, lp in zip(scores, lam_prev):
        w = np.exp((row - row.max()) / lp)
        p = w / w.sum()
        kl = sum(pi * np.log(pi * k) for pi in p)
        lams.append(lam0 - lam0 * kl / (alpha * np.log(k)))
    lams = np.array(lams)
    loss = np_psi(scores, y, lams, margin) - alpha * np.log(k) / (2 * lam0) * (lams - lam0) ** 2
    return lams, loss


@pytest.mark.parametrize("normalize", ["l1", "softplus_l1", "none"])
def test_aldr_kl_matches_the_adaptive_rule(batch, rng, normalize):
    z, y = batch
    lam0, alpha, margin = 1.5, 3.0, 0.1
    lam_prev = torch.rand(12, generator=rng) + 0.2
    lams, expected = np_aldr(z.numpy(), y.numpy(), lam_prev.double().numpy(), lam0, alpha, margin, normalize)
    got_lam = aldr_kl_lambda(z, lam_prev, lam0, alpha, normalize)
    np.testing.assert_allclose(got_lam.numpy(), lams, rtol=1e-5)
    per = aldr_kl_loss(z, y, lam_prev, lam0, alpha, margin, normalize, reduction="none")
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert aldr_kl_loss(z, y, lam_prev, lam0, alpha, margin, normalize).item() == pytest.approx(
        expected.mean(), rel=1e-4
    )
    assert aldr_kl_loss(
        z, y, lam_prev, lam0, alpha, margin, normalize, reduction="sum"
    ).item() == pytest.approx(expected.sum(), rel=1e-4)
    # no stored λ: λ_0 for every sample
    first, _ = np_aldr(z.numpy(), y.numpy(), np.full(12, lam0), lam0, alpha, margin, normalize)
    np.testing.assert_allclose(aldr_kl_lambda(z, None, lam0, alpha, normalize).numpy(), first, rtol=1e-5)


def test_aldr_kl_lambda_range_limits_and_gradient(rng):
    k = 10
    z = torch.randn(64, k, generator=rng) * 5
    y = torch.randint(0, k, (64,), generator=rng)
    for alpha in (1.5, 2.0, 8.0):
        lam = aldr_kl_lambda(z, torch.full((64,), 0.05), 1.0, alpha)
        assert (lam <= 1.0 + 1e-6).all() and (lam >= 1.0 - 1.0 / alpha - 1e-6).all()
    # uniform predictions keep λ_0; a (near) one-hot one reaches λ_0·(1 − 1/α)
    assert torch.allclose(aldr_kl_lambda(torch.ones(3, k), None, 2.0, 2.0), torch.full((3,), 2.0))
    sharp = torch.full((1, k), -1.0)
    sharp[0, 0] = 1.0
    assert aldr_kl_lambda(sharp, torch.tensor([1e-3]), 2.0, 2.0).item() == pytest.approx(1.0, abs=1e-4)
    # α → ∞: λ_i = λ_0 and ALDR-KL is LDR-KL with λ = λ_0 (the penalty vanishes)
    assert torch.allclose(
        aldr_kl_loss(z, y, None, 0.8, 1e9, 0.1, "l1", reduction="none"),
        ldr_kl_loss(z, y, 0.8, 0.1, "l1", reduction="none"),
        atol=1e-5,
    )
    # λ_i carries no gradient: the gradient is LDR-KL's at the fixed λ_i, p*(λ_i) − onehot
    zz = z.double().requires_grad_(True)
    lam_prev = torch.rand(64, generator=rng).double() + 0.5
    aldr_kl_loss(zz, y, lam_prev, 1.0, 2.0, 0.1, "none", reduction="sum").backward()
    lam = aldr_kl_lambda(z.double(), lam_prev, 1.0, 2.0, "none")
    delta = z.double() - z.double().gather(1, y[:, None]) + 0.1 * (1 - F.one_hot(y, k).double())
    expected = torch.softmax(delta / lam[:, None], -1) - F.one_hot(y, k).double()
    assert torch.allclose(zz.grad, expected, atol=1e-12)


def test_aldr_kl_term_keeps_lambda_per_sample(rng):
    term = ALDRKLLoss(lam0=1.0, alpha=2.0, margin=0.1)
    assert term.needs_index
    z = torch.randn(4, 6, generator=rng) * 3
    y = torch.tensor([0, 1, 2, 3])
    idx = torch.tensor([9, 2, 5, 0])
    step = Step(Batch(None, y, idx), ModelOutput(z), None, Progress())
    first = term(step)
    assert torch.allclose(first, aldr_kl_loss(z, y, None, 1.0, 2.0, 0.1, "l1", reduction="none"))
    stored = aldr_kl_lambda(z, None, 1.0, 2.0, "l1")
    assert torch.allclose(term.previous_lambda(idx), stored)
    assert term.memory.written.sum() == 4 and not term.memory.written[1]
    # the second visit starts from the stored λ (unseen sample 7 starts from λ_0)
    z2 = torch.randn(5, 6, generator=rng)
    y2 = torch.tensor([0, 1, 2, 3, 4])
    idx2 = torch.tensor([9, 2, 5, 0, 7])
    second = term(Step(Batch(None, y2, idx2), ModelOutput(z2), None, Progress()))
    prev = torch.cat([stored, torch.tensor([1.0])])
    assert torch.allclose(second, aldr_kl_loss(z2, y2, prev, 1.0, 2.0, 0.1, "l1", reduction="none"))
    # evaluation does not write; a batch without indices is a clear error
    term.eval()
    before = term.memory.values.clone()
    term(Step(Batch(None, y, idx), ModelOutput(torch.randn(4, 6)), None, Progress()))
    assert torch.equal(term.memory.values, before)
    with pytest.raises(ValueError, match="needs the dataset index"):
        term(Step(Batch(None, y), ModelOutput(z), None, Progress()))


# ------------------------------------------------------------------------------------------------
# all four: numerics, bad inputs, registry, configs, Lightning, recipe
# ------------------------------------------------------------------------------------------------
LOSSES = {
    "spherical_z": lambda s, y: spherical_z_loss(s, y),
    "spherical_z_sharp": lambda s, y: spherical_z_loss(s, y, 50.0, 2.0),
    "anyloss_f1": lambda s, y: anyloss(s, y),
    "anyloss_gmean_micro": lambda s, y: anyloss(s, y, metric="gmean", average="micro"),
    "anyloss_bacc": lambda s, y: anyloss(s, y, metric="balanced_accuracy", L=5.0),
    "ldr_kl": lambda s, y: ldr_kl_loss(s, y),
    "ldr_kl_raw_small_lambda": lambda s, y: ldr_kl_loss(s, y, 0.05, 0.1, "none"),
    "aldr_kl": lambda s, y: aldr_kl_loss(s, y),
    "aldr_kl_raw": lambda s, y: aldr_kl_loss(s, y, torch.full((6,), 0.05), 0.1, 2.0, 0.1, "none"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_for_extreme_logits_and_bf16(name, rng):
    fn = LOSSES[name]
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    big = torch.randn(6, 10, generator=rng) * 1e4
    saturated = torch.full((6, 10), -1e4)
    saturated[torch.arange(6), y] = 1e4
    for s in (big, big.bfloat16(), saturated, -saturated, torch.zeros(6, 10), big.half()):
        s = s.clone().requires_grad_(True)
        v = fn(s, y)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(s.grad).all()
        assert v.dtype == torch.float32
    z = torch.randn(6, 10, generator=rng)
    assert torch.allclose(fn(z.bfloat16(), y), fn(z.bfloat16().float(), y))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=20, max_size=20),
    st.lists(st.integers(0, 4), min_size=4, max_size=4),
    st.sampled_from(sorted(LOSSES)),
    st.booleans(),
)
def test_property_every_loss_finite(values, labels, name, bf16):
    if name == "aldr_kl_raw":
        fn = lambda s, y: aldr_kl_loss(s, y, torch.full((4,), 0.05), 0.1, 2.0, 0.1, "none")  # noqa: E731
    else:
        fn = LOSSES[name]
    s = torch.tensor(values).view(4, 5)
    s = (s.bfloat16() if bf16 else s).requires_grad_(True)
    v = fn(s, torch.tensor(labels))
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(s.grad).all()


def test_bad_hyper_parameters_and_inputs_raise(batch):
    z, y = batch
    for kw, match in [
        ({"a": 0.0}, "a \\(the softplus"),
        ({"a": float("nan")}, "a \\("),
        ({"b": float("inf")}, "b \\("),
    ]:
        with pytest.raises(ValueError, match=match):
            SphericalZLoss(**kw)
        with pytest.raises(ValueError, match=match):
            spherical_z_loss(z, y, **kw)
    for kw, match in [
        ({"metric": "auc"}, "metric must be"),
        ({"beta": 0.0}, "beta"),
        ({"metric": "f1", "beta": 2.0}, "metric='fbeta'"),
        ({"L": -1.0}, "amplifying scale"),
        ({"average": "weighted"}, "average must be"),
        ({"eps": -1.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            AnyLoss(**kw)
        with pytest.raises(ValueError, match=match):
            anyloss(z, y, **kw)
    with pytest.raises(ValueError, match="binary targets must be 0 or 1"):
        anyloss(z[:, 0], torch.full((12,), 2))
    with pytest.raises(ValueError, match="binary target must be"):
        anyloss(z[:, 0], y[:5])
    with pytest.raises(ValueError, match="average='binary' needs"):
        anyloss(z, y, average="binary")
    with pytest.raises(ValueError, match="\\(B,\\) binary logits or \\(B, C\\)"):
        anyloss(z.view(3, 4, 7), y)
    for kw, match in [
        ({"lam": 0.0}, "lam \\(the KL"),
        ({"lam": float("inf")}, "lam \\("),
        ({"margin": -0.1}, "margin"),
        ({"normalize": "l2"}, "normalize must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            LDRKLLoss(**kw)
        with pytest.raises(ValueError, match=match):
            ldr_kl_loss(z, y, **kw)
    for kw, match in [
        ({"lam0": -1.0}, "lam0"),
        ({"alpha": 1.0}, "alpha must be"),
        ({"alpha": 0.5}, "alpha must be"),
        ({"margin": float("nan")}, "margin"),
        ({"normalize": "softmax"}, "normalize must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            ALDRKLLoss(**kw)
        with pytest.raises(ValueError, match=match):
            aldr_kl_loss(z, y, **kw)
    with pytest.raises(ValueError, match="lam_prev must be \\(B,\\)"):
        aldr_kl_loss(z, y, torch.ones(3))
    with pytest.raises(ValueError, match="lam_prev must be > 0"):
        aldr_kl_loss(z, y, torch.zeros(12))
    # shared input checks: targets out of range, soft targets, shapes, a single class, reduction
    for fn in (spherical_z_loss, ldr_kl_loss, aldr_kl_loss, anyloss):
        with pytest.raises(ValueError, match="class indices in \\[0, 7\\)"):
            fn(z, torch.full((12,), 7))
        with pytest.raises(ValueError, match="class indices in \\[0, 7\\)"):
            fn(z, torch.full((12,), -1))
        with pytest.raises(ValueError, match="class-index targets"):
            fn(z, F.one_hot(y, 7).float())
        with pytest.raises(ValueError, match="target must be"):
            fn(z, y[:4])
        with pytest.raises(ValueError, match="reduction must be"):
            fn(z, y, reduction="batchmean")
    for fn in (spherical_z_loss, ldr_kl_loss, aldr_kl_loss):
        with pytest.raises(ValueError, match="\\(B, C\\) logits"):
            fn(z[:, 0], y)


def test_registry_and_module_construction():
    from toolkit.modules import ClassificationModule

    for name, cls in zip(NAMES, (SphericalZLoss, AnyLoss, LDRKLLoss, ALDRKLLoss)):
        assert registry.get("loss", name) is cls
        module = ClassificationModule("convnet", num_classes=10, in_chans=1, loss=name)
        assert isinstance(module.loss_terms["loss"], cls)
        module = ClassificationModule("convnet", num_classes=10, in_chans=1, loss={"x": {"loss": name}})
        assert isinstance(module.loss_terms["x"], cls)


def test_configs_build(batch):
    z, y = batch
    idx = torch.arange(12)
    for name in NAMES:
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg["method"] == name
        terms = build_terms(cfg["terms"])
        assert [t.__class__ for t, _ in terms.values()] == [registry.get("loss", name)]
        term, _ = terms[name]
        v = term(Step(Batch(None, y, idx), ModelOutput(z), None, Progress()))
        assert torch.isfinite(v).all()


def _module(name, **kw):
    from toolkit.modules import ClassificationModule

    return ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        loss={name: {"loss": name, **kw}},
        optimizer={"name": "adam", "lr": 0.01},
    )


@pytest.mark.parametrize("name", NAMES)
def test_short_lightning_run(name, make_trainer):
    from toolkit.data import DigitsDataModule

    torch.manual_seed(0)
    module = _module(name)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    dm = DigitsDataModule(batch_size=64, seed=0)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics[f"train/loss/{name}"]) and torch.isfinite(metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())
    if name == "aldr_kl":  # the λ of the 3·64 samples seen, each in [λ_0/2, λ_0]
        mem = module.loss_terms[name].memory
        assert int(mem.written.sum()) == 3 * 64
        lam = mem.values[mem.written]
        assert (lam <= 1.0 + 1e-6).all() and (lam >= 0.5 - 1e-6).all() and (lam < 1.0).any()


def _state(module):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in module.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert x.keys() == y.keys(), k
            for kk in x:
                assert torch.equal(x[kk], y[kk]) if torch.is_tensor(x[kk]) else x[kk] == y[kk], (k, kk)
        elif torch.is_tensor(x):
            assert torch.equal(x, y), k
        else:
            assert x == y, k


def _final_state(tmp_path, stop_after=None):
    from toolkit.data import DigitsDataModule

    kw = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=2,
        limit_val_batches=1,
        deterministic=True,
    )

    def data():
        return DigitsDataModule(batch_size=64, train_subset=192, seed=0)

    L.seed_everything(7, workers=True)
    module = _module("aldr_kl")
    if stop_after is None:
        L.Trainer(enable_checkpointing=False, **kw).fit(module, datamodule=data())
        return _state(module)
    cb = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb, StopAfter(stop_after)], **kw).fit(module, datamodule=data())
    torch.manual_seed(12345)  # a fresh process: new objects, another RNG state
    L.seed_everything(7, workers=True)
    resumed = _module("aldr_kl")
    cb = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb], **kw).fit(resumed, datamodule=data(), ckpt_path=str(tmp_path / "last.ckpt"))
    return _state(resumed)


def test_aldr_kl_resume_continues_exactly(tmp_path):
    from toolkit.modules import ClassificationModule

    straight = _final_state(tmp_path / "a")
    resumed = _final_state(tmp_path / "b", stop_after=1)
    assert "loss_terms.aldr_kl.memory._extra_state" in straight
    assert int(straight["loss_terms.aldr_kl.memory._extra_state"]["written"].sum()) == 192
    _same(straight, resumed)
    # load_from_checkpoint (strict) restores the λ memory
    loaded = ClassificationModule.load_from_checkpoint(tmp_path / "b" / "last.ckpt")
    mem = loaded.loss_terms["aldr_kl"].memory
    assert int(mem.written.sum()) == 192


def test_recipe_runs_every_loss_on_digits_fast(tmp_path):
    """`python -m recipes.train --loss NAME --data digits --fast` for the four losses, in one
    `--compare` process (same data and seed for all)."""
    from recipes import train

    res = train.main(
        [
            "--compare",
            ",".join(NAMES),
            "--data",
            "digits",
            "--fast",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert set(res["runs"]) == set(NAMES)
    for name in NAMES:
        assert 0 <= res["runs"][name]["acc"] <= 1
        assert res["terms"][name][name]["loss"] == name
    assert (tmp_path / "results.json").exists()
