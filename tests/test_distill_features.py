"""Feature distillers: `fitnet` (FitNets hint loss) and `attention_transfer` (Zagoruyko & Komodakis).

Exact values against formulas restated here in NumPy (and the official attention-transfer code as
an oracle for mode "code"), limiting cases, reductions, bf16 and large activations, projectors
sized by the dry run and rebuilt from checkpoints, short Lightning runs and the set-up errors.
"""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import config_module

import toolkit.distill.attention  # noqa: F401 - registers "attention_transfer"
import toolkit.distill.fitnet  # noqa: F401 - registers "fitnet"
from toolkit import registry
from toolkit.data import DigitsDataModule
from toolkit.distill import Teacher
from toolkit.distill.attention import AttentionTransferLoss
from toolkit.distill.fitnet import FitNetLoss
from toolkit.functional.attention import attention_map, attention_transfer_loss
from toolkit.functional.fitnet import hint_loss
from toolkit.models import create_model
from toolkit.modules import DistillationModule
from toolkit.terms import Step
from toolkit.types import Batch, ModelOutput

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs" / "distill"


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# -- NumPy restatements of the papers' formulas ---------------------------------------------------
def np_hint(s, t):
    d = s.astype(np.float64) - t.astype(np.float64)
    return (d**2).reshape(d.shape[0], -1).sum(1) / np.prod(d.shape[1:])


def np_attention(a, p=2):
    q = (np.abs(a.astype(np.float64)) ** p).sum(1).reshape(a.shape[0], -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def np_at_loss(students, teachers, p=2, mode="paper"):
    total = 0.0
    for s, t in zip(students, teachers):
        d = np_attention(s, p) - np_attention(t, p)
        n = d.shape[1]
        total = total + (0.5 * np.linalg.norm(d, axis=1) / n if mode == "paper" else (d**2).sum(1) / n)
    return total


def official_at_loss(x, y):
    """szagoruyko/attention-transfer `utils.at_loss` (the code CRD and mdistiller copy)."""

    def at(z):
        return F.normalize(z.pow(2).mean(1).view(z.size(0), -1))

    return (at(x) - at(y)).pow(2).mean()


# -- fitnet: functional -------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (5, 7), (3, 4, 6)])
def test_hint_loss_matches_numpy_and_mse(shape):
    s, t = rand(*shape, seed=1), rand(*shape, seed=2)
    per = hint_loss(s, t, reduction="none")
    np.testing.assert_allclose(per.numpy(), np_hint(s.numpy(), t.numpy()), rtol=1e-6)
    assert per.shape == (shape[0],)
    assert torch.allclose(hint_loss(s, t), F.mse_loss(s, t), rtol=1e-6)
    assert torch.allclose(hint_loss(s, t, reduction="mean"), per.mean())
    assert torch.allclose(hint_loss(s, t, reduction="sum"), per.sum())
    # the paper's ½·‖·‖² summed over elements is (C·H·W / 2) times the per-sample mean
    half_sq = 0.5 * ((s - t) ** 2).flatten(1).sum(1)
    assert torch.allclose(half_sq, per * np.prod(shape[1:]) / 2, rtol=1e-5)


def test_hint_loss_limits_numerics_and_errors():
    x = rand(3, 4, 5, 5)
    assert hint_loss(x, x.clone()).item() == 0.0
    assert (hint_loss(x, rand(3, 4, 5, 5, seed=3), reduction="none") >= 0).all()
    big_s, big_t = rand(2, 3, 4, 4, seed=4, scale=1e4), rand(2, 3, 4, 4, seed=5, scale=1e4)
    out = hint_loss(big_s, big_t, reduction="none")
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), np_hint(big_s.numpy(), big_t.numpy()), rtol=1e-5)
    bf = hint_loss(big_s.bfloat16(), big_t.bfloat16())
    assert bf.dtype == torch.float32 and torch.isfinite(bf)
    assert bf.item() == pytest.approx(hint_loss(big_s, big_t).item(), rel=2e-2)
    with pytest.raises(ValueError, match="equal shapes.*regressor"):
        hint_loss(rand(2, 3, 4, 4), rand(2, 5, 4, 4))
    with pytest.raises(ValueError, match="reduction"):
        hint_loss(x, x, reduction="batchmean")


