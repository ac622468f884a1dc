"""The one-step look-ahead utility: hypergradients against a hand derivation and finite differences."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from toolkit.meta import (
    apply_meta_gradients,
    average_across_processes,
    functional_model,
    lookahead_hypergradient,
    trainable_params,
    virtual_sgd_step,
)


def test_linear_model_matches_the_hand_derived_hypergradient(rng):
    """f(x) = W x, inner = (1/B) Σ_i ω_i · ½‖W x_i − y_i‖², outer = (1/M) Σ_j ½‖W' v_j − z_j‖².

    W' = W − η G with G = (1/B) Σ_i ω_i r_i x_iᵀ, r_i = W x_i − y_i; with H = ∂outer/∂W' =
    (1/M) Σ_j (W' v_j − z_j) v_jᵀ the chain rule gives ∂outer/∂ω_i = −(η/B) r_iᵀ H x_i.
    """
    d_in, d_out, b, m, eta = 4, 3, 6, 5, 0.3
    model = nn.Linear(d_in, d_out, bias=False).double()
    x, y = torch.randn(b, d_in, generator=rng).double(), torch.randn(b, d_out, generator=rng).double()
    v, z = torch.randn(m, d_in, generator=rng).double(), torch.randn(m, d_out, generator=rng).double()
    omega = torch.rand(b, generator=rng).double().requires_grad_(True)

    res = lookahead_hypergradient(
        model,
        inner_loss=lambda f: (omega * 0.5 * (f(x) - y).pow(2).sum(-1)).mean(),
        outer_loss=lambda f: (0.5 * (f(v) - z).pow(2).sum(-1)).mean(),
        meta_params={"omega": omega},
        lr=eta,
    )

    W = model.weight.detach().numpy()
    X, Y, V, Z, om = x.numpy(), y.numpy(), v.numpy(), z.numpy(), omega.detach().numpy()
    R = X @ W.T - Y  # (B, d_out)
    G = sum(om[i] * np.outer(R[i], X[i]) for i in range(b)) / b
    W2 = W - eta * G
    H = sum(np.outer(W2 @ V[j] - Z[j], V[j]) for j in range(m)) / m
    expected = np.array([-(eta / b) * R[i] @ H @ X[i] for i in range(b)])
    np.testing.assert_allclose(res.meta_grads["omega"].numpy(), expected, rtol=1e-10, atol=1e-12)
    # the reported losses are the inner loss at W and the outer loss at W'
    inner = np.mean([om[i] * 0.5 * np.sum(R[i] ** 2) for i in range(b)])
    outer = np.mean([0.5 * np.sum((W2 @ V[j] - Z[j]) ** 2) for j in range(m)])
    assert res.inner_loss.item() == pytest.approx(inner, rel=1e-12)
    assert res.outer_loss.item() == pytest.approx(outer, rel=1e-12)


class Weighter(nn.Module):
    """A small meta-network: per-sample weights σ(a·loss_i + b) from each sample's loss."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, losses):
        return torch.sigmoid(self.lin(losses.unsqueeze(-1))).squeeze(-1)


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def test_mlp_with_a_meta_network_matches_finite_differences(rng):
    model, weighter = _mlp(0), Weighter().double()
    x, y = torch.randn(8, 5, generator=rng).double(), torch.randint(0, 3, (8,), generator=rng)
    xv, yv = torch.randn(6, 5, generator=rng).double(), torch.randint(0, 3, (6,), generator=rng)
    eta = 0.5
    meta = {k: p.detach().clone().requires_grad_(True) for k, p in weighter.named_parameters()}

    def inner(f, meta_tensors):
        losses = F.cross_entropy(f(x), y, reduction="none")
        w = functional_call(weighter, meta_tensors, (losses.detach(),))
        return (w * losses).mean()

    res = lookahead_hypergradient(
        model,
        lambda f: inner(f, meta),
        lambda f: F.cross_entropy(f(xv), yv),
        meta,
        lr=eta,
    )

    # independent evaluation of L_outer(θ'(ω)): plain autograd for the inner gradient, no graph kept
    theta = {k: p.detach() for k, p in model.named_parameters()}

    def outer_after_step(meta_tensors):
        th = {k: p.clone().requires_grad_(True) for k, p in theta.items()}
        loss = inner(lambda inp: functional_call(model, th, (inp,)), meta_tensors)
        grads = torch.autograd.grad(loss, list(th.values()))
        stepped = {k: p.detach() - eta * g for (k, p), g in zip(th.items(), grads)}
        return F.cross_entropy(functional_call(model, stepped, (xv,)), yv).item()

    eps = 1e-6
    for name, value in meta.items():
        fd = torch.zeros_like(value)
        for idx in np.ndindex(*value.shape):
            plus = {k: v.detach().clone() for k, v in meta.items()}
            minus = {k: v.detach().clone() for k, v in meta.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            fd[idx] = (outer_after_step(plus) - outer_after_step(minus)) / (2 * eps)
        assert torch.allclose(res.meta_grads[name], fd, rtol=1e-5, atol=1e-9), name
        assert res.meta_grads[name].abs().sum() > 0


def test_model_state_is_untouched_and_limits(rng):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(10, 4, generator=rng), torch.randint(0, 2, (10,), generator=rng)
    scale = torch.ones((), requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)

    def inner(f):
        return scale * F.cross_entropy(f(x), y)

    def outer(f):
        return F.cross_entropy(f(x), y)

    res = lookahead_hypergradient(model, inner, outer, {"scale": scale, "unused": unused}, lr=0.1)
    # parameters, BatchNorm running statistics and .grad are as before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert scale.grad is None
    # a meta-parameter the losses do not use gets a zero gradient; scaling the inner loss up
    # lowers the outer loss on the same batch (a descent step), so the hypergradient is negative
    assert torch.equal(res.meta_grads["unused"], torch.zeros(3))
    assert res.meta_grads["scale"].item() < 0
    # η = 0: θ' = θ, the outer loss does not depend on ω
    zero = lookahead_hypergradient(model, inner, outer, {"scale": scale}, lr=0.0)
    assert zero.meta_grads["scale"].item() == 0.0
    assert zero.outer_loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


def test_restricting_the_virtual_step_to_some_parameters(rng):
    model = _mlp(1).float()
    x, y = torch.randn(8, 5, generator=rng), torch.randint(0, 3, (8,), generator=rng)
    omega = torch.ones(8, requires_grad=True)

    def inner(f):
        return (omega * F.cross_entropy(f(x), y, reduction="none")).mean()

    def outer(f):
        return F.cross_entropy(f(x), y)

    last = trainable_params(model, lambda n: n.startswith("2."))
    assert set(last) == {"2.weight", "2.bias"}
    only_last = lookahead_hypergradient(model, inner, outer, {"omega": omega}, lr=0.5, params=last)
    full = lookahead_hypergradient(model, inner, outer, {"omega": omega}, lr=0.5)
    assert not torch.allclose(only_last.meta_grads["omega"], full.meta_grads["omega"])
    # a last-layer step only: θ' differs from θ in the last layer alone
    loss = inner(functional_model(model, last))
    stepped = virtual_sgd_step(last, loss, 0.5)
    assert set(stepped) == set(last) and not torch.equal(stepped["2.weight"], last["2.weight"])


def test_apply_meta_gradients_and_processes():
    net = nn.Linear(2, 1)
    net.requires_grad_(False)  # a meta-network kept out of the main optimiser and DDP
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    params = dict(net.named_parameters())
    grads = {"weight": torch.tensor([[1.0, -2.0]]), "bias": torch.tensor([4.0])}
    w0, b0 = net.weight.clone(), net.bias.clone()
    apply_meta_gradients(opt, params, grads)
    assert torch.allclose(net.weight, w0 - 0.5 * grads["weight"])
    assert torch.allclose(net.bias, b0 - 0.5 * grads["bias"])
    assert net.weight.grad is None and net.bias.grad is None
    with pytest.raises(KeyError, match="bias"):
        apply_meta_gradients(opt, params, {"weight": grads["weight"]})
    # one process: the average is the gradient itself
    assert average_across_processes(grads)["weight"] is grads["weight"]


def test_bad_arguments_raise(rng):
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3, generator=rng)
    w = torch.ones(4, requires_grad=True)

    def inner(f):
        return (w * f(x).sum(-1)).mean()

    def outer(f):
        return f(x).sum()

    for lr in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning rate"):
            lookahead_hypergradient(model, inner, outer, {"w": w}, lr=lr)
    with pytest.raises(ValueError, match="requires_grad=True"):
        lookahead_hypergradient(model, inner, outer, {"w": torch.ones(4)}, lr=0.1)
    with pytest.raises(ValueError, match="meta_params is empty"):
        lookahead_hypergradient(model, inner, outer, {}, lr=0.1)
    with pytest.raises(ValueError, match="inner_loss must return a scalar"):
        lookahead_hypergradient(model, lambda f: w * f(x).sum(-1), outer, {"w": w}, lr=0.1)
    with pytest.raises(ValueError, match="outer_loss must return a scalar"):
        lookahead_hypergradient(model, inner, lambda f: f(x), {"w": w}, lr=0.1)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no model parameter to step"):
        lookahead_hypergradient(frozen, inner, outer, {"w": w}, lr=0.1)
