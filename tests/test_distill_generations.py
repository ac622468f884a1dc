"""Multi-generation and pre-pass distillers: gt_self_distill (generations as recipe stages) and
lelp (a teacher-embedding pre-pass stored once): exact values against independent formulas,
limits, numerics, errors, the kernel-ridge theory, checkpoints and real runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipes import distill
from toolkit import Progress, Step, build
from toolkit.data import DigitsDataModule
from toolkit.distill import Teacher
from toolkit.distill.gt_self_distill import GTSelfDistillLoss
from toolkit.distill.lelp import LELPLoss
from toolkit.functional.gt_self_distill import (
    gt_self_distill_loss,
    gt_self_distill_targets,
    kernel_ridge_self_distill,
    parameter_norm_penalty,
)
from toolkit.functional.lelp import (
    lelp_fit,
    lelp_loss,
    lelp_subclass_logits,
    lelp_within_class_logits,
    null_space_projector,
)
from toolkit.models import create_model
from toolkit.modules import ClassificationModule, DistillationModule
from toolkit.types import Batch, ModelOutput


@pytest.fixture
def batch(rng):
    s = torch.randn(6, 5, generator=rng) * 3
    t = torch.randn(6, 5, generator=rng) * 3
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    return s, t, y


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# -- gt_self_distill: the loss ----------------------------------------------------------------------
def loop_gt_self_distill(s, t, y, alpha):
    """Per sample, by explicit loops over classes: (1/C)·Σ_c [α(p_c − y_c)² + (1 − α)(p_c − q_c)²]."""
    p, q = np_softmax(s.double().numpy()), np_softmax(t.double().numpy())
    out = []
    for i in range(p.shape[0]):
        c_count = p.shape[1]
        total = 0.0
        for c in range(c_count):
            onehot = 1.0 if c == int(y[i]) else 0.0
            total += alpha * (p[i, c] - onehot) ** 2 + (1 - alpha) * (p[i, c] - q[i, c]) ** 2
        out.append(total / c_count)
    return np.array(out)


def test_gt_self_distill_matches_the_formula_and_reductions(batch):
    s, t, y = batch
    for alpha in (0.0, 0.35, 0.6, 1.0):
        expected = loop_gt_self_distill(s, t, y, alpha)
        per = gt_self_distill_loss(s, y, t, alpha, reduction="none")
        assert per.shape == (6,)
        np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(gt_self_distill_loss(s, y, t, alpha)), expected.mean(), rtol=1e-5)
        np.testing.assert_allclose(
            float(gt_self_distill_loss(s, y, t, alpha, reduction="sum")), expected.sum(), rtol=1e-5
        )


def test_gt_self_distill_matches_the_official_training_step(batch):
    """Kennethborup/self_distillation self_distiller.py: loss = mse(softmax(pred), onehot);
    loss *= alpha; loss += (1 - alpha) * mse(softmax(pred), softmax(teacher))."""
    s, t, y = batch
    onehot = F.one_hot(y, 5).float()
    for alpha in (0.0, 0.6, 1.0):
        s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        official = F.mse_loss(F.softmax(s1, dim=1), onehot) * alpha
        official = official + (1 - alpha) * F.mse_loss(F.softmax(s1, dim=1), F.softmax(t, dim=1))
        ours = gt_self_distill_loss(s2, y, t, alpha)
        assert torch.allclose(ours, official, rtol=1e-6, atol=1e-8)
        official.backward()
        ours.backward()
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-5, atol=1e-9)


def test_gt_self_distill_is_a_squared_error_to_the_mixed_target(batch):
    s, t, y = batch
    alpha = 0.3
    mixed = gt_self_distill_targets(y, t, alpha)
    p, q = s.softmax(-1), t.softmax(-1)
    assert torch.allclose(mixed, alpha * F.one_hot(y, 5) + (1 - alpha) * q)
    assert torch.allclose(mixed.sum(-1), torch.ones(6))
    constant = alpha * (1 - alpha) * (F.one_hot(y, 5) - q).pow(2).mean(-1)
    per = gt_self_distill_loss(s, y, t, alpha, reduction="none")
    assert torch.allclose(per, (p - mixed).pow(2).mean(-1) + constant, atol=1e-7)
    # hence the same gradient as the squared error to α·y + (1 − α)·q
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    gt_self_distill_loss(s1, y, t, alpha).backward()
    (s2.softmax(-1) - mixed).pow(2).mean().backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-8)


def test_gt_self_distill_limits(batch):
    s, t, y = batch
    # α = 1: the labels alone, with or without a teacher
    assert torch.equal(
        gt_self_distill_loss(s, y, None, 1.0, "none"), gt_self_distill_loss(s, y, t, 1.0, "none")
    )
    # α = 0: the teacher alone (labels ignored); zero when the student is its teacher
    other_y = (y + 1) % 5
    assert torch.equal(
        gt_self_distill_loss(s, y, t, 0.0, "none"), gt_self_distill_loss(s, other_y, t, 0.0, "none")
    )
    assert torch.allclose(gt_self_distill_loss(t, y, t, 0.0, "none"), torch.zeros(6), atol=1e-12)
    # a confident correct student and α = 1: zero loss; confidently wrong: 2/C
    confident = torch.full((6, 5), -1e4).scatter(1, y[:, None], 1e4)
    assert torch.allclose(gt_self_distill_loss(confident, y, None, 1.0, "none"), torch.zeros(6))
    wrong = torch.full((6, 5), -1e4).scatter(1, ((y + 2) % 5)[:, None], 1e4)
    assert torch.allclose(gt_self_distill_loss(wrong, y, None, 1.0, "none"), torch.full((6,), 2 / 5))
    # soft targets: one-hot probabilities give the same values as class indices
    soft = F.one_hot(y, 5).float()
    assert torch.allclose(
        gt_self_distill_loss(s, soft, t, 0.4, "none"), gt_self_distill_loss(s, y, t, 0.4, "none")
    )


def test_gt_self_distill_is_finite_for_extreme_logits_and_bf16(batch):
    s, t, y = batch
    for scale in (1e4, -1e4):
        sg = (s * scale).requires_grad_(True)
        loss = gt_self_distill_loss(sg, y, t * scale, 0.5)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(sg.grad).all()
    sb = s.to(torch.bfloat16).requires_grad_(True)
    loss = gt_self_distill_loss(sb, y, t.to(torch.bfloat16), 0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(sb.grad.float()).all()
    np.testing.assert_allclose(
        float(loss), float(gt_self_distill_loss(sb.float(), y, t.bfloat16().float(), 0.5))
    )


def test_gt_self_distill_bad_inputs(batch):
    s, t, y = batch
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            gt_self_distill_loss(s, y, t, alpha)
    with pytest.raises(ValueError, match="pass teacher_logits"):
        gt_self_distill_loss(s, y, None, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        gt_self_distill_loss(s, y, t[:, :4], 0.5)
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        gt_self_distill_loss(s, torch.tensor([0, 1, 2, 3, 4, 5]), t, 0.5)
    with pytest.raises(ValueError, match="soft targets must be"):
        gt_self_distill_loss(s, torch.rand(6, 4), t, 0.5)
    with pytest.raises(ValueError, match="C >= 2"):
        gt_self_distill_loss(s[:, :1], torch.zeros(6, dtype=torch.long), None, 1.0)
    with pytest.raises(ValueError, match="reduction"):
        gt_self_distill_loss(s, y, t, 0.5, reduction="avg")
    with pytest.raises(ValueError, match="teacher_logits must be"):
        gt_self_distill_targets(y, None, 0.5)
    with pytest.raises(ValueError, match="reg_coef must be >= 0"):
        GTSelfDistillLoss(reg_coef=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        GTSelfDistillLoss(alpha=2.0)


# -- gt_self_distill: the kernel-ridge theory (the paper's setting; toy_example.ipynb) -------------
def test_kernel_ridge_generations_follow_the_closed_forms(rng):
    x = torch.linspace(0, 1, 11).double().unsqueeze(1)
    gram = torch.exp(-80.0 * (x - x.T) ** 2)  # the notebook's RBF kernel (gamma = 80)
    y = torch.sin(2 * np.pi * x).squeeze(1) + 0.3 * torch.randn(11, generator=rng).double()
    lam = 0.2
    evals, evecs = torch.linalg.eigh(gram)
    shrink = evals / (evals + lam)
    # α = 1: every generation is the original fit
    fits = kernel_ridge_self_distill(gram, y, lam, 1.0, 4)
    assert all(torch.allclose(f, fits[0]) for f in fits)
    # α = 0: generation k = V diag((d / (d + λ))^(k+1)) Vᵀ y (Mobahi et al.'s sparsification)
    fits = kernel_ridge_self_distill(gram, y, lam, 0.0, 5)
    for k, f in enumerate(fits):
        assert torch.allclose(f, evecs @ (shrink ** (k + 1) * (evecs.T @ y)), atol=1e-10)
    # α ∈ (0, 1): the limit is ridge with λ/α, f_∞ = αK(αK + λI)⁻¹y (the paper's Theorem; notebook)
    alpha = 0.35
    fits = kernel_ridge_self_distill(gram, y, lam, alpha, 400)
    limit = alpha * gram @ torch.linalg.solve(alpha * gram + lam * torch.eye(11, dtype=torch.float64), y)
    assert torch.allclose(fits[-1], limit, atol=1e-8)
    # and each generation is the recursion written out directly
    fits = kernel_ridge_self_distill(gram, y, lam, alpha, 2)
    smoother = gram @ torch.linalg.inv(gram + lam * torch.eye(11, dtype=torch.float64))
    f1 = smoother @ (alpha * y + (1 - alpha) * (smoother @ y))
    assert torch.allclose(fits[1], f1) and torch.allclose(fits[2], smoother @ (alpha * y + (1 - alpha) * f1))
    with pytest.raises(ValueError, match="lam must be > 0"):
        kernel_ridge_self_distill(gram, y, 0.0, alpha, 1)
    with pytest.raises(ValueError, match="gram must be"):
        kernel_ridge_self_distill(gram[:5], y, lam, alpha, 1)


# -- gt_self_distill: the term and the generations ---------------------------------------------------
def test_gt_self_distill_term_adds_the_parameter_norm_regulariser(batch):
    s, t, y = batch
    term = build("distiller", "gt_self_distill", alpha=0.6, reg_coef=1e-3)
    assert isinstance(term, GTSelfDistillLoss) and term.needs_teacher and "reg_coef=0.001" in repr(term)
    assert not build("distiller", "gt_self_distill", alpha=1.0).needs_teacher  # generation 0
    module = ClassificationModule("convnet", num_classes=5, in_chans=1, model_kwargs={"width": 4})
    norm = sum(float(torch.sqrt((p.detach().double() ** 2).sum())) for p in module.model.parameters())
    assert np.isclose(float(parameter_norm_penalty(module.model.parameters())), norm, rtol=1e-5)
    step = Step(Batch(None, y), ModelOutput(s), ModelOutput(t), Progress(), module)
    expected = torch.from_numpy(loop_gt_self_distill(s, t, y, 0.6)).float() + 1e-3 * norm
    assert torch.allclose(term(step), expected, rtol=1e-5)
    # the regulariser's gradient reaches the trained network's weights
    term(step).mean().backward()
    assert module.model.fc.weight.grad is not None and module.model.fc.weight.grad.abs().sum() > 0
    no_reg = build("distiller", "gt_self_distill", alpha=0.6, reg_coef=0.0)
    assert torch.allclose(no_reg(step), gt_self_distill_loss(s, y, t, 0.6, "none"))


def test_gt_self_distill_generations_through_the_recipe(tmp_path):
    """The shipped config: generation 0 from the labels, generations 1-4 each from the previous one."""
    out = tmp_path / "gt"
    args = ["--method", "gt_self_distill", "--data", "digits", "--fast", "--out", str(out)]
    res = distill.main([*args, "--trainer.enable_progress_bar", "false"])
    (records,) = res["stages"]["gt_self_distill"]
    assert [r["name"] for r in records] == ["gen0", "gen1", "gen2", "gen3", "gen4"]
    assert all(r["status"] == "done" and 0 <= r["results"]["test_acc"] <= 1 for r in records)
    assert res["student_acc"] == records[-1]["results"]["test_acc"]
    # each generation's checkpoint holds its own network (trained from the same initialisation)
    w0 = torch.load(records[0]["path"], weights_only=False)["state_dict"]["model.fc.weight"]
    w1 = torch.load(records[1]["path"], weights_only=False)["state_dict"]["model.fc.weight"]
    assert not torch.equal(w0, w1)
    hp = torch.load(records[1]["path"], weights_only=False)["hyper_parameters"]
    assert hp["terms"]["gt_self_distill"]["alpha"] == 0.6
    assert (
        torch.load(records[0]["path"], weights_only=False)["hyper_parameters"]["loss"]["gt_self_distill"][
            "alpha"
        ]
        == 1.0
    )
    # --method.alpha changes the distilled generations, so they must run again: an error, not a silent reuse
    with pytest.raises(ValueError, match="stage 'gen1' .* another configuration"):
        distill.main([*args, "--method.alpha", "0.3"])


# -- lelp: the pre-pass ------------------------------------------------------------------------------
def test_null_space_projector(rng):
    w = torch.randn(3, 8, generator=rng)
    p = null_space_projector(w)
    assert torch.allclose(w.double() @ p, torch.zeros(3, 8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(p @ p, p, atol=1e-12) and torch.allclose(p, p.T)
    assert round(float(torch.trace(p))) == 8 - 3
    # a rank-deficient classifier (two equal rows) removes fewer directions
    w2 = torch.cat([w[:2], w[:1]])
    assert round(float(torch.trace(null_space_projector(w2)))) == 8 - 2
    # numpy's pseudo-inverse as the oracle
    wn = w.double().numpy()
    np.testing.assert_allclose(p.numpy(), np.eye(8) - np.linalg.pinv(wn) @ wn, atol=1e-12)


def clustered_embeddings(rng, n_per_class=40, d=12, c=3):
    centres = torch.randn(c, d, generator=rng) * 4
    spread = torch.linspace(3.0, 0.2, d)  # decreasing variance along the coordinates
    h = torch.cat([centres[k] + torch.randn(n_per_class, d, generator=rng) * spread for k in range(c)])
    y = torch.arange(c).repeat_interleave(n_per_class)
    return h, y


def test_lelp_fit_matches_an_independent_pca(rng):
    h, y = clustered_embeddings(rng)
    w = torch.randn(3, 12, generator=rng)
    k = 4
    state = lelp_fit(h, y, w, k)
    assert state["mean"].shape == (3, 12) and state["directions"].shape == (3, k, 12)
    wn = w.double().numpy()
    proj = np.eye(12) - np.linalg.pinv(wn) @ wn
    for c in range(3):
        z = h[y == c].double().numpy() @ proj
        mu = z.mean(0)
        cov = np.cov(z - mu, rowvar=False)  # unbiased, like the σ here
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][:k]
        np.testing.assert_allclose(state["mean"][c].numpy(), mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state["scale"][c].numpy(), np.sqrt(evals[order]), rtol=1e-4)
        for j, e in enumerate(order):
            v = state["directions"][c, j].double().numpy()
            assert abs(abs(v @ evecs[:, e]) - 1) < 1e-4  # the same direction up to sign
            assert v[np.argmax(np.abs(v))] > 0  # the sign convention
        dirs = state["directions"][c].double()
        assert torch.allclose(dirs @ dirs.T, torch.eye(k, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(w.double() @ dirs.T, torch.zeros(3, k, dtype=torch.float64), atol=1e-4)
    # deterministic
    again = lelp_fit(h, y, w, k)
    assert all(torch.equal(state[key], again[key]) for key in state)


def test_lelp_pseudo_subclass_logits(rng):
    h, y = clustered_embeddings(rng)
    w = torch.randn(3, 12, generator=rng)
    state = lelp_fit(h, y, w, 2)
    emb, z = h[:7], torch.randn(7, 3, generator=rng) * 5
    within = lelp_within_class_logits(emb, state["mean"], state["directions"], state["scale"], beta=1.5)
    assert within.shape == (7, 3, 4)
    for i in range(7):  # the formula, element by element
        for c in range(3):
            for j in range(2):
                v, mu, sd = state["directions"][c, j], state["mean"][c], state["scale"][c, j]
                u = float((v * (emb[i] - mu)).sum() / sd)
                assert np.isclose(float(within[i, c, j]), 1.5 * u, rtol=1e-4, atol=1e-4)
                assert np.isclose(float(within[i, c, 2 + j]), -1.5 * u, rtol=1e-4, atol=1e-4)
    sub = lelp_subclass_logits(z, within)
    assert sub.shape == (7, 12)
    # each class's pseudo-subclasses sum back to it: logsumexp gives the class logit, and the
    # pseudo-subclass distribution sums to the class distribution
    assert torch.allclose(torch.logsumexp(sub.view(7, 3, 4), -1), z, atol=1e-5)
    assert torch.allclose(sub.softmax(-1).view(7, 3, 4).sum(-1), z.softmax(-1), atol=1e-6)
    # components along the classifier's rows (which set the logits) do not move the split
    shifted = emb + 3.0 * w[0]
    again = lelp_within_class_logits(shifted, state["mean"], state["directions"], state["scale"], beta=1.5)
    assert torch.allclose(again, within, atol=1e-4)


def test_lelp_loss_values_and_decomposition(rng):
    t_sub = torch.randn(5, 3 * 4, generator=rng) * 2
    z_s, a_s = torch.randn(5, 3, generator=rng), torch.randn(5, 3, 4, generator=rng)
    s_sub = lelp_subclass_logits(z_s, a_s)
    for tau in (1.0, 2.0):
        pt, ps = np_softmax(t_sub.numpy() / tau), np_softmax(s_sub.numpy() / tau)
        expected = tau**2 * (pt * (np.log(pt) - np.log(ps))).sum(-1)
        per = lelp_loss(s_sub, t_sub, tau, reduction="none")
        np.testing.assert_allclose(per.numpy(), expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(lelp_loss(s_sub, t_sub, tau)), expected.mean(), rtol=1e-4)
        np.testing.assert_allclose(float(lelp_loss(s_sub, t_sub, tau, "sum")), expected.sum(), rtol=1e-4)
    # at τ = 1: KL over classes + teacher-weighted KL of the within-class distributions
    z_t, a_t = torch.randn(5, 3, generator=rng), torch.randn(5, 3, 4, generator=rng)
    t_sub = lelp_subclass_logits(z_t, a_t)
    pc_t, pc_s = np_softmax(z_t.numpy()), np_softmax(z_s.numpy())
    wt, ws = np_softmax(a_t.numpy()), np_softmax(a_s.numpy())
    class_kl = (pc_t * (np.log(pc_t) - np.log(pc_s))).sum(-1)
    within_kl = (pc_t * (wt * (np.log(wt) - np.log(ws))).sum(-1)).sum(-1)
    np.testing.assert_allclose(lelp_loss(s_sub, t_sub, 1.0, "none").numpy(), class_kl + within_kl, rtol=1e-4)
    assert torch.allclose(lelp_loss(t_sub, t_sub, 1.0, "none"), torch.zeros(5), atol=1e-6)


def test_lelp_numerics(rng):
    h, y = clustered_embeddings(rng)
    w = torch.randn(3, 12, generator=rng)
    state = lelp_fit(h, y, w, 2)
    for scale in (1e4, 1.0):
        emb = (h[:6] * scale).requires_grad_(True)
        z = torch.randn(6, 3, generator=rng) * 1e4
        sub_t = lelp_subclass_logits(z, lelp_within_class_logits(emb, **state))
        a_s = (torch.randn(6, 3, 4, generator=rng) * 1e4).requires_grad_(True)
        loss = lelp_loss(lelp_subclass_logits(z * 0.5, a_s), sub_t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(a_s.grad).all()
    sub_t = lelp_subclass_logits(z.bfloat16(), lelp_within_class_logits(h[:6].bfloat16(), **state))
    loss = lelp_loss(lelp_subclass_logits(z.bfloat16(), torch.randn(6, 3, 4).bfloat16()), sub_t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_lelp_bad_inputs(rng):
    h, y = clustered_embeddings(rng, d=6)
    w = torch.randn(3, 6, generator=rng)
    with pytest.raises(ValueError, match=r"exceeds the null space .* use num_directions <= 3"):
        lelp_fit(h, y, w, 4)
    with pytest.raises(ValueError, match="class 1 has 2 training examples"):
        keep = torch.cat([torch.arange(0, 40), torch.tensor([40, 41]), torch.arange(80, 120)])
        lelp_fit(h[keep], y[keep], w, 2)
    with pytest.raises(ValueError, match="must be .C, d. with d = 6"):
        lelp_fit(h, y, torch.randn(3, 5), 2)
    with pytest.raises(ValueError, match="num_directions must be an integer >= 1"):
        lelp_fit(h, y, w, 0)
    state = lelp_fit(h, y, w, 2)
    with pytest.raises(ValueError, match="beta must be > 0"):
        lelp_within_class_logits(h[:2], **state, beta=0.0)
    with pytest.raises(ValueError, match="embeddings must be .B, d. with d = 6"):
        lelp_within_class_logits(h[:2, :5], **state)
    with pytest.raises(ValueError, match="must agree"):
        lelp_subclass_logits(torch.randn(2, 3), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        lelp_loss(torch.randn(2, 4), torch.randn(2, 4), 0.0)
    with pytest.raises(ValueError, match="num_directions must be an integer"):
        LELPLoss(num_directions=1.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        LELPLoss(beta=-1)
    term = LELPLoss(num_directions=3)
    with pytest.raises(ValueError, match="the pre-pass has 2 directions per class but num_directions=3"):
        term.load_prepass(state)
    with pytest.raises(RuntimeError, match="LELP has no pre-pass"):
        term._ensure_state()
    with pytest.raises(FileNotFoundError, match="run the pre-pass stage first"):
        LELPLoss(artifact="/nonexistent/artifact.pt")._ensure_state()
    with pytest.raises(ValueError, match="single teacher"):
        term.prepass(Teacher([create_model("convnet", num_classes=3, in_chans=1)] * 2), None)


# -- lelp: the term in real runs ---------------------------------------------------------------------
def small_digits(**kw):
    return DigitsDataModule(batch_size=64, train_subset=256, val_split=64, test_subset=128, seed=0, **kw)


def lelp_module(teacher_net, **term_kw):
    return DistillationModule(
        "convnet",
        Teacher(teacher_net),
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms={
            "ce": {"loss": "cross_entropy", "weight": 0.5},
            "lelp": {"distiller": "lelp", "weight": 0.5, **term_kw},
        },
        optimizer={"name": "adam", "lr": 0.01},
    )


def test_lelp_prepass_on_a_real_teacher_and_a_short_run(make_trainer, tmp_path):
    torch.manual_seed(0)
    teacher_net = create_model("convnet", num_classes=10, in_chans=1, width=4, depth=2)
    dm = small_digits()
    term = LELPLoss(num_directions=3)
    state = term.prepass(Teacher(teacher_net), dm)
    # the same pass written out: embeddings of the training loader, fitted
    embs, labels = [], []
    for b in dm.train_dataloader():
        embs.append(teacher_net.forward_head(teacher_net.forward_features(b.input), pre_logits=True).detach())
        labels.append(b.target)
    ref = lelp_fit(torch.cat(embs), torch.cat(labels), teacher_net.fc.weight.detach(), 3)
    assert all(torch.allclose(state[k], ref[k], atol=1e-5) for k in ref)

    # inside a Trainer without an artifact: the pre-pass runs once, in on_train_start
    module = lelp_module(teacher_net, num_directions=3)
    make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(
        module, datamodule=small_digits()
    )
    lelp = module.loss_terms["lelp"]
    assert lelp.state is not None and all(torch.allclose(lelp.state[k], ref[k], atol=1e-5) for k in ref)
    assert "within" in lelp.heads and lelp.heads["within"].spec["out_dim"] == 10 * 2 * 3

    # checkpoints hold the pre-pass and the head: a fresh module loads them strictly, no dry run
    saved = module.state_dict()
    fresh = lelp_module(
        create_model("convnet", num_classes=10, in_chans=1, width=4, depth=2), num_directions=3
    )
    fresh.load_state_dict(saved, strict=True)
    restored = fresh.loss_terms["lelp"]
    assert all(torch.equal(restored.state[k], lelp.state[k]) for k in ref)
    assert torch.equal(restored.heads["within"].net.weight, lelp.heads["within"].net.weight)
    # and the loss it computes on a batch is the same
    b = next(iter(small_digits().train_dataloader()))
    fresh.teacher = module.teacher
    step_a = Step(b, module.student_output(b), module.teacher(b.input), Progress(), module)
    step_b = Step(b, fresh.student_output(b), fresh.teacher(b.input), Progress(), fresh)
    module.eval(), fresh.eval()
    assert torch.allclose(lelp(step_a), restored(step_b))

    # a saved pre-pass is an artifact the term loads lazily
    path = tmp_path / "artifact.pt"
    torch.save(state, path)
    from_file = LELPLoss(num_directions=3, artifact=str(path))
    assert from_file.state is None
    assert all(torch.equal(from_file._ensure_state()[k], state[k]) for k in state)


def test_lelp_stages_through_the_recipe(tmp_path):
    out = tmp_path / "lelp"
    args = ["--method", "lelp", "--data", "digits", "--fast", "--out", str(out)]
    res = distill.main([*args, "--trainer.enable_progress_bar", "false", "--method.num_directions", "3"])
    (records,) = res["stages"]["lelp"]
    assert [r["name"] for r in records] == ["lelp_prepass", "lelp_distill"]
    artifact = torch.load(records[0]["path"], weights_only=True)
    assert artifact["directions"].shape[:2] == (10, 3)  # --method.* reaches the pre-pass too
    ckpt = torch.load(records[1]["path"], weights_only=False)
    saved = ckpt["state_dict"]["loss_terms.lelp._extra_state"]["prepass"]
    assert all(torch.equal(saved[k], artifact[k]) for k in artifact)  # the student used that pre-pass
    record = json.loads((Path(out) / "stages" / "lelp_distill" / "seed0" / "stage.json").read_text())
    assert record["status"] == "done" and res["student_acc"] == record["results"]["test_acc"]
