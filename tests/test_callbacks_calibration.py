"""calibration (ECE/MCE, temperature scaling), naive_bayes_probe (Gaussian NB vs logistic
regression on frozen features) and lr_annealing_law (L = L0 + A·S1^-α − C·S2)."""

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from toolkit import registry
from toolkit.callbacks import (
    Calibration,
    LRAnnealingLaw,
    NaiveBayesProbe,
    TemperatureScaling,
    linear_probe,
    load_temperature,
)
from toolkit.data import DigitsDataModule
from toolkit.functional.calibration import (
    calibration_error,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    reliability_bins,
    temperature_scale,
)
from toolkit.functional.lr_annealing_law import fit_lr_annealing_law, lr_annealing_areas, lr_annealing_law
from toolkit.functional.naive_bayes import (
    gaussian_nb_fit,
    gaussian_nb_linear,
    gaussian_nb_log_likelihood,
    gaussian_nb_predict,
    gaussian_nb_stats,
    merge_gaussian_nb_stats,
)
from toolkit.models.output import forward_output
from toolkit.modules import ClassificationModule
from toolkit.types import as_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # restored after the module


def events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0}).Reload()


def np_nll(z, y, t=1.0):
    z = np.asarray(z, dtype=np.float64) / t
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), np.asarray(y)].mean())


def convnet_module(**kw):
    return ClassificationModule(
        "convnet", num_classes=10, in_chans=1, loss="cross_entropy", model_kwargs={"width": 8}, **kw
    )


def eval_logits(net, loader):
    """The logits of `net` (eval mode) on every batch of `loader`, and the targets."""
    net.eval()
    zs, ys = [], []
    with torch.no_grad():
        for raw in loader:
            b = as_batch(raw)
            zs.append(forward_output(net, b.input).logits)
            ys.append(b.target)
    return torch.cat(zs), torch.cat(ys)


# == calibration: functional =====================================================================
def logits_with_confidences(conf, pred, num_classes=3):
    """Logits whose softmax has top-1 probability conf[i] on class pred[i], the rest spread evenly."""
    rows = []
    for c, k in zip(conf, pred):
        p = np.full(num_classes, (1 - c) / (num_classes - 1))
        p[k] = c
        rows.append(np.log(p))
    return torch.tensor(np.array(rows), dtype=torch.float32)


def test_ece_mce_against_hand_computation():
    # 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]; confidences away from the edges
    conf = [0.95, 0.85, 0.72, 0.66, 0.55, 0.45, 0.38]
    pred = [0, 1, 2, 0, 1, 2, 0]
    target = torch.tensor([0, 2, 2, 0, 0, 2, 1])  # correct: 1, 0, 1, 1, 0, 1, 0
    z = logits_with_confidences(conf, pred)
    # (.8, 1]: conf (.95 + .85)/2 = .90, acc 1/2 -> gap .40, weight 2/7
    # (.6, .8]: conf (.72 + .66)/2 = .69, acc 1 -> gap .31, weight 2/7
    # (.4, .6]: conf (.55 + .45)/2 = .50, acc 1/2 -> gap .00, weight 2/7
    # (.2, .4]: conf .38, acc 0 -> gap .38, weight 1/7
    ece = (2 * 0.40 + 2 * 0.31 + 2 * 0.0 + 1 * 0.38) / 7
    assert float(expected_calibration_error(z, target, n_bins=5)) == pytest.approx(ece, abs=1e-6)
    assert float(maximum_calibration_error(z, target, n_bins=5)) == pytest.approx(0.40, abs=1e-6)
    bins = reliability_bins(z, target, n_bins=5)
    assert bins.count.tolist() == [0, 1, 2, 2, 2]
    assert bins.accuracy.tolist() == pytest.approx([0, 0, 0.5, 1, 0.5])
    assert bins.confidence.tolist() == pytest.approx([0, 0.38, 0.5, 0.69, 0.9], abs=1e-6)


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_ece_mce_match_torchmetrics(n_bins, rng):
    from torchmetrics.functional.classification import multiclass_calibration_error

    z = torch.randn(500, 6, generator=rng) * 2.5
    y = torch.randint(0, 6, (500,), generator=rng)
    for norm in ("l1", "max"):
        ours = calibration_error(z, y, n_bins, norm)
        ref = multiclass_calibration_error(torch.softmax(z, -1), y, 6, n_bins=n_bins, norm=norm)
        assert float(ours) == pytest.approx(float(ref), abs=1e-6)


