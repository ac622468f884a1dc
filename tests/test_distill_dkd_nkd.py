"""DKD and NKD: exact values, the official computations, identities, limits, numerics, a real run."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import toolkit.distill.dkd  # noqa: F401 - registers dkd
import toolkit.distill.nkd  # noqa: F401 - registers nkd
from toolkit import Progress, Step, build
from toolkit.distill.dkd import DKDLoss
from toolkit.distill.nkd import NKDLoss
from toolkit.functional import cross_entropy, kd_loss
from toolkit.functional.dkd import dkd_loss, dkd_parts, non_target
from toolkit.functional.nkd import nkd_loss, nkd_parts
from toolkit.modules.config import build_terms
from toolkit.types import Batch, ModelOutput

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "distill"


# -- independent NumPy formulas (float64) -------------------------------------------------------
def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_drop_target(a, y):
    """Rows of `a` without their target column: (B, C - 1)."""
    return np.stack([np.delete(row, k) for row, k in zip(np.asarray(a, dtype=np.float64), y)])


def np_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def np_dkd(s, t, y, alpha, beta, tau):
    """Returns (TCKD, NCKD, alpha·TCKD + beta·NCKD), per sample, from the paper's definitions."""
    s, t, y = s.double().numpy(), t.double().numpy(), y.numpy()
    ps, pt = np_softmax(s / tau), np_softmax(t / tau)
    rows = np.arange(len(y))
    bs = np.stack([ps[rows, y], 1 - ps[rows, y]], -1)
    bt = np.stack([pt[rows, y], 1 - pt[rows, y]], -1)
    tckd = tau**2 * np_kl(bt, bs)
    qs, qt = np_softmax(np_drop_target(s, y) / tau), np_softmax(np_drop_target(t, y) / tau)
    nckd = tau**2 * np_kl(qt, qs)
    return tckd, nckd, alpha * tckd + beta * nckd


def np_nkd(s, t, y, lam, gamma):
    """Returns (target term, non-target term without gamma, total), per sample."""
    s, t, y = s.double().numpy(), t.double().numpy(), y.numpy()
    rows = np.arange(len(y))
    target_term = -np_softmax(t)[rows, y] * np.log(np_softmax(s)[rows, y])
    t_hat, s_hat = np_softmax(np_drop_target(t, y) / lam), np_softmax(np_drop_target(s, y) / lam)
    non = -(lam**2) * (t_hat * np.log(s_hat)).sum(-1)
    return target_term, non, target_term + gamma * non


# -- direct transcriptions of the official code (torch) -----------------------------------------
def official_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller/distillers/DKD.py dkd_loss, `size_average=False` written as reduction='sum'."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.reshape(-1).unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


def official_nkd(logit_s, logit_t, gt_label, temp, gamma, fixed_mask=True):
    """yzd-v/cls_KD mmcls/models/dis_losses/nkd.py NKDLoss.forward (fixed_mask=False: the older
    mmcls/distillation/losses/nkd.py, whose mask keeps every class)."""
    label = (
        torch.max(gt_label, dim=1, keepdim=True)[1] if gt_label.dim() > 1 else gt_label.view(len(gt_label), 1)
    )
    n, _ = logit_s.shape
    s_i = F.log_softmax(logit_s, dim=1)
    t_i = F.softmax(logit_t, dim=1)
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logit_s).scatter_(1, label, 0 if fixed_mask else 1).bool()
    logit_s = logit_s[mask].reshape(n, -1)
    logit_t = logit_t[mask].reshape(n, -1)
    S_i = F.log_softmax(logit_s / temp, dim=1)
    T_i = F.softmax(logit_t / temp, dim=1)
    loss_non = (T_i * S_i).sum(dim=1).mean()
    loss_non = -gamma * (temp**2) * loss_non
    return loss_t + loss_non


@pytest.fixture
def batch(rng):
    s = torch.randn(8, 7, generator=rng) * 3
    t = torch.randn(8, 7, generator=rng) * 3
    y = torch.tensor([0, 6, 3, 2, 2, 5, 1, 4])
    return s, t, y


