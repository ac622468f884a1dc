"""The paper optimisers (`lion`, `diffgrad`, `classp`): step by step against the update rules
written here, against maintained packages (lion-pytorch, torch-optimizer) as oracles, limiting
cases, weight decay and parameter groups, state-dict resume, errors, and runs by name."""

import math

import lightning as L
import pytest
import torch

from toolkit import build
from toolkit.modules import ClassificationModule
from toolkit.optim import CLASSP, DiffGrad, Lion, build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # restored after the module


def grads(n, shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


def run(opt_cls, params, grad_seq, groups=None, **kw):
    """Apply the optimiser to copies of `params` for each gradient list of `grad_seq`; `groups`
    maps the copies to parameter groups."""
    params = [p.clone().requires_grad_() for p in params]
    opt = opt_cls(groups(params) if groups else params, **kw)
    for gs in grad_seq:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


# ---------------------------------------------------------------------------------------------
# Lion
# ---------------------------------------------------------------------------------------------


def lion_by_hand(theta, gs, lr, b1, b2, wd):
    theta, m = theta.clone(), torch.zeros_like(theta)
    for g in gs:
        theta = theta * (1 - lr * wd)
        c = b1 * m + (1 - b1) * g
        theta = theta - lr * torch.sign(c)
        m = b2 * m + (1 - b2) * g
    return theta


def test_lion_matches_the_rule_with_groups_and_weight_decay():
    theta = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    seq = list(zip(grads(6, (4, 3), 1), grads(6, (5,), 2)))
    out, _ = run(
        Lion,
        theta,
        seq,
        groups=lambda ps: [
            {"params": [ps[0]], "lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 0.1},
            {"params": [ps[1]], "lr": 0.003, "betas": (0.5, 0.8), "weight_decay": 0.0},
        ],
    )
    assert torch.allclose(
        out[0], lion_by_hand(theta[0], [s[0] for s in seq], 0.01, 0.9, 0.99, 0.1), atol=1e-12
    )
    assert torch.allclose(
        out[1], lion_by_hand(theta[1], [s[1] for s in seq], 0.003, 0.5, 0.8, 0.0), atol=1e-12
    )


def test_lion_limiting_cases():
    theta = torch.randn(50, dtype=torch.float64)
    seq = [[g] for g in grads(4, (50,), 3)]
    (out,), _ = run(Lion, [theta], seq[:1], lr=0.1)
    assert torch.allclose((out - theta).abs(), torch.full((50,), 0.1, dtype=torch.float64))  # ±lr each
    (out,), _ = run(Lion, [theta], seq, lr=0.1, betas=(0.0, 0.0))  # β₁ = β₂ = 0: signSGD
    expected = theta - 0.1 * sum(torch.sign(s[0]) for s in seq)
    assert torch.allclose(out, expected, atol=1e-12)
    zero = [[torch.zeros(50, dtype=torch.float64)]]
    (out,), _ = run(Lion, [theta], zero, lr=0.1, weight_decay=0.5)  # sign(0) = 0: only the decay
    assert torch.allclose(out, theta * (1 - 0.1 * 0.5), atol=1e-12)


def test_lion_equals_the_lion_pytorch_package():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    torch.manual_seed(0)
    theta = torch.randn(6, 4)
    seq = [[g.float()] for g in grads(8, (6, 4), 4)]
    ours, _ = run(Lion, [theta], seq, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.2)
    theirs, _ = run(lion_pytorch.Lion, [theta], seq, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.2)
    assert torch.equal(ours[0], theirs[0])


# ---------------------------------------------------------------------------------------------
# diffGrad
# ---------------------------------------------------------------------------------------------


def diffgrad_by_hand(theta, gs, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    theta, m, v, prev = theta.clone(), 0 * theta, 0 * theta, 0 * theta
    for t, g in enumerate(gs, start=1):
        g = g + wd * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        xi = 1 / (1 + torch.exp(-(prev - g).abs()))
        prev = g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        # ε on √v_t (the official code): lr·ξ·m̂ / (√v̂ + ε/√(1 − β₂ᵗ))
        theta = theta - lr * xi * m_hat / (v_hat.sqrt() + eps / math.sqrt(1 - b2**t))
    return theta


def test_diffgrad_matches_the_rule_with_groups_and_weight_decay():
    theta = [torch.randn(3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    seq = list(zip(grads(7, (3, 3), 5), grads(7, (4,), 6)))
    out, _ = run(
        DiffGrad,
        theta,
        seq,
        groups=lambda ps: [
            {"params": [ps[0]], "lr": 0.01, "weight_decay": 0.05},
            {"params": [ps[1]], "lr": 0.002, "betas": (0.8, 0.99), "eps": 1e-3},
        ],
    )
    ref0 = diffgrad_by_hand(theta[0], [s[0] for s in seq], lr=0.01, wd=0.05)
    ref1 = diffgrad_by_hand(theta[1], [s[1] for s in seq], lr=0.002, b1=0.8, b2=0.99, eps=1e-3)
    assert torch.allclose(out[0], ref0, atol=1e-12) and torch.allclose(out[1], ref1, atol=1e-12)


def test_diffgrad_friction_limits():
    theta = torch.randn(20, dtype=torch.float64)
    g = torch.randn(20, dtype=torch.float64)
    # constant gradients: ξ = sigmoid(|g|) at step 1 (g_0 = 0), then exactly 0.5 (no change)
    (out,), _ = run(DiffGrad, [theta], [[g]], lr=0.1, eps=0.0)
    adam = [theta.clone().requires_grad_()]
    adam_opt = torch.optim.Adam(adam, lr=0.1, eps=0.0)
    adam[0].grad = g.clone()
    adam_opt.step()
    step_adam = adam[0].detach() - theta
    assert torch.allclose(out - theta, torch.sigmoid(g.abs()) * step_adam, atol=1e-12)
    p = [theta.clone().requires_grad_()]
    dg = DiffGrad(p, lr=0.1, eps=0.0)
    ad = torch.optim.Adam([q := theta.clone().requires_grad_()], lr=0.1, eps=0.0)
    for _ in range(3):
        before_dg, before_ad = p[0].detach().clone(), q.detach().clone()
        p[0].grad, q.grad = g.clone(), g.clone()
        dg.step(), ad.step()
    assert torch.allclose(p[0].detach() - before_dg, 0.5 * (q.detach() - before_ad), atol=1e-12)
    xi = torch.sigmoid((grads(1, (1000,), 9)[0]).abs())
    assert bool((xi >= 0.5).all() and (xi < 1).all())


def test_diffgrad_equals_the_torch_optimizer_package():
    torch_optimizer = pytest.importorskip("torch_optimizer")
    theta = torch.randn(5, 3, dtype=torch.float64)
    seq = [[g] for g in grads(8, (5, 3), 7)]
    ours, _ = run(DiffGrad, [theta], seq, lr=0.01, weight_decay=0.01)
    theirs, _ = run(torch_optimizer.DiffGrad, [theta], seq, lr=0.01, weight_decay=0.01)
    assert torch.allclose(ours[0], theirs[0], atol=1e-14)


# ---------------------------------------------------------------------------------------------
# CLASSP
# ---------------------------------------------------------------------------------------------


def classp_by_hand(theta, gs, lr=0.2, threshold=0.5, eps=1e-5, power=1.0, wd=0.0):
    """The paper's per-weight rule, one element at a time."""
    theta = theta.clone().flatten()
    total = torch.zeros_like(theta)
    for g in gs:
        g = g.flatten()
        for i in range(theta.numel()):
            gi = float(g[i]) + wd * float(theta[i])
            total[i] += abs(gi) ** power
            if gi * gi > threshold:
                theta[i] -= lr * gi / (float(total[i]) + eps) ** (1 / power)
    return theta


def classp_reference_code(theta, gs, lr=0.2, threshold=0.5, eps=1e-5, power=1.0):
    """oswaldoludwig/CLASSP `CLASSP.py`, its behaviour spelled out: a per-tensor test, |g| summed."""
    theta, total = theta.clone(), torch.zeros_like(theta)
    for g in gs:
        if (g**2).any() > threshold:
            total = total + g.abs()
            theta = theta - lr / (total + eps) ** (1 / power) * g
    return theta


def test_classp_matches_the_per_weight_rule():
    theta = [torch.randn(4, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)]
    seq = list(zip(grads(5, (4, 3), 8), grads(5, (6,), 9, scale=2.0)))
    out, opt = run(
        CLASSP,
        theta,
        seq,
        groups=lambda ps: [
            {"params": [ps[0]], "lr": 0.1, "threshold": 0.3, "power": 2.0, "weight_decay": 0.1},
            {"params": [ps[1]]},
        ],
    )
    ref0 = classp_by_hand(theta[0], [s[0] for s in seq], lr=0.1, threshold=0.3, power=2.0, wd=0.1).reshape(
        4, 3
    )
    ref1 = classp_by_hand(theta[1], [s[1] for s in seq])
    assert torch.allclose(out[0], ref0, atol=1e-12) and torch.allclose(out[1], ref1, atol=1e-12)
    assert opt.average_grad_sum() > 0


def test_classp_moves_only_weights_with_large_gradients():
    theta = torch.randn(6, dtype=torch.float64)
    g = torch.tensor([0.1, -0.2, 0.9, -1.5, 0.7, 0.0], dtype=torch.float64)
    (out,), _ = run(CLASSP, [theta], [[g]], threshold=0.5)
    moved = (out != theta).tolist()
    assert moved == [False, False, True, True, False, False]  # g² > 0.5 only for 0.9 and −1.5
    # first step: lr·g/(|g| + ε) ≈ lr·sign(g)
    assert torch.allclose(out[2:4] - theta[2:4], -0.2 * g[2:4] / (g[2:4].abs() + 1e-5), atol=1e-12)
    # p = 2, threshold = 0: AdaGrad (torch's, ε on √G instead of inside: equal for tiny ε)
    seq = [[s] for s in grads(5, (6,), 10)]
    (ours,), _ = run(CLASSP, [theta], seq, lr=0.1, threshold=0.0, power=2.0, eps=1e-30)
    (ada,), _ = run(torch.optim.Adagrad, [theta], seq, lr=0.1, eps=1e-30)
    assert torch.allclose(ours, ada, atol=1e-12)
    (plain,), _ = run(CLASSP, [theta], [[g]], lr=0.1, threshold=0.5, apply_scaling=False)
    assert torch.allclose(plain, theta - 0.1 * g * (g * g > 0.5), atol=1e-12)  # thresholded SGD


def test_classp_reference_compat_reproduces_the_official_code():
    theta = torch.randn(5, dtype=torch.float64)
    seq = [[g] for g in grads(4, (5,), 11, scale=0.3)]  # every g² < 0.5: the paper's rule moves nothing
    (paper,), _ = run(CLASSP, [theta], seq)
    assert torch.equal(paper, theta)
    (compat,), _ = run(CLASSP, [theta], seq, reference_compat=True)
    assert torch.allclose(compat, classp_reference_code(theta, [s[0] for s in seq]), atol=1e-12)
    assert not torch.equal(compat, theta)  # the per-tensor test passes for any non-zero gradient
    (never,), _ = run(CLASSP, [theta], seq, reference_compat=True, threshold=1.0)
    assert torch.equal(never, theta)  # True > 1 is False: the official code never updates


# ---------------------------------------------------------------------------------------------
# all three: resume, errors, construction by name, training runs
# ---------------------------------------------------------------------------------------------

OPTIMIZERS = [
    (Lion, {"lr": 1e-2, "weight_decay": 0.1}),
    (DiffGrad, {"lr": 1e-2, "weight_decay": 0.01}),
    (CLASSP, {"lr": 0.1, "threshold": 0.2, "power": 2.0}),
]


@pytest.mark.parametrize(("cls", "kw"), OPTIMIZERS, ids=["lion", "diffgrad", "classp"])
def test_state_dict_resume_continues_exactly(cls, kw):
    theta = [torch.randn(3, 4), torch.randn(4)]
    seq = list(zip(grads(6, (3, 4), 12), grads(6, (4,), 13)))
    seq = [[g.float() for g in s] for s in seq]
    straight, _ = run(cls, theta, seq, **kw)
    first, opt = run(cls, theta, seq[:3], **kw)
    state = opt.state_dict()
    params = [p.clone().requires_grad_() for p in first]
    resumed = cls(params, **kw)
    resumed.load_state_dict(state)
    for gs in seq[3:]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        resumed.step()
    for a, b in zip(straight, params):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("cls", [Lion, DiffGrad, CLASSP], ids=["lion", "diffgrad", "classp"])
def test_closure_and_sparse_gradients(cls):
    w = torch.randn(3, requires_grad=True)
    opt = cls([w])

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))
    emb = torch.nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        cls(emb.parameters()).step()


def test_bad_arguments_say_what_is_wrong():
    w = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        Lion(w, lr=0)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        Lion(w, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\)"):
        DiffGrad(w, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="betas must be two numbers"):
        DiffGrad(w, betas=0.9)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0"):
        DiffGrad(w, weight_decay=-1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        CLASSP(w, eps=0)
    with pytest.raises(ValueError, match="power must be > 0"):
        CLASSP(w, power=0)
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        CLASSP(w, threshold=-0.1)
    with pytest.raises(TypeError, match="bad options for optimizer 'lion'"):
        build_optimizer(w, {"name": "lion", "momentum": 0.9})


@pytest.mark.parametrize(("name", "cls"), [("lion", Lion), ("diffgrad", DiffGrad), ("classp", CLASSP)])
def test_selectable_by_name_in_a_lightning_run(name, cls):
    assert isinstance(build_optimizer([torch.zeros(1, requires_grad=True)], name), cls)
    torch.manual_seed(0)
    module = ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        loss="cross_entropy",
        model_kwargs={"width": 8},
        optimizer={"name": name, "lr": 1e-3, **({"threshold": 0.0} if name == "classp" else {})},
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=build("data", "digits", batch_size=32))
    assert isinstance(trainer.optimizers[0], cls)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_recipe_optimizer_flag(tmp_path):
    from recipes import train

    res = train.main(
        [
            "--data",
            "digits",
            "--fast",
            "--optimizer",
            "lion",
            "--optimizer.lr",
            "1e-4",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["config"]["optimizer"] == {"name": "lion", "lr": 1e-4}
    assert 0 <= res["acc"] <= 1