def test_ece_limits_extremes_and_bf16(rng):
    y = torch.randint(0, 4, (64,), generator=rng)
    sure = F.one_hot(y, 4).float() * 1e4  # right and certain: perfectly calibrated
    assert float(expected_calibration_error(sure, y)) == 0.0
    assert float(maximum_calibration_error(sure, y)) == 0.0
    wrong = F.one_hot((y + 1) % 4, 4).float() * 1e4  # certain and always wrong: ECE = MCE = 1
    assert float(expected_calibration_error(wrong, y)) == pytest.approx(1.0)
    assert float(maximum_calibration_error(wrong, y)) == pytest.approx(1.0)
    z = torch.randn(64, 4, generator=rng) * 3
    bf = expected_calibration_error(z.bfloat16(), y)
    assert torch.isfinite(bf) and float(bf) == pytest.approx(
        float(expected_calibration_error(z, y)), abs=0.05
    )
    assert math.isfinite(fit_temperature(sure, y))  # separable: clipped, not infinite


def test_temperature_is_one_when_already_calibrated():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 10, generator=g) * 3
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)  # labels drawn from the model
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_fit_recovers_known_temperature(true_t):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20000, 10, generator=g) * 3
    y = torch.multinomial(torch.softmax(z / true_t, -1), 1, generator=g).squeeze(1)
    t = fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.04)
    # a minimum of the NLL (written independently in numpy)
    zn, yn = z.numpy(), y.numpy()
    assert np_nll(zn, yn, t) <= min(np_nll(zn, yn, t * 1.01), np_nll(zn, yn, t / 1.01))
    assert np_nll(zn, yn, t) < np_nll(zn, yn, 1.0)
    # scaling keeps the predictions and lowers the ECE
    assert torch.equal(temperature_scale(z, t).argmax(-1), z.argmax(-1))
    assert expected_calibration_error(temperature_scale(z, t), y) < expected_calibration_error(z, y)


def test_temperature_scale_is_differentiable_and_module():
    z = torch.randn(5, 3)
    t = torch.tensor(2.0, requires_grad=True)
    out = temperature_scale(z, t)
    out.sum().backward()
    assert torch.allclose(out, z / 2) and torch.allclose(t.grad, -(z.sum()) / 4)
    scaler = TemperatureScaling(2.0)
    assert torch.allclose(scaler(z), z / 2) and "temperature" in scaler.state_dict()