# -- DKD ----------------------------------------------------------------------------------------
def test_dkd_matches_formula_and_reductions(batch):
    s, t, y = batch
    alpha, beta, tau = 0.7, 3.0, 2.5
    tckd, nckd, total = np_dkd(s, t, y, alpha, beta, tau)
    got_t, got_n = dkd_parts(s, t, y, tau)
    # float32 against float64: TCKD is a difference of nearby logs, hence the absolute tolerance
    np.testing.assert_allclose(got_t.numpy(), tckd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_n.numpy(), nckd, rtol=1e-5, atol=1e-5)
    per = dkd_loss(s, t, y, alpha, beta, tau, reduction="none")
    assert per.shape == (8,)
    np.testing.assert_allclose(per.numpy(), total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(dkd_loss(s, t, y, alpha, beta, tau)), total.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(dkd_loss(s, t, y, alpha, beta, tau, reduction="sum")), total.sum(), rtol=1e-5
    )
    with pytest.raises(ValueError, match="reduction"):
        dkd_loss(s, t, y, reduction="avg")


def test_dkd_matches_official_mdistiller(rng):
    for scale, tau, (alpha, beta) in [
        (1.0, 4.0, (1.0, 8.0)),
        (5.0, 1.0, (0.5, 0.5)),
        (10.0, 4.0, (2.0, 6.0)),
    ]:
        s = torch.randn(64, 100, generator=rng) * scale
        t = torch.randn(64, 100, generator=rng) * scale
        y = torch.randint(0, 100, (64,), generator=rng)
        ref = official_dkd(s, t, y, alpha, beta, tau)
        assert torch.allclose(dkd_loss(s, t, y, alpha, beta, tau), ref, rtol=1e-5, atol=1e-6)
        # the official gradient too
        s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        dkd_loss(s1, t, y, alpha, beta, tau).backward()
        official_dkd(s2, t, y, alpha, beta, tau).backward()
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


def test_dkd_excludes_the_target_where_the_official_offset_does_not(rng):
    # logits beyond 1000·τ: the code's "−1000" no longer removes the target from NCKD
    s = torch.randn(4, 10, generator=rng) * 10
    t = torch.randn(4, 10, generator=rng) * 10
    y = torch.tensor([1, 2, 3, 4])
    t[torch.arange(4), y] = 2e4
    s[torch.arange(4), y] = 1.5e4
    tau = 4.0
    _, nckd, _ = np_dkd(s, t, y, 0.0, 1.0, tau)
    _, got = dkd_parts(s, t, y, tau)
    np.testing.assert_allclose(got.numpy(), nckd, rtol=1e-4, atol=1e-5)
    leaked = official_dkd(s, t, y, 0.0, 1.0, tau)
    assert not torch.isclose(leaked, got.mean(), rtol=1e-2)


def test_dkd_limiting_cases(batch):
    s, t, y = batch
    zeros = torch.zeros(8)
    assert torch.equal(dkd_loss(s, t, y, 0.0, 0.0, reduction="none"), zeros)
    tckd, nckd = dkd_parts(s, t, y, 4.0)
    # β = 0: α·TCKD alone; α = 0: β·NCKD alone
    assert torch.allclose(dkd_loss(s, t, y, 1.3, 0.0, 4.0, reduction="none"), 1.3 * tckd)
    assert torch.allclose(dkd_loss(s, t, y, 0.0, 2.0, 4.0, reduction="none"), 2.0 * nckd)
    # equal logits (and per-row shifts of them) give 0; both parts are KLs, so non-negative
    assert torch.allclose(dkd_loss(s, s.clone(), y, 1.0, 8.0, reduction="none"), zeros, atol=1e-5)
    assert torch.allclose(dkd_loss(s + 5.0, s, y, 1.0, 8.0, reduction="none"), zeros, atol=1e-4)
    assert (tckd >= 0).all() and (nckd >= 0).all()
    # TCKD = 0 when only the non-target logits differ by a common shift of their log-sum-exp:
    # permuting the non-target classes of the student changes NCKD but not TCKD
    perm = s.clone()
    for i, k in enumerate(y.tolist()):
        others = [c for c in range(7) if c != k]
        perm[i, others] = perm[i, others].flip(0)
    tckd_p, nckd_p = dkd_parts(perm, t, y, 4.0)
    assert torch.allclose(tckd_p, tckd, atol=1e-5)
    assert not torch.allclose(nckd_p, nckd)


