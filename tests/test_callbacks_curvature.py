"""Curvature and gradient monitors and the Hessian Alignment regulariser: `hessian_monitor`,
`hessian_alignment`, `gradient_spectrum` and their functional forms.

Exact values come from independent computations: the dense Hessian of small models
(`torch.autograd.functional.hessian` on a flat parameter vector through `torch.func.functional_call`),
`torch.linalg.eigvalsh` / `torch.linalg.svd`, and the penalties written out with those Hessians.
`pyhessian` (power iteration) is an extra oracle when installed.
"""

from __future__ import annotations

import copy
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from toolkit import build
from toolkit.callbacks import GradientSpectrum, HessianAlignment, HessianAlignmentTerm, HessianMonitor
from toolkit.functional.gradient_spectrum import (
    effective_rank,
    gradient_spectrum,
    spectrum_stats,
    stable_rank,
)
from toolkit.functional.hessian import (
    HessianOperator,
    gradients,
    hutchinson_diagonal,
    hutchinson_trace,
    hvp,
    lanczos_top_eigenvalues,
    rademacher,
)
from toolkit.functional.hessian_alignment import (
    domain_risks,
    hessian_alignment_parts,
    hessian_gradient_product,
    hgp_penalty,
    hutchinson_penalty,
)
from toolkit.modules import ClassificationModule
from toolkit.terms import Step
from toolkit.types import Batch, ModelOutput, Progress


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- independent references ---------------------------------------------------------------
def mlp(seed=0, d_in=5, hidden=4, classes=3, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def data(n=24, d_in=5, classes=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def exact_hessian(module, x, y):
    """Dense Hessian of mean CE w.r.t. all parameters (in `parameters()` order), float64."""
    m64 = copy.deepcopy(module).double()
    named = list(m64.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(theta):
        params, i = {}, 0
        for n, p in named:
            params[n] = theta[i : i + p.numel()].view_as(p)
            i += p.numel()
        return F.cross_entropy(torch.func.functional_call(m64, params, (x.double(),)), y)

    return torch.autograd.functional.hessian(f, flat)


def head_alignment_direct(z, y, d, weight, bias, alpha, beta, method, probes=None, constants=None):
    """The HGP / Hutchinson penalty of a linear head written out with dense Hessians.

    With `constants` (the mean quantities as fixed tensors) returns the penalty as a
    differentiable function of θ (for the stop-gradient check); otherwise its value."""
    c, dim = weight.shape

    def risk(theta, mask):
        return F.cross_entropy(z[mask] @ theta[: c * dim].view(c, dim).T + theta[c * dim :], y[mask])

    theta = (
        torch.cat([weight.detach().reshape(-1), bias.detach()]).double().requires_grad_(constants is not None)
    )
    doms = sorted(set(d.tolist()))
    make = constants is not None
    gs = [
        torch.autograd.functional.jacobian(lambda t, e=e: risk(t, d == e), theta, create_graph=make)
        for e in doms
    ]
    hs = [
        torch.autograd.functional.hessian(lambda t, e=e: risk(t, d == e), theta, create_graph=make)
        for e in doms
    ]
    if method == "hgp":
        hv = [h @ g for h, g in zip(hs, gs)]
    else:
        hv = [(probes * (probes @ h)).mean(0) for h in hs]  # z ⊙ Hz, H symmetric
    g_bar = torch.stack(gs).mean(0)
    h_bar = torch.stack(hs).mean(0) @ g_bar if method == "hgp" else torch.stack(hv).mean(0)
    if constants is not None:
        h_bar, g_bar = constants
    hess = torch.stack([(v - h_bar).pow(2).sum() for v in hv]).mean()
    grad = torch.stack([(g - g_bar).pow(2).sum() for g in gs]).mean()
    if constants is not None:
        return alpha * hess + beta * grad, theta
    return alpha * hess + beta * grad, (h_bar.detach(), g_bar.detach())


def head_setup(seed=0, n=30, dim=4, classes=3, domains=(0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    d = torch.tensor([domains[i % len(domains)] for i in range(n)])
    d[:3] = domains[0]  # unequal domain sizes
    head = nn.Linear(dim, classes).double()
    torch.manual_seed(seed)
    nn.init.normal_(head.weight)
    return z, y, d, head


# -- functional: Hessian-vector products, Hutchinson, Lanczos ---------------------------
def test_hvp_matches_the_exact_hessian():
    net, (x, y) = mlp(), data()
    h = exact_hessian(net, x, y)
    params = list(net.parameters())
    v = torch.randn(h.shape[0], dtype=torch.float64)
    loss = F.cross_entropy(net(x), y)
    torch.testing.assert_close(hvp(loss, params, v), h @ v, rtol=1e-10, atol=1e-12)
    op = HessianOperator(loss, params)
    assert op.dim == h.shape[0] == sum(p.numel() for p in params)
    torch.testing.assert_close(op(v), h @ v, rtol=1e-10, atol=1e-12)
    as_list = [v[:20].view(4, 5), v[20:24], v[24:36].view(3, 4), v[36:]]
    torch.testing.assert_close(hvp(None, params, as_list, grads=op.grads), h @ v)
    # a loss linear in a parameter has a zero Hessian block
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(
        hvp((w * 2).sum(), [w], torch.ones(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64)
    )


def test_hutchinson_trace_is_exact_for_a_diagonal_quadratic():
    a = torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0], dtype=torch.float64)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    op = HessianOperator(0.5 * (a * theta.pow(2)).sum(), [theta])  # H = diag(a)
    est, samples = hutchinson_trace(op, 7, torch.Generator().manual_seed(0), return_samples=True)
    assert float(est) == pytest.approx(float(a.sum()), abs=1e-12)
    torch.testing.assert_close(samples, torch.full((7,), float(a.sum()), dtype=torch.float64))
    # the diagonal estimate is exact too: z ⊙ diag(a) z = a since z_i² = 1
    grads = gradients(0.5 * (a * theta.pow(2)).sum(), [theta])
    torch.testing.assert_close(hutchinson_diagonal(grads, [theta], 3, torch.Generator().manual_seed(1)), a)


def test_hutchinson_trace_with_given_probes_and_unbiasedness():
    net, (x, y) = mlp(), data()
    h = exact_hessian(net, x, y)
    op = HessianOperator(F.cross_entropy(net(x), y), list(net.parameters()))
    z = rademacher((6, op.dim), torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.stack([zi @ h @ zi for zi in z]).mean()
    assert float(hutchinson_trace(op, probes=z)) == pytest.approx(float(expected), rel=1e-10)
    est, samples = hutchinson_trace(op, 600, torch.Generator().manual_seed(0), return_samples=True)
    stderr = float(samples.std()) / math.sqrt(600)
    assert abs(float(est) - float(h.trace())) < 4 * stderr
    assert abs(float(samples.mean() - est)) < 1e-12


def test_hutchinson_diagonal_matches_the_formula_and_converges():
    net, (x, y) = mlp(), data()
    h = exact_hessian(net, x, y)
    params = list(net.parameters())
    grads = gradients(F.cross_entropy(net(x), y), params)
    z = rademacher((5, h.shape[0]), torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (z * (z @ h)).mean(0)
    torch.testing.assert_close(hutchinson_diagonal(grads, params, probes=z), expected)
    # probes applied in chunks of one give the same result
    torch.testing.assert_close(hutchinson_diagonal(grads, params, probes=z, max_batched_elements=1), expected)
    est = hutchinson_diagonal(grads, params, 4000, torch.Generator().manual_seed(1), create_graph=False)
    off = (h - torch.diag(torch.diag(h))).pow(2).sum(1).sqrt()  # the estimator's std per entry
    assert ((est - torch.diag(h)).abs() <= 5 * off / math.sqrt(4000) + 1e-12).all()


def test_lanczos_top_eigenvalues_match_the_exact_spectrum():
    net, (x, y) = mlp(), data()
    h = exact_hessian(net, x, y)
    exact = torch.linalg.eigvalsh(h).flip(0)
    op = HessianOperator(F.cross_entropy(net(x), y), list(net.parameters()))
    full = lanczos_top_eigenvalues(op, 5, num_iters=op.dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(full, exact[:5], rtol=1e-8, atol=1e-10)
    short = lanczos_top_eigenvalues(op, 2, num_iters=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(short, exact[:2], rtol=1e-6, atol=1e-8)
    assert short.dtype == torch.float64 and bool((short[:-1] >= short[1:]).all())


def test_lanczos_repeated_and_negative_eigenvalues():
    a = torch.diag(torch.tensor([3.0, 3.0, 1.0, 0.0], dtype=torch.float64))
    # the Krylov space of diag(3,3,1,0) has dimension 3: Lanczos restarts and finds the second 3
    got = lanczos_top_eigenvalues(
        lambda v: a @ v, 3, num_iters=4, dim=4, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(got, torch.tensor([3.0, 3.0, 1.0], dtype=torch.float64))
    b = torch.diag(torch.tensor([-5.0, 1.0, 2.0], dtype=torch.float64))  # largest algebraic, not magnitude
    assert float(lanczos_top_eigenvalues(lambda v: b @ v, 1, num_iters=3, dim=3)[0]) == pytest.approx(2.0)


def test_pyhessian_oracle():
    pyhessian = pytest.importorskip("pyhessian")
    net, (x, y) = mlp(dtype=torch.float32), data(n=32, dtype=torch.float32)
    h = exact_hessian(net, x, y)
    exact = torch.linalg.eigvalsh(h).flip(0)
    torch.manual_seed(0)
    comp = pyhessian.hessian(net, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    top, _ = comp.eigenvalues(maxIter=300, tol=1e-6, top_n=1)
    op = HessianOperator(F.cross_entropy(net(x), y), list(net.parameters()))
    ours = lanczos_top_eigenvalues(op, 1, num_iters=op.dim, generator=torch.Generator().manual_seed(0))
    assert float(ours[0]) == pytest.approx(top[0], rel=1e-3)
    assert float(ours[0]) == pytest.approx(float(exact[0]), rel=1e-4)


def test_hessian_function_errors():
    w = torch.randn(3, requires_grad=True)
    op = HessianOperator((w**3).sum(), [w])
    with pytest.raises(ValueError, match="scalar"):
        gradients(w * 2, [w])
    with pytest.raises(ValueError, match="does not require grad"):
        gradients(torch.ones(()), [w])
    with pytest.raises(ValueError, match="requires_grad"):
        HessianOperator((w**2).sum(), [torch.ones(3)])
    with pytest.raises(ValueError, match="empty"):
        gradients((w**2).sum(), [])
    with pytest.raises(ValueError, match="flat with 3"):
        op(torch.ones(4))
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(op, 0)
    with pytest.raises(ValueError, match=r"probes must be \(m, 3\)"):
        hutchinson_trace(op, probes=torch.ones(2, 4))
    with pytest.raises(ValueError, match="k=4"):
        lanczos_top_eigenvalues(op, 4)
    with pytest.raises(ValueError, match="num_iters"):
        lanczos_top_eigenvalues(op, 2, num_iters=1)
    with pytest.raises(ValueError, match="dim must be"):
        lanczos_top_eigenvalues(lambda v: v, 1)


# -- functional: Hessian Alignment penalties ----------------------------------------------
def test_hessian_gradient_product_is_hvp_and_the_papers_norm_form():
    z, y, d, head = head_setup()
    params = list(head.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    c, dim = head.weight.shape

    def risk(t):
        return F.cross_entropy(z @ t[: c * dim].view(c, dim).T + t[c * dim :], y)

    g = torch.autograd.functional.jacobian(risk, theta)
    _, ref = torch.autograd.functional.hvp(risk, theta, g)
    grads = gradients(F.cross_entropy(head(z), y), params)
    torch.testing.assert_close(hessian_gradient_product(grads, params), ref)
    norm = torch.cat([gi.reshape(-1) for gi in grads]).norm()  # the paper: H g = ‖g‖ ∇‖g‖
    grad_norm = torch.autograd.grad(norm, params, retain_graph=True)
    torch.testing.assert_close(norm.detach() * torch.cat([t.reshape(-1) for t in grad_norm]), ref)


@pytest.mark.parametrize("method", ["hgp", "hutchinson"])
def test_alignment_penalty_matches_the_direct_computation(method):
    z, y, d, head = head_setup()
    params = list(head.parameters())
    risks, ids = domain_risks(head(z), y, d)
    assert ids.tolist() == [0, 1, 2]
    assert float(risks[1]) == pytest.approx(float(F.cross_entropy(head(z)[d == 1], y[d == 1])))
    probes = rademacher((7, 15), torch.Generator().manual_seed(2), dtype=torch.float64)
    if method == "hgp":
        got = hgp_penalty(risks, params, alpha=0.3, beta=0.7)
    else:
        got = hutchinson_penalty(risks, params, alpha=0.3, beta=0.7, probes=probes)
    expected, _ = head_alignment_direct(z, y, d, head.weight, head.bias, 0.3, 0.7, method, probes)
    assert float(got) == pytest.approx(float(expected), rel=1e-9)
    hess, grad = hessian_alignment_parts(risks, params, method, probes=probes)
    assert float(0.3 * hess + 0.7 * grad) == pytest.approx(float(got), rel=1e-12)
    # α = β = 0: nothing; only the gradient part: the gradient variance across domains
    assert float(hgp_penalty(risks, params, 0.0, 0.0)) == 0.0


def test_alignment_gradient_stops_at_the_domain_means():
    z, y, d, head = head_setup(dim=3)
    risks, _ = domain_risks(head(z), y, d)
    penalty = hgp_penalty(risks, list(head.parameters()), alpha=0.5, beta=2.0)
    ours = torch.autograd.grad(penalty, list(head.parameters()))
    _, constants = head_alignment_direct(z, y, d, head.weight, head.bias, 0.5, 2.0, "hgp")
    fixed, theta = head_alignment_direct(
        z, y, d, head.weight, head.bias, 0.5, 2.0, "hgp", constants=constants
    )
    (ref,) = torch.autograd.grad(fixed, theta)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in ours]), ref, rtol=1e-8, atol=1e-12)


def test_alignment_penalty_is_zero_for_a_duplicated_domain_and_reaches_the_features():
    z, y, _, head = head_setup()
    zz, yy = torch.cat([z, z]), torch.cat([y, y])
    d = torch.cat([torch.zeros(len(z)), torch.ones(len(z))]).long()
    risks, _ = domain_risks(head(zz), yy, d)
    assert float(hgp_penalty(risks, list(head.parameters()), 1.0, 1.0)) == pytest.approx(0.0, abs=1e-20)
    g = torch.Generator().manual_seed(0)
    assert float(hutchinson_penalty(risks, list(head.parameters()), 1.0, 1.0, 5, g)) == pytest.approx(
        0.0, abs=1e-20
    )
    # the featurizer receives the penalty's gradient through the features
    feat = nn.Linear(4, 4).double()
    _, _, d3, _ = head_setup()
    risks, _ = domain_risks(head(feat(z)), y, d3)
    for pen in (
        hgp_penalty(risks, list(head.parameters())),
        hutchinson_penalty(risks, list(head.parameters()), num_probes=3),
    ):
        grads = torch.autograd.grad(pen, list(feat.parameters()), retain_graph=True)
        assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


def test_alignment_errors():
    z, y, d, head = head_setup()
    risks, _ = domain_risks(head(z), y, d)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        hgp_penalty(risks, list(head.parameters()), alpha=-1.0)
    with pytest.raises(ValueError, match="empty"):
        hgp_penalty([], list(head.parameters()))
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_alignment_parts(risks, list(head.parameters()), "fisher")
    with pytest.raises(ValueError, match="one domain id per sample"):
        domain_risks(head(z), y, d[:-1])


# -- the DataModule's domains option --------------------------------------------------------
def test_datamodule_domains_option():
    dm = build("data", "digits", batch_size=32, domains=3)
    dm.setup("fit")
    pool = len(dm.domain_ids)
    assert pool == len(dm.train_set) + len(dm.val_set) and dm.num_domains == 3
    counts = torch.bincount(dm.domain_ids)
    assert counts.max() - counts.min() <= 1  # balanced
    again = build("data", "digits", batch_size=32, domains=3)
    again.setup("fit")
    assert torch.equal(again.domain_ids, dm.domain_ids)
    other = build("data", "digits", batch_size=32, domains=3, split_seed=5)
    other.setup("fit")
    assert not torch.equal(other.domain_ids, dm.domain_ids)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and len(batch) == 3  # batches are unchanged
    assert torch.equal(dm.domain_of(batch.index), dm.domain_ids[batch.index])
    rule = build("data", "digits", domains=lambda targets: targets % 2)
    rule.setup("fit")
    ytr = rule.domain_ids  # pool order
    assert rule.num_domains == 2 and torch.equal(ytr[rule.train_indices], rule.train_targets % 2)
    given = build("data", "digits", domains=[i % 4 for i in range(pool)])
    given.setup("fit")
    assert given.num_domains == 4 and given.domain_ids[:5].tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match="has no domains"):
        plain = build("data", "digits")
        plain.domain_of(torch.tensor([0]))
    for bad in (0, True):
        with pytest.raises(ValueError, match="domains must be an int K >= 1"):
            build("data", "digits", domains=bad)
    for bad, msg in (([0, 1], "one integer domain id per train-pool sample"), ([-1] * pool, "must be >= 0")):
        with pytest.raises(ValueError, match=msg):
            build("data", "digits", domains=bad).setup("fit")
    with pytest.raises(ValueError, match="integer domain id"):
        build("data", "digits", domains=[0.5] * pool).setup("fit")


# -- hessian_alignment: the term and the callback ---------------------------------------
@pytest.mark.parametrize("method", ["hgp", "hutchinson"])
def test_alignment_term_value_matches_the_direct_computation(method):
    z, y, d, head = head_setup()
    index = torch.arange(len(z)) + 100
    table = torch.full((200,), -1)
    table[index] = d
    term = HessianAlignmentTerm(head, method, alpha=0.2, beta=0.4, num_probes=6, seed=3, domain_table=table)
    assert term.needs_index and "head" not in dict(term.named_children())
    step = Step(Batch(z, y, index), ModelOutput(head(z)), progress=Progress(global_step=5))
    got = term(step)
    probes = rademacher((6, 15), torch.Generator().manual_seed(3 * 1_000_003 + 5), dtype=torch.float64)
    expected, _ = head_alignment_direct(z, y, d, head.weight, head.bias, 0.2, 0.4, method, probes)
    assert float(got) == pytest.approx(float(expected), rel=1e-9)
    assert term.last_parts["domains"] == 3
    by_fn = HessianAlignmentTerm(head, method, 0.2, 0.4, 6, 3, domain_fn=lambda b: d)
    assert float(by_fn(step)) == pytest.approx(float(got), rel=1e-12)
    with pytest.raises(ValueError, match="exactly one of"):
        HessianAlignmentTerm(head)
    with pytest.raises(ValueError, match="needs the dataset index"):
        term(Step(Batch(z, y), ModelOutput(head(z))))
    with pytest.raises(ValueError, match="do not depend on the chosen head"):
        HessianAlignmentTerm(nn.Linear(4, 3).double(), domain_fn=lambda b: d)(step)


def digits_module():
    return ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        loss="cross_entropy",
        model_kwargs={"width": 8},
        optimizer={"name": "sgd", "lr": 0.05},
    )


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class Plain(L.LightningModule):
    """A LightningModule with no toolkit parts: its own loaders, a tiny MLP."""

    def __init__(self, lr=0.1, n=48, batch_size=16):
        super().__init__()
        self.x, self.y = data(n=n, dtype=torch.float32)
        self.net = mlp(dtype=torch.float32)
        self.lr, self.batch_size = lr, batch_size

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


def quiet_trainer(tmp_path=None, **kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=1,
    )
    if tmp_path is not None:
        base["default_root_dir"] = str(tmp_path)
    base.update(kw)
    return L.Trainer(**base)


def test_alignment_callback_runs_on_digits_with_domains(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = digits_module()
    cb = HessianAlignment(method="hgp")
    trainer = quiet_trainer(
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=""),
        callbacks=[cb],
        limit_train_batches=3,
        limit_val_batches=1,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=build("data", "digits", batch_size=32, domains=3))
    assert "hessian_alignment" in module.terms and cb.term.head is module.model.fc
    assert cb.term.alpha == 1e-4 and cb.term.beta == 5e-3  # the paper's HGP defaults
    tags = read_scalars(tmp_path / "tb")
    for tag in ("train/loss/hessian_alignment", "hessian_alignment/hessian", "hessian_alignment/gradient"):
        assert len(tags[tag]) == 3 and all(math.isfinite(v) and v >= 0 for v in tags[tag])
    assert sum(tags["hessian_alignment/gradient"]) > 0
    assert not any(k.startswith("hessian_alignment") for k in module.state_dict())  # no extra state


def test_alignment_callback_errors(tmp_path):
    with pytest.raises(TypeError, match="no loss bus"):
        quiet_trainer(callbacks=[HessianAlignment()], max_steps=1).fit(Plain())
    with pytest.raises(ValueError, match="domains="):
        quiet_trainer(callbacks=[HessianAlignment()], max_steps=1).fit(
            digits_module(), datamodule=build("data", "digits", batch_size=32)
        )
    with pytest.raises(ValueError, match="Closest module paths: model.fc"):
        quiet_trainer(callbacks=[HessianAlignment(head="model.fcc")], max_steps=1).fit(
            digits_module(), datamodule=build("data", "digits", batch_size=32, domains=2)
        )
    for kw, msg in (
        ({"method": "sam"}, "method must be one of"),
        ({"alpha": -1.0}, "alpha must be >= 0"),
        ({"num_probes": 0}, "num_probes must be an integer >= 1"),
        ({"name": "a/b"}, "without '/'"),
    ):
        with pytest.raises(ValueError, match=msg):
            HessianAlignment(**kw)


# -- hessian_monitor ------------------------------------------------------------------
def test_monitor_on_a_plain_module_gives_the_exact_curvature():
    module = Plain(lr=0.1)
    dim = sum(p.numel() for p in module.parameters())
    monitor = HessianMonitor(num_samples=32, top_k=3, lanczos_iters=dim, hutchinson_probes=200)
    quiet_trainer(callbacks=[monitor]).fit(module)
    (row,) = monitor.history
    x, y = module.x[:32], module.y[:32]  # the probe batch: the first samples of the training loader
    assert torch.equal(monitor.probe_batch.input, x) and torch.equal(monitor.probe_batch.target, y)
    h = exact_hessian(module.net, x, y)
    exact = torch.linalg.eigvalsh(h).flip(0)
    for i in range(3):
        assert row[f"eig_{i + 1}"] == pytest.approx(float(exact[i]), rel=1e-4, abs=1e-6)
    assert abs(row["trace"] - float(h.trace())) < 5 * row["trace_stderr"]
    assert row["stability_threshold"] == pytest.approx(2 / 0.1) and row["lr"] == pytest.approx(0.1)
    assert row["lambda_max_lr_over_2"] == pytest.approx(0.1 * row["eig_1"] / 2)
    assert row["trace_lr_over_2"] == pytest.approx(0.1 * row["trace"] / 2)
    assert row["loss"] == pytest.approx(float(F.cross_entropy(module(x), y)), rel=1e-6)


def test_monitor_measure_leaves_the_run_untouched():
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    module = Plain()
    module.net = net
    module.train()
    for p in module.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {k: v.clone() for k, v in module.state_dict().items()}
    monitor = HessianMonitor(batch=(module.x, module.y), top_k=2, lanczos_iters=5, hutchinson_probes=3)
    rng = torch.get_rng_state()
    with torch.inference_mode():  # Lightning validates under inference mode
        out = monitor.measure(module, epoch=0, lr=None)
    assert torch.equal(torch.get_rng_state(), rng)
    assert module.training and all(m.training for m in module.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in module.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in module.state_dict().items())
    assert set(out) == {"trace", "trace_stderr", "eig_1", "eig_2", "loss"}  # no lr: no stability line
    again = monitor.measure(module, epoch=0)
    assert again == out  # seeded by (seed, epoch)
    fc = HessianMonitor(
        batch=(module.x, module.y), parameters="net.3", top_k=1, lanczos_iters=15, hutchinson_probes=1
    )
    x = module.x
    module.eval()
    feats = module.net[:3](x).detach()
    head = nn.Linear(6, 3)
    head.load_state_dict(module.net[3].state_dict())
    h = exact_hessian(head, feats, module.y)
    module.train()
    assert fc.measure(module)["eig_1"] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-4)


def test_monitor_and_spectrum_on_digits_write_tensorboard_scalars(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    monitor = HessianMonitor(num_samples=64, top_k=2, lanczos_iters=6, hutchinson_probes=4)
    spectrum = GradientSpectrum(
        every_n_steps=1, every_n_epochs=1, layers=["model.fc", "model.features.0"], top_k=2
    )
    trainer = quiet_trainer(
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=""),
        callbacks=[monitor, spectrum],
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=50,
    )
    trainer.fit(digits_module(), datamodule=build("data", "digits", batch_size=32))
    tags = read_scalars(tmp_path / "tb")
    for tag in (
        "hessian/trace",
        "hessian/trace_stderr",
        "hessian/eig_1",
        "hessian/eig_2",
        "hessian/loss",
        "hessian/stability_threshold",
        "hessian/lambda_max_lr_over_2",
        "hessian/trace_lr_over_2",
    ):
        assert len(tags[tag]) == 2, tag  # one per epoch
    assert tags["hessian/stability_threshold"] == pytest.approx([2 / 0.05] * 2)
    assert all(a >= b for a, b in zip(tags["hessian/eig_1"], tags["hessian/eig_2"]))
    assert len(monitor.probe_batch.target) == 64
    # step values bypass log_every_n_steps: every one of the 4 optimiser steps is logged
    assert len(tags["grad_spectrum/mean_effective_rank"]) == 4
    for stat in (
        "nuclear_norm",
        "effective_rank",
        "stable_rank",
        "sigma_1",
        "sigma_2",
        "ratio_2",
        "top_share",
    ):
        assert len(tags[f"grad_spectrum/model.fc.weight/{stat}"]) == 4
    assert "grad_spectrum/model.fc.bias/nuclear_norm" not in tags  # no spectrum for 1-D parameters
    assert len(tags["grad_spectrum/probe/model.features.0.weight/effective_rank"]) == 2


def test_monitor_history_is_checkpointed_and_resumed(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    first = HessianMonitor(num_samples=16, top_k=1, lanczos_iters=4, hutchinson_probes=2)
    quiet_trainer(tmp_path, callbacks=[first, ckpt], enable_checkpointing=True).fit(Plain())
    second = HessianMonitor(num_samples=16, top_k=1, lanczos_iters=4, hutchinson_probes=2)
    quiet_trainer(tmp_path, callbacks=[second], max_epochs=2, enable_checkpointing=True).fit(
        Plain(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert len(second.history) == 2 and second.history[0] == first.history[0]
    assert second.history[1]["epoch"] == 1
    restored = HessianMonitor()
    restored.load_state_dict(second.state_dict())
    assert restored.history == second.history


def test_monitor_errors_and_stages():
    for kw, msg in (
        ({"every_n_epochs": 0}, "every_n_epochs must be an integer >= 1"),
        ({"top_k": 5, "lanczos_iters": 3}, r"lanczos_iters \(3\) must be >= top_k"),
        ({"top_k": 0, "hutchinson_probes": 0}, "nothing to measure"),
        ({"parameters": ""}, "module path"),
        ({"num_samples": 1.5}, "num_samples must be an integer"),
    ):
        with pytest.raises(ValueError, match=msg):
            HessianMonitor(**kw)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        HessianMonitor(loss_fn=3)
    with pytest.raises(ValueError, match="Closest module paths: net"):
        quiet_trainer(callbacks=[HessianMonitor(parameters="nett.0")], max_steps=1).fit(Plain())
    with pytest.raises(ValueError, match="no probe batch"):
        HessianMonitor().measure(Plain())
    with pytest.raises(ValueError, match="must carry targets"):
        HessianMonitor(batch=(torch.ones(2, 5),))
    monitor = HessianMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.setup(quiet_trainer(), Plain(), "validate")
    assert any("fit only" in str(w.message) for w in caught) and not monitor._active


def test_monitor_custom_loss_fn():
    module = Plain()
    x, y = module.x[:20], module.y[:20]

    def loss_fn(pl_module, batch):  # a scaled loss scales the Hessian
        return 3.0 * F.cross_entropy(pl_module(batch.input), batch.target)

    base = HessianMonitor(batch=(x, y), top_k=1, lanczos_iters=10, hutchinson_probes=5).measure(module)
    scaled = HessianMonitor(batch=(x, y), top_k=1, lanczos_iters=10, hutchinson_probes=5, loss_fn=loss_fn)
    out = scaled.measure(module)
    assert out["eig_1"] == pytest.approx(3 * base["eig_1"], rel=1e-5)
    assert out["trace"] == pytest.approx(3 * base["trace"], rel=1e-5)


def test_recipe_train_with_hessian_monitor(tmp_path):
    from recipes import train

    train.main(
        [
            "--data",
            "digits",
            "--fast",
            "--callbacks",
            "hessian_monitor",
            "--callbacks.hessian_monitor.top_k",
            "2",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events
    tags = {}
    for d in {e.parent for e in events}:
        tags.update(read_scalars(d))
    assert {"hessian/trace", "hessian/eig_1", "hessian/eig_2", "hessian/stability_threshold"} <= set(tags)
    assert "hessian/eig_3" not in tags
    assert all(math.isfinite(v) for v in tags["hessian/eig_1"])


# -- gradient_spectrum ----------------------------------------------------------------
def entropy_rank(s):
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


def test_spectrum_stats_match_torch_svd():
    g = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svd(g).S
    st = spectrum_stats(g, top_k=3)
    torch.testing.assert_close(torch.stack([st["sigma_1"], st["sigma_2"], st["sigma_3"]]), s[:3])
    assert float(st["nuclear_norm"]) == pytest.approx(float(s.sum()))
    assert float(st["spectral_norm"]) == pytest.approx(float(s[0]))
    assert float(st["frobenius_norm"]) == pytest.approx(float(torch.linalg.norm(g)))
    assert float(st["effective_rank"]) == pytest.approx(entropy_rank(s))
    assert float(st["stable_rank"]) == pytest.approx(float((g**2).sum() / s[0] ** 2))
    assert float(st["ratio_2"]) == pytest.approx(float(s[1] / s[0]))
    assert float(st["top_share"]) == pytest.approx(float(s[0] / s.sum()))
    conv = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    ref = torch.linalg.svd(conv.reshape(4, 12)).S
    assert float(spectrum_stats(conv)["nuclear_norm"]) == pytest.approx(float(ref.sum()))
    out = gradient_spectrum({"w": g, "b": torch.ones(3), "none": None})
    assert set(out) == {"w"}


def test_spectrum_limits():
    n = 6
    assert float(effective_rank(torch.linalg.svdvals(torch.eye(n)))) == pytest.approx(n)
    assert float(stable_rank(torch.linalg.svdvals(torch.eye(n)))) == pytest.approx(n)
    u, v = torch.randn(5, 1), torch.randn(1, 4)
    one = spectrum_stats(u @ v)
    assert float(one["effective_rank"]) == pytest.approx(1.0, abs=1e-5)
    assert float(one["stable_rank"]) == pytest.approx(1.0, abs=1e-5)
    g = torch.randn(5, 4)
    a, b = spectrum_stats(g), spectrum_stats(-37.0 * g)  # scale invariance of the ranks
    assert float(a["effective_rank"]) == pytest.approx(float(b["effective_rank"]), rel=1e-5)
    assert float(b["nuclear_norm"]) == pytest.approx(37.0 * float(a["nuclear_norm"]), rel=1e-5)
    zero = spectrum_stats(torch.zeros(3, 4), top_k=2)
    assert all(float(v) == 0.0 for v in zero.values())
    wide = spectrum_stats(torch.randn(2, 9), top_k=4)  # top_k beyond the rank: zeros
    assert float(wide["sigma_3"]) == 0.0 == float(wide["sigma_4"]) and float(wide["ratio_4"]) == 0.0
    with pytest.raises(ValueError, match=">= 2 dims"):
        spectrum_stats(torch.ones(3))
    with pytest.raises(ValueError, match="top_k"):
        spectrum_stats(torch.ones(3, 3), top_k=0)


class GradRecorder(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def test_spectrum_callback_values_match_svd_of_the_training_gradient():
    spectrum, recorder = GradientSpectrum(every_n_steps=1, top_k=2), GradRecorder()
    module = Plain()
    quiet_trainer(callbacks=[spectrum, recorder], max_steps=2).fit(module)
    assert set(spectrum.last) == {"net.0.weight", "net.2.weight"}  # weights only, whole module
    for name, stats in spectrum.last.items():
        s = torch.linalg.svd(recorder.grads[name].double()).S
        assert stats["sigma_1"] == pytest.approx(float(s[0]), rel=1e-5)
        assert stats["nuclear_norm"] == pytest.approx(float(s.sum()), rel=1e-5)
        assert stats["effective_rank"] == pytest.approx(entropy_rank(s), rel=1e-5)
    # the probe-batch gradient equals autograd's, the module's .grad untouched
    probe = GradientSpectrum(every_n_steps=None, every_n_epochs=1, batch=(module.x, module.y))
    grads = probe.probe_gradients(module)
    loss = F.cross_entropy(module(module.x), module.y)
    ref = torch.autograd.grad(loss, [module.net[0].weight, module.net[2].weight])
    torch.testing.assert_close(grads["net.0.weight"], ref[0])
    torch.testing.assert_close(grads["net.2.weight"], ref[1])


def test_spectrum_errors():
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientSpectrum(every_n_steps=None, every_n_epochs=None)
    with pytest.raises(ValueError, match="layers must be module paths"):
        GradientSpectrum(layers=[""])
    with pytest.raises(ValueError, match="Closest module paths: net"):
        quiet_trainer(callbacks=[GradientSpectrum(layers="nett")], max_steps=1).fit(Plain())
    with pytest.raises(ValueError, match="no weight with >= 2 dims"):
        quiet_trainer(callbacks=[GradientSpectrum(layers="net.1")], max_steps=1).fit(Plain())
