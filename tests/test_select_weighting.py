"""Sample reweighters on the loss bus: `loss_reweighting`, `dataset_equity`, `curriculum` and their
`SampleWeighting` base.

Exact values against the formulas written independently here (Python loops, scipy as a ranking
oracle), limits (r → ∞ is the plain mean, W(e ≥ m) = 1, w(p = 0) = 1), monotonicity, the
composition with the bus's local mean (and, in a 2-process gloo run, with DDP's gradient
averaging), errors, short Lightning runs on digits and stop/resume equal to an uninterrupted run.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import StopAfter
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits

from toolkit import Progress, Step, build
from toolkit.functional.curriculum import curriculum_weight, difficulty_to_easiness
from toolkit.functional.dataset_equity import cluster_features, cluster_likelihood, dataset_equity_weight
from toolkit.functional.loss_reweighting import (
    STRATEGIES,
    loss_reweighting_weights,
    normalize_losses,
    reweighting_strategy,
)
from toolkit.modules import ClassificationModule
from toolkit.selection import Curriculum, DatasetEquity, LossReweighting, SampleScores, SampleWeighting
from toolkit.types import Batch, ModelOutput

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """scikit-learn's OpenMP/BLAS pools spin badly on a loaded 2-core machine: one thread here."""
    with threadpool_limits(1):
        yield


# == helpers =======================================================================================


def digits():
    return build("data", "digits", batch_size=32)


def make_module(seed=0, loss="cross_entropy"):
    L.seed_everything(seed)
    return ClassificationModule("convnet", num_classes=10, in_chans=1, loss=loss, model_kwargs={"width": 8})


KW = dict(
    accelerator="cpu",
    max_epochs=2,
    limit_train_batches=3,
    limit_val_batches=0,
    num_sanity_val_steps=0,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    deterministic=True,
)


class Record(Callback):
    """Put before the weighter: reads the weights it returned for each training batch."""

    def __init__(self, weighting):
        self.weighting = weighting
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        w = self.weighting._last
        self.rows.append(
            (trainer.current_epoch, outputs["index"].clone(), w.clone(), outputs["per_sample_loss"])
        )


class MemLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics, self.histograms = [], []

    name = "mem"
    version = 0

    @property
    def experiment(self):
        return self

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, step, values.clone()))

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, *args, **kwargs):
        pass


def fit(callbacks, module=None, **kw):
    module = module if module is not None else make_module()
    L.Trainer(callbacks=callbacks, enable_checkpointing=False, **{**KW, **kw}).fit(
        module, datamodule=digits()
    )
    return module


def straight_and_resumed(make_cb, tmp_path):
    """(state_dict, callback state) of an uninterrupted 2-epoch run and of one stopped after an epoch
    and resumed from its checkpoint with a differently initialised module and a fresh callback."""
    cb = make_cb()
    straight = fit([cb], make_module(3))
    out = [(straight.state_dict(), cb.state_dict())]
    cb = make_cb()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb, ckpt, StopAfter(1)], **KW).fit(make_module(3), datamodule=digits())
    resumed = make_module(42)
    cb = make_cb()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb, ckpt], **KW).fit(
        resumed, datamodule=digits(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    out.append((resumed.state_dict(), cb.state_dict()))
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same(a[k], b[k])
        else:
            assert a[k] == b[k], k


def step_of(n, index=None, epoch=0, global_step=0, module=None, max_epochs=1, steps_per_epoch=1):
    logits = torch.zeros(n, 3)
    progress = Progress(
        epoch=epoch, global_step=global_step, max_epochs=max_epochs, steps_per_epoch=steps_per_epoch
    )
    return Step(
        Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), index),
        ModelOutput(logits),
        None,
        progress,
        module,
    )


# == the base: bus registration, errors, logging ===================================================


def test_a_module_without_the_bus_is_a_clear_error():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch.input.flatten(1)), batch.target)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="add_weighter.*LossBus"):
        L.Trainer(callbacks=[LossReweighting()], **KW).fit(Plain(), datamodule=digits())


def test_registers_on_the_bus_and_removes_itself_after_fit():
    cb = LossReweighting(warmup=0)
    module = fit([cb])
    assert "loss_reweighting" not in module._weighters
    cb.setup(None, module, "fit")
    assert module._weighters["loss_reweighting"] is cb
    cb.teardown(None, module, "fit")
    assert not module._weighters
    with pytest.warns(UserWarning, match="nothing to do in 'test'"):
        cb.setup(None, module, "test")
    assert not module._weighters