def test_kd_is_tckd_plus_teacher_weighted_nckd(batch):
    """The paper's reformulation (Eq. 1): KD = TCKD + (1 − p_y^T)·NCKD, per sample."""
    s, t, y = batch
    for tau in (1.0, 4.0):
        tckd, nckd = dkd_parts(s, t, y, tau)
        p_t = torch.softmax(t / tau, -1)[torch.arange(8), y]
        assert torch.allclose(
            kd_loss(s, t, tau, reduction="none"), tckd + (1 - p_t) * nckd, rtol=1e-4, atol=1e-6
        )
        # so DKD with α = β = 1 bounds KD from above
        assert (
            dkd_loss(s, t, y, 1.0, 1.0, tau, reduction="none") >= kd_loss(s, t, tau, reduction="none") - 1e-6
        ).all()
    # two classes: no non-target distribution to match, TCKD is all of KD
    s2, t2, y2 = s[:, :2], t[:, :2], y % 2
    tckd, nckd = dkd_parts(s2, t2, y2, 2.0)
    assert torch.equal(nckd, torch.zeros(8))
    assert torch.allclose(tckd, kd_loss(s2, t2, 2.0, reduction="none"), atol=1e-6)


def test_nckd_has_zero_gradient_wrt_the_target_logit(batch):
    s, t, y = batch
    rows = torch.arange(8)
    sg, tg = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    _, nckd = dkd_parts(sg, tg, y, 4.0)
    nckd.sum().backward()
    assert torch.equal(sg.grad[rows, y], torch.zeros(8)) and torch.equal(tg.grad[rows, y], torch.zeros(8))
    assert sg.grad.abs().sum() > 0
    # and NCKD does not move when only the target logits change
    s2 = s.clone()
    s2[rows, y] += 100.0
    assert torch.allclose(dkd_parts(s2, t, y, 4.0)[1], nckd.detach())
    # TCKD's gradient sums to zero over the classes (shift invariance) and is not zero at the target
    sg.grad = None
    tckd, _ = dkd_parts(sg, t, y, 4.0)
    tckd.sum().backward()
    assert torch.allclose(sg.grad.sum(-1), torch.zeros(8), atol=1e-5)
    assert (sg.grad[rows, y] != 0).all()


def test_dkd_term_and_registry(batch):
    s, t, y = batch
    term = build("distiller", "dkd", alpha=0.5, beta=2.0, temperature=3.0)
    assert isinstance(term, DKDLoss) and term.needs_teacher and term.needs_target
    step = Step(Batch(None, y), ModelOutput(s), ModelOutput(t), Progress())
    assert torch.allclose(term(step), dkd_loss(s, t, y, 0.5, 2.0, 3.0, reduction="none"))
    assert "beta=2.0" in repr(term)


# -- NKD ----------------------------------------------------------------------------------------
def test_nkd_matches_formula_and_reductions(batch):
    s, t, y = batch
    lam, gamma = 2.0, 1.5
    target_term, non, total = np_nkd(s, t, y, lam, gamma)
    got_t, got_n = nkd_parts(s, t, y, lam)
    np.testing.assert_allclose(got_t.numpy(), target_term, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_n.numpy(), non, rtol=1e-5, atol=1e-7)
    per = nkd_loss(s, t, y, lam, gamma, reduction="none")
    assert per.shape == (8,)
    np.testing.assert_allclose(per.numpy(), total, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(nkd_loss(s, t, y, lam, gamma)), total.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(nkd_loss(s, t, y, lam, gamma, reduction="sum")), total.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        nkd_loss(s, t, y, reduction="batchmean")


def test_nkd_matches_official_code_with_the_fixed_mask(rng):
    for lam, gamma in [(1.0, 1.5), (3.0, 3.5)]:
        s = torch.randn(32, 100, generator=rng) * 4
        t = torch.randn(32, 100, generator=rng) * 4
        y = torch.randint(0, 100, (32,), generator=rng)
        ref = official_nkd(s, t, y, lam, gamma)
        assert torch.allclose(nkd_loss(s, t, y, lam, gamma), ref, rtol=1e-5, atol=1e-6)
        s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        nkd_loss(s1, t, y, lam, gamma).backward()
        official_nkd(s2, t, y, lam, gamma).backward()
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)
        # soft labels are read through their argmax, as the official code
        soft = 0.7 * F.one_hot(y, 100).float() + 0.3 * torch.softmax(torch.randn(32, 100, generator=rng), -1)
        assert torch.allclose(
            nkd_loss(s, t, soft, lam, gamma), official_nkd(s, t, soft, lam, gamma), rtol=1e-5, atol=1e-6
        )
    # the older mask kept the target in the "non-target" softmax: a different loss, far from NKD
    # when the teacher is confident (its non-target part then mostly matches the target class)
    rows = torch.arange(32)
    s[rows, y] += 8.0
    t[rows, y] += 12.0
    old = official_nkd(s, t, y, 1.0, 1.5, fixed_mask=False)
    assert torch.allclose(official_nkd(s, t, y, 1.0, 1.5), nkd_loss(s, t, y, 1.0, 1.5), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(old, nkd_loss(s, t, y, 1.0, 1.5), rtol=0.05)
    # (it is the target term plus γ·λ²·the full soft cross-entropy)
    full = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1)
    assert torch.allclose(old, (nkd_parts(s, t, y)[0] + 1.5 * full).mean(), rtol=1e-5)


