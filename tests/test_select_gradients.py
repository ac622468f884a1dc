"""Gradient-based pruning scores: `grand` (full per-sample gradient norm, vmap and loop),
`grand_last_layer` (closed form over the linear head) and `vog` (variance of input gradients
across checkpoints). Exact values against independent computations (hand loops with
`.backward()`, `torch.func` on the head only), limiting cases, errors, short Lightning runs with
`DataPruning` on digits, and stop/resume of VoG's running statistics."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import StopAfter
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from toolkit.functional.grand import grand_last_layer_score, grand_score
from toolkit.functional.vog import (
    class_normalize,
    input_gradients,
    vog_from_moments,
    vog_score,
    welford_update,
)
from toolkit.models import create_model
from toolkit.registry import build
from toolkit.selection import DataPruning, GraNdLastLayerScorer, GraNdScorer, VoGScorer
from toolkit.types import Batch, ModelOutput, as_batch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads gain nothing, and on a loaded machine the per-sample loop's
    many small parallel regions are slowed a hundredfold by oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# == small models =================================================================================


class TinyNet(nn.Module):
    """conv + BN + ReLU + pool, then a linear head; timm-style (embedding available)."""

    def __init__(self, num_classes=4, in_chans=1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.fc = nn.Linear(12, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits=False):
        x = x.flatten(1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = TinyNet(**kw)
    with torch.no_grad():  # non-trivial running statistics, used in eval mode
        m.features[1].running_mean.uniform_(-0.5, 0.5)
        m.features[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def data(n=6, classes=4, chans=1, seed=1, size=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, chans, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def hand_grad_norms(model, x, y, params=None):
    """Per-sample ‖∇θ CE‖ by one .backward() per sample (an independent code path)."""
    params = list(model.parameters()) if params is None else params
    out = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None) ** 0.5)
    model.zero_grad()
    return torch.tensor(out)


# == grand (full gradients) =======================================================================


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_grand_equals_hand_loop(strategy):
    m = tiny()
    x, y = data()
    got = grand_score(m, x, y, strategy=strategy, chunk_size=4)
    assert got.dtype == torch.float32 and got.shape == (6,)
    torch.testing.assert_close(got.double(), hand_grad_norms(m, x, y).double(), rtol=1e-5, atol=1e-6)


def test_grand_strategies_agree_on_the_recipe_convnet():
    torch.manual_seed(0)
    m = create_model("convnet", num_classes=10, in_chans=1, width=4).eval()
    x = torch.randn(5, 1, 28, 28)
    y = torch.tensor([0, 3, 9, 3, 1])
    v = grand_score(m, x, y, "vmap", chunk_size=2)
    lo = grand_score(m, x, y, "loop")
    torch.testing.assert_close(v, lo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo.double(), hand_grad_norms(m, x, y).double(), rtol=1e-5, atol=1e-6)
    assert m.features[1].training is False  # eval mode kept: running statistics untouched


def test_grand_chunk_size_does_not_change_values():
    m = tiny()
    x, y = data(n=7)
    ref = grand_score(m, x, y, "vmap", chunk_size=None)
    for c in (1, 3, 7, 100):
        torch.testing.assert_close(grand_score(m, x, y, "vmap", chunk_size=c), ref)


def test_grand_over_head_only_is_the_last_layer_closed_form():
    m = tiny()
    x, y = data()
    head = {"fc.weight": m.fc.weight, "fc.bias": m.fc.bias}
    out = ModelOutput(m(x), m.forward_head(m.forward_features(x), pre_logits=True))
    closed = grand_last_layer_score(out.logits.detach(), out.embedding.detach(), y)
    for strategy in ("vmap", "loop"):
        torch.testing.assert_close(grand_score(m, x, y, strategy, params=head), closed, rtol=1e-5, atol=1e-6)


def test_grand_ignores_frozen_parameters():
    m = tiny()
    x, y = data()
    m.features[0].weight.requires_grad_(False)
    rest = [p for p in m.parameters() if p.requires_grad]
    want = hand_grad_norms(m, x, y, rest)
    for strategy in ("vmap", "loop"):
        torch.testing.assert_close(
            grand_score(m, x, y, strategy).double(), want.double(), rtol=1e-5, atol=1e-6
        )


def test_grand_errors():
    m = tiny()
    x, y = data()
    with pytest.raises(ValueError, match="strategy"):
        grand_score(m, x, y, strategy="jit")
    with pytest.raises(ValueError, match="chunk_size"):
        grand_score(m, x, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"\(B,\) class targets"):
        grand_score(m, x, y[:3])
    for strategy in ("vmap", "loop"):
        with pytest.raises(ValueError, match="class-index"):
            grand_score(m, x, y.float(), strategy)
        with pytest.raises(ValueError, match="labels out of range"):
            grand_score(m, x, torch.full_like(y, 4), strategy)
    frozen = tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        grand_score(frozen, x, y)
    with pytest.raises(ValueError, match="strategy"):
        GraNdScorer(strategy="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        GraNdScorer(chunk_size=0)


def test_grand_scorer_auto_times_both_and_keeps_the_choice(caplog):
    m = tiny()
    x, y = data(n=8)
    s = GraNdScorer(strategy="auto", chunk_size=4)
    with caplog.at_level(logging.INFO, logger="toolkit.selection.grand"):
        got = s.score_batch(m, Batch(x, y, torch.arange(8)))
    assert set(s.timings) == {"vmap", "loop"} and s.chosen in ("vmap", "loop")
    assert "chose" in caplog.text
    torch.testing.assert_close(got.double(), hand_grad_norms(m, x, y).double(), rtol=1e-5, atol=1e-6)
    state = s.state_dict()
    assert state["chosen"] == s.chosen
    resumed = GraNdScorer(strategy="auto")
    resumed.load_state_dict(state)
    assert resumed.chosen == s.chosen and resumed.timings == s.timings
    fixed = GraNdScorer(strategy="loop")
    fixed.load_state_dict(state)
    assert fixed.chosen == "loop"  # an explicit strategy is not overridden by a checkpoint


class NoVmapNet(nn.Module):
    """Data-dependent Python control flow: vmap cannot run it, a plain loop can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if float(x.sum()) > 1e9:
            return self.fc(x) * 2
        return self.fc(x)