# -- attention transfer: functional -------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 3])
def test_attention_map_matches_numpy(p):
    a = rand(3, 5, 4, 6, seed=p)
    q = attention_map(a, p=p)
    assert q.shape == (3, 24)
    np.testing.assert_allclose(q.numpy(), np_attention(a.numpy(), p), rtol=1e-5, atol=1e-7)
    raw = attention_map(a, p=p, normalize=False)
    np.testing.assert_allclose(raw.numpy(), (np.abs(a.numpy()) ** p).sum(1).reshape(3, -1), rtol=1e-5)
    assert torch.allclose(q.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_attention_transfer_matches_numpy_over_pairs(mode):
    s = [rand(4, 3, 8, 8, seed=1), rand(4, 6, 4, 4, seed=2)]
    t = [rand(4, 5, 8, 8, seed=3), rand(4, 7, 4, 4, seed=4)]  # channel counts may differ
    per = attention_transfer_loss(s, t, reduction="none", mode=mode)
    expect = np_at_loss([x.numpy() for x in s], [x.numpy() for x in t], mode=mode)
    np.testing.assert_allclose(per.numpy(), expect, rtol=1e-5)
    assert torch.allclose(attention_transfer_loss(s, t, mode=mode), per.mean())
    assert torch.allclose(attention_transfer_loss(s, t, reduction="sum", mode=mode), per.sum())
    # a single pair may be given as tensors
    one = attention_transfer_loss(s[0], t[0], reduction="none", mode=mode)
    np.testing.assert_allclose(one.numpy(), np_at_loss([s[0].numpy()], [t[0].numpy()], mode=mode), rtol=1e-5)


def test_attention_transfer_beta_scales_match_official_code_and_paper():
    s = [rand(8, 3, 8, 8, seed=5), rand(8, 4, 4, 4, seed=6)]
    t = [rand(8, 6, 8, 8, seed=7), rand(8, 8, 4, 4, seed=8)]
    beta = 1000.0
    # mode "code" with weight β is exactly the official `β * sum(at_loss(x, y))` (= mdistiller FEAT_WEIGHT)
    official = beta * sum(official_at_loss(x, y) for x, y in zip(s, t))
    assert torch.allclose(beta * attention_transfer_loss(s, t, mode="code"), official, rtol=1e-5)
    # mode "paper" with weight β is eq. 2, β/2·Σ_j ‖Q̂_s − Q̂_t‖₂ summed over the batch, with the paper's
    # β_j = 10³ / (elements of the attention map · batch size)
    b = s[0].shape[0]
    paper = 0.0
    for x, y in zip(s, t):
        d = np_attention(x.numpy()) - np_attention(y.numpy())
        beta_j = 1e3 / (d.shape[1] * b)
        paper += (beta_j / 2 * np.linalg.norm(d, axis=1)).sum()
    assert (beta * attention_transfer_loss(s, t, mode="paper")).item() == pytest.approx(paper, rel=1e-5)


def test_attention_transfer_limits():
    a = rand(3, 4, 6, 6, seed=9)
    t = rand(3, 8, 6, 6, seed=10)
    for mode in ("paper", "code"):
        assert attention_transfer_loss(a, a.clone(), mode=mode).item() == pytest.approx(0.0, abs=1e-7)
        # invariant to a positive rescaling of either map (per sample, too) and to the sign of activations
        base = attention_transfer_loss(a, t, reduction="none", mode=mode)
        scale = torch.tensor([0.01, 3.0, 250.0]).view(3, 1, 1, 1)
        assert torch.allclose(
            attention_transfer_loss(a * scale, t, reduction="none", mode=mode), base, rtol=1e-5
        )
        assert torch.allclose(
            attention_transfer_loss(a, 7.0 * t, reduction="none", mode=mode), base, rtol=1e-5
        )
        assert torch.allclose(attention_transfer_loss(-a, t, reduction="none", mode=mode), base, rtol=1e-5)
        # bounded: the normalised maps are non-negative unit vectors, so ‖Q̂_s − Q̂_t‖₂ ≤ √2
        bound = 0.5 * 2**0.5 / 36 if mode == "paper" else 2.0 / 36
        assert (base >= 0).all() and (base <= bound + 1e-7).all()
    # the gradient at a perfect match is zero and finite (the L2 norm is not differentiable at 0)
    x = a.clone().requires_grad_(True)
    attention_transfer_loss(x, a, mode="paper").backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0


def test_attention_transfer_resizes_the_student_map():
    s_big, t = rand(2, 3, 8, 8, seed=11), rand(2, 5, 4, 4, seed=12)
    # larger student: its attention energy Σ_c A_c² is average-pooled 2×2 to the teacher's 4×4
    e = (s_big.numpy().astype(np.float64) ** 2).sum(1)
    pooled = e.reshape(2, 4, 2, 4, 2).mean((2, 4))
    q_s = pooled.reshape(2, -1) / np.linalg.norm(pooled.reshape(2, -1), axis=1, keepdims=True)
    d = q_s - np_attention(t.numpy())
    expect = 0.5 * np.linalg.norm(d, axis=1) / 16
    np.testing.assert_allclose(attention_transfer_loss(s_big, t, reduction="none").numpy(), expect, rtol=1e-5)
    # smaller student: bilinearly upsampled; a constant map stays constant
    flat_s = torch.ones(2, 3, 2, 2)
    flat_t = torch.ones(2, 4, 8, 8)
    assert attention_transfer_loss(flat_s, flat_t).item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(attention_transfer_loss(rand(2, 3, 2, 2), rand(2, 4, 8, 8)))


def test_attention_transfer_numerics():
    s, t = rand(4, 8, 6, 6, seed=13), rand(4, 16, 6, 6, seed=14)
    ref = attention_transfer_loss(s, t, reduction="none")
    bf = attention_transfer_loss(s.bfloat16(), t.bfloat16(), reduction="none")
    assert bf.dtype == torch.float32 and torch.isfinite(bf).all()
    assert torch.allclose(bf, ref, rtol=5e-2, atol=1e-5)
    # activations whose squares overflow float32 (1e20² = 1e40) give the same value (scale invariance)
    huge = attention_transfer_loss(s * 1e20, t * 1e20, reduction="none")
    assert torch.isfinite(huge).all() and torch.allclose(huge, ref, rtol=1e-5)
    # all-zero (dead ReLU) maps: finite values and gradients
    z = torch.zeros(4, 8, 6, 6, requires_grad=True)
    out = attention_transfer_loss(z, t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()


def test_attention_transfer_bad_inputs():
    x = rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\).*\(2, 10\)"):
        attention_transfer_loss(rand(2, 10), x)
    with pytest.raises(ValueError, match="2 student and 1 teacher"):
        attention_transfer_loss([x, x], [x])
    with pytest.raises(ValueError, match="batch"):
        attention_transfer_loss(x, rand(3, 3, 4, 4))
    with pytest.raises(ValueError, match="p must be >= 1"):
        attention_transfer_loss(x, x, p=0.5)
    with pytest.raises(ValueError, match="mode"):
        attention_transfer_loss(x, x, mode="squared")
    with pytest.raises(ValueError, match="reduction"):
        attention_transfer_loss(x, x, reduction="avg")


# -- terms on hand-made steps ---------------------------------------------------------------------
def step_with(student_feats, teacher_feats, b=4):
    logits = torch.zeros(b, 10)
    return Step(
        Batch(torch.zeros(b, 1, 8, 8)),
        ModelOutput(logits, None, student_feats),
        ModelOutput(logits, None, teacher_feats),
    )


def test_fitnet_term_with_identity_regressor_is_zero_on_matching_features():
    feat = rand(4, 6, 5, 5, seed=15).relu()  # a post-ReLU hint
    term = FitNetLoss("s", "t")
    step = step_with({"s": feat}, {"t": feat})
    term.setup(step)
    proj = term.projectors["hint"]
    conv, bn = proj.proj
    assert (conv.in_channels, conv.out_channels) == (6, 6)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
    term.eval()  # BatchNorm with its initial running statistics (0, 1): y = x / sqrt(1 + eps)
    expected = np_hint(feat.numpy() / np.sqrt(1 + bn.eps), feat.numpy())
    out = term(step).detach()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-12)
    assert out.max().item() < 1e-9
    # and the term's value is the functional hint loss of the regressed feature
    other = rand(4, 6, 5, 5, seed=16).relu()
    step2 = step_with({"s": other}, {"t": feat})
    assert torch.allclose(term(step2), hint_loss(term.regressed(other), feat, reduction="none"))