def test_nkd_limits_and_normalised_distributions(batch):
    s, t, y = batch
    rows = torch.arange(8)
    # γ = 0: only the teacher-weighted target term −T_y·log S_y
    expected = -torch.softmax(t, -1)[rows, y] * torch.log_softmax(s, -1)[rows, y]
    assert torch.allclose(nkd_loss(s, t, y, 2.0, 0.0, reduction="none"), expected, atol=1e-6)
    # a one-hot-confident teacher turns the target term into CE
    t_hot = torch.full_like(t, -1e4)
    t_hot[rows, y] = 1e4
    assert torch.allclose(nkd_parts(s, t_hot, y)[0], cross_entropy(s, y, reduction="none"), atol=1e-6)
    # the non-target columns are the other classes, in order; their softmaxes sum to 1
    nt = non_target(s, y)
    np.testing.assert_array_equal(nt.numpy(), np_drop_target(s.numpy(), y.numpy()).astype(np.float32))
    for lam in (0.5, 1.0, 3.0):
        assert torch.allclose(torch.softmax(nt / lam, -1).sum(-1), torch.ones(8), atol=1e-6)
    # the non-target term is a cross-entropy: λ²·(H(T̂) + KL(T̂ ‖ Ŝ)), so at Ŝ = T̂ it is λ²·H(T̂)
    lam = 2.0
    t_hat = torch.softmax(non_target(t, y) / lam, -1)
    entropy = -(t_hat * t_hat.log()).sum(-1)
    s_same = s.clone()
    s_same[rows] = t[rows]
    s_same[rows, y] = s[rows, y]  # any target logit: only the non-target logits are normalised
    assert torch.allclose(nkd_parts(s_same, t, y, lam)[1], lam**2 * entropy, atol=1e-5)


def test_nkd_decomposes_soft_cross_entropy_at_unit_temperature(batch):
    """At λ = 1: CE(T, S) = −T_y log S_y − (1 − T_y) log(1 − S_y) + (1 − T_y)·(non-target term)."""
    s, t, y = batch
    rows = torch.arange(8)
    target_term, non = nkd_parts(s, t, y, 1.0)
    p_s, p_t = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    t_y, s_y = p_t[rows, y], p_s[rows, y]
    soft_ce = -(p_t * p_s.log()).sum(-1)
    rebuilt = target_term.double() - (1 - t_y) * torch.log1p(-s_y) + (1 - t_y) * non.double()
    assert torch.allclose(rebuilt, soft_ce, rtol=1e-5)


def test_nkd_gradients(batch):
    s, t, y = batch
    rows = torch.arange(8)
    # the non-target term has zero gradient w.r.t. the target logit ...
    sg = s.clone().requires_grad_(True)
    nkd_parts(sg, t, y, 2.0)[1].sum().backward()
    assert torch.equal(sg.grad[rows, y], torch.zeros(8)) and sg.grad.abs().sum() > 0
    # ... and vanishes once the normalised non-target distributions match, whatever the
    # non-target masses (the point of normalising): student = teacher on the non-target logits up
    # to a shift, with a different target logit
    s_match = t + 3.0
    s_match[rows, y] = s[rows, y]
    sg = s_match.clone().requires_grad_(True)
    nkd_parts(sg, t, y, 1.5)[1].sum().backward()
    assert torch.allclose(sg.grad, torch.zeros_like(sg), atol=1e-6)
    # the target term's gradient is T_y·(softmax(s) − onehot(y))
    sg = s.clone().requires_grad_(True)
    nkd_parts(sg, t, y)[0].sum().backward()
    t_y = torch.softmax(t, -1)[rows, y].unsqueeze(-1)
    assert torch.allclose(sg.grad, t_y * (torch.softmax(s, -1) - F.one_hot(y, 7)), atol=1e-6)


def test_nkd_term_and_registry(batch):
    s, t, y = batch
    term = build("distiller", "nkd", temperature=3.0, gamma=3.5)
    assert isinstance(term, NKDLoss) and term.needs_teacher and term.needs_target
    step = Step(Batch(None, y), ModelOutput(s), ModelOutput(t), Progress())
    assert torch.allclose(term(step), nkd_loss(s, t, y, 3.0, 3.5, reduction="none"))
    assert "gamma=3.5" in repr(term)