def test_weights_are_one_outside_training():
    module = make_module()
    module.eval()
    w = Curriculum(scores=torch.rand(10))(step_of(4, module=module), torch.rand(4))
    assert torch.equal(w, torch.ones(4))


def test_weight_statistics_and_histogram_are_logged():
    cb = LossReweighting(warmup=0, log_every_n_steps=2)
    log = MemLogger()
    fit([cb], logger=log, max_epochs=1)
    logged = [(m, s) for m, s in log.metrics if "selection/loss_reweighting/weight_mean" in m]
    assert [s for _, s in logged] == [1, 3]
    for m, _ in logged:
        assert m["selection/loss_reweighting/weight_min"] <= m["selection/loss_reweighting/weight_mean"]
        assert m["selection/loss_reweighting/weight_mean"] <= m["selection/loss_reweighting/weight_max"]
        assert m["selection/loss_reweighting/weight_mean"] == pytest.approx(1.0, rel=1e-5)  # B·w_i, Σw = 1
    assert [(t, s) for t, s, _ in log.histograms] == [("selection/loss_reweighting/weights", 1)] + [
        ("selection/loss_reweighting/weights", 3)
    ]
    assert isinstance(cb, SampleWeighting)


def test_bad_base_arguments():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        LossReweighting(log_every_n_steps=-1)


# == loss_reweighting ==============================================================================


def ref_weights(losses, strategy, r, delta=1.0):
    """The official README's steps, written with Python floats."""
    lo, hi = min(losses), max(losses)
    span = max(hi - lo, 1e-6)
    norm = [2 * delta * v / span - delta * (hi + lo) / span for v in losses]
    if strategy == "linupper":
        f = [min(v + delta, delta) for v in norm]
    elif strategy == "quadratic":
        f = [1 - v * v / delta**2 for v in norm]
    elif strategy == "extremes":
        f = [abs(v) for v in norm]
    else:
        f = list(norm)
    top = max(f)
    e = [math.exp((v - top) / r) for v in f]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("r", [0.3, 1.0, 4.0])
def test_loss_reweighting_exact_values_and_normalisation(strategy, r, rng):
    losses = torch.rand(11, generator=rng) * 5
    w = loss_reweighting_weights(losses, strategy, r)
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx(ref_weights(losses.double().tolist(), strategy, r), rel=1e-5, abs=1e-7)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert (w > 0).all()


def test_normalisation_maps_the_batch_onto_minus_delta_delta():
    x = normalize_losses(torch.tensor([1.0, 2.0, 4.0, 5.0]), delta=2.0)
    assert x.tolist() == pytest.approx([-2.0, -1.0, 1.0, 2.0])
    assert normalize_losses(torch.full((3,), 7.0)).tolist() == [0.0, 0.0, 0.0]


def test_large_r_gives_the_plain_mean(rng):
    losses = torch.rand(9, generator=rng) * 3
    for strategy in STRATEGIES:
        w = loss_reweighting_weights(losses, strategy, r=1e9)
        assert w.tolist() == pytest.approx([1 / 9] * 9, rel=1e-6)
    # through the bus: the loss is the plain mean of the per-sample losses
    module = make_module()
    module.add_weighter("loss_reweighting", LossReweighting(r=1e9, warmup=0))
    logits, y = torch.randn(9, 10, generator=rng), torch.randint(0, 10, (9,), generator=rng)
    step = Step(Batch(torch.zeros(9, 1), y, torch.arange(9)), ModelOutput(logits), None, Progress(), module)
    total = module.compute_loss(step)["loss"]
    assert float(total) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


def test_equal_losses_give_equal_weights():
    assert loss_reweighting_weights(torch.full((4,), 2.5)).tolist() == pytest.approx([0.25] * 4)


def test_linupper_is_monotone_and_constant_above_the_mid_range(rng):
    losses = torch.rand(50, generator=rng) * 4 + 1
    w = loss_reweighting_weights(losses, "linupper", r=0.5)
    order = torch.argsort(losses)
    assert (torch.diff(w[order]) >= -1e-9).all()
    mid = (losses.max() + losses.min()) / 2
    above = w[losses >= mid]
    assert len(above) > 3 and torch.allclose(above, above[0].expand_as(above), rtol=0, atol=1e-9)
    assert (w[losses < mid] < above[0]).all()
    f = reweighting_strategy(normalize_losses(losses), "linupper")
    assert float(f.max()) == 1.0 and float(f.min()) == 0.0