def test_fitnet_setup_sizes_projector_and_warns_on_negative_hints():
    s, t = rand(2, 4, 8, 8, seed=17), rand(2, 16, 4, 4, seed=18)
    term = FitNetLoss("s", "t")
    with pytest.warns(UserWarning, match="negative values.*relu=False"):
        term.setup(step_with({"s": s}, {"t": t}, b=2))
    conv = term.projectors["hint"].proj[0]
    assert (conv.in_channels, conv.out_channels) == (4, 16)
    assert term(step_with({"s": s}, {"t": t}, b=2)).shape == (2,)
    quiet = FitNetLoss("s", "t", relu=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.setup(step_with({"s": s}, {"t": t}, b=2))
    # linear features get a linear regressor
    lin = FitNetLoss("s", "t", relu=False)
    lin.setup(step_with({"s": rand(3, 5)}, {"t": rand(3, 7)}, b=3))
    assert isinstance(lin.projectors["hint"].proj, torch.nn.Linear)


def test_terms_are_registered_and_validate_arguments():
    assert {"fitnet", "attention_transfer"} <= set(registry.names("distiller"))
    term = registry.build(
        "distiller", "attention_transfer", student_layers=["a", "b"], teacher_layers=["c", "d"]
    )
    assert (
        term.student_features == ("a", "b") and term.teacher_features == ("c", "d") and term.mode == "paper"
    )
    assert registry.build("distiller", "fitnet", student_layer="a", teacher_layer="b").teacher_features == (
        "b",
    )
    with pytest.raises(ValueError, match="2 student_layers.*1 teacher_layers"):
        AttentionTransferLoss(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="at least one"):
        AttentionTransferLoss([], [])
    with pytest.raises(ValueError, match="mode"):
        AttentionTransferLoss(["a"], ["b"], mode="both")
    with pytest.raises(ValueError, match="module path"):
        FitNetLoss("", "layer2")
    with pytest.raises(TypeError, match="teacher_layer"):
        registry.build("distiller", "fitnet", student_layer="a")


# -- through DistillationModule ---------------------------------------------------------------------
def teacher_net(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=10, in_chans=1)


FITNET = {"distiller": "fitnet", "weight": 1.0, "student_layer": "features.3", "teacher_layer": "layer2"}
AT = {
    "distiller": "attention_transfer",
    "weight": 1.0,
    "student_layers": ["features.3", "features.7", "features.3"],
    "teacher_layers": ["layer2", "layer3", "layer1"],
}


def module(terms, teacher=None, seed=1):
    torch.manual_seed(seed)
    return DistillationModule(
        "convnet",
        teacher or Teacher(teacher_net()),
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        optimizer={"name": "adam", "lr": 0.01},
        terms=terms,
    )


def fitnet_terms():
    return {"ce": {"loss": "cross_entropy", "weight": 1.0}, "fitnet": dict(FITNET)}


def test_projector_sized_by_dry_run_and_rebuilt_by_strict_load():
    m = module(fitnet_terms())
    m.prepare(torch.randn(2, 1, 8, 8))
    conv = m.loss_terms["fitnet"].projectors["hint"].proj[0]
    # convnet width 4: features.3 is 4×4×4; resnet8 layer2 is 32×4×4
    assert (conv.in_channels, conv.out_channels) == (4, 32)
    state = m.state_dict()
    assert any(k.startswith("loss_terms.fitnet.projectors.") for k in state)
    assert not any("teacher" in k for k in state)
    fresh = module(fitnet_terms(), teacher=m.teacher, seed=5)  # no dry run: no projector yet
    assert "hint" not in fresh.loss_terms["fitnet"].projectors
    fresh.load_state_dict(state, strict=True)
    for k, v in state.items():
        other = fresh.state_dict()[k]
        assert torch.equal(v, other) if torch.is_tensor(v) else v == other, k
    x = torch.randn(2, 1, 8, 8)
    m.eval(), fresh.eval()
    assert torch.equal(m(x), fresh(x))


@pytest.mark.parametrize("name,entry", [("fitnet", FITNET), ("attention_transfer", AT)])
def test_short_lightning_run(name, entry, make_trainer, tmp_path):
    m = module({"ce": {"loss": "cross_entropy", "weight": 1.0}, name: dict(entry)})
    seen = []

    class Watch(__import__("lightning").pytorch.callbacks.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["loss"].detach())

    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[Watch()])
    trainer.fit(m, datamodule=DigitsDataModule(batch_size=64))
    assert len(seen) == 3 and all(torch.isfinite(v) for v in seen)
    assert f"train/loss/{name}" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics[f"train/loss/{name}"])
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    term_params = list(m.loss_terms[name].parameters())
    if name == "fitnet":
        assert term_params and {id(p) for p in term_params} <= opt_params
        # the Lightning checkpoint holds the projector and reloads strictly with a fresh module
        path = tmp_path / "fitnet.ckpt"
        trainer.save_checkpoint(path)
        loaded = DistillationModule.load_from_checkpoint(
            path, teacher=m.teacher, terms={"ce": {"loss": "cross_entropy"}, "fitnet": dict(FITNET)}
        )
        for k, v in m.state_dict().items():
            other = loaded.state_dict()[k]
            assert torch.equal(v, other) if torch.is_tensor(v) else v == other, k
    else:
        assert term_params == []  # no trainable parts


