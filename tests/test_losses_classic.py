"""comp_sum, self_adjusting_dice, bias_loss, l2_svm: values against formulas written here (loops
in float64), against F.cross_entropy / F.multi_margin_loss and transcriptions of the official
code, limiting cases, reductions, gradients, finiteness, errors, and short Lightning runs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit import Progress, Step, build
from toolkit.functional import bias_loss, comp_sum_loss, l2_svm_loss, self_adjusting_dice_loss
from toolkit.functional.bias_loss import bias_weights, feature_variance
from toolkit.functional.comp_sum import EXP_CAP
from toolkit.functional.self_adjusting_dice import log_one_minus_softmax
from toolkit.losses import BiasLoss, CompSumLoss, L2SVMLoss, SelfAdjustingDiceLoss
from toolkit.modules.config import build_terms
from toolkit.types import Batch, ModelOutput

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes" / "configs" / "train"
NAMES = ("comp_sum", "self_adjusting_dice", "bias_loss", "l2_svm")


@pytest.fixture
def batch(rng):
    z = torch.randn(8, 5, generator=rng) * 2
    y = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    return z, y


def softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def step_of(logits, target, features=None, module=None):
    return Step(Batch(None, target), ModelOutput(logits, features=features or {}), None, Progress(), module)


# -- comp_sum --------------------------------------------------------------------------------


def comp_sum_reference(z, y, tau):
    """ℓ^τ = Φ^τ(u), u = Σ_{y'≠y} exp(h_{y'} − h_y), by a loop in float64."""
    z = z.double().numpy()
    out = []
    for i in range(z.shape[0]):
        u = sum(math.exp(z[i, k] - z[i, y[i]]) for k in range(z.shape[1]) if k != y[i])
        out.append(math.log1p(u) if tau == 1 else ((1 + u) ** (1 - tau) - 1) / (1 - tau))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.3, 1.5, 1.7, 2.0, 3.0])
def test_comp_sum_matches_formula_and_reductions(batch, tau):
    z, y = batch
    ref = comp_sum_reference(z, y, tau)
    per = comp_sum_loss(z, y, tau, reduction="none")
    assert per.shape == (8,) and per.dtype == torch.float32
    assert torch.allclose(per.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(comp_sum_loss(z, y, tau), ref.mean().float(), rtol=1e-5)
    assert torch.allclose(comp_sum_loss(z, y, tau, reduction="sum"), ref.sum().float(), rtol=1e-5)
    term = CompSumLoss(tau=tau)
    assert torch.allclose(term(step_of(z, y)), per)


def test_comp_sum_limits_ce_gce_mae_and_sum_exponential(batch):
    z, y = batch
    p = softmax64(z)[np.arange(8), y.numpy()]
    onehot = F.one_hot(y, 5).double()
    # τ = 1 is cross-entropy, in value and gradient
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    comp_sum_loss(a, y, 1.0).backward()
    F.cross_entropy(b, y).backward()
    assert torch.allclose(comp_sum_loss(z, y, 1.0), F.cross_entropy(z, y))
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    # τ = 2 is 1 − p_y = ½·‖onehot − softmax‖₁ (MAE up to ½)
    mae = (torch.softmax(z.double(), -1) - onehot).abs().sum(-1)
    assert torch.allclose(comp_sum_loss(z, y, 2.0, reduction="none").double(), 0.5 * mae, atol=1e-6)
    assert np.allclose(comp_sum_loss(z, y, 2.0, reduction="none").numpy(), 1 - p, atol=1e-6)
    # τ = 1 + q is generalised cross-entropy (1 − p_y^q)/q
    for q in (0.3, 0.5, 0.7):
        gce = (1 - p**q) / q
        assert np.allclose(comp_sum_loss(z, y, 1 + q, reduction="none").numpy(), gce, rtol=1e-5)
    # τ = 0 is the sum-exponential loss 1/p_y − 1
    assert np.allclose(comp_sum_loss(z, y, 0.0, reduction="none").numpy(), 1 / p - 1, rtol=1e-5)
    # continuous at τ = 1 from both sides
    ce = F.cross_entropy(z, y, reduction="none")
    for tau in (1 - 1e-6, 1 + 1e-6):
        assert torch.allclose(comp_sum_loss(z, y, tau, reduction="none"), ce, rtol=1e-5)
    # bounded by 1/(τ − 1) for τ > 1, non-negative
    for tau in (1.5, 2.0, 4.0):
        v = comp_sum_loss(z * 50, y, tau, reduction="none")
        assert (v >= 0).all() and (v <= 1 / (tau - 1) + 1e-6).all()


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5, 2.0])
def test_comp_sum_gradient_is_p_y_power_times_ce_gradient(batch, tau):
    """dℓ^τ/dh = p_y^{τ−1}·(softmax(h) − onehot): the CE gradient re-weighted by p_y^{τ−1}."""
    z, y = batch
    x = z.clone().requires_grad_(True)
    comp_sum_loss(x, y, tau, reduction="sum").backward()
    p = softmax64(z)
    expected = (p[np.arange(8), y.numpy()] ** (tau - 1))[:, None] * (p - np.eye(5)[y.numpy()])
    assert np.allclose(x.grad.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_comp_sum_overflow_guard_is_linear_beyond_the_cap():
    """Below (1 − τ)·ℓ = EXP_CAP the loss is exact; beyond, the tangent line at the cap."""
    y = torch.tensor([0])
    for ce in (30.0, EXP_CAP + 5.0, 1e4):
        z = torch.tensor([[0.0, ce]], dtype=torch.float64)  # ℓ = log(1 + e^ce) ≈ ce
        ell = math.log1p(math.exp(ce)) if ce < 700 else ce
        x = z.float().requires_grad_(True)
        v = comp_sum_loss(x, y, 0.0)
        v.backward()
        if ell <= EXP_CAP:
            assert v.item() == pytest.approx(math.expm1(ell), rel=1e-5)
        else:
            assert v.item() == pytest.approx(
                math.expm1(EXP_CAP) + math.exp(EXP_CAP) * (ell - EXP_CAP), rel=1e-5
            )
            # slope in ℓ continuous at the cap: e^{cap}, times dℓ/dz = p − onehot = (−1, 1) here
            assert x.grad[0, 1].item() == pytest.approx(math.exp(EXP_CAP), rel=1e-4)
        assert torch.isfinite(x.grad).all()


# -- self_adjusting_dice --------------------------------------------------------------------


def dice_reference(z, y, alpha, smooth, square=False):
    p = softmax64(z)
    out = []
    for i in range(p.shape[0]):
        total = 0.0
        for c in range(p.shape[1]):
            pt = (1 - p[i, c]) ** alpha * p[i, c]
            t = 1.0 if c == y[i] else 0.0
            den = (pt**2 + t**2) if square else (pt + t)
            total += 1 - (2 * pt * t + smooth) / (den + smooth)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def dice_official(logits, target, alpha, smooth, square_denominator):
    """ShannonAI/dice_loss_for_NLP `DiceLoss._multiple_class` without OHEM and mask, then the mean
    (transcribed from loss/dice_loss.py)."""
    flat_input = torch.softmax(logits, dim=1)
    flat_target = F.one_hot(target, num_classes=logits.shape[-1]).float()
    loss = None
    for label_idx in range(logits.shape[-1]):
        fi = flat_input[:, label_idx].view(-1, 1)
        ft = flat_target[:, label_idx].view(-1, 1)
        fi = ((1 - fi) ** alpha) * fi
        inter = torch.sum(fi * ft, -1)
        if not square_denominator:
            li = 1 - ((2 * inter + smooth) / (fi.sum() + ft.sum() + smooth))
        else:
            li = 1 - (
                (2 * inter + smooth)
                / (torch.sum(torch.square(fi), -1) + torch.sum(torch.square(ft), -1) + smooth)
            )
        loss = li if loss is None else loss + li
    return loss.mean()


@pytest.mark.parametrize(
    "alpha, smooth, square", [(0.0, 1.0, False), (0.01, 1.0, False), (0.5, 1e-4, True), (2.0, 0.3, True)]
)
def test_dice_matches_formula_and_reductions(batch, alpha, smooth, square):
    z, y = batch
    ref = dice_reference(z, y, alpha, smooth, square)
    per = self_adjusting_dice_loss(z, y, alpha, smooth, square, reduction="none")
    assert per.shape == (8,) and torch.allclose(per.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(
        self_adjusting_dice_loss(z, y, alpha, smooth, square), ref.mean().float(), rtol=1e-5
    )
    assert torch.allclose(
        self_adjusting_dice_loss(z, y, alpha, smooth, square, reduction="sum"), ref.sum().float(), rtol=1e-5
    )
    term = SelfAdjustingDiceLoss(alpha, smooth, square)
    assert torch.allclose(term(step_of(z, y)), per)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.5])
def test_dice_squared_denominator_equals_the_official_code(batch, alpha):
    z, y = batch
    ours = self_adjusting_dice_loss(z, y, alpha, 1.0, square_denominator=True)
    assert torch.allclose(ours, dice_official(z, y, alpha, 1.0, True), rtol=1e-5)
    # the official non-squared path divides by batch sums: it is not the per-sample loss
    assert not torch.allclose(
        self_adjusting_dice_loss(z, y, alpha, 1.0), dice_official(z, y, alpha, 1.0, False)
    )
    # ... and with a batch of one sample the two agree
    assert torch.allclose(
        self_adjusting_dice_loss(z[:1], y[:1], alpha, 1.0),
        dice_official(z[:1], y[:1], alpha, 1.0, False),
        rtol=1e-5,
    )


def test_dice_limits(batch):
    z, y = batch
    p = torch.softmax(z.double(), -1)
    onehot = F.one_hot(y, 5).double()
    # α = 0 is the plain smoothed soft Dice of each sample
    plain = (1 - (2 * p * onehot + 1.0) / (p + onehot + 1.0)).sum(-1)
    assert torch.allclose(
        self_adjusting_dice_loss(z, y, 0.0, 1.0, reduction="none").double(), plain, atol=1e-6
    )
    # perfect predictions give 0 at α = 0 (any γ); wrong confident predictions give about 2·1/(1 + γ)
    perfect = F.one_hot(y, 5).float() * 60 - 30
    assert self_adjusting_dice_loss(perfect, y, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    wrong = F.one_hot((y + 1) % 5, 5).float() * 60 - 30
    assert self_adjusting_dice_loss(wrong, y, 0.0, 1.0).item() == pytest.approx(2 * (1 - 1 / 2), abs=1e-5)
    # α > 0: the target term is smallest at p_y = 1/(1 + α), where (1 − p)^α·p peaks
    alpha = 0.5
    grid = torch.linspace(-6, 6, 2401)
    two = torch.stack([grid, torch.zeros_like(grid)], -1)  # p_0 = sigmoid(grid)
    target = torch.zeros(len(grid), dtype=torch.long)
    p0 = torch.sigmoid(grid.double())
    target_term = 1 - (2 * (1 - p0) ** alpha * p0 + 1) / ((1 - p0) ** alpha * p0 + 2)
    best = p0[target_term.argmin()]
    assert best.item() == pytest.approx(1 / (1 + alpha), abs=2e-3)
    ours = self_adjusting_dice_loss(two, target, alpha, 1.0, reduction="none")
    p1 = 1 - p0
    other = 1 - 1 / ((1 - p1) ** alpha * p1 + 1)
    assert torch.allclose(ours.double(), target_term + other, atol=1e-6)


def test_dice_gradient_matches_an_independent_float64_autograd(batch):
    z, y = batch
    for alpha, square in ((0.0, False), (0.01, True), (0.7, False)):
        x = z.clone().requires_grad_(True)
        self_adjusting_dice_loss(x, y, alpha, 1.0, square, reduction="sum").backward()
        r = z.double().clone().requires_grad_(True)
        p = torch.softmax(r, -1)
        pt = (1 - p) ** alpha * p
        t = F.one_hot(y, 5).double()
        den = pt**2 + t**2 if square else pt + t
        (1 - (2 * pt * t + 1.0) / (den + 1.0)).sum().backward()
        assert torch.allclose(x.grad.double(), r.grad, rtol=1e-4, atol=1e-6)


def test_log_one_minus_softmax_is_exact_and_finite_at_saturation(batch):
    z, _ = batch
    assert torch.allclose(
        log_one_minus_softmax(z).double(), torch.log1p(-torch.softmax(z.double(), -1)), atol=1e-6
    )
    sat = torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], requires_grad=True)
    v = log_one_minus_softmax(sat)
    assert v[0, 0].item() == pytest.approx(-1e4, rel=1e-6)  # log(1 − p) = log Σ_others − lse
    (v * torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])).sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(sat.grad).all()


# -- bias_loss --------------------------------------------------------------------------------


def bias_reference(z, y, feats, alpha, beta, vmin=None):
    f = feats.double().reshape(feats.shape[0], -1).numpy()
    v = np.array([np.var(row, ddof=1) for row in f])
    lo, hi = v.min(), v.max()
    m = lo if vmin is None else vmin
    vh = (v - m) / (hi - lo) if hi > lo else np.zeros_like(v)
    w = np.exp(beta * vh) - 1 + alpha
    p = softmax64(z)
    ce = -np.log(p[np.arange(len(y)), y.numpy()])
    return torch.tensor(w * ce)


def bias_official(features, output, target, alpha, beta, mode, state):
    """lusinlu/bias-loss-skipblocknet `BiasLoss.forward` (transcribed from bias_loss/biasloss.py)."""
    f = features.clone().detach().reshape(features.shape[0], -1)
    v = torch.var(f, dim=1)
    mn, mx = v.clone().min(), v.clone().max()
    if mode == "global":
        if mn < state["global_min"]:
            state["global_min"] = mn
        vn = (v - state["global_min"]) / (mx - mn)
    else:
        vn = (v - mn) / (mx - mn)
    w = ((torch.exp(vn * beta) - 1.0) / 1.0) + alpha
    return (w * F.cross_entropy(output, target, reduction="none")).mean()


@pytest.fixture
def feats(rng):
    # per-sample spread differs: sample i scaled by (i + 1)/4
    return torch.randn(8, 3, 4, 4, generator=rng) * (torch.arange(1, 9).float() / 4).view(8, 1, 1, 1)


def test_bias_loss_matches_formula_and_reductions(batch, feats):
    z, y = batch
    for alpha, beta in ((0.3, 0.3), (0.1, 2.0), (1.0, 0.0)):
        ref = bias_reference(z, y, feats, alpha, beta)
        per = bias_loss(z, y, feats, alpha, beta, reduction="none")
        assert per.shape == (8,) and torch.allclose(per.double(), ref, rtol=1e-5)
        assert torch.allclose(bias_loss(z, y, feats, alpha, beta), ref.mean().float(), rtol=1e-5)
        assert torch.allclose(
            bias_loss(z, y, feats, alpha, beta, reduction="sum"), ref.sum().float(), rtol=1e-5
        )
    vmin = 0.01
    ref = bias_reference(z, y, feats, 0.3, 0.3, vmin)
    assert torch.allclose(
        bias_loss(z, y, feats, variance_min=vmin, reduction="none").double(), ref, rtol=1e-5
    )


def test_bias_loss_equals_the_official_code_in_both_modes(batch, feats, rng):
    z, y = batch
    assert torch.allclose(
        bias_loss(z, y, feats), bias_official(feats, z, y, 0.3, 0.3, "local", {}), rtol=1e-6
    )
    # "global": the term's running minimum over two batches against the official state
    term = BiasLoss(layer="f", normalisation="running_min").train()
    state = {"global_min": 100000}
    for scale in (1.0, 3.0):
        f = feats * scale + 0.1 * torch.randn(feats.shape, generator=rng)
        ours = term(step_of(z, y, {"f": f})).mean()
        assert torch.allclose(ours, bias_official(f, z, y, 0.3, 0.3, "global", state), rtol=1e-5)
    assert term.running_min.item() == pytest.approx(float(state["global_min"]), rel=1e-6)
    # the running minimum is saved with the module and restored
    other = BiasLoss(layer="f", normalisation="running_min")
    other.load_state_dict(term.state_dict())
    assert other.running_min == term.running_min
    # evaluation does not move it
    term.eval()
    term(step_of(z, y, {"f": feats * 1e-3}))
    assert term.running_min.item() == pytest.approx(float(state["global_min"]), rel=1e-6)


def test_bias_loss_limits_weights_and_no_gradient_through_them(batch, feats):
    z, y = batch
    ce = F.cross_entropy(z, y, reduction="none")
    # equal variances (and B = 1): every weight is α, the loss α·CE
    same = torch.randn(1, 3, 4, 4).expand(8, 3, 4, 4)
    assert torch.allclose(bias_loss(z, y, same, 0.3, 0.3, reduction="none"), 0.3 * ce, rtol=1e-6)
    assert torch.allclose(bias_loss(z[:1], y[:1], feats[:1], 0.5, 0.3, reduction="none"), 0.5 * ce[:1])
    # α = 1, β = 0 is plain cross-entropy
    assert torch.allclose(bias_loss(z, y, feats, 1.0, 0.0), F.cross_entropy(z, y))
    # weights monotone in the variance, from α to e^β − 1 + α
    v = feature_variance(feats)
    w = bias_weights(v, 0.3, 0.3)
    order = v.argsort()
    assert (w[order].diff() >= 0).all()
    assert w.min().item() == pytest.approx(0.3) and w.max().item() == pytest.approx(math.exp(0.3) - 1 + 0.3)
    # no gradient flows into the features; the logits get w·(softmax − onehot)/B
    f = feats.clone().requires_grad_(True)
    x = z.clone().requires_grad_(True)
    bias_loss(x, y, f).backward()
    assert f.grad is None
    expected = w[:, None] * (torch.softmax(z, -1) - F.one_hot(y, 5)) / 8
    assert torch.allclose(x.grad, expected, atol=1e-7)


# -- l2_svm -------------------------------------------------------------------------------------


def svm_reference(o, y, margin=1.0, penalty=1.0, class_mean=True):
    o = o.double().numpy()
    out = []
    for i in range(o.shape[0]):
        total = 0.0
        for c in range(o.shape[1]):
            t = 1.0 if c == y[i] else -1.0
            total += max(0.0, margin - t * o[i, c]) ** 2
        out.append(penalty * (total / o.shape[1] if class_mean else total))
    return torch.tensor(out)


def test_l2_svm_matches_formula_and_reductions(batch):
    z, y = batch
    for margin, penalty, mean in ((1.0, 1.0, True), (0.5, 3.0, False)):
        ref = svm_reference(z, y, margin, penalty, mean)
        red = "mean" if mean else "sum"
        per = l2_svm_loss(z, y, margin, penalty, class_reduction=red, reduction="none")
        assert per.shape == (8,) and torch.allclose(per.double(), ref, rtol=1e-6)
        assert torch.allclose(l2_svm_loss(z, y, margin, penalty, class_reduction=red), ref.mean().float())
        assert torch.allclose(
            l2_svm_loss(z, y, margin, penalty, class_reduction=red, reduction="sum"), ref.sum().float()
        )


def test_l2_svm_weston_watkins_equals_multi_margin_loss(batch):
    z, y = batch
    for margin in (1.0, 2.5):
        ours = l2_svm_loss(z, y, margin, multiclass="weston_watkins", reduction="none")
        assert torch.allclose(
            ours, F.multi_margin_loss(z, y, p=2, margin=margin, reduction="none"), atol=1e-6
        )
        summed = l2_svm_loss(z, y, margin, multiclass="weston_watkins", class_reduction="sum")
        assert torch.allclose(summed, 5 * F.multi_margin_loss(z, y, p=2, margin=margin), rtol=1e-6)


def test_l2_svm_equals_agarap_loss_with_the_weight_penalty(batch, rng):
    """AFAgarap/cnn-svm: reduce_mean(square(W)) + C·reduce_mean(square(max(0, 1 − y·o))), y ∈ {−1, +1}."""
    z, y = batch
    weight = torch.randn(5, 7, generator=rng)
    y_pm = F.one_hot(y, 5).float()
    y_pm[y_pm == 0] = -1
    for c in (1.0, 0.5):
        agarap = torch.mean(weight.square()) + c * torch.mean(torch.square(torch.clamp(1 - y_pm * z, min=0)))
        ours = l2_svm_loss(z, y, penalty=c, weight=weight, weight_penalty=1.0)
        assert torch.allclose(ours, agarap, rtol=1e-6)


def test_l2_svm_zero_beyond_the_margin_and_its_gradient(batch):
    z, y = batch
    safe = F.one_hot(y, 5).float() * 4 - 2  # +2 for the label, −2 elsewhere: every margin ≥ 1
    x = safe.clone().requires_grad_(True)
    v = l2_svm_loss(x, y)
    v.backward()
    assert v.item() == 0 and (x.grad == 0).all()
    # gradient −2·C/K·max(0, 1 − t·o)·t per element (batch mean: /B)
    x = z.clone().requires_grad_(True)
    l2_svm_loss(x, y, penalty=2.0).backward()
    t = F.one_hot(y, 5).float() * 2 - 1
    expected = -2 * 2.0 / 5 * (1 - t * z).clamp_min(0) * t / 8
    assert torch.allclose(x.grad, expected, atol=1e-7)


class _Holder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model


def test_l2_svm_term_finds_the_classifier(batch):
    from toolkit.models import create_model

    z, y = batch
    net = create_model("convnet", num_classes=5, in_chans=1, width=4)
    holder = _Holder(net)
    term = L2SVMLoss()
    per = term(step_of(z, y, module=holder))
    expected = l2_svm_loss(z, y, weight=net.fc.weight, weight_penalty=1.0, reduction="none")
    assert torch.allclose(per, expected)
    # the penalty's gradient reaches the classifier weight: 2·λ·W/numel (batch mean)
    per.mean().backward()
    assert torch.allclose(net.fc.weight.grad, 2 * net.fc.weight.detach() / net.fc.weight.numel())
    # an explicit path works the same; a layer that is not the classifier is refused
    assert torch.allclose(L2SVMLoss(head="fc")(step_of(z, y, module=holder)), per)
    with pytest.raises(ValueError, match="not a linear classifier"):
        L2SVMLoss(head="features.0")(step_of(z, y, module=holder))
    with pytest.raises(ValueError, match="no get_classifier"):
        L2SVMLoss()(step_of(z, y, module=_Holder(torch.nn.Linear(3, 5))))
    with pytest.raises(ValueError, match="weight_penalty=0"):
        L2SVMLoss()(step_of(z, y))
    # without the penalty no model is needed
    assert torch.allclose(L2SVMLoss(weight_penalty=0.0)(step_of(z, y)), svm_reference(z, y).float())


# -- shared: finiteness, errors, configs, Lightning -----------------------------------------


FUNCTIONS = {
    "comp_sum_0": lambda z, y: comp_sum_loss(z, y, 0.0),
    "comp_sum_1": lambda z, y: comp_sum_loss(z, y, 1.0),
    "comp_sum_1.5": lambda z, y: comp_sum_loss(z, y, 1.5),
    "comp_sum_2": lambda z, y: comp_sum_loss(z, y, 2.0),
    "dice_0": lambda z, y: self_adjusting_dice_loss(z, y, 0.0),
    "dice_0.01": lambda z, y: self_adjusting_dice_loss(z, y, 0.01, square_denominator=True),
    "dice_0.5": lambda z, y: self_adjusting_dice_loss(z, y, 0.5, 1e-4),
    "bias": lambda z, y: bias_loss(z, y, torch.arange(24.0).reshape(6, 4) ** 1.5),
    "l2_svm": lambda z, y: l2_svm_loss(z, y),
    "l2_svm_ww": lambda z, y: l2_svm_loss(z, y, multiclass="weston_watkins"),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_finite_for_extreme_logits_and_bf16(name, rng):
    fn = FUNCTIONS[name]
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    big = torch.randn(6, 10, generator=rng) * 1e4
    right = big.clone()
    right[torch.arange(6), y] = 3e4  # p_y = 1 exactly in float32
    for z in (big, -big, right, big.bfloat16(), right.bfloat16()):
        x = z.clone().requires_grad_(True)
        v = fn(x, y)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(x.grad).all(), name
        assert v.dtype == torch.float32
    z = torch.randn(6, 10, generator=rng)
    assert torch.allclose(fn(z.bfloat16(), y), fn(z.bfloat16().float(), y))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(FUNCTIONS)),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    seed=st.integers(0, 2**16),
    bf16=st.booleans(),
)
def test_property_finite_value_and_gradient(name, scale, seed, bf16):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 10, generator=g) * scale
    y = torch.randint(0, 10, (6,), generator=g)
    x = (z.bfloat16() if bf16 else z).requires_grad_(True)
    v = FUNCTIONS[name](x, y)
    v.backward()
    assert torch.isfinite(v) and v >= 0 and torch.isfinite(x.grad.float()).all()


def test_bias_loss_finite_for_bf16_and_large_features(batch, feats):
    z, y = batch
    for f in (feats.bfloat16(), feats * 1e4, feats.bfloat16() * 1e4):
        v = bias_loss(z.bfloat16(), y, f)
        assert torch.isfinite(v)


def test_bad_hyper_parameters_and_inputs_raise(batch, feats):
    z, y = batch
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            CompSumLoss(tau=bad)
        with pytest.raises(ValueError, match="tau"):
            comp_sum_loss(z, y, bad)
        with pytest.raises(ValueError, match="alpha"):
            SelfAdjustingDiceLoss(alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            BiasLoss(alpha=bad)
        with pytest.raises(ValueError, match="beta"):
            bias_loss(z, y, feats, beta=bad)
        with pytest.raises(ValueError, match="penalty"):
            L2SVMLoss(penalty=bad)
        with pytest.raises(ValueError, match="weight_penalty"):
            L2SVMLoss(weight_penalty=bad)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="smooth"):
            self_adjusting_dice_loss(z, y, smooth=bad)
        with pytest.raises(ValueError, match="margin"):
            l2_svm_loss(z, y, margin=bad)
    with pytest.raises(ValueError, match="multiclass"):
        L2SVMLoss(multiclass="crammer")
    with pytest.raises(ValueError, match="class_reduction"):
        l2_svm_loss(z, y, class_reduction="max")
    with pytest.raises(ValueError, match="normalisation"):
        BiasLoss(normalisation="global")
    with pytest.raises(ValueError, match="module path"):
        BiasLoss(layer="")
    with pytest.raises(ValueError, match="head"):
        L2SVMLoss(head="")
    with pytest.raises(ValueError, match="weight matrix"):
        l2_svm_loss(z, y, weight_penalty=1.0)
    with pytest.raises(ValueError, match="2 feature values"):
        bias_loss(z, y, torch.randn(8, 1))
    with pytest.raises(ValueError, match="feature rows"):
        bias_loss(z, y, feats[:4])
    with pytest.raises(ValueError, match="no tapped feature"):
        BiasLoss(layer="layer3")(step_of(z, y, {"features": feats}))
    fns = [
        lambda a, b: comp_sum_loss(a, b),
        lambda a, b: self_adjusting_dice_loss(a, b),
        lambda a, b: bias_loss(a, b, torch.randn(a.shape[0] if a.dim() else 1, 6)),
        lambda a, b: l2_svm_loss(a, b),
    ]
    for fn in fns:
        with pytest.raises(ValueError, match="class indices"):
            fn(z, torch.full((8,), 5))
        with pytest.raises(ValueError, match="class indices"):
            fn(z, torch.full((8,), -1))
        with pytest.raises(ValueError, match="target must be"):
            fn(z, y[:4])
        with pytest.raises(ValueError, match="class-index targets"):
            fn(z, F.one_hot(y, 5).float())
        with pytest.raises(ValueError, match="at least 2 classes"):
            fn(z[:, :1], torch.zeros(8, dtype=torch.long))
        with pytest.raises(ValueError, match=r"\(B, C\) logits"):
            fn(z.unsqueeze(0), y)
    for fn in (comp_sum_loss, self_adjusting_dice_loss, l2_svm_loss):
        with pytest.raises(ValueError, match="reduction"):
            fn(z, y, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        bias_loss(z, y, feats, reduction="avg")


def test_configs_build_and_registry(batch):
    z, y = batch
    for name in NAMES:
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg["method"] == name
        terms = build_terms(cfg["terms"])
        assert set(terms) == {name}
        assert type(terms[name][0]) is type(build("loss", name))
    dice = build_terms(yaml.safe_load((CONFIGS / "self_adjusting_dice.yaml").read_text())["terms"])
    term = dice["self_adjusting_dice"][0]
    assert (term.alpha, term.smooth, term.square_denominator) == (0.01, 1.0, True)
    bias = build_terms(yaml.safe_load((CONFIGS / "bias_loss.yaml").read_text())["terms"])["bias_loss"][0]
    assert bias.student_features == ("features",) and bias.normalisation == "running_min"


def test_classification_module_taps_the_student_feature_for_bias_loss():
    """A single-model module installs the term's student tap, runs the dry run and hands the
    feature to the term (the default layer fits the toolkit convnet)."""
    from toolkit.modules import ClassificationModule

    module = ClassificationModule(
        "convnet", num_classes=10, in_chans=1, model_kwargs={"width": 4}, loss="bias_loss"
    )
    x = torch.randn(6, 1, 8, 8)
    module.prepare(x)
    out = module.student_output(Batch(x, torch.arange(6)))
    assert set(out.features) == {"features"} and out.features["features"].shape == (6, 8, 2, 2)
    per = module.loss_terms["loss"](Step(Batch(x, torch.arange(6)), out, None, Progress(), module))
    expected = bias_loss(out.logits, torch.arange(6), out.features["features"], reduction="none")
    assert torch.allclose(per, expected)
    # a path the model lacks fails in the dry run with the closest module names
    bad = ClassificationModule("resnet8", num_classes=10, in_chans=1, loss="bias_loss")
    with pytest.raises(ValueError, match="no submodule 'features'"):
        bad.prepare(torch.randn(2, 1, 8, 8))
    ok = ClassificationModule(
        "resnet8", num_classes=10, in_chans=1, loss={"loss": "bias_loss", "layer": "layer3"}
    )
    ok.prepare(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize(
    "spec",
    [
        {"loss": "comp_sum", "tau": 1.5},
        {"loss": "self_adjusting_dice", "square_denominator": True},
        {"loss": "bias_loss", "normalisation": "running_min"},
        {"loss": "l2_svm"},
    ],
    ids=lambda s: s["loss"],
)
def test_short_lightning_run(spec, make_trainer):
    from toolkit.data import DigitsDataModule
    from toolkit.modules import ClassificationModule

    torch.manual_seed(0)
    module = ClassificationModule(
        "convnet", num_classes=10, in_chans=1, model_kwargs={"width": 4}, loss={"x": spec}
    )
    fc_before = module.model.fc.weight.detach().clone()
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss/x"]) and torch.isfinite(metrics["train/loss"])
    assert "val/acc" in metrics
    assert not torch.equal(module.model.fc.weight, fc_before)
    if spec["loss"] == "bias_loss":
        term = module.loss_terms["x"]
        assert math.isfinite(term.running_min.item()) and "loss_terms.x.running_min" in module.state_dict()


@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs_each_loss(name, tmp_path):
    from recipes import train

    res = train.main(
        [
            "--loss",
            name,
            "--data",
            "digits",
            "--fast",
            "--out",
            str(tmp_path / name),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["method"] == name and 0 <= res["acc"] <= 1
    assert (tmp_path / name / "results.json").exists()
