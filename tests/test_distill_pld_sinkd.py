"""PLD and SinKD: exact values against independent NumPy formulas, limiting cases, reductions,
numerical stability, bad hyper-parameters, the configs, and a short real Lightning run each."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import toolkit.distill.pld  # noqa: F401 - registers "pld" (the package __init__ does not import it yet)
import toolkit.distill.sinkd  # noqa: F401 - registers "sinkd"
from toolkit.distill.pld import PLDLoss
from toolkit.distill.sinkd import SinKDLoss
from toolkit.functional import cross_entropy
from toolkit.functional.pld import pld_loss, teacher_optimal_permutation
from toolkit.functional.sinkd import sinkd_loss, sinkhorn_plan

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "distill"


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# PLD, written out independently: an explicit loop over the positions k of π*
# ---------------------------------------------------------------------------------------------


def np_pi_star(t, y):
    """Target first, then the other classes by descending teacher logit (ties: lower index first)."""
    others = sorted((c for c in range(len(t)) if c != y), key=lambda c: -t[c])
    return [y, *others]


def np_pld_one(s, t, y, tau, weights=None):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    pi = np_pi_star(t, y)
    q = np_softmax(t / tau) if weights is None else None
    total = 0.0
    for k in range(len(pi)):
        rest = [s[pi[j]] for j in range(k, len(pi))]
        m = max(rest)
        lse = m + math.log(sum(math.exp(v - m) for v in rest))
        alpha = q[pi[k]] if weights is None else weights[k]
        total += alpha * (lse - s[pi[k]])
    return total


def np_pld(s, t, y, tau):
    return np.array([np_pld_one(s[i], t[i], int(y[i]), tau) for i in range(len(y))])


def np_pld_appendix_c(s, t, y, tau):
    """The paper's Appendix C construction: ascending teacher order, target moved to the end,
    forward log-cumsum-exp, weights softmax(t_perm / τ)."""
    out = []
    for i in range(len(y)):
        asc = [c for c in np.argsort(t[i], kind="stable") if c != y[i]] + [int(y[i])]
        sp, tp = np.asarray(s[i], np.float64)[asc], np.asarray(t[i], np.float64)[asc]
        lcs = np.logaddexp.accumulate(sp)
        out.append(float(((lcs - sp) * np_softmax(tp / tau)).sum()))
    return np.array(out)


@pytest.fixture
def batch(rng):
    s = torch.randn(6, 7, generator=rng) * 3
    t = torch.randn(6, 7, generator=rng) * 3
    y = torch.tensor([0, 3, 6, 2, 2, 5])
    return s, t, y


def test_pi_star_target_first_then_teacher_order():
    t = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, 1.0, 1.0, 1.0], [float("inf"), 0.0, 2.0, 1.0]])
    y = torch.tensor([2, 3, 1])
    pi = teacher_optimal_permutation(t, y)
    assert pi.tolist() == [[2, 1, 3, 0], [3, 0, 1, 2], [1, 0, 2, 3]]


@pytest.mark.parametrize("tau", [1.0, 4.0, 0.5])
def test_pld_matches_loop_formula_and_paper_code(batch, tau):
    s, t, y = batch
    expected = np_pld(s.numpy(), t.numpy(), y.numpy(), tau)
    per = pld_loss(s, t, y, tau, reduction="none")
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        per.numpy(), np_pld_appendix_c(s.numpy(), t.numpy(), y.numpy(), tau), rtol=1e-5
    )
    assert torch.allclose(pld_loss(s, t, y, tau), per.mean())
    assert torch.allclose(pld_loss(s, t, y, tau, reduction="sum"), per.sum())
    assert (per > 0).all()


def test_pld_translation_invariant(batch):
    s, t, y = batch
    shift = torch.randn(6, 1) * 50
    base = pld_loss(s, t, y, reduction="none")
    assert torch.allclose(pld_loss(s + shift, t, y, reduction="none"), base, atol=1e-4)
    # shifting the teacher changes neither π* nor the softmax weights
    assert torch.allclose(pld_loss(s, t + shift, y, reduction="none"), base, atol=1e-5)


def test_pld_is_cross_entropy_when_teacher_mass_is_all_on_the_label(batch):
    s, _, y = batch
    t = torch.nn.functional.one_hot(y, 7).float() * 1e4  # softmax(t) is exactly one-hot on y
    assert torch.allclose(
        pld_loss(s, t, y, reduction="none"), cross_entropy(s, y, reduction="none"), atol=1e-6
    )
    # a teacher sure of a *wrong* class puts (almost) no weight on the first (CE) step instead
    wrong = torch.nn.functional.one_hot((y + 1) % 7, 7).float() * 1e4
    assert not torch.allclose(pld_loss(s, wrong, y, reduction="none"), cross_entropy(s, y, reduction="none"))


def test_pld_uniform_weights_is_listmle_on_pi_star(batch):
    s, _, y = batch
    c = s.shape[1]
    t = torch.zeros(6, c)  # uniform teacher: α = 1/C exactly; π* = (y, the rest in index order)
    listmle = [np_pld_one(s[i].numpy(), np.zeros(c), int(y[i]), 1.0, weights=np.ones(c)) for i in range(6)]
    np.testing.assert_allclose(pld_loss(s, t, y, reduction="none").numpy(), np.array(listmle) / c, rtol=1e-5)
    # and as τ → ∞ with a non-uniform teacher: (1/C)·ListMLE on that teacher's π*
    _, t2, _ = batch
    listmle2 = [np_pld_one(s[i].numpy(), t2[i].numpy(), int(y[i]), 1.0, weights=np.ones(c)) for i in range(6)]
    np.testing.assert_allclose(
        pld_loss(s, t2, y, temperature=1e7, reduction="none").numpy(), np.array(listmle2) / c, rtol=1e-5
    )


def test_pld_gradient_matches_closed_form(batch):
    """Appendix A: ∇_s L = Σ_k α_k (σ_k − e_{π*_k}), σ_k the softmax over {π*_k, …, π*_C}."""
    s, t, y = batch
    tau = 2.0
    x = s.clone().requires_grad_(True)
    pld_loss(x, t, y, tau, reduction="sum").backward()
    for i in range(6):
        si, ti = s[i].double().numpy(), t[i].double().numpy()
        pi, q = np_pi_star(ti, int(y[i])), np_softmax(ti / tau)
        g = np.zeros(7)
        for k in range(7):
            rest = pi[k:]
            sigma = np_softmax(si[rest])
            g[rest] += q[pi[k]] * sigma
            g[pi[k]] -= q[pi[k]]
        np.testing.assert_allclose(x.grad[i].numpy(), g, atol=1e-5)


def test_pld_convex_along_random_lines(batch, rng):
    s, t, y = batch
    d = torch.randn(6, 7, generator=rng) * 4
    f = [pld_loss(s + a * d, t, y, reduction="none") for a in (0.0, 0.5, 1.0)]
    assert (f[1] <= 0.5 * (f[0] + f[2]) + 1e-5).all()


def test_pld_ignore_index(batch):
    s, t, y = batch
    y2 = y.clone()
    y2[[1, 4]] = -100
    per = pld_loss(s, t, y2, reduction="none")
    assert per[1] == 0 and per[4] == 0
    keep = [0, 2, 3, 5]
    assert torch.allclose(pld_loss(s, t, y2), pld_loss(s[keep], t[keep], y[keep]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pld_finite_for_extreme_logits_and_bf16(batch, dtype):
    s, t, y = batch
    for scale in (1.0, 1e4):
        x = (s * scale).to(dtype).requires_grad_(True)
        loss = pld_loss(x, (t * scale).to(dtype), y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    x = s.to(dtype)
    assert torch.allclose(pld_loss(x, t.to(dtype), y), pld_loss(x.float(), t.to(dtype).float(), y))


def test_pld_rejects_bad_inputs(batch):
    s, t, y = batch
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            pld_loss(s, t, y, temperature=tau)
        with pytest.raises(ValueError, match="temperature"):
            PLDLoss(temperature=tau)
    with pytest.raises(ValueError, match="class-index"):
        pld_loss(s, t, torch.softmax(s, -1))
    with pytest.raises(ValueError, match="same classes"):
        pld_loss(s, t[:, :5], y)
    with pytest.raises(ValueError, match="class indices"):
        pld_loss(s, t, torch.tensor([0, 1, 2, 3, 4, 7]))
    with pytest.raises(ValueError, match="reduction"):
        pld_loss(s, t, y, reduction="batchmean")


# ---------------------------------------------------------------------------------------------
# SinKD, written out independently: the official code's plain Sinkhorn-Knopp iteration in NumPy
# ---------------------------------------------------------------------------------------------


def np_l1_cost(s, t, tau):
    ps, pt = np_softmax(np.asarray(s) / tau), np_softmax(np.asarray(t) / tau)
    return np.abs(ps[:, None, :] - pt[None, :, :]).sum(-1)


def np_sinkd(s, t, tau=2.0, eps=0.1, n=20):
    m = np_l1_cost(s, t, tau)
    k = np.exp(-m / eps)
    for _ in range(n):
        k = k / k.sum(1, keepdims=True)
        k = k / k.sum(0, keepdims=True)
    return float((k * m).sum())


def np_sinkhorn_uv(m, eps, n=5000):
    """Converged entropic OT with unit marginals by the u/v scaling form: P = diag(u) K diag(v)."""
    k = np.exp(-m / eps)
    u, v = np.ones(len(m)), np.ones(len(m))
    for _ in range(n):
        u = 1.0 / (k @ v)
        v = 1.0 / (k.T @ u)
    return float(((u[:, None] * k * v[None, :]) * m).sum())


@pytest.fixture
def pair(rng):
    return torch.randn(8, 5, generator=rng) * 3, torch.randn(8, 5, generator=rng) * 3


@pytest.mark.parametrize(("tau", "eps", "n"), [(2.0, 0.1, 20), (1.0, 0.05, 7), (4.0, 0.5, 1)])
def test_sinkd_matches_numpy_iteration(pair, tau, eps, n):
    s, t = pair
    got = sinkd_loss(s, t, tau, eps, n)
    assert got.dim() == 0
    assert got.item() == pytest.approx(np_sinkd(s.numpy(), t.numpy(), tau, eps, n), rel=1e-5)


def test_sinkd_compares_tempered_softmax_distributions(pair):
    """What the paper's text states: the Sinkhorn distance is taken between the teacher's and the
    student's softmax outputs at temperature τ, so τ acts only through the softmax."""
    s, t = pair
    for tau in (0.5, 2.0, 5.0):
        assert torch.allclose(sinkd_loss(s, t, tau), sinkd_loss(s / tau, t / tau, 1.0), rtol=1e-5)