def test_other_strategies_shapes(rng):
    losses = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    wq = loss_reweighting_weights(losses, "quadratic", r=1.0)
    assert int(wq.argmax()) == 2 and wq[0] == pytest.approx(float(wq[4]))  # mid-range first
    we = loss_reweighting_weights(losses, "extremes", r=1.0)
    assert int(we.argmin()) == 2 and we[0] == pytest.approx(float(we[4]))  # both ends first


def test_bus_total_is_the_weighted_sum(rng):
    """One process: the weight B·w_i times the bus's 1/B mean gives Σ w_i ℓ_i."""
    module = make_module()
    module.add_weighter("loss_reweighting", LossReweighting(strategy="linupper", r=0.5, warmup=0))
    logits, y = torch.randn(7, 10, generator=rng) * 3, torch.randint(0, 10, (7,), generator=rng)
    step = Step(Batch(torch.zeros(7, 1), y, torch.arange(7)), ModelOutput(logits), None, Progress(), module)
    out = module.compute_loss(step)
    ce = [float(F.cross_entropy(logits[i : i + 1], y[i : i + 1])) for i in range(7)]
    w = ref_weights(ce, "linupper", 0.5)
    assert float(out["loss"]) == pytest.approx(sum(a * b for a, b in zip(w, ce)), rel=1e-5)
    assert out["sample_weights"].tolist() == pytest.approx([7 * v for v in w], rel=1e-5)


def test_warmup_steps_and_fraction():
    cb = LossReweighting(warmup=3)
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(cb(step_of(3, global_step=2), losses), torch.ones(3))
    assert not torch.equal(cb(step_of(3, global_step=3), losses), torch.ones(3))
    cb = LossReweighting(warmup=0.25)  # of 2 epochs × 10 steps = 5 steps
    assert torch.equal(cb(step_of(3, global_step=4, max_epochs=2, steps_per_epoch=10), losses), torch.ones(3))
    assert not torch.equal(
        cb(step_of(3, global_step=5, max_epochs=2, steps_per_epoch=10), losses), torch.ones(3)
    )