def test_bf16_mixed_run_is_finite(make_trainer):
    m = module({"ce": {"loss": "cross_entropy"}, "fitnet": dict(FITNET), "attention_transfer": dict(AT)})
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, precision="bf16-mixed")
    trainer.fit(m, datamodule=DigitsDataModule(batch_size=64))
    for name in ("fitnet", "attention_transfer"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss/{name}"])
    assert all(torch.isfinite(p).all() for p in m.parameters())


def fit_error(make_trainer, terms):
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module(terms), datamodule=DigitsDataModule(batch_size=64))


def test_setup_errors_are_clear(make_trainer):
    # a wrong module path names the closest paths and the top-level modules, on either side
    with pytest.raises(
        ValueError,
        match=r"ConvNet has no submodule 'features\.77'.*features\.7.*Top-level modules: features, fc",
    ):
        fit_error(make_trainer, {"f": {**FITNET, "student_layer": "features.77"}})
    with pytest.raises(
        ValueError, match=r"CifarResNet has no submodule 'layer22'.*layer2.*Top-level modules: conv1"
    ):
        fit_error(make_trainer, {"a": {**AT, "teacher_layers": ["layer1", "layer22", "layer3"]}})
    # feature maps of the wrong rank: a linear layer's output for attention transfer
    with pytest.raises(ValueError, match=r"4-D.*student layer 'fc' gives shape \(2, 10\)"):
        fit_error(make_trainer, {"a": {**AT, "student_layers": ["fc", "features.7", "features.3"]}})
    with pytest.raises(ValueError, match=r"4-D.*teacher layer 'fc'"):
        fit_error(make_trainer, {"a": {**AT, "teacher_layers": ["fc", "layer3", "layer1"]}})
    with pytest.raises(
        ValueError, match=r"fitnet cannot regress student layer 'fc' \(2, 10\) onto teacher layer 'layer2'"
    ):
        fit_error(make_trainer, {"f": {**FITNET, "student_layer": "fc"}})
    # mismatched list lengths fail when the module is built
    with pytest.raises(ValueError, match="pairs layers one to one"):
        module({"a": {**AT, "teacher_layers": ["layer1"]}})
    # an ensemble teacher keys its features by member: a clear error instead of a KeyError
    ens = Teacher([teacher_net(0), teacher_net(1)])
    with pytest.raises(ValueError, match="not an ensemble"):
        module({"f": dict(FITNET)}, teacher=ens).prepare(torch.randn(2, 1, 8, 8))