def test_sinkd_single_sample_is_l1_distance(pair):
    s, t = pair
    expected = np.abs(np_softmax(s[:1].numpy() / 2) - np_softmax(t[:1].numpy() / 2)).sum()
    assert sinkd_loss(s[:1], t[:1]).item() == pytest.approx(expected, rel=1e-5)


def test_sinkd_converges_to_the_entropic_ot_cost(pair):
    s, t = pair
    eps = 0.1
    exact = np_sinkhorn_uv(np_l1_cost(s.numpy(), t.numpy(), 2.0), eps)
    errors = {n: abs(sinkd_loss(s, t, epsilon=eps, iterations=n).item() - exact) for n in (1, 20, 100, 300)}
    assert errors[300] < 1e-5 * exact and errors[100] < 1e-5 * exact
    assert errors[300] < errors[20] < errors[1]
    # the row-marginal error of the plan (columns are exact after each round) never increases
    cost = torch.cdist(torch.softmax(s / 2, -1), torch.softmax(t / 2, -1), p=1).double()
    violation = [
        (sinkhorn_plan(cost, eps, n).sum(1) - 1).abs().sum().item() for n in (1, 2, 5, 10, 20, 50, 100)
    ]
    assert all(a >= b for a, b in zip(violation, violation[1:])) and violation[-1] < 1e-6


