"""σReparam (+ attention entropy), weight compander and SAF: the maths against formulas written
here, the surgery (function kept at setup, state in checkpoints, folding for export), the
callbacks in real Lightning runs, resume, errors, and one recipe run."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import StopAfter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from toolkit import Batch, ModelOutput, Progress, Step, build
from toolkit.callbacks import (
    SAF,
    SAFTerm,
    SigmaReparam,
    SigmaReparamCallback,
    WeightCompander,
    WeightCompanderCallback,
    apply_sigma_reparam,
    apply_weight_compander,
    remove_sigma_reparam,
    remove_weight_compander,
)
from toolkit.callbacks.reparam import find_layers
from toolkit.callbacks.sigma_reparam import AttentionEntropyMonitor, attention_modules
from toolkit.functional import (
    attention_entropy,
    compand,
    compand_inverse,
    power_iteration,
    saf_slots,
    saf_trajectory_loss,
    sigma_reparam_weight,
    spectral_init,
)
from toolkit.models import create_model
from toolkit.modules import ClassificationModule
from toolkit.types import as_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # restored after the module


def convnet(seed=0):
    torch.manual_seed(seed)
    return ClassificationModule(
        "convnet", num_classes=10, in_chans=1, loss="cross_entropy", model_kwargs={"width": 8}
    )


def digits(**kw):
    return build("data", "digits", batch_size=32, **kw)


def trainer(**kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
    )
    base.update(kw)
    return L.Trainer(**base)


def tb_scalars(root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in root.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events)).Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [e.value for e in acc.Scalars(tag)]
    return out


class TinyAttentionNet(nn.Module):
    """8×8 digits as 8 tokens of 8 pixels: embedding, one attention block of each kind, a head."""

    def __init__(self, kind="mha", heads=2, dim=16):
        super().__init__()
        self.num_classes = 10
        self.embed = nn.Linear(8, dim)
        if kind == "mha":
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            from timm.models.vision_transformer import Attention

            self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.kind = kind
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.reshape(x.shape[0], 8, 8))
        a = self.attn(t, t, t)[0] if self.kind == "mha" else self.attn(t)
        return self.head((t + a).mean(1))


# ---------------------------------------------------------------------------------------------
# σReparam: the maths
# ---------------------------------------------------------------------------------------------


def test_power_iteration_converges_to_the_top_singular_value():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    u = torch.randn(5, generator=g)
    u, v = power_iteration(w, u, steps=200)
    sigma = float(v.double() @ w @ u.double())
    assert sigma == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-5)
    s0, u0, v0 = spectral_init(w)
    assert float(s0) == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-6)
    assert torch.allclose((w.float() @ u0), s0 * v0, atol=1e-5)  # W u = σ v


def test_one_power_step_and_reparam_weight_match_the_formula():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, generator=g, requires_grad=True)
    u0 = torch.randn(6, generator=g)
    gamma = torch.tensor(2.5, requires_grad=True)
    w_hat, sigma, u1, v1 = sigma_reparam_weight(w, gamma, u0)
    # by hand: v = Wu/|Wu|, u' = Wᵀv/|Wᵀv|, σ = vᵀ W u'
    wd = w.detach()
    v_ref = wd @ u0 / (wd @ u0).norm()
    u_ref = wd.t() @ v_ref / (wd.t() @ v_ref).norm()
    s_ref = sum(v_ref[i] * wd[i, j] * u_ref[j] for i in range(4) for j in range(6))
    assert torch.allclose(u1, u_ref, atol=1e-6) and torch.allclose(v1, v_ref, atol=1e-6)
    assert float(sigma.detach()) == pytest.approx(float(s_ref), rel=1e-5)
    assert torch.allclose(w_hat, 2.5 / s_ref * wd, atol=1e-6)
    # gradients: dσ/dW = v u'ᵀ (u, v constants); dŴ/dγ = W/σ
    (w_hat * torch.arange(24.0).reshape(4, 6)).sum().backward()
    c = torch.arange(24.0).reshape(4, 6)
    expected = 2.5 / s_ref * c - 2.5 / s_ref**2 * (c * wd).sum() * torch.outer(v_ref, u_ref)
    assert torch.allclose(w.grad, expected, atol=1e-5)
    assert float(gamma.grad) == pytest.approx(float((c * wd).sum() / s_ref), rel=1e-5)


def test_conv_kernels_are_read_as_out_by_in_k_k_matrices():
    w = torch.randn(3, 2, 3, 3)
    s, u, v = spectral_init(w)
    assert u.shape == (18,) and v.shape == (3,)
    assert float(s) == pytest.approx(float(torch.linalg.svdvals(w.reshape(3, 18))[0]), rel=1e-6)


def test_attention_entropy_limits_and_values():
    t, s = 5, 6
    assert torch.allclose(attention_entropy(torch.full((2, 3, t, s), 1 / s)), torch.full((2, 3), math.log(s)))
    onehot = F.one_hot(torch.arange(t) % s, s).float()
    assert torch.equal(attention_entropy(onehot), torch.tensor(0.0))  # 0·log 0 = 0
    a = torch.randn(2, t, s).softmax(-1)
    ref = torch.tensor(
        [-sum(float(a[b, i, j] * a[b, i, j].log()) for i in range(t) for j in range(s)) / t for b in range(2)]
    )
    assert torch.allclose(attention_entropy(a), ref, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, S\)"):
        attention_entropy(torch.ones(3))


# ---------------------------------------------------------------------------------------------
# σReparam: the surgery
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("types", [["linear"], ["linear", "conv"]])
def test_sigma_reparam_keeps_the_function_at_setup_and_folds_for_export(types):
    torch.manual_seed(0)
    model = create_model("convnet", num_classes=10, in_chans=1, width=8)
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    before = model(x)
    paths = apply_sigma_reparam(model, types=types)
    assert paths == (["fc"] if types == ["linear"] else ["fc", "features.0", "features.4"])
    assert torch.allclose(model(x), before, atol=1e-5)  # γ = σ(W_init): Ŵ = W
    model.train()
    for _ in range(3):
        model(x).sum().backward()  # training forwards take power steps; γ gets gradients
    p = model.fc.parametrizations.weight[0]
    assert isinstance(p, SigmaReparam) and p.gamma.grad is not None
    model.eval()
    after = model(x)
    assert remove_sigma_reparam(model) == paths
    assert isinstance(model.fc.weight, nn.Parameter) and "fc.weight" in model.state_dict()
    assert not any("parametrizations" in k for k in model.state_dict())
    assert torch.allclose(model(x), after, atol=1e-6)  # the exported model computes the same


def test_sigma_reparam_updates_u_once_per_training_forward_and_never_in_eval():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    apply_sigma_reparam(lin, layers=None)
    p = lin.parametrizations.weight[0]
    latent = lin.parametrizations.weight.original
    p.u.copy_(torch.randn(6))  # away from the converged vector, so a step is visible
    u_before = p.u.clone()
    lin.eval()
    lin(torch.randn(2, 6))
    assert torch.equal(p.u, u_before)
    lin.train()
    lin(torch.randn(2, 6))
    expected, _ = power_iteration(latent, u_before, steps=1)
    assert torch.allclose(p.u, expected, atol=1e-7)
    frozen = nn.Linear(6, 4)
    apply_sigma_reparam(frozen, learn_gamma=False, gamma_init=1.0)
    assert "gamma" in dict(frozen.parametrizations.weight[0].named_buffers())
    w = frozen.parametrizations.weight.original
    assert torch.allclose(frozen.weight, w / torch.linalg.svdvals(w)[0], atol=1e-6)  # γ = 1: W/σ(W)
    with pytest.raises(ValueError, match="gamma_init"):
        SigmaReparamCallback(gamma_init=0)


def test_layer_selection_and_its_errors():
    model = create_model("convnet", num_classes=10, in_chans=1, width=8)
    assert list(find_layers(model, types=["conv"])) == ["features.0", "features.4"]
    assert list(find_layers(model, types=["linear", "conv"], exclude=["features.0"])) == ["features.4", "fc"]
    with pytest.raises(ValueError, match="Closest module paths: fc"):
        find_layers(model, layers=["fcc"])
    with pytest.raises(ValueError, match="BatchNorm2d, not a layer of types"):
        find_layers(model, layers=["features.1"], types=["linear", "conv"])
    with pytest.raises(ValueError, match="types must be"):
        find_layers(model, types=["attention"])
    with pytest.raises(TypeError, match="list of module paths"):
        SigmaReparamCallback(layers="fc")
    apply_sigma_reparam(model)
    apply_sigma_reparam(model)  # idempotent
    with pytest.raises(ValueError, match="already has a weight parametrization"):
        apply_weight_compander(model, layers=["fc"])


def test_attention_monitor_reads_mha_and_timm_maps_without_changing_outputs():
    torch.manual_seed(0)
    for kind in ("mha", "timm"):
        net = TinyAttentionNet(kind).train()
        assert list(attention_modules(net)) == ["attn"]
        x = torch.randn(3, 1, 8, 8)
        torch.manual_seed(1)
        plain = net(x)
        monitor = AttentionEntropyMonitor(attention_modules(net))
        monitor.active = True
        torch.manual_seed(1)
        watched = net(x)
        ent = monitor.pop()["attn"]
        assert torch.allclose(watched, plain, atol=1e-5)
        # the maps by hand from the module's own weights
        t = net.embed(x.reshape(3, 8, 8)).detach()
        if kind == "mha":
            wq, wk, _ = net.attn.in_proj_weight.detach().chunk(3)
            bq, bk, _ = net.attn.in_proj_bias.detach().chunk(3)
        else:
            wq, wk, _ = net.attn.qkv.weight.detach().chunk(3)
            bq, bk, _ = net.attn.qkv.bias.detach().chunk(3)
        q = (t @ wq.t() + bq).reshape(3, 8, 2, 8).transpose(1, 2)
        k = (t @ wk.t() + bk).reshape(3, 8, 2, 8).transpose(1, 2)
        maps = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        ref = -(maps * maps.log()).sum(-1).mean(-1).mean(0)  # (H,)
        assert ent.shape == (2,) and torch.allclose(ent, ref, atol=1e-5), kind
        monitor.active = False
        net(x)
        assert monitor.pop() == {}
        monitor.remove()


# ---------------------------------------------------------------------------------------------
# σReparam in Lightning
# ---------------------------------------------------------------------------------------------


def test_sigma_reparam_run_logs_gamma_sigma_and_says_there_is_no_attention(tmp_path):
    module = convnet()
    cb = SigmaReparamCallback(log_every_n_steps=1)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    with pytest.warns(UserWarning, match="no attention module"):
        trainer(logger=logger, log_every_n_steps=1, callbacks=[cb]).fit(module, datamodule=digits())
    scalars = tb_scalars(tmp_path)
    p = module.model.fc.parametrizations.weight[0]
    assert "sigma_reparam/fc/gamma" in scalars and "sigma_reparam/fc/sigma" in scalars
    assert scalars["sigma_reparam/fc/sigma"][-1] == pytest.approx(float(p.sigma), rel=1e-5)


def test_attention_entropy_is_logged_for_an_attention_model(tmp_path):
    torch.manual_seed(0)
    module = ClassificationModule(TinyAttentionNet("mha"), num_classes=10)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    cb = SigmaReparamCallback(log_every_n_steps=2)
    trainer(logger=logger, log_every_n_steps=1, callbacks=[cb], limit_train_batches=4).fit(
        module, datamodule=digits()
    )
    scalars = tb_scalars(tmp_path)
    assert len(scalars["attention_entropy/attn"]) == 2  # steps 0 and 2
    assert (
        0
        < scalars["attention_entropy/attn/min_head"][0]
        <= scalars["attention_entropy/attn"][0]
        <= math.log(8)
    )
    # every Linear (embed, head, the MHA's out_proj) is reparameterised
    assert {"embed", "head", "attn.out_proj"} <= {
        k.split("/")[1] for k in scalars if k.startswith("sigma_reparam/")
    }
    with pytest.raises(ValueError, match="not an attention module"):
        trainer(callbacks=[SigmaReparamCallback(attention_modules=["head"])]).fit(
            ClassificationModule(TinyAttentionNet("mha"), num_classes=10), datamodule=digits()
        )


class PlainModule(L.LightningModule):
    """Any LightningModule: no loss bus, its own training step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = create_model("convnet", num_classes=10, in_chans=1, width=8)

    def training_step(self, batch, batch_idx):
        batch = as_batch(batch)
        return F.cross_entropy(self.model(batch.input), batch.target)

    def validation_step(self, batch, batch_idx):
        batch = as_batch(batch)
        self.log("val/loss", F.cross_entropy(self.model(batch.input), batch.target))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_reparam_callbacks_work_with_any_lightning_module_and_fold_at_fit_end():
    module = PlainModule()
    run = trainer(callbacks=[SigmaReparamCallback(monitor_attention=False, fold_on_fit_end=True)])
    run.fit(module, datamodule=digits())
    assert not any("parametrizations" in k for k in module.state_dict())
    run.validate(module, datamodule=digits(), verbose=False)  # a later stage keeps the exported model
    assert not any("parametrizations" in k for k in module.state_dict())
    module = PlainModule()
    initial_bound = 2.0 * float(module.model.features[0].weight.abs().max())
    cb = WeightCompanderCallback(target=None, types=["conv"], learnable=True)
    run = trainer(callbacks=[cb])
    run.fit(module, datamodule=digits())
    assert cb.applied == ["model.features.0", "model.features.4"]
    p = module.model.features[0].parametrizations.weight[0]
    optimised = {id(q) for g in run.optimizers[0].param_groups for q in g["params"]}
    assert id(p.log_bound) in optimised  # the surgery came before the optimiser was built
    assert float(p.bound) != pytest.approx(initial_bound, rel=1e-6)  # and it was trained
    with pytest.raises(ValueError, match="no network attribute 'net'"):
        trainer(callbacks=[SigmaReparamCallback(target="net")]).fit(PlainModule(), datamodule=digits())