# -- configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fitnet", "attention_transfer"])
def test_demo_configs_build_on_fashion_mnist_shapes(name):
    cfg, m = config_module_on(name, (2, 1, 28, 28), "fashion_mnist")
    assert cfg["method"] == name and name in m.loss_terms
    # both on top of the demonstration's KD (0.5·CE + 0.5·KD at τ = 1)
    assert cfg["terms"]["ce"]["weight"] == cfg["terms"]["kd"]["weight"] == 0.5
    assert cfg["terms"]["kd"]["temperature"] == 1.0
    if name == "fitnet":
        conv = m.loss_terms["fitnet"].projectors["hint"].proj[0]
        # the student's middle layer (w8 block 1, 14×14) -> the teacher's (w16 block 2, 7×7)
        assert (conv.in_channels, conv.out_channels) == (8, 32)
    else:
        at = cfg["terms"]["attention_transfer"]
        assert (at["mode"], at["weight"]) == ("code", 10.0)


@pytest.mark.parametrize("name", ["fitnet_cifar100", "attention_transfer_cifar100"])
def test_cifar100_configs_match_the_benchmark_setting(name):
    cfg, m = config_module_on(name, (2, 3, 32, 32), "cifar100")
    assert cfg["student"] == "resnet8x4" and cfg["teacher_train"]["model"] == "resnet32x4"
    assert cfg["terms"]["ce"]["weight"] == 1.0
    if name == "fitnet_cifar100":
        assert cfg["terms"]["fitnet"]["weight"] == 100.0
        conv = m.loss_terms["fitnet"].projectors["hint"].proj[0]
        assert (conv.in_channels, conv.out_channels) == (128, 128)
    else:
        term = m.loss_terms["attention_transfer"]
        assert cfg["terms"]["attention_transfer"]["weight"] == 1000.0 and term.mode == "code"
        assert term.student_layers == term.teacher_layers == ["layer1", "layer2", "layer3"]


def config_module_on(name, input_shape, data_name):
    cfg, m = config_module(name, input_shape)
    assert cfg["data"] == data_name
    return cfg, m