def test_sinkd_symmetric_at_convergence(pair):
    s, t = pair
    assert sinkd_loss(s, t, iterations=300).item() == pytest.approx(
        sinkd_loss(t, s, iterations=300).item(), rel=1e-5
    )


def test_sinkd_identical_inputs_entropic_floor(pair):
    s, t = pair
    floor = sinkd_loss(s, s.clone())
    assert 0 <= floor < sinkd_loss(s, t)
    # the floor vanishes as ε → 0: the plan tends to the identity, whose cost is 0
    assert sinkd_loss(s, s.clone(), epsilon=1e-3, iterations=50).item() == pytest.approx(0.0, abs=1e-5)


def test_sinkd_batch_level_invariances(pair):
    s, t = pair
    base = sinkd_loss(s, t)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    # a set-to-set cost: the pairing of student and teacher rows is not used
    assert torch.allclose(sinkd_loss(s, t[perm]), base, rtol=1e-5)
    assert torch.allclose(sinkd_loss(s[perm], t), base, rtol=1e-5)
    assert torch.allclose(sinkd_loss(s + 9.0, t - 3.0), base, rtol=1e-5)


def test_sinkhorn_plan_marginals_and_gradient():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(5, 5, generator=g, dtype=torch.float64)
    plan = sinkhorn_plan(cost, 0.2, 200)
    assert torch.allclose(plan.sum(0), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(plan.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-8)
    x = cost.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: (sinkhorn_plan(c, 0.3, 5) * c).sum(), (x,))