def test_calibration_functional_errors():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for call, match in [
        (lambda: expected_calibration_error(z, y, n_bins=0), "n_bins"),
        (lambda: calibration_error(z, y, norm="l2"), "norm"),
        (lambda: expected_calibration_error(z[0], y), r"\(B, C\)"),
        (lambda: expected_calibration_error(z, y.float()), "class-index"),
        (lambda: expected_calibration_error(z, torch.tensor([0, 1, 3, 0])), "class indices"),
        (lambda: expected_calibration_error(z[:0], y[:0]), "at least one"),
        (lambda: temperature_scale(z, 0.0), "temperature"),
        (lambda: temperature_scale(z, float("nan")), "temperature"),
        (lambda: fit_temperature(z, y, max_iter=0), "max_iter"),
        (lambda: fit_temperature(z, y, t_min=2.0, t_max=1.0), "t_min"),
        (lambda: TemperatureScaling(-1.0), "temperature"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


# == calibration: callback =======================================================================
def test_calibration_run_tensorboard_checkpoint_and_test(tmp_path, make_trainer):
    dm = DigitsDataModule(batch_size=32, val_split=0.2, seed=0)
    module = convnet_module(optimizer={"name": "adam", "lr": 0.01})
    cal = Calibration(n_bins=10)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    trainer = make_trainer(
        max_epochs=2,
        limit_train_batches=6,
        num_sanity_val_steps=1,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[cal, ckpt],
    )
    trainer.fit(module, datamodule=dm)
    assert [h["epoch"] for h in cal.history] == [0, 1]  # every epoch, never the sanity check
    # the logged values are those of the final weights on the validation set, computed apart
    z, y = eval_logits(module.model, dm.val_dataloader())
    m = trainer.callback_metrics
    assert float(m["val/ece"]) == pytest.approx(float(expected_calibration_error(z, y, 10)), abs=1e-6)
    assert float(m["val/mce"]) == pytest.approx(float(maximum_calibration_error(z, y, 10)), abs=1e-6)
    assert float(m["val/nll"]) == pytest.approx(np_nll(z, y), abs=1e-5)
    t = cal.temperature
    assert float(m["val/temperature"]) == pytest.approx(t) and t == pytest.approx(
        fit_temperature(z, y), rel=1e-5
    )
    assert np_nll(z, y, t) <= min(np_nll(z, y, t * 1.01), np_nll(z, y, t / 1.01)) + 1e-9
    assert float(m["val/nll_scaled"]) == pytest.approx(np_nll(z, y, t), abs=1e-5)
    # TensorBoard: scalars and the reliability diagram (two panels), and the PNG
    acc = events(tmp_path / "tb")
    assert {"val/ece", "val/mce", "val/nll", "val/temperature", "val/ece_scaled"} <= set(
        acc.Tags()["scalars"]
    )
    images = acc.Images("val/reliability_diagram")
    assert len(images) == 2 and images[-1].width == 800 and images[-1].height == 400
    assert (tmp_path / "tb" / "calibration" / "reliability_val.png").exists()
    # the temperature is in the checkpoint; a fresh callback restores it for testing
    path = tmp_path / "ckpt" / "last.ckpt"
    assert load_temperature(path) == pytest.approx(t)
    fresh = Calibration(n_bins=10)
    tester = make_trainer(logger=TensorBoardLogger(str(tmp_path), name="tb", version=""), callbacks=[fresh])
    (res,) = tester.test(convnet_module(), datamodule=dm, ckpt_path=str(path), verbose=False)
    zt, yt = eval_logits(module.model, dm.test_dataloader())
    assert fresh.temperature == pytest.approx(t) and res["test/temperature"] == pytest.approx(t)
    assert res["test/nll_scaled"] == pytest.approx(np_nll(zt, yt, t), abs=1e-5)
    assert res["test/ece"] == pytest.approx(float(expected_calibration_error(zt, yt, 10)), abs=1e-6)
    assert (tmp_path / "tb" / "calibration" / "reliability_test.png").exists()
    assert "test/reliability_diagram" in events(tmp_path / "tb").Tags()["images"]
    # the module's own state dict is untouched (strict loading elsewhere keeps working)
    assert not any("temperature" in k for k in torch.load(path, weights_only=False)["state_dict"])


class Plain(L.LightningModule):
    """A user's own module: no `model`, no loss bus; forward gives logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)

    def forward(self, x):
        return self.net(x.flatten(1))

    def training_step(self, batch, batch_idx):
        b = as_batch(batch)
        return F.cross_entropy(self(b.input), b.target)

    def validation_step(self, batch, batch_idx):
        b = as_batch(batch)
        self.log("val/loss", F.cross_entropy(self(b.input), b.target))

    def predict_step(self, batch, batch_idx):
        return self(as_batch(batch).input)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2)
        sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_callbacks_on_a_plain_module_post_hoc_temperature_and_predict(tmp_path, make_trainer):
    dm = DigitsDataModule(batch_size=64, val_split=0.2, seed=0)
    module = Plain()
    law = LRAnnealingLaw(min_points=5, plot=False)
    nb = NaiveBayesProbe(embedding_fn=lambda m, x: x.flatten(1).float(), linear_epochs=1)
    make_trainer(max_epochs=1, limit_train_batches=12, callbacks=[law, nb]).fit(module, datamodule=dm)
    assert law.result is not None and len(law.lrs) == 12
    assert law.lrs == pytest.approx([0.2] * 4 + [0.1] * 4 + [0.05] * 4)  # StepLR(4, 0.5), per step
    assert 0 <= nb.results[-1]["naive_bayes_probe_acc"] <= 1
    # post-hoc: temperature fitted by trainer.validate, then applied to predictions
    cal = Calibration(scale_predictions=True, plot=False)
    trainer = make_trainer(callbacks=[cal])
    trainer.validate(module, datamodule=dm, verbose=False)
    z, y = eval_logits(module, dm.val_dataloader())
    assert cal.temperature == pytest.approx(fit_temperature(z, y), rel=1e-5)
    preds = trainer.predict(module, dataloaders=dm.test_dataloader())
    zt, _ = eval_logits(module, dm.test_dataloader())
    assert torch.allclose(torch.cat(preds), zt / cal.temperature, atol=1e-6)
    assert torch.allclose(cal.calibrate(zt), zt / cal.temperature)


def test_calibration_errors_at_init_and_setup(make_trainer):
    for kw, match in [
        ({"n_bins": 0}, "n_bins"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"max_iter": 1.5}, "max_iter"),
    ]:
        with pytest.raises(ValueError, match=match):
            Calibration(**kw)
    with pytest.raises(TypeError, match="logits_fn"):
        Calibration(logits_fn=3)

    class NoLogits(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return self.w.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(batch_size=64, val_split=0.2, seed=0)
    with pytest.raises(ValueError, match="logits_fn"):
        make_trainer(max_epochs=1, callbacks=[Calibration()]).fit(NoLogits(), datamodule=dm)
    with pytest.raises(ValueError, match="limit_val_batches"):
        make_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Calibration()]).fit(Plain(), datamodule=dm)
    with pytest.raises(ValueError, match="no fitted temperature"):
        load_temperature({"callbacks": {"Calibration{'n_bins': 15}": {"temperature": None}}})
    assert registry.get("callback", "calibration") is Calibration


# == naive Bayes: functional =====================================================================
def blobs(n=300, d=5, c=3, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, c, n)
    centres = g.normal(0, 2, (c, d))
    scales = g.uniform(0.5, 2.0, (c, d))
    x = centres[y] + g.normal(size=(n, d)) * scales[y]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def np_official_gnb(x, y, xt, c, eps):
    """The official code's classifier: pooled variance Σ_c prior_c var_c (ddof 0) + eps."""
    x, xt, y = np.asarray(x, np.float64), np.asarray(xt, np.float64), np.asarray(y)
    present = [k for k in range(c) if (y == k).any()]  # an absent class is never predicted
    prior = {k: (y == k).mean() for k in present}
    mus = {k: x[y == k].mean(0) for k in present}
    pooled = sum(prior[k] * x[y == k].var(0) for k in present) + eps
    jll = np.full((len(xt), c), -np.inf)
    for k in present:
        jll[:, k] = np.log(prior[k]) - 0.5 * ((xt - mus[k]) ** 2 / pooled).sum(1)
    return jll.argmax(1), jll


def test_gaussian_nb_per_class_equals_sklearn():
    from sklearn.naive_bayes import GaussianNB

    x, y = blobs()
    xt, _ = blobs(seed=1)
    ref = GaussianNB(var_smoothing=1e-9).fit(x.double().numpy(), y.numpy())
    params = gaussian_nb_fit(x, y, 3, variance="per_class", var_smoothing=1e-9)
    np.testing.assert_allclose(params.mean.numpy(), ref.theta_, rtol=1e-10)
    np.testing.assert_allclose(params.var.numpy(), ref.var_, rtol=1e-10)
    np.testing.assert_allclose(params.log_prior.exp().numpy(), ref.class_prior_, rtol=1e-12)
    jll = gaussian_nb_log_likelihood(params, xt).numpy()
    np.testing.assert_allclose(jll, ref.predict_joint_log_proba(xt.double().numpy()), rtol=1e-10, atol=1e-9)
    assert (gaussian_nb_predict(params, xt).numpy() == ref.predict(xt.double().numpy())).all()


def test_gaussian_nb_pooled_is_the_papers_linear_classifier():
    x, y = blobs(d=8, c=4)
    xt, _ = blobs(d=8, c=4, seed=3)
    params = gaussian_nb_fit(x, y, 4)  # pooled by default
    eps = 1e-9 * x.double().var(0, unbiased=False).max().item()
    pred, jll = np_official_gnb(x, y, xt, 4, eps)
    assert (gaussian_nb_predict(params, xt).numpy() == pred).all()
    ours = gaussian_nb_log_likelihood(params, xt).numpy()
    diff = ours - jll  # equal up to a per-sample constant (the class-independent terms)
    np.testing.assert_allclose(diff, diff[:, :1].repeat(4, 1), atol=1e-8)
    w, b = gaussian_nb_linear(params)
    lin = (xt.double() @ w.T + b).numpy()
    d2 = lin - ours
    np.testing.assert_allclose(d2, d2[:, :1].repeat(4, 1), atol=1e-8)
    with pytest.raises(ValueError, match="pooled"):
        gaussian_nb_linear(gaussian_nb_fit(x, y, 4, variance="per_class"))


def test_gaussian_nb_streaming_equals_one_shot_and_absent_class():
    x, y = blobs(n=200)
    whole = gaussian_nb_stats(x, y, 5)  # classes 3 and 4 never occur
    merged = gaussian_nb_stats(x[:70], y[:70], 5)
    for s in (slice(70, 71), slice(71, 150), slice(150, 200)):
        merged = merge_gaussian_nb_stats(merged, gaussian_nb_stats(x[s], y[s], 5))
    for a, b in zip(whole, merged):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    p1, p2 = gaussian_nb_fit(x, y, 5), gaussian_nb_fit(stats=merged)
    torch.testing.assert_close(p1.var, p2.var, rtol=1e-10, atol=1e-12)
    assert p1.log_prior[3] == -math.inf and not (gaussian_nb_predict(p1, x) >= 3).any()
    bf = gaussian_nb_fit(x.bfloat16() * 1e3, y, 5)  # bf16 and large features: statistics in float64
    assert torch.isfinite(bf.var).all() and torch.isfinite(gaussian_nb_log_likelihood(bf, x)[:, :3]).all()


def test_gaussian_nb_errors():
    x, y = blobs(n=20)
    for call, match in [
        (lambda: gaussian_nb_fit(x, y, 3, variance="full"), "variance"),
        (lambda: gaussian_nb_fit(x, y, 3, var_smoothing=-1.0), "var_smoothing"),
        (lambda: gaussian_nb_fit(x, y), "num_classes"),
        (lambda: gaussian_nb_stats(x, y, 1), "num_classes"),
        (lambda: gaussian_nb_stats(x, y + 5, 3), "class indices"),
        (lambda: gaussian_nb_stats(x[0], y, 3), r"\(N, D\)"),
        (
            lambda: gaussian_nb_fit(torch.ones(4, 2), torch.tensor([0, 1, 0, 1]), 2, var_smoothing=0.0),
            "zero variance",
        ),
        (lambda: gaussian_nb_log_likelihood(gaussian_nb_fit(x, y, 3), x[:, :2]), "features"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


# == naive Bayes: callback =======================================================================
def test_naive_bayes_probe_run_against_independent_probes(tmp_path, make_trainer):
    dm = DigitsDataModule(batch_size=64, val_split=0.2, seed=0)
    module = convnet_module(optimizer={"name": "adam", "lr": 0.01})
    probe = NaiveBayesProbe(linear_epochs=2, linear_batch_size=128, train_sizes=[30, 10_000])
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    with pytest.warns(UserWarning, match="10000"):
        make_trainer(max_epochs=1, limit_train_batches=3, logger=logger, callbacks=[probe]).fit(
            module, datamodule=dm
        )
    out = probe.results[-1]
    module.eval()
    with torch.no_grad():
        train = [dm.train_set[i] for i in range(len(dm.train_set))]
        val = [dm.val_set[i] for i in range(len(dm.val_set))]
        tx = forward_output(module.model, torch.stack([b.input for b in train])).embedding
        vx = forward_output(module.model, torch.stack([b.input for b in val])).embedding
    ty = torch.tensor([int(b.target) for b in train])
    vy = torch.tensor([int(b.target) for b in val])
    tol = 1.5 / len(vy)
    for n, suffix in ((len(ty), ""), (30, "_n30")):
        eps = 1e-9 * tx[:n].double().var(0, unbiased=False).max().item()
        pred, _ = np_official_gnb(tx[:n], ty[:n], vx, 10, eps)
        assert out[f"naive_bayes_probe_acc{suffix}"] == pytest.approx((pred == vy.numpy()).mean(), abs=tol)
        lin = linear_probe(tx[:n], ty[:n], vx, 10, 2, 1e-3, 1e-2, 128)[0]
        assert out[f"logistic_probe_acc{suffix}"] == pytest.approx((lin == vy).float().mean().item(), abs=tol)
    assert "naive_bayes_probe_acc_n10000" not in out
    tags = set(events(tmp_path / "tb").Tags()["scalars"])
    assert {"val/naive_bayes_probe_acc", "val/logistic_probe_acc", "val/naive_bayes_probe_acc_n30"} <= tags


def test_naive_bayes_probe_arguments_and_state():
    for kw, match in [
        ({"variance": "full"}, "variance"),
        ({"var_smoothing": -1}, "var_smoothing"),
        ({"train_sizes": [0]}, "train_sizes"),
        ({"linear_epochs": -1}, "linear_epochs"),
    ]:
        with pytest.raises(ValueError, match=match):
            NaiveBayesProbe(**kw)
    probe = NaiveBayesProbe()
    probe.load_state_dict({"results": [{"epoch": 0, "naive_bayes_probe_acc": 0.5}]})
    assert probe.state_dict()["results"][0]["naive_bayes_probe_acc"] == 0.5
    assert probe.state_key != NaiveBayesProbe(variance="per_class").state_key
    assert registry.get("callback", "naive_bayes_probe") is NaiveBayesProbe


# == LR annealing law: functional ================================================================
def hand_areas(lrs, lam):
    s1, s2, m, a1, a2 = [], [], 0.0, 0.0, 0.0
    for i, eta in enumerate(lrs):
        if i > 0:
            m = lam * m + (lrs[i - 1] - eta)
        a1 += eta
        a2 += m
        s1.append(a1)
        s2.append(a2)
    return np.array(s1), np.array(s2)


def cosine_schedule(n=2000, warmup=100, peak=1e-3, floor=1e-4):
    s = np.arange(n)
    cos = floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * (s - warmup) / (n - warmup)))
    return np.where(s < warmup, peak * (s + 1) / warmup, cos)


def test_lr_annealing_areas_against_hand_loop_and_limits():
    g = np.random.default_rng(0)
    lrs = g.uniform(0.1, 1.0, 50)
    for lam in (0.0, 0.9, 0.999, 1.0):
        s1, s2 = lr_annealing_areas(lrs, lam)
        h1, h2 = hand_areas(lrs, lam)
        np.testing.assert_allclose(s1, h1, rtol=1e-12)
        np.testing.assert_allclose(s2, h2, rtol=1e-10, atol=1e-12)
    # λ = 1: m_i = η_0 − η_i (the area between the peak and the curve); λ = 0: m_i = η_{i−1} − η_i
    np.testing.assert_allclose(lr_annealing_areas(lrs, 1.0)[1], np.cumsum(lrs[0] - lrs), atol=1e-12)
    np.testing.assert_allclose(lr_annealing_areas(lrs, 0.0)[1], lrs[0] - lrs, atol=1e-12)
    s1, s2 = lr_annealing_areas(np.full(30, 0.1))  # constant LR: no annealing area
    assert (s2 == 0).all() and s1[-1] == pytest.approx(3.0)
    warm = np.array([0.1, 0.2, 0.3, 0.3, 0.2])
    s1, s2 = lr_annealing_areas(warm, 0.5, warmup_steps=2)  # the warm-up counts at the peak
    h1, h2 = hand_areas([0.3, 0.3, 0.3, 0.3, 0.2], 0.5)
    np.testing.assert_allclose(s1, h1)
    np.testing.assert_allclose(s2, h2)


@pytest.mark.parametrize("objective", ["huber_log", "squares"])
def test_lr_annealing_fit_recovers_known_parameters(objective):
    lrs = cosine_schedule()
    s1, s2 = lr_annealing_areas(lrs, 0.999, warmup_steps=100)
    true = {"L0": 2.0, "A": 0.6, "alpha": 0.5, "C": 0.8}
    loss = lr_annealing_law(s1, s2, **true)
    fit = fit_lr_annealing_law(loss[100:], s1[100:], s2[100:], objective=objective)
    for k, v in true.items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-5)
    assert fit.r2 == pytest.approx(1.0)
    noisy = loss * (1 + 0.003 * np.random.default_rng(0).standard_normal(len(loss)))
    fit = fit_lr_annealing_law(noisy[100:], s1[100:], s2[100:], objective=objective)
    for k, v in true.items():
        assert getattr(fit, k) == pytest.approx(v, rel=0.03)
    # a step-decay (WSD-like) schedule with another set of parameters
    wsd = np.where(np.arange(1500) < 1200, 0.5, 0.05)
    s1, s2 = lr_annealing_areas(wsd, 0.99)
    true = {"L0": 1.2, "A": 1.5, "alpha": 0.3, "C": 0.01}
    fit = fit_lr_annealing_law(lr_annealing_law(s1, s2, **true), s1, s2, objective=objective)
    for k, v in true.items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-4)