def test_grand_auto_falls_back_to_the_loop_when_vmap_fails():
    torch.manual_seed(0)
    m = NoVmapNet()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(RuntimeError):
        grand_score(m, x, y, "vmap")
    s = GraNdScorer(strategy="auto")
    got = s.score_batch(m, Batch(x, y, torch.arange(4)))
    assert s.chosen == "loop" and s.fallback is not None
    torch.testing.assert_close(got.double(), hand_grad_norms(m, x, y).double(), rtol=1e-5, atol=1e-6)


# == grand_last_layer =============================================================================


def test_grand_last_layer_equals_torch_func_per_sample_head_grads():
    from torch.func import functional_call, grad, vmap

    m = tiny()
    x, y = data(n=5)
    h = m.forward_head(m.forward_features(x), pre_logits=True).detach()
    head = {k: v.detach() for k, v in m.fc.named_parameters()}

    def loss(p, hi, yi):
        return F.cross_entropy(functional_call(m.fc, p, (hi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(head, h, y)
    want = torch.cat([g["weight"].flatten(1), g["bias"]], 1).norm(dim=1)
    got = grand_last_layer_score(m.fc(h).detach(), h, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grand_last_layer_formula_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ‖h‖ = 5, and 0 (bias gradient only)
    y = torch.tensor([0, 2])
    p = torch.softmax(logits.double(), -1)
    want0 = ((p[0, 0] - 1) ** 2 + p[0, 1] ** 2 + p[0, 2] ** 2).sqrt() * (1 + 25) ** 0.5
    want1 = ((1 / 3) ** 2 * 2 + (2 / 3) ** 2) ** 0.5
    got = grand_last_layer_score(logits, h, y)
    torch.testing.assert_close(got.double(), torch.stack([want0, torch.tensor(want1, dtype=torch.float64)]))


def test_grand_last_layer_limits_and_extremes():
    h = torch.randn(3, 8)
    confident = torch.tensor([[1e4, 0.0, 0.0], [0.0, -1e4, 1e4], [5.0, 5.0, 5.0]])
    y = torch.tensor([0, 2, 1])
    got = grand_last_layer_score(confident, h, y)
    assert torch.isfinite(got).all()
    assert got[0] == 0 and got[1] == 0  # a sample learned with certainty does not move the head
    wrong = grand_last_layer_score(confident, h, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(wrong[:2], 2**0.5 * torch.hypot(torch.tensor(1.0), h[:2].norm(dim=1)))
    big = grand_last_layer_score(confident, torch.full((3, 8), 1e30), y)  # ‖h‖² overflows float32
    assert torch.isfinite(big).all()
    bf = grand_last_layer_score(confident.bfloat16(), h.bfloat16(), y)
    assert bf.dtype == torch.float32 and torch.isfinite(bf).all()


def test_grand_last_layer_errors():
    with pytest.raises(ValueError, match="logits must be"):
        grand_last_layer_score(torch.zeros(3), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="embedding must be"):
        grand_last_layer_score(torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class targets"):
        grand_last_layer_score(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class-index"):
        grand_last_layer_score(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(25, 4))
    x, y = data(n=3)
    with pytest.raises(ValueError, match="penultimate embedding.*'grand'"):
        GraNdLastLayerScorer().score_batch(plain, Batch(x, y, torch.arange(3)))
    with pytest.raises(ValueError, match="targets"):
        GraNdLastLayerScorer().score_batch(tiny(), Batch(x, None, torch.arange(3)))


# == vog ==========================================================================================


def test_input_gradients_equal_per_sample_autograd():
    m = tiny(in_chans=3)
    x, y = data(n=4, chans=3)
    got = input_gradients(m, x, y, channel_mean=False)
    for i in range(4):
        xi = x[i : i + 1].clone().requires_grad_(True)
        m(xi)[0, y[i]].backward()
        torch.testing.assert_close(got[i], xi.grad[0].flatten())
    mean = input_gradients(m, x, y)  # the official code's channel average
    assert mean.shape == (4, 25)
    torch.testing.assert_close(mean, got.view(4, 3, 25).mean(1))


def test_input_gradients_leave_parameter_grads_alone():
    m = tiny()
    x, y = data()
    input_gradients(m, x, y)
    assert all(p.grad is None for p in m.parameters())


def vog_by_hand(grads):
    """grads: list over checkpoints of (B, D); the official formula sample by sample."""
    k = len(grads)
    out = []
    for i in range(grads[0].shape[0]):
        g = [t[i].double() for t in grads]
        mu = sum(g) / k
        out.append(float(torch.sqrt(sum((gi - mu) ** 2 for gi in g) / k).mean()))
    return torch.tensor(out, dtype=torch.float64)


def test_vog_score_and_welford_match_the_formula():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 7, generator=g) for _ in range(4)]
    want = vog_by_hand(grads)
    torch.testing.assert_close(vog_score(torch.stack(grads)).double(), want, rtol=1e-5, atol=1e-7)
    count, mean, m2 = torch.zeros(5, dtype=torch.long), torch.zeros(5, 7), torch.zeros(5, 7)
    for t in grads:
        count, mean, m2 = welford_update(count, mean, m2, t)
    torch.testing.assert_close(vog_from_moments(count, m2).double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean, torch.stack(grads).mean(0))


def test_vog_limits():
    s = torch.randn(6, 10)
    same = torch.stack([s, s, s])
    assert torch.equal(vog_score(same), torch.zeros(6))
    count, mean, m2 = torch.zeros(6, dtype=torch.long), torch.zeros(6, 10), torch.zeros(6, 10)
    for t in same:
        count, mean, m2 = welford_update(count, mean, m2, t)
    assert torch.equal(vog_from_moments(count, m2), torch.zeros(6))  # exactly 0, not rounding noise
    grads = torch.randn(3, 6, 10)
    torch.testing.assert_close(vog_score(grads * 2.5), 2.5 * vog_score(grads))
    torch.testing.assert_close(vog_score(grads * -3.0), 3.0 * vog_score(grads))
    torch.testing.assert_close(vog_score(grads + s), vog_score(grads))  # a shift common to every checkpoint
    with pytest.raises(ValueError, match="K checkpoints"):
        vog_score(torch.zeros(4))


def test_class_normalize():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(40, generator=g) * torch.arange(40).float()
    label = torch.arange(40) % 3
    z = class_normalize(score, label)
    for c in range(3):
        zc = z[label == c].double()
        assert abs(float(zc.mean())) < 1e-6
        assert abs(float(zc.std(unbiased=False)) - 1) < 1e-5
        sc = score[label == c].double()
        torch.testing.assert_close(zc, ((sc - sc.mean()) / sc.std(unbiased=False)), rtol=1e-5, atol=1e-6)
    flat = class_normalize(torch.tensor([0.1, 0.1, 0.1, 2.0]), torch.tensor([0, 0, 0, 1]))
    assert torch.equal(flat, torch.zeros(4))  # one value per class / equal values: 0, not NaN
    with pytest.raises(ValueError, match="score and label"):
        class_normalize(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def test_vog_scorer_over_checkpoints_equals_independent_computation():
    x, y = data(n=9, classes=3)
    models = [tiny(seed=s, num_classes=3) for s in range(3)]  # three "checkpoints"
    scorer = VoGScorer()
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 7, 3, 5])
    for m in models:
        scorer.begin_pass()
        for part in (perm[:4], perm[4:]):  # batches in another order each pass: keyed by index
            scorer.pass_batch(m, Batch(x[part], y[part], part))
        scorer.end_pass()
        perm = perm.flip(0)
    grads = []
    for m in models:  # by hand: one backward per sample and checkpoint
        rows = []
        for i in range(9):
            xi = x[i : i + 1].clone().requires_grad_(True)
            m(xi)[0, y[i]].backward()
            rows.append(xi.grad.flatten())
        grads.append(torch.stack(rows))
    raw = vog_by_hand(grads)
    want = torch.zeros(9, dtype=torch.float64)
    for c in y.unique():
        r = raw[y == c]
        want[y == c] = (r - r.mean()) / r.std(unbiased=False)
    got = scorer.scores()
    assert torch.equal(got.index, torch.arange(9)) and got.meta["checkpoints"] == 3
    torch.testing.assert_close(got.score.double(), want, rtol=1e-4, atol=1e-5)
    for c in y.unique():
        assert abs(float(got.score[y == c].double().mean())) < 1e-5
    scorer.normalize = False
    torch.testing.assert_close(scorer.scores().score.double(), raw, rtol=1e-5, atol=1e-7)


def test_vog_scorer_errors():
    m = tiny()
    x, y = data(n=4)
    s = VoGScorer()
    with pytest.raises(ValueError, match="no scoring pass"):
        s.scores()
    with pytest.raises(ValueError, match="index"):
        s.pass_batch(m, Batch(x, y, None))
    with pytest.raises(ValueError, match="class targets"):
        s.pass_batch(m, Batch(x, None, torch.arange(4)))
    with pytest.raises(NotImplementedError, match="text"):
        s.pass_batch(m, Batch({"input_ids": torch.zeros(4, 3, dtype=torch.long)}, y, torch.arange(4)))
    with pytest.raises(TypeError, match="floating-point"):
        s.pass_batch(m, Batch(x.long(), y, torch.arange(4)))
    s.begin_pass()
    s.pass_batch(m, Batch(x, y, torch.arange(4)))
    s.end_pass()
    with pytest.raises(ValueError, match="at least 2 checkpoints.*score_epochs"):
        s.scores()
    s.begin_pass()
    s.pass_batch(m, Batch(x, (y + 1) % 4, torch.arange(4)))
    with pytest.raises(ValueError, match="label changed"):
        s.end_pass()
    s.begin_pass()
    s.pass_batch(m, Batch(x, y, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="twice"):
        s.end_pass()


def test_vog_state_dict_round_trip_and_reset_keeps_checkpoints():
    x, y = data(n=5)
    s = VoGScorer()
    for seed in (0, 1):
        s.begin_pass()
        s.pass_batch(tiny(seed), Batch(x, y, torch.arange(5)))
        s.end_pass()
    s.reset()
    assert s.checkpoints == 2
    other = VoGScorer()
    other.load_state_dict(s.state_dict())
    assert torch.equal(other.scores().score, s.scores().score)


# == registry =====================================================================================


def test_selectors_are_registered_with_the_papers_defaults():
    g = build("selector", "grand", keep=0.5, strategy="loop", chunk_size=8)
    assert isinstance(g, DataPruning) and isinstance(g.scorer, GraNdScorer)
    assert g.scorer.chosen == "loop" and g.scorer.chunk_size == 8 and g.pass_epochs == [0]
    assert g.mode == "hardest"
    gl = build("selector", "grand_last_layer", keep=0.3)
    assert isinstance(gl.scorer, GraNdLastLayerScorer) and gl.pass_epochs == [1]
    v = build("selector", "vog", keep=0.5, normalize=False)
    assert isinstance(v.scorer, VoGScorer) and v.pass_epochs == [1, 2, 3] and v.scorer.normalize is False
    assert len({g.state_key, gl.state_key, v.state_key}) == 3


# == Lightning runs ===============================================================================


def digits_dm():
    return build("data", "digits", batch_size=32)


def module(seed=0):
    from toolkit.modules import ClassificationModule

    torch.manual_seed(seed)
    return ClassificationModule(
        "convnet", num_classes=10, in_chans=1, loss="cross_entropy", model_kwargs={"width": 8}
    )


def run(callbacks, max_epochs=2, ckpt_path=None, seed=0, **kw):
    L.seed_everything(seed)
    m = module(seed)
    dm = digits_dm()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **{"enable_checkpointing": False, **kw},
    )
    trainer.fit(m, datamodule=dm, ckpt_path=ckpt_path)
    return m, dm


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("grand", {"strategy": "auto"}),
        ("grand_last_layer", {}),
        ("vog", {"score_epochs": [0, 1]}),
    ],
)
def test_lightning_run_prunes_by_score(name, kwargs, tmp_path):
    cb = build("selector", name, keep=0.5, save_scores=str(tmp_path / "s.pt"), **kwargs)
    _, dm = run([cb], max_epochs=2)
    n = len(dm.train_sample_indices)
    assert cb.subset is not None and len(cb.subset) == round(0.5 * n)
    scores = cb.scorer.scores()
    scores.check_covers(dm.train_sample_indices)
    assert torch.isfinite(scores.score).all()
    kept = set(cb.subset.tolist())  # "hardest": the kept scores are the highest
    order = scores.index[scores.score.argsort(descending=True, stable=True)]
    assert kept == set(order[: len(kept)].tolist())
    assert (tmp_path / "s.pt").exists()
    if name == "grand":
        assert cb.scorer.chosen in ("vmap", "loop")


def test_grand_pass_scores_equal_the_functional_on_the_trained_model():
    cb = build("selector", "grand", keep=0.5, strategy="vmap", score_epochs=1)
    m, dm = run([cb], max_epochs=1)
    model = m.model.eval()
    batch = as_batch(next(iter(dm.scoring_dataloader())))
    want = hand_grad_norms(model, batch.input[:6], batch.target[:6])
    got = cb.scorer.scores().dense()[batch.index[:6]]
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)


def vog_run(tmp_path, stop_after=None):
    kw = dict(max_epochs=3, score_epochs=[0, 1, 2])
    cb = build("selector", "vog", keep=0.5, score_epochs=kw["score_epochs"])
    if stop_after is None:
        m, _ = run([cb], max_epochs=kw["max_epochs"])
        return m, cb
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    run([cb, ckpt, StopAfter(stop_after)], max_epochs=kw["max_epochs"], enable_checkpointing=True)
    cb2 = build("selector", "vog", keep=0.5, score_epochs=kw["score_epochs"])
    ckpt2 = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    m, _ = run(
        [cb2, ckpt2],
        max_epochs=kw["max_epochs"],
        ckpt_path=str(tmp_path / "last.ckpt"),
        enable_checkpointing=True,
        seed=99,
    )
    return m, cb2


def test_vog_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    m_a, a = vog_run(tmp_path / "a")
    m_b, b = vog_run(tmp_path / "b", stop_after=1)
    assert b.done_passes == a.done_passes == [0, 1, 2]
    sa, sb = a.scorer.state_dict(), b.scorer.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.subset, b.subset)
    assert torch.equal(a.scorer.scores().score, b.scorer.scores().score)
    wa, wb = m_a.state_dict(), m_b.state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