def test_sinkd_log_domain_is_stable_where_the_plain_iteration_underflows(pair):
    s, t = pair
    with np.errstate(divide="ignore", invalid="ignore"):
        assert not np.isfinite(np_sinkd(s.numpy() * 10, t.numpy() * 10, eps=1e-3))
    x = (s * 10).requires_grad_(True)
    loss = sinkd_loss(x, t * 10, epsilon=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkd_finite_for_extreme_logits_and_bf16(pair, dtype):
    s, t = pair
    for scale in (1.0, 1e4):
        x = (s * scale).to(dtype).requires_grad_(True)
        loss = sinkd_loss(x, (t * scale).to(dtype))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        if scale == 1.0:  # at 1e4 the tempered softmaxes are saturated one-hots: zero gradient is exact
            assert x.grad.abs().sum() > 0


def test_sinkd_rejects_bad_hyper_parameters(pair):
    s, t = pair
    for bad, match in (
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"iterations": 0}, "iterations"),
        ({"iterations": 2.5}, "iterations"),
    ):
        with pytest.raises(ValueError, match=match):
            sinkd_loss(s, t, **bad)
        with pytest.raises(ValueError, match=match):
            SinKDLoss(**bad)
    with pytest.raises(ValueError, match="same shape"):
        sinkd_loss(s, t[:4])


# ---------------------------------------------------------------------------------------------
# configs and real Lightning runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pld", "pld_cifar100", "sinkd", "sinkd_cifar100"])
def test_configs_build_their_terms(name):
    from toolkit.modules.config import build_terms

    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    method = name.split("_")[0]
    assert cfg["method"] == method
    terms = build_terms(cfg["terms"])
    assert any(
        type(term).__name__ == {"pld": "PLDLoss", "sinkd": "SinKDLoss"}[method] for term, _ in terms.values()
    )
    if method == "pld":  # PLD replaces CE + KD
        assert list(terms) == ["pld"]


@pytest.mark.parametrize(
    ("terms", "name"),
    [
        ({"pld": {"distiller": "pld"}}, "pld"),
        ({"ce": {"loss": "cross_entropy"}, "sinkd": {"distiller": "sinkd", "weight": 0.01}}, "sinkd"),
    ],
)
def test_lightning_run(make_trainer, terms, name):
    from toolkit.data import DigitsDataModule
    from toolkit.distill import Teacher
    from toolkit.models import create_model
    from toolkit.modules import DistillationModule

    torch.manual_seed(0)
    teacher = Teacher(create_model("resnet8", num_classes=10, in_chans=1))
    module = DistillationModule(
        "convnet", teacher, num_classes=10, in_chans=1, model_kwargs={"width": 4}, terms=terms
    )
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    metrics = trainer.callback_metrics
    assert f"train/loss/{name}" in metrics
    assert torch.isfinite(metrics[f"train/loss/{name}"]) and torch.isfinite(metrics["train/loss"])