def test_loss_reweighting_errors():
    with pytest.raises(ValueError, match="strategy"):
        LossReweighting(strategy="lin")
    with pytest.raises(ValueError, match="r .*> 0"):
        LossReweighting(r=0)
    with pytest.raises(ValueError, match="delta"):
        LossReweighting(delta=-1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LossReweighting(warmup=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        LossReweighting(warmup=-2)
    with pytest.raises(TypeError, match="warmup"):
        LossReweighting(warmup="10")
    with pytest.raises(ValueError, match="non-finite"):
        loss_reweighting_weights(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-empty"):
        loss_reweighting_weights(torch.zeros(0))


@pytest.mark.slow
def test_ddp_gradient_is_the_globally_weighted_sum(tmp_path):
    """2 gloo processes with 5 and 3 samples: mean_local(s_i·ℓ_i) averaged over ranks has the
    gradient of Σ_global w_i·ℓ_i, the weights being a softmax over all 8 samples."""
    r = subprocess.run(
        [sys.executable, str(HERE / "ddp_loss_reweighting.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE.parent,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    sys.path.insert(0, str(HERE))
    from ddp_loss_reweighting import data

    x, y, w0 = data()
    weight = w0.clone().requires_grad_(True)
    losses = F.cross_entropy(x @ weight.T, y, reduction="none")
    w = ref_weights(losses.detach().double().tolist(), "linupper", 0.5)
    (torch.tensor(w) * losses).sum().backward()
    for rank in ranks:
        assert rank["grad"] == pytest.approx(weight.grad.flatten().tolist(), rel=1e-5, abs=1e-7)
    assert ranks[0]["losses"] + ranks[1]["losses"] == pytest.approx(losses.tolist(), rel=1e-6)
    assert ranks[0]["weights"] == pytest.approx([2 * 5 * v for v in w[:5]], rel=1e-5)
    assert ranks[1]["weights"] == pytest.approx([2 * 3 * v for v in w[5:]], rel=1e-5)


def test_loss_reweighting_lightning_run():
    cb = LossReweighting(warmup=2, r=0.5)
    rec = Record(cb)
    fit([rec, cb], max_epochs=1)
    assert len(rec.rows) == 3
    for i, (_, _index, w, psl) in enumerate(rec.rows):
        if i < 2:
            assert torch.equal(w, torch.ones_like(w))
        else:
            ref = ref_weights(psl.double().tolist(), "linupper", 0.5)
            assert w.tolist() == pytest.approx([len(ref) * v for v in ref], rel=1e-4)


def test_loss_reweighting_resumes_exactly(tmp_path):
    (a, ca), (b, cb) = straight_and_resumed(lambda: LossReweighting(warmup=2, r=0.5), tmp_path)
    assert_same(a, b)
    assert ca == cb


# == dataset_equity ================================================================================


@pytest.mark.parametrize("eta, gamma", [(1.0, 5.0), (0.5, 5.0), (0.3, 2.0), (0.0, 1.0)])
def test_dataset_equity_weight_exact_and_bounds(eta, gamma):
    p = torch.linspace(0, 1, 21)
    w = dataset_equity_weight(p, eta, gamma)
    ref = [(eta + (1 - v) ** gamma) / (eta + 1) for v in p.double().tolist()]
    assert w.tolist() == pytest.approx(ref, rel=1e-6, abs=1e-7)
    assert float(w[0]) == 1.0
    assert float(w[-1]) == pytest.approx(eta / (eta + 1))
    assert (w >= eta / (eta + 1) - 1e-7).all() and (w <= 1).all()
    assert (torch.diff(w) < 0).all()  # strictly decreasing in p


def test_dataset_equity_weight_limits_and_errors():
    assert torch.equal(dataset_equity_weight(torch.rand(5), eta=1.0, gamma=0.0), torch.ones(5))
    with pytest.raises(ValueError, match="eta"):
        dataset_equity_weight(torch.rand(3), eta=-1)
    with pytest.raises(ValueError, match="gamma"):
        dataset_equity_weight(torch.rand(3), gamma=float("inf"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dataset_equity_weight(torch.tensor([0.5, 1.5]))


def test_cluster_likelihood_exact():
    labels = torch.tensor([0, 0, 1, -1, 2, 2, 2, -1])
    assert cluster_likelihood(labels).tolist() == pytest.approx(
        [2 / 8, 2 / 8, 1 / 8, 1 / 8, 3 / 8, 3 / 8, 3 / 8, 1 / 8]
    )
    assert cluster_likelihood(labels, "max").tolist() == pytest.approx(
        [2 / 3, 2 / 3, 1 / 3, 1 / 3, 1, 1, 1, 1 / 3]
    )
    with pytest.raises(ValueError, match="likelihood"):
        cluster_likelihood(labels, "density")


def blobs(sizes, rng, dim=5):
    centers = torch.randn(len(sizes), dim, generator=rng) * 20
    x = torch.cat([c + torch.randn(n, dim, generator=rng) for c, n in zip(centers, sizes)])
    truth = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    return x, truth


def same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_cluster_features_recovers_separated_blobs(rng):
    x, truth = blobs([40, 25, 10], rng)
    labels = cluster_features(x, "kmeans", n_clusters=3)
    assert same_partition(labels, truth)
    p = cluster_likelihood(labels)
    assert sorted(set(p.tolist())) == pytest.approx([10 / 75, 25 / 75, 40 / 75])
    labels = cluster_features(x, "tsne_dbscan", perplexity=10)
    kept = labels >= 0
    assert kept.float().mean() > 0.9  # few DBSCAN noise points
    for k in labels[kept].unique():  # t-SNE may split a blob, never merge two
        assert len(truth[labels == k].unique()) == 1
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_features(x, "kmeans", n_clusters=0)
    with pytest.raises(ValueError, match="method"):
        cluster_features(x, "hdbscan")
    with pytest.raises(ValueError, match="non-finite"):
        cluster_features(torch.full((4, 2), float("nan")))


def test_dataset_equity_errors():
    with pytest.raises(ValueError, match="features"):
        DatasetEquity(features="pixels")
    with pytest.raises(ValueError, match="cluster"):
        DatasetEquity(cluster="dbscan")
    with pytest.raises(ValueError, match="n_clusters"):
        DatasetEquity(n_clusters=0)
    with pytest.raises(ValueError, match="save_likelihoods"):
        DatasetEquity(save_likelihoods="p.csv")
    with pytest.raises(ValueError, match=r"likelihoods must be in \[0, 1\]"):
        DatasetEquity(likelihoods=torch.tensor([0.5, 2.0]))


@pytest.mark.parametrize("features", ["model", "input"])
def test_dataset_equity_lightning_run(features):
    cb = DatasetEquity(eta=0.5, gamma=2.0, features=features, n_clusters=5)
    rec = Record(cb)
    dm = digits()
    fit([rec, cb], max_epochs=1)
    train = dm.train_sample_indices
    p = cb.p
    assert torch.equal(torch.nonzero(~torch.isnan(p)).flatten(), train)
    sizes = torch.bincount(cb.labels[train])
    assert len(sizes) == 5 and int(sizes.sum()) == len(train)
    assert torch.allclose(p[train], sizes[cb.labels[train]].double() / len(train))
    for _, index, w, _ in rec.rows:
        ref = [(0.5 + (1 - v) ** 2.0) / 1.5 for v in p[index].tolist()]
        assert w.tolist() == pytest.approx(ref, rel=1e-6, abs=1e-7)


def test_dataset_equity_given_and_saved_likelihoods(tmp_path):
    dm = digits()
    train = dm.train_sample_indices
    dense = torch.full((int(train.max()) + 1,), float("nan"))
    dense[train] = torch.rand(len(train), generator=torch.Generator().manual_seed(1))
    cb = DatasetEquity(likelihoods=dense, save_likelihoods=tmp_path / "p.pt")
    rec = Record(cb)
    fit([rec, cb], max_epochs=1)
    loaded = SampleScores.load(tmp_path / "p.pt")
    assert torch.equal(loaded.index, train)
    assert torch.allclose(loaded.score.double(), dense[train].double(), atol=1e-7)
    for _, index, w, _ in rec.rows:
        assert torch.allclose(w, dataset_equity_weight(dense[index]))
    # likelihoods of another split: a clear error
    with pytest.raises(ValueError, match="cover"):
        fit([DatasetEquity(likelihoods=dense[:100])], max_epochs=1)


def test_dataset_equity_batch_without_index():
    cb = DatasetEquity(likelihoods=torch.rand(10))
    cb.p = torch.rand(10).double()
    with pytest.raises(ValueError, match="dataset_equity keeps per-sample memory.*index"):
        cb(step_of(3, index=None), torch.rand(3))
    with pytest.raises(ValueError, match="index 12"):
        cb(step_of(3, index=torch.tensor([0, 1, 12])), torch.rand(3))


def test_dataset_equity_resumes_exactly(tmp_path):
    (a, ca), (b, cb) = straight_and_resumed(lambda: DatasetEquity(n_clusters=4), tmp_path)
    assert_same(a, b)
    assert torch.equal(ca["p"].nan_to_num(-1), cb["p"].nan_to_num(-1))
    assert torch.equal(ca["labels"], cb["labels"])


# == curriculum ====================================================================================


def test_curriculum_weight_limits_and_exact_values(rng):
    d = torch.rand(20, generator=rng)
    m = 5
    assert torch.allclose(curriculum_weight(d, 0, m), d, atol=1e-7)
    for e in (5, 6, 50):
        assert torch.equal(curriculum_weight(d, e, m), torch.ones(20))
    prev = curriculum_weight(d, 0, m)
    for e in range(1, 8):
        cur = curriculum_weight(d, e, m)
        assert (cur >= prev - 1e-7).all()
        prev = cur
    e = 2
    ref = [(v + 1e-8) * (1 - e / m) + e / m for v in d.double().tolist()]
    assert curriculum_weight(d, e, m).tolist() == pytest.approx(ref, rel=1e-6)
    anti = [(1 - v + 1e-8) * (1 - e / m) + e / m for v in d.double().tolist()]
    assert curriculum_weight(d, e, m, anti=True).tolist() == pytest.approx(anti, rel=1e-6)
    assert torch.allclose(curriculum_weight(d, 0, m, anti=True), 1 - d, atol=1e-7)


def test_difficulty_to_easiness_mappings(rng):
    s = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 0.5])
    ranks = rankdata(s.numpy(), method="average") - 1  # 0 = easiest
    assert difficulty_to_easiness(s).tolist() == pytest.approx((1 - ranks / 5).tolist())
    assert difficulty_to_easiness(s, higher_is_harder=False).tolist() == pytest.approx((ranks / 5).tolist())
    assert difficulty_to_easiness(s, "minmax").tolist() == pytest.approx([(5 - v) / 4.5 for v in s.tolist()])
    d = torch.rand(7, generator=rng)
    assert torch.equal(difficulty_to_easiness(d, "easiness"), d)
    assert difficulty_to_easiness(torch.full((3,), 2.0), "minmax").tolist() == [1.0] * 3
    assert difficulty_to_easiness(torch.full((3,), 2.0)).tolist() == [0.5] * 3
    e = difficulty_to_easiness(torch.randn(101, generator=rng))
    assert float(e.min()) == 0.0 and float(e.max()) == 1.0 and float(e.mean()) == pytest.approx(0.5)


def test_curriculum_errors():
    with pytest.raises(ValueError, match="end_epoch"):
        Curriculum(end_epoch=0)
    with pytest.raises(ValueError, match="mapping"):
        Curriculum(mapping="zscore")
    with pytest.raises(TypeError, match="PassScorer"):
        Curriculum(scorer="el2n")
    with pytest.raises(ValueError, match="mapping='easiness' needs scores in"):
        difficulty_to_easiness(torch.tensor([0.5, 2.0]), "easiness")
    with pytest.raises(ValueError, match="finite"):
        difficulty_to_easiness(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match=r"easiness D must be in \[0, 1\]"):
        curriculum_weight(torch.tensor([1.5]), 0, 3)
    cb = Curriculum(scores=torch.rand(10))
    with pytest.raises(RuntimeError, match="start of fit"):
        cb(step_of(2, index=torch.tensor([0, 1])), torch.rand(2))
    cb.easiness = torch.rand(10)
    with pytest.raises(ValueError, match="curriculum keeps per-sample memory.*index"):
        cb(step_of(2), torch.rand(2))


def test_curriculum_lightning_run_with_given_scores():
    dm = digits()
    train = dm.train_sample_indices
    dense = torch.full((int(train.max()) + 1,), float("nan"))
    dense[train] = torch.randn(len(train), generator=torch.Generator().manual_seed(2))
    cb = Curriculum(end_epoch=2, scores=dense)
    rec = Record(cb)
    fit([rec, cb], max_epochs=3)
    ranks = torch.from_numpy(rankdata(dense[train].numpy()) - 1)
    d = torch.full_like(dense, float("nan"))
    d[train] = (1 - ranks / (len(train) - 1)).float()
    assert torch.allclose(cb.easiness, d, atol=1e-6, equal_nan=True)
    assert [e for e, *_ in rec.rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for epoch, index, w, _ in rec.rows:
        ref = [(v + 1e-8) * (1 - epoch / 2) + epoch / 2 if epoch < 2 else 1.0 for v in d[index].tolist()]
        assert w.tolist() == pytest.approx(ref, rel=1e-6, abs=1e-7)
    with pytest.raises(ValueError, match="cover"):
        fit([Curriculum(scores=dense[:50])], max_epochs=1)


def test_curriculum_scores_the_initial_model_with_el2n():
    cb = Curriculum(end_epoch=3)
    module = make_module(5)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit([cb], module=module, max_epochs=1)
    train = digits().train_sample_indices
    # the same EL2N, computed here with the initial weights
    net = make_module(5).model
    net.load_state_dict(initial)
    net.eval()
    dm = digits()
    scores = torch.full((int(train.max()) + 1,), float("nan"))
    with torch.no_grad():
        for b in dm.scoring_dataloader():
            p = net(b.input).softmax(-1)
            scores[b.index] = (p - F.one_hot(b.target, 10)).norm(dim=-1)
    ranks = torch.from_numpy(rankdata(scores[train].numpy()) - 1)
    assert torch.allclose(cb.easiness[train], (1 - ranks / (len(train) - 1)).float(), atol=1e-6)


def test_curriculum_resumes_exactly(tmp_path):
    (a, ca), (b, cb) = straight_and_resumed(lambda: Curriculum(end_epoch=2), tmp_path)
    assert_same(a, b)
    assert torch.equal(ca["easiness"].nan_to_num(-1), cb["easiness"].nan_to_num(-1))
