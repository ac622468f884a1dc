"""Exact values, limiting cases, reductions and numerical stability of the functional forms."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit.functional import cross_entropy, kd_loss


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.fixture
def logits(rng):
    return torch.randn(6, 5, generator=rng) * 3


def test_cross_entropy_matches_formula_and_torch(logits):
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    expected = -np_log_softmax(logits.numpy())[np.arange(6), y.numpy()]
    per = cross_entropy(logits, y, reduction="none")
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5)
    assert torch.allclose(cross_entropy(logits, y), F.cross_entropy(logits, y))
    assert torch.allclose(cross_entropy(logits, y, reduction="sum"), per.sum())


def test_cross_entropy_label_smoothing_and_soft_targets(logits):
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    eps, c = 0.2, logits.shape[1]
    q = np.full((6, c), eps / c)
    q[np.arange(6), y.numpy()] += 1 - eps
    expected = -(q * np_log_softmax(logits.numpy())).sum(-1)
    np.testing.assert_allclose(
        cross_entropy(logits, y, label_smoothing=eps, reduction="none").numpy(), expected, rtol=1e-5
    )
    assert torch.allclose(
        cross_entropy(logits, y, label_smoothing=eps), F.cross_entropy(logits, y, label_smoothing=eps)
    )
    # one-hot soft targets reduce to the hard-label loss
    soft = F.one_hot(y, c).float()
    assert torch.allclose(
        cross_entropy(logits, soft, reduction="none"), cross_entropy(logits, y, reduction="none")
    )


def test_cross_entropy_ignore_index(logits):
    y = torch.tensor([0, -100, 2, 3, -100, 0])
    per = cross_entropy(logits, y, reduction="none")
    assert per[1] == 0 and per[4] == 0
    assert torch.allclose(cross_entropy(logits, y), F.cross_entropy(logits, y, ignore_index=-100))


def test_kd_matches_formula(logits, rng):
    t = torch.randn(6, 5, generator=rng) * 2
    tau = 3.0
    lp_s, lp_t = np_log_softmax(logits.numpy() / tau), np_log_softmax(t.numpy() / tau)
    expected = tau**2 * (np.exp(lp_t) * (lp_t - lp_s)).sum(-1)
    per = kd_loss(logits, t, tau, reduction="none")
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5)
    assert torch.allclose(kd_loss(logits, t, tau), per.mean())
    assert torch.allclose(kd_loss(logits, t, tau, reduction="sum"), per.sum())
    # same as torch's batchmean KL times tau^2
    ref = F.kl_div(
        F.log_softmax(logits / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="batchmean"
    )
    assert torch.allclose(kd_loss(logits, t, tau), ref * tau**2, rtol=1e-5)


def test_kd_limiting_cases(logits):
    assert torch.allclose(kd_loss(logits, logits.clone(), 4.0, reduction="none"), torch.zeros(6), atol=1e-6)
    # shift invariance of softmax: adding a constant per row changes nothing
    assert torch.allclose(kd_loss(logits + 7.0, logits, 2.0, reduction="none"), torch.zeros(6), atol=1e-5)
    t = torch.randn_like(logits)
    assert (kd_loss(logits, t, 2.0, reduction="none") >= 0).all()


def test_kd_gradient_is_tau_times_prob_difference(logits, rng):
    t = torch.randn(6, 5, generator=rng)
    tau = 2.5
    s = logits.clone().requires_grad_(True)
    kd_loss(s, t, tau, reduction="sum").backward()
    expected = tau * (torch.softmax(logits / tau, -1) - torch.softmax(t / tau, -1))
    assert torch.allclose(s.grad, expected, atol=1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_kd_rejects_nonpositive_temperature(logits, bad):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(logits, logits, bad)


def test_kd_rejects_class_count_mismatch(logits):
    with pytest.raises(ValueError, match="same classes"):
        kd_loss(logits, torch.randn(6, 7))


def test_bad_reduction(logits):
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, torch.zeros(6, dtype=torch.long), reduction="avg")


def test_stability_extreme_logits_and_bf16(rng):
    big = torch.randn(4, 10, generator=rng) * 1e4
    y = torch.tensor([0, 1, 2, 3])
    for fn in (lambda s: cross_entropy(s, y), lambda s: kd_loss(s, big.flip(0), 4.0)):
        s = big.clone().requires_grad_(True)
        v = fn(s)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(s.grad).all()
        sb = big.bfloat16().requires_grad_(True)
        vb = fn(sb)
        vb.backward()
        assert torch.isfinite(vb) and torch.isfinite(sb.grad).all()
    # bf16 input gives the float32 value of the rounded logits
    z = torch.randn(4, 10, generator=rng)
    assert math.isclose(
        float(cross_entropy(z.bfloat16(), y)), float(cross_entropy(z.bfloat16().float(), y)), rel_tol=1e-6
    )