# -- both ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t, y: dkd_loss(s, t, y),
        lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 1.0),
        lambda s, t, y: nkd_loss(s, t, y),
        lambda s, t, y: nkd_loss(s, t, y, 3.0, 3.5),
    ],
)
def test_finite_for_extreme_logits_and_bf16(fn, rng):
    big_s = torch.randn(6, 10, generator=rng) * 1e4
    big_t = torch.randn(6, 10, generator=rng) * 1e4
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    big_t[torch.arange(6), y] = 3e4  # a saturated teacher: p_y^T = 1 exactly in float32
    for s, t in ((big_s, big_t), (big_s.bfloat16(), big_t.bfloat16()), (big_t.clone(), big_t)):
        s = s.clone().requires_grad_(True)
        v = fn(s, t, y)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(s.grad).all()
        assert v.dtype == torch.float32
    # bf16 inputs give the float32 value of the rounded logits
    z, w = torch.randn(6, 10, generator=rng), torch.randn(6, 10, generator=rng)
    assert torch.allclose(
        fn(z.bfloat16(), w.bfloat16(), y), fn(z.bfloat16().float(), w.bfloat16().float(), y)
    )


def test_bad_hyper_parameters_and_inputs_raise(batch):
    s, t, y = batch
    for kw, name in [
        ({"alpha": -1.0}, "alpha"),
        ({"beta": -0.5}, "beta"),
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": float("nan")}, "alpha"),
    ]:
        with pytest.raises(ValueError, match=name):
            DKDLoss(**kw)
        with pytest.raises(ValueError, match=name):
            dkd_loss(s, t, y, **kw)
    for kw, name in [({"gamma": -1.0}, "gamma"), ({"temperature": -2.0}, "temperature")]:
        with pytest.raises(ValueError, match=name):
            NKDLoss(**kw)
        with pytest.raises(ValueError, match=name):
            nkd_loss(s, t, y, **kw)
    for fn in (dkd_loss, nkd_loss):
        with pytest.raises(ValueError, match="same classes"):
            fn(s, t[:, :5], y)
        with pytest.raises(ValueError, match="class indices"):
            fn(s, t, torch.full((8,), 7))
        with pytest.raises(ValueError, match="target must be"):
            fn(s, t, y[:4])
        with pytest.raises(ValueError, match="at least 2 classes"):
            fn(s[:, :1], t[:, :1], torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="class-index targets"):
        dkd_loss(s, t, F.one_hot(y, 7).float())


def test_configs_build(batch):
    s, t, y = batch
    for name in ("dkd", "nkd", "dkd_cifar100", "nkd_cifar100"):
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        method = name.split("_")[0]
        assert cfg["method"] == method
        terms = build_terms(cfg["terms"])
        assert set(terms) == {"ce", method}
        term, _ = terms[method]
        step = Step(Batch(None, y), ModelOutput(s), ModelOutput(t), Progress())
        assert torch.isfinite(term(step)).all()
    cifar = yaml.safe_load((CONFIGS / "dkd_cifar100.yaml").read_text())["terms"]
    assert cifar["ce"]["weight"] == 1.0 and cifar["dkd"]["weight"]["end_epoch"] == 20
    assert (cifar["dkd"]["alpha"], cifar["dkd"]["beta"], cifar["dkd"]["temperature"]) == (1.0, 8.0, 4.0)


@pytest.mark.parametrize(
    "name, spec",
    [
        (
            "dkd",
            {"distiller": "dkd", "weight": {"schedule": "linear", "start": 0.0, "end": 1.0, "end_epoch": 2}},
        ),
        ("nkd", {"distiller": "nkd", "weight": 1.0}),
    ],
)
def test_short_lightning_run(name, spec, make_trainer):
    from toolkit.data import DigitsDataModule
    from toolkit.distill import Teacher
    from toolkit.models import create_model
    from toolkit.modules import DistillationModule

    torch.manual_seed(0)
    teacher = Teacher(create_model("resnet8", num_classes=10, in_chans=1))
    module = DistillationModule(
        "convnet",
        teacher,
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms={"ce": {"loss": "cross_entropy"}, name: spec},
    )
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    metrics = trainer.callback_metrics
    assert f"train/loss/{name}" in metrics and torch.isfinite(metrics[f"train/loss/{name}"])
    assert torch.isfinite(metrics["train/loss"])
    if name == "dkd":  # the warm-up weight after 3 of 6 steps to epoch 2: 3/6 (scheduled, not in the term)
        assert module.term_weight("dkd") == pytest.approx(3 / (2 * 3))