def test_lr_annealing_functional_errors():
    s1, s2 = lr_annealing_areas(np.linspace(1, 0.1, 20))
    loss = np.linspace(3, 2, 20)
    for call, match in [
        (lambda: lr_annealing_areas([0.1, -0.1]), ">= 0"),
        (lambda: lr_annealing_areas([0.1], decay=1.5), "decay"),
        (lambda: lr_annealing_areas([0.1], warmup_steps=-1), "warmup_steps"),
        (lambda: lr_annealing_areas([[0.1]]), "1-D"),
        (lambda: lr_annealing_areas([0.1, float("nan")]), "NaN"),
        (lambda: fit_lr_annealing_law(loss[:5], s1, s2), "same length"),
        (lambda: fit_lr_annealing_law(loss[:4], s1[:4], s2[:4]), "at least 5"),
        (lambda: fit_lr_annealing_law(loss, s1 - 100, s2), "S1 must be > 0"),
        (lambda: fit_lr_annealing_law(loss - 5, s1, s2), "squares"),
        (lambda: fit_lr_annealing_law(loss, s1, s2, objective="l1"), "objective"),
        (lambda: fit_lr_annealing_law(loss, s1, s2, huber_delta=0), "huber_delta"),
        (lambda: fit_lr_annealing_law(loss, s1, s2, alpha_bounds=(1, 0.5)), "alpha_bounds"),
        (lambda: lr_annealing_law([0.0], [0.0], 1, 1, 1, 1), "S1 must be > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


# == LR annealing law: callback ==================================================================
def test_lr_annealing_law_run_resume_tensorboard(tmp_path, make_trainer):
    from helpers import StopAfter

    sched = {"name": "cosine", "interval": "step", "t_max": 30, "warmup_epochs": 3, "eta_min": 0.001}
    dm = DigitsDataModule(batch_size=32, val_split=0.2, seed=0)

    def run(callbacks, ckpt_path=None):
        module = convnet_module(optimizer={"name": "sgd", "lr": 0.1}, scheduler=sched)
        logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
        trainer = make_trainer(
            max_epochs=3,
            limit_train_batches=10,
            limit_val_batches=1,
            logger=logger,
            enable_checkpointing=True,
            callbacks=[*callbacks, ckpt],
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

    with pytest.warns(UserWarning, match="min_points"):
        run([LRAnnealingLaw(), StopAfter(1)])  # 10 steps: too few points after the warm-up
    law = LRAnnealingLaw()
    run([law], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # resumes: the curve continues
    assert law.steps == list(range(30))
    # LinearLR warm-up (factor 1/4 → 1 over 3 steps), then cosine from 0.1 to 0.001 over 27 steps
    expected = [0.1 * (0.25 + 0.75 * k / 3) for k in range(3)]
    expected += [0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * t / 27)) / 2 for t in range(27)]
    assert law.lrs == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(v) for v in law.losses)
    r = law.result
    assert r is not None and r["warmup_steps"] == 3 and r["points"] == 27
    assert r["A"] >= 0 and r["C"] >= 0 and r["r2"] <= 1
    acc = events(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    assert {f"lr_annealing_law/{k}" for k in ("L0", "A", "alpha", "C", "r2", "rmse")} <= tags
    assert acc.Scalars("lr_annealing_law/alpha")[-1].value == pytest.approx(r["alpha"], rel=1e-6)
    assert acc.Images("lr_annealing_law/fit")[-1].height == 550
    assert (tmp_path / "tb" / "lr_annealing_law" / "fit.png").exists()


def test_lr_annealing_law_arguments():
    for kw, match in [
        ({"decay": 1.5}, "decay"),
        ({"warmup_steps": "x"}, "warmup_steps"),
        ({"skip_steps": -1}, "skip_steps"),
        ({"min_points": 4}, "min_points"),
        ({"objective": "l1"}, "objective"),
        ({"huber_delta": 0}, "huber_delta"),
        ({"param_group": -1}, "param_group"),
        ({"prefix": ""}, "prefix"),
    ]:
        with pytest.raises(ValueError, match=match):
            LRAnnealingLaw(**kw)
    law = LRAnnealingLaw()
    law.load_state_dict({"steps": [0, 1], "lrs": [0.1, 0.1], "losses": [2.0, 1.9], "result": None})
    assert law.state_dict()["losses"] == [2.0, 1.9] and law.fit() is None
    assert registry.get("callback", "lr_annealing_law") is LRAnnealingLaw


# == recipe ======================================================================================
def test_recipe_train_with_calibration_and_naive_bayes_probe(tmp_path):
    from recipes import train

    out = tmp_path / "run"
    train.main(
        [
            "--data",
            "digits",
            "--fast",
            "--callbacks",
            "calibration,naive_bayes_probe",
            "--callbacks.naive_bayes_probe.linear_epochs",
            "2",
            "--out",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    run_dir = out / "tb" / "cross_entropy_seed0"
    acc = events(run_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {
        "val/ece",
        "val/temperature",
        "test/ece",
        "test/ece_scaled",
        "val/naive_bayes_probe_acc",
    } <= scalars
    assert {"val/reliability_diagram", "test/reliability_diagram"} <= set(acc.Tags()["images"])
    assert (run_dir / "calibration" / "reliability_val.png").exists()
    ckpt = out / "checkpoints" / "cross_entropy_seed0" / "last.ckpt"
    assert load_temperature(ckpt) == pytest.approx(acc.Scalars("val/temperature")[-1].value, rel=1e-6)