def _state_after(tmp_path, callbacks, stop_after=None, max_epochs=3, module_fn=convnet):
    kw = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    L.seed_everything(7, workers=True)
    module = module_fn(seed=3)
    if stop_after is None:
        L.Trainer(enable_checkpointing=False, callbacks=callbacks(), **kw).fit(module, datamodule=digits())
        return module.state_dict()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[*callbacks(), ckpt, StopAfter(stop_after)], **kw).fit(module, datamodule=digits())
    torch.manual_seed(12345)
    L.seed_everything(7, workers=True)
    resumed = module_fn(seed=99)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[*callbacks(), ckpt], **kw).fit(
        resumed, datamodule=digits(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    return resumed.state_dict()


def assert_same_state(a, b, where=""):
    assert a.keys() == b.keys(), where
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{where}{k}"
        elif isinstance(a[k], dict):  # extra states (the SAF memories)
            assert_same_state(a[k], b[k], f"{where}{k}.")
        else:
            assert a[k] == b[k], f"{where}{k}"


def test_reparam_state_is_checkpointed_and_resume_continues_exactly(tmp_path):
    def callbacks():
        return [
            SigmaReparamCallback(monitor_attention=False),
            WeightCompanderCallback(types=["conv"], learnable=True),
        ]

    straight = _state_after(tmp_path / "a", callbacks)
    resumed = _state_after(tmp_path / "b", callbacks, stop_after=2)
    assert {"model.fc.parametrizations.weight.0.u", "model.fc.parametrizations.weight.0.gamma"} <= set(
        straight
    )
    assert "model.features.0.parametrizations.weight.0.log_slope" in straight
    assert_same_state(straight, resumed)


# ---------------------------------------------------------------------------------------------
# Weight compander (UNCONFIRMED function: its stated properties are what is tested)
# ---------------------------------------------------------------------------------------------


def test_compander_values_and_stated_properties():
    v = torch.linspace(-3, 3, 61, dtype=torch.float64)
    a, s = 0.5, 3.0
    x = s * v / a
    assert torch.allclose(compand(v, a, s), a * (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1), atol=1e-12)
    assert torch.allclose(compand(-v, a, s), -compand(v, a, s))  # odd
    assert bool((compand(v * 100, a, s).abs() <= a).all())  # bounded by a
    small = torch.tensor([1e-3, -2e-3], dtype=torch.float64)
    assert bool((compand(small, a, s).abs() > small.abs()).all())  # pushes small weights away from 0
    z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(compand(z, a, s), z)
    assert float(grad) == pytest.approx(s)  # slope s at zero
    w = torch.tensor([-0.49, -0.1, 0.0, 0.3], dtype=torch.float64)
    assert torch.allclose(compand(compand_inverse(w, a, s), a, s), w, atol=1e-12)
    bound, slope = (
        torch.tensor(0.7, dtype=torch.float64, requires_grad=True),
        torch.tensor(1.5, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(
        lambda vv, b, k: compand(vv, b, k), (v[:5].clone().requires_grad_(), bound, slope)
    )
    with pytest.raises(ValueError, match="raise bound"):
        compand_inverse(torch.tensor([0.6]), 0.5, 2.0)
    with pytest.raises(ValueError, match="slope must be > 0"):
        compand(v, 1.0, 0.0)


def test_weight_compander_keeps_the_function_at_setup_and_folds():
    torch.manual_seed(0)
    model = create_model("convnet", num_classes=10, in_chans=1, width=8)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    before = model(x)
    assert apply_weight_compander(model, slope=2.0, bound_scale=1.5) == ["fc", "features.0", "features.4"]
    assert torch.allclose(model(x), before, atol=1e-5)
    p = model.fc.parametrizations.weight[0]
    assert isinstance(p, WeightCompander)
    latent = model.fc.parametrizations.weight.original
    w0 = model.fc.weight.detach()
    assert float(p.bound) == pytest.approx(1.5 * float(w0.abs().max()), rel=1e-5)
    assert torch.allclose(latent, float(p.bound) / 2.0 * torch.atanh(w0 / p.bound), atol=1e-6)
    assert remove_weight_compander(model) == ["fc", "features.0", "features.4"]
    assert torch.allclose(model(x), before, atol=1e-5)
    with pytest.raises(ValueError, match="bound_scale must be > 1"):
        WeightCompanderCallback(bound_scale=1.0)
    with pytest.raises(ValueError, match="slope must be > 0"):
        WeightCompanderCallback(slope=-1)
    with pytest.raises(ValueError, match="raise bound"):
        apply_weight_compander(create_model("convnet", num_classes=10, in_chans=1, width=8), bound=1e-4)


def test_weight_compander_gradient_reaches_the_latent_through_f():
    lin = nn.Linear(3, 2).double()
    apply_weight_compander(lin, bound=2.0, slope=3.0, learnable=True)
    latent = lin.parametrizations.weight.original
    x = torch.randn(4, 3, dtype=torch.float64)
    lin(x).sum().backward()
    # dL/dv = dL/dw · f'(v), f'(v) = s·(1 − tanh²(s v / a))
    dw = x.sum(0).expand(2, 3)
    expected = dw * 3.0 * (1 - torch.tanh(3.0 * latent.detach() / 2.0) ** 2)
    assert torch.allclose(latent.grad, expected, atol=1e-10)
    assert lin.parametrizations.weight[0].log_slope.grad is not None


# ---------------------------------------------------------------------------------------------
# SAF: the maths and the memory
# ---------------------------------------------------------------------------------------------


def test_saf_trajectory_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    cur, past = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    tau = 5.0
    ref = []
    for i in range(4):
        pp = [math.exp(float(past[i, c]) / tau) for c in range(5)]
        pc = [math.exp(float(cur[i, c]) / tau) for c in range(5)]
        pp = [p / sum(pp) for p in pp]
        pc = [p / sum(pc) for p in pc]
        ref.append(tau**2 * sum(pp[c] * (math.log(pp[c]) - math.log(pc[c])) for c in range(5)))
    ref = torch.tensor(ref)
    assert torch.allclose(saf_trajectory_loss(cur, past, tau, reduction="none"), ref, atol=1e-5)
    assert float(saf_trajectory_loss(cur, past, tau)) == pytest.approx(float(ref.mean()), rel=1e-5)
    valid = torch.tensor([True, False, True, False])
    assert torch.allclose(
        saf_trajectory_loss(cur, past, tau, valid=valid, reduction="none"), ref * valid, atol=1e-5
    )
    assert float(saf_trajectory_loss(cur, cur, tau)) == pytest.approx(0.0, abs=1e-6)  # unchanged outputs
    big = cur * 1e4
    assert torch.isfinite(saf_trajectory_loss(big, past * 1e4, tau)).all()
    assert torch.isfinite(saf_trajectory_loss(cur.bfloat16(), past.bfloat16(), tau)).all()
    assert saf_slots(7, 3) == (3, 0) and saf_slots(3, 2) == (0, 1)


def _step(index, logits, epoch):
    return Step(
        Batch(torch.zeros(len(index), 1), index=index), ModelOutput(logits), progress=Progress(epoch=epoch)
    )


def test_saf_memory_returns_outputs_from_exactly_minus_epoch_earlier():
    term = SAFTerm(temperature=2.0, start_epoch=1, minus_epoch=2).train()
    index = torch.tensor([3, 0, 5])
    per_epoch = {e: torch.randn(3, 4) + e for e in range(6)}
    for e in range(6):
        cur = per_epoch[e]
        loss = term(_step(index, cur, e))
        if e <= 1:  # not active yet (epochs > start_epoch), and nothing to compare with before epoch 2
            assert torch.equal(loss, torch.zeros(3))
        else:
            past, valid = per_epoch[e - 2], torch.ones(3, dtype=torch.bool)
            assert torch.allclose(
                loss, saf_trajectory_loss(cur, past, 2.0, valid=valid, reduction="none"), atol=1e-6
            )
    past, valid = term.past(index, 4, 6)
    assert torch.equal(past, per_epoch[4]) and bool(valid.all())
    # a sample not seen at epoch e − Ẽ contributes 0; evaluation mode does not record
    loss = term(_step(torch.tensor([9]), torch.randn(1, 4), 6))
    assert torch.equal(loss, torch.zeros(1))
    term.eval()
    term(_step(index, torch.zeros(3, 4), 7))
    assert not bool(term.past(index, 4, 9)[1].any())  # epoch 7 was never recorded
    with pytest.raises(ValueError, match="minus_epoch must be an integer >= 1"):
        SAFTerm(minus_epoch=0)
    with pytest.raises(ValueError, match="end_epoch must be None or an integer > start_epoch"):
        SAFTerm(start_epoch=3, end_epoch=4)
    with pytest.raises(ValueError, match="memory_dtype"):
        SAF(memory_dtype="int8")
    with pytest.raises(ValueError, match="weight"):
        SAF(weight=-1)


def test_saf_needs_a_loss_bus_and_a_free_term_name():
    with pytest.raises(TypeError, match="needs a module with a loss bus"):
        trainer(callbacks=[SAF()]).fit(PlainModule(), datamodule=digits())
    module = convnet()
    with pytest.raises(ValueError, match="already has a loss term named 'loss'"):
        trainer(callbacks=[SAF(term_name="loss")]).fit(module, datamodule=digits())
    with pytest.warns(UserWarning, match="never applies"):
        trainer(callbacks=[SAF(start_epoch=5)], max_epochs=3, limit_train_batches=1).fit(
            convnet(), datamodule=digits()
        )


def test_saf_run_adds_the_trajectory_loss_and_resumes_exactly(tmp_path):
    module = convnet()
    run = trainer(callbacks=[SAF(weight=0.5, start_epoch=0, minus_epoch=1)], max_epochs=2)
    run.fit(module, datamodule=digits())
    assert float(run.callback_metrics["train/loss/saf"]) > 0  # epoch 1 compares with epoch 0
    term = module.loss_terms["saf"]
    assert module.term_weight("saf") == 0.5
    stamps = term.epoch_memory.values
    assert set(stamps[term.epoch_memory.written].flatten().tolist()) <= {0, 1, 2}
    assert int((stamps == 2).sum()) == 3 * 32  # epoch 1 recorded every sample it saw (3 batches of 32)

    def callbacks():
        return [SAF(weight=0.5, start_epoch=0, minus_epoch=1)]

    straight = _state_after(tmp_path / "a", callbacks)
    resumed = _state_after(tmp_path / "b", callbacks, stop_after=2)
    assert "loss_terms.saf.logits_memory._extra_state" in straight
    assert_same_state(straight, resumed)


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------


def test_recipe_attaches_the_reparam_and_saf_callbacks(tmp_path):
    from recipes import train

    res = train.main(
        [
            "--data",
            "digits",
            "--fast",
            "--epochs",
            "2",
            "--callbacks",
            "sigma_reparam,weight_compander,saf",
            "--callbacks.sigma_reparam.log_every_n_steps",
            "1",
            "--callbacks.weight_compander.types",
            "[conv]",
            "--callbacks.saf.start_epoch",
            "0",
            "--callbacks.saf.minus_epoch",
            "1",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    assert res["config"]["callbacks"]["weight_compander"] == {"types": ["conv"]}
    scalars = tb_scalars(tmp_path / "tb")
    assert "sigma_reparam/fc/gamma" in scalars
    assert scalars["train/loss/saf"][0] == 0 and scalars["train/loss/saf"][-1] > 0  # active in epoch 1 only
    assert 0 <= res["acc"] <= 1
