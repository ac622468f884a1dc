"""TGeo-KD: the fused loss and its features against formulas, the ratio network and its bilevel
meta step, a real run, and checkpoint/resume."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import StopAfter
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import toolkit.distill.tgeo_kd  # noqa: F401 - registers tgeo_kd
from toolkit import Progress, Step, build
from toolkit.data import DigitsDataModule
from toolkit.distill import Teacher
from toolkit.distill.tgeo_kd import FusionRatioNet, TGeoKDLoss
from toolkit.functional import cross_entropy, kd_loss
from toolkit.functional.tgeo_kd import tgeo_features, tgeo_kd_loss
from toolkit.models import create_model
from toolkit.modules import DistillationModule
from toolkit.modules.config import build_terms
from toolkit.types import Batch, ModelOutput

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "distill"


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def batch(rng):
    s = torch.randn(8, 5, generator=rng) * 3
    t = torch.randn(8, 5, generator=rng) * 3
    y = torch.tensor([0, 4, 3, 2, 2, 1, 1, 0])
    return s, t, y


# -- the fused loss -----------------------------------------------------------------------------
def test_loss_matches_formula_limits_and_reductions(batch, rng):
    s, t, y = batch
    tau = 2.0
    alpha = torch.rand(8, generator=rng)
    ps, pt = np_softmax(s.numpy() / tau), np_softmax(t.numpy() / tau)
    kl = tau**2 * (pt * (np.log(pt) - np.log(ps))).sum(-1)
    ce = -np.log(np_softmax(s.numpy())[np.arange(8), y.numpy()])
    expected = alpha.numpy() * kl + (1 - alpha.numpy()) * ce
    got = tgeo_kd_loss(s, t, y, alpha, tau, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert tgeo_kd_loss(s, t, y, alpha, tau).item() == pytest.approx(expected.mean(), rel=1e-5)
    assert tgeo_kd_loss(s, t, y, alpha, tau, reduction="sum").item() == pytest.approx(
        expected.sum(), rel=1e-5
    )
    # α = 0: cross-entropy; α = 1: KD; a constant α: classical KD, per sample
    assert torch.allclose(tgeo_kd_loss(s, t, y, 0.0, tau, "none"), cross_entropy(s, y, reduction="none"))
    assert torch.allclose(tgeo_kd_loss(s, t, y, 1.0, tau, "none"), kd_loss(s, t, tau, reduction="none"))
    const = 0.3 * kd_loss(s, t, tau, reduction="none") + 0.7 * cross_entropy(s, y, reduction="none")
    assert torch.allclose(tgeo_kd_loss(s, t, y, torch.full((8,), 0.3), tau, "none"), const, atol=1e-6)
    # a (B, 1) ratio, as the network returns before squeezing, is accepted
    assert torch.allclose(tgeo_kd_loss(s, t, y, alpha.unsqueeze(-1), tau, "none"), got)
    # gradient w.r.t. the student: α·τ·(p_s^τ − p_t^τ) + (1 − α)·(softmax(s) − onehot)
    sg = s.clone().requires_grad_(True)
    tgeo_kd_loss(sg, t, y, alpha, tau, reduction="sum").backward()
    a = alpha.unsqueeze(-1)
    ref = a * tau * (torch.softmax(s / tau, -1) - torch.softmax(t / tau, -1)) + (1 - a) * (
        torch.softmax(s, -1) - F.one_hot(y, 5)
    )
    assert torch.allclose(sg.grad, ref, atol=1e-5)


def test_features_match_the_official_layout(batch, rng):
    s, t, y = batch
    means = torch.softmax(torch.randn(5, 5, generator=rng), -1)
    feats = tgeo_features(s, t, y, means)
    assert feats.shape == (8, 45) and feats.dtype == torch.float32
    S, T, M = np_softmax(s.numpy()), np_softmax(t.numpy()), means.double().numpy()
    for i in range(8):  # a loop over samples, as the official `_x_in` row by row
        G = np.eye(5)[y[i].item()]
        Tb = M[y[i].item()]
        row = np.concatenate(
            [
                S[i],
                T[i],
                Tb,
                G,
                abs(S[i] - G),
                abs(S[i] - T[i]),
                abs(S[i] - Tb),
                (G - Tb) * (G - S[i]),
                (G - T[i]) * (G - S[i]),
            ]
        )
        np.testing.assert_allclose(feats[i].numpy(), row, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"class_means must be \(C, C\)"):
        tgeo_features(s, t, y, means[:3])


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_finite_for_extreme_logits_and_bf16(rng, reduction):
    s = torch.randn(6, 10, generator=rng) * 1e4
    t = torch.randn(6, 10, generator=rng) * 1e4
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    alpha = torch.rand(6, generator=rng)
    for a, b in ((s, t), (s.bfloat16(), t.bfloat16())):
        a = a.clone().requires_grad_(True)
        v = tgeo_kd_loss(a, b, y, alpha, 4.0, reduction)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(a.grad).all() and v.dtype == torch.float32
        f = tgeo_features(a.detach(), b, y, torch.full((10, 10), 0.1))
        assert torch.isfinite(f).all()


def test_bad_inputs_and_arguments_raise(batch):
    s, t, y = batch
    with pytest.raises(ValueError, match="ratio must be in"):
        tgeo_kd_loss(s, t, y, 1.5)
    with pytest.raises(ValueError, match="ratio must be a number or a"):
        tgeo_kd_loss(s, t, y, torch.rand(3))
    with pytest.raises(ValueError, match="temperature"):
        tgeo_kd_loss(s, t, y, 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        tgeo_kd_loss(s, t, y, 0.5, reduction="avg")
    with pytest.raises(ValueError, match="class indices"):
        tgeo_kd_loss(s, t, torch.full((8,), 5), 0.5)
    with pytest.raises(ValueError, match="same classes"):
        tgeo_kd_loss(s, t[:, :3], y, 0.5)
    for kw, match in [
        ({"temperature": -1.0}, "temperature"),
        ({"hidden": 0}, "hidden"),
        ({"meta_lr": 0.0}, "meta_lr"),
        ({"meta_weight_decay": -1.0}, "meta_weight_decay"),
        ({"inner_lr": -0.1}, "inner_lr"),
        ({"meta_source": "test"}, "meta_source"),
        ({"meta_every": 0}, "meta_every"),
    ]:
        with pytest.raises(ValueError, match=match):
            TGeoKDLoss(**kw)


# -- the term -----------------------------------------------------------------------------------
def _step(s, t, y, module=None):
    return Step(Batch(None, y), ModelOutput(s), ModelOutput(t), Progress(), module)


def test_ratio_in_unit_interval_constant_net_is_kd_and_permutation_equivariant(batch):
    s, t, y = batch
    term = build("distiller", "tgeo_kd", temperature=2.0, hidden=16)
    assert isinstance(term, TGeoKDLoss) and term.needs_teacher and term.needs_target
    term.setup(_step(s, t, y))
    net = term.ratio_net
    assert isinstance(net, FusionRatioNet) and not any(p.requires_grad for p in net.parameters())
    term.eval()  # no online class-mean update: a pure function of its inputs
    feats = tgeo_features(s, t, y, net.class_means())
    alpha = net(feats)
    assert alpha.shape == (8,) and ((alpha > 0) & (alpha < 1)).all()
    perm = torch.randperm(8)
    assert torch.allclose(net(feats[perm]), alpha[perm])
    # a constant network σ(c): the term is classical KD with α = σ(c)
    with torch.no_grad():
        net.net[2].weight.zero_()
        net.net[2].bias.fill_(0.4)
    a = torch.sigmoid(torch.tensor(0.4)).item()
    expected = a * kd_loss(s, t, 2.0, reduction="none") + (1 - a) * cross_entropy(s, y, reduction="none")
    assert torch.allclose(term(_step(s, t, y)), expected, atol=1e-6)
    # the student gets gradient only through the loss, never into the ratio network
    sg = s.clone().requires_grad_(True)
    term(_step(sg, t, y)).sum().backward()
    assert sg.grad is not None and all(p.grad is None for p in net.parameters())


def test_online_class_means_when_no_data_pass(batch):
    s, t, y = batch
    term = TGeoKDLoss(hidden=4)
    term.setup(_step(s, t, y))
    term.train()
    term(_step(s, t, y))  # training without a module: no meta step, T̄ accumulated from the batch
    probs = torch.softmax(t, -1)
    for c in range(5):
        rows = probs[y == c]
        assert torch.allclose(term.ratio_net.class_means()[c], rows.mean(0), atol=1e-6)
    assert term.meta_steps == 0 and term.calls == 0


class _Module(nn.Module):
    """The least a module needs for the meta step: the student in `.model`, no trainer."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def test_meta_step_lowers_the_ratio_for_a_misleading_teacher(rng):
    """A teacher that points every sample at a wrong class: KD on it raises the held-out CE, so the
    hypergradient says "trust the label more" and one meta step lowers every α."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(32, 6, generator=rng)
    w_true = torch.randn(6, 4, generator=rng)
    y = (x @ w_true).argmax(-1)
    t = F.one_hot((y + 1) % 4, 4).float() * 8.0  # confidently wrong
    term = TGeoKDLoss(hidden=8, meta_lr=0.05, inner_lr=1.0, meta_source="train")
    module = _Module(student)
    logits = student(x)
    step = Step(Batch(x, y), ModelOutput(logits), ModelOutput(t), Progress(), module)
    term.setup(step)
    term.train()
    net = term.ratio_net
    before = net(tgeo_features(logits.detach(), t, y, net.class_means())).detach()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    term(step)
    after = net(tgeo_features(logits.detach(), t, y, net.class_means())).detach()
    assert term.meta_steps == 1 and term.calls == 1
    assert (after < before).all()
    # the student itself is untouched by the look-ahead
    for k, v in student.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(p.grad is None for p in student.parameters())


def digits(**kw):
    kw.setdefault("batch_size", 64)
    return DigitsDataModule(val_split=0.2, seed=0, **kw)


def tgeo_module(seed=1, **term_kw):
    torch.manual_seed(0)
    teacher = Teacher(create_model("resnet8", num_classes=10, in_chans=1))
    torch.manual_seed(seed)
    return DistillationModule(
        "convnet",
        teacher,
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms={"tgeo_kd": {"distiller": "tgeo_kd", "hidden": 16, **term_kw}},
        optimizer={"name": "adam", "lr": 0.01},
    )


def test_short_lightning_run_updates_only_through_the_meta_step(make_trainer):
    module = tgeo_module(meta_lr=0.01)
    dm = digits()
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    term = module.loss_terms["tgeo_kd"]
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    for name in ("train/loss/tgeo_kd", "train/tgeo_kd/alpha", "train/tgeo_kd/meta_loss", "val/acc"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert term.meta_steps == 3 and term.calls == 3
    net = term.ratio_net
    # T̄ from a full teacher pass over the training set: every training sample counted once
    assert bool(net.means_final) and int(net.class_counts.sum()) == len(dm.train_set)
    assert torch.allclose(net.class_means().sum(-1), torch.ones(10), atol=1e-5)
    # the ratio network moved (meta step), its parameters never got a gradient from the main loss
    fresh = tgeo_module(meta_lr=0.01).loss_terms["tgeo_kd"]
    fresh.setup(Step(Batch(None), ModelOutput(torch.zeros(1, 10)), None))
    assert not torch.allclose(net.net[0].weight, fresh.ratio_net.net[0].weight)
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    # the meta-optimiser's Adam state is in the module's state_dict
    extra = module.state_dict()["loss_terms.tgeo_kd._extra_state"]
    assert extra["meta_steps"] == 3 and extra["optimizer"]["state"][0]["step"].item() == 3


def test_validation_on_the_test_split_is_refused(make_trainer):
    module = tgeo_module()
    dm = DigitsDataModule(batch_size=64, val_split=0, seed=0)
    with pytest.raises(ValueError, match="val_split"):
        make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(module, datamodule=dm)
    # meta_source="train" needs no held-out data
    make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
        tgeo_module(meta_source="train"), datamodule=dm
    )


def _final_state(tmp_path, stop_after=None):
    kw = dict(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=1,
        deterministic=True,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    L.seed_everything(7, workers=True)
    module = tgeo_module(meta_lr=0.01)
    if stop_after is None:
        L.Trainer(enable_checkpointing=False, **kw).fit(module, datamodule=digits())
        return module
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[ckpt, StopAfter(stop_after)], **kw).fit(module, datamodule=digits())
    torch.manual_seed(12345)
    L.seed_everything(7, workers=True)
    resumed = tgeo_module(seed=99, meta_lr=0.01)
    L.Trainer(callbacks=[ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)], **kw).fit(
        resumed, datamodule=digits(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    return resumed


def test_checkpoint_resume_continues_exactly(tmp_path):
    straight = _final_state(tmp_path / "a")
    resumed = _final_state(tmp_path / "b", stop_after=1)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("_extra_state"):
            continue
        assert torch.equal(a[k], b[k]), k
    ta, tb = straight.loss_terms["tgeo_kd"], resumed.loss_terms["tgeo_kd"]
    assert (ta.meta_steps, ta.calls) == (tb.meta_steps, tb.calls) == (8, 8)
    sa, sb = ta._meta_opt.state_dict()["state"], tb._meta_opt.state_dict()["state"]
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][name], sb[i][name]), (i, name)


def test_loads_into_a_fresh_module_without_a_dry_run(tmp_path, make_trainer):
    module = tgeo_module()
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=digits())
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    state = torch.load(tmp_path / "t.ckpt", weights_only=True)["state_dict"]
    fresh = tgeo_module()
    assert fresh.loss_terms["tgeo_kd"].ratio_net is None
    fresh.load_state_dict(state)  # strict: the ratio network is rebuilt from the saved state
    term = fresh.loss_terms["tgeo_kd"]
    assert torch.equal(term.ratio_net.net[0].weight, module.loss_terms["tgeo_kd"].ratio_net.net[0].weight)
    assert term.meta_steps == 2 and term._pending_opt_state is not None
    assert term._optimizer().state_dict()["state"][0]["step"].item() == 2


def test_configs_build(batch):
    s, t, y = batch
    for name in ("tgeo_kd", "tgeo_kd_cifar100"):
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg["method"] == "tgeo_kd"
        terms = build_terms(cfg["terms"])
        assert set(terms) == {"tgeo_kd"}
        term, weight = terms["tgeo_kd"]
        term.setup(_step(s, t, y))
        assert torch.isfinite(term(_step(s, t, y))).all()
    cifar = yaml.safe_load((CONFIGS / "tgeo_kd_cifar100.yaml").read_text())
    assert cifar["data_args"]["val_split"] > 0  # the meta split the paper's bilevel step needs
