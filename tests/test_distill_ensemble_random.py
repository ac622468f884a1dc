"""Ensemble distillation, random-teacher distillation and the k-NN / linear-probe callback."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import toolkit.distill.ensemble_kd  # noqa: F401 - registers ensemble_kd
import toolkit.distill.random_teacher  # noqa: F401 - registers random_teacher
from recipes import distill
from toolkit import Progress, Step, build
from toolkit.callbacks import KNNProbe, knn_predict, linear_probe
from toolkit.data import DigitsDataModule
from toolkit.distill import Teacher
from toolkit.distill.ensemble_kd import EnsembleKDLoss
from toolkit.distill.random_teacher import DINOHead, RandomTeacherLoss
from toolkit.functional import kd_loss
from toolkit.functional.ensemble_kd import ensemble_kd_loss, ensemble_log_probs
from toolkit.functional.random_teacher import random_teacher_loss
from toolkit.models import create_model
from toolkit.models.output import forward_output
from toolkit.modules import ClassificationModule, DistillationModule
from toolkit.modules.config import build_terms
from toolkit.types import Batch, ModelOutput

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "distill"


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


# == ensemble_kd ================================================================================
@pytest.fixture
def members(rng):
    s = torch.randn(6, 7, generator=rng) * 3
    ts = [torch.randn(6, 7, generator=rng) * 3 for _ in range(3)]
    return s, ts


def test_ensemble_kd_matches_formula_and_reductions(members):
    s, ts = members
    tau = 2.5
    for combine in ("probs", "logits"):
        if combine == "probs":
            p_bar = np.mean([np_softmax(t.numpy() / tau) for t in ts], axis=0)
        else:
            p_bar = np_softmax(np.mean([t.double().numpy() for t in ts], axis=0) / tau)
        expected = tau**2 * np_kl(p_bar, np_softmax(s.numpy() / tau))
        got = ensemble_kd_loss(s, ts, tau, combine, reduction="none")
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            ensemble_log_probs(torch.stack(ts), tau, combine).exp().numpy(), p_bar, rtol=1e-5
        )
        assert ensemble_kd_loss(s, torch.stack(ts), tau, combine).item() == pytest.approx(
            expected.mean(), rel=1e-5
        )
        assert ensemble_kd_loss(s, ts, tau, combine, reduction="sum").item() == pytest.approx(
            expected.sum(), rel=1e-5
        )
    # the two rules differ for different members
    assert not torch.allclose(ensemble_kd_loss(s, ts, tau, "probs"), ensemble_kd_loss(s, ts, tau, "logits"))


def test_ensemble_kd_limits(members):
    s, ts = members
    for combine in ("probs", "logits"):
        for tau in (1.0, 4.0):
            # one member, or K identical members: Hinton KD
            single = kd_loss(s, ts[0], tau, reduction="none")
            assert torch.allclose(ensemble_kd_loss(s, [ts[0]], tau, combine, "none"), single, atol=1e-5)
            assert torch.allclose(ensemble_kd_loss(s, [ts[0]] * 4, tau, combine, "none"), single, atol=1e-5)
    # mean logits: KD towards the averaged logits
    mean_t = torch.stack(ts).mean(0)
    assert torch.allclose(
        ensemble_kd_loss(s, ts, 3.0, "logits", "none"), kd_loss(s, mean_t, 3.0, reduction="none"), atol=1e-5
    )
    # at τ = 1 the Teacher class's own "probs" combination (log of mean softmax) is the same target
    teacher = Teacher([torch.nn.Identity(), torch.nn.Identity()], combine="probs")
    combined = torch.logsumexp(torch.log_softmax(torch.stack(ts[:2]), -1), 0) - np.log(2)
    assert torch.allclose(
        ensemble_kd_loss(s, ts[:2], 1.0, "probs", "none"),
        kd_loss(s, combined, 1.0, reduction="none"),
        atol=1e-5,
    )
    assert teacher.combine == "probs"
    # the student matching the ensemble: zero loss and zero gradient
    log_p = ensemble_log_probs(ts, 2.0, "probs")
    sg = (2.0 * log_p).clone().requires_grad_(True)
    v = ensemble_kd_loss(sg, ts, 2.0, "probs", "sum")
    v.backward()
    assert v.abs().item() < 1e-4 and sg.grad.abs().max().item() < 1e-5


def test_ensemble_kd_gradient(members):
    s, ts = members
    tau = 2.0
    sg = s.clone().requires_grad_(True)
    ensemble_kd_loss(sg, ts, tau, "probs", "sum").backward()
    p_bar = ensemble_log_probs(ts, tau, "probs").exp()
    assert torch.allclose(sg.grad, tau * (torch.softmax(s / tau, -1) - p_bar), atol=1e-5)


def test_ensemble_kd_finite_and_errors(rng):
    big = [torch.randn(4, 10, generator=rng) * 1e4 for _ in range(3)]
    s = torch.randn(4, 10, generator=rng) * 1e4
    for combine in ("probs", "logits"):
        for a, bs in ((s, big), (s.bfloat16(), [b.bfloat16() for b in big])):
            a = a.clone().requires_grad_(True)
            v = ensemble_kd_loss(a, bs, 4.0, combine)
            v.backward()
            assert torch.isfinite(v) and torch.isfinite(a.grad).all() and v.dtype == torch.float32
    with pytest.raises(ValueError, match="combine"):
        ensemble_kd_loss(s, big, combine="median")
    with pytest.raises(ValueError, match="must match the student"):
        ensemble_kd_loss(s[:, :5], big)
    with pytest.raises(ValueError, match="different shapes"):
        ensemble_kd_loss(s, [big[0], big[1][:, :5]])
    with pytest.raises(ValueError, match="at least one teacher"):
        ensemble_kd_loss(s, [])
    with pytest.raises(ValueError, match=r"\(K, B, C\)"):
        ensemble_kd_loss(s, big[0])
    with pytest.raises(ValueError, match="temperature"):
        EnsembleKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="combine"):
        EnsembleKDLoss(combine="vote")


def nets(k, num_classes=10):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        out.append(create_model("resnet8", num_classes=num_classes, in_chans=1))
    return out


def test_ensemble_term_runs_the_members_itself(rng):
    members_ = nets(3)
    module = DistillationModule(
        "convnet",
        members_,
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms={
            "ce": {"loss": "cross_entropy"},
            "ens": {"distiller": "ensemble_kd", "temperature": 2.0, "combine": "probs"},
        },
    )
    term = module.loss_terms["ens"]
    assert isinstance(term, EnsembleKDLoss) and not term.needs_teacher and not term.needs_target
    assert (
        module.teacher.is_ensemble and not module._teacher_needed
    )  # the module does not run the combined teacher
    x = torch.randn(5, 1, 8, 8, generator=rng)
    s = torch.randn(5, 10, generator=rng)
    got = term(Step(Batch(x), ModelOutput(s), None, Progress(), module))
    with torch.no_grad():
        ts = [m.eval()(x) for m in members_]
    assert torch.allclose(got, ensemble_kd_loss(s, ts, 2.0, "probs", "none"), atol=1e-5)
    # a module without a Teacher: the step's teacher output is the (already combined) target
    alone = EnsembleKDLoss(temperature=2.0)
    t = torch.randn(5, 10, generator=rng)
    assert torch.allclose(
        alone(Step(Batch(x), ModelOutput(s), ModelOutput(t))), kd_loss(s, t, 2.0, reduction="none")
    )
    with pytest.raises(ValueError, match="needs teachers"):
        alone.setup(Step(Batch(x), ModelOutput(s), None))


def test_ensemble_short_lightning_run(make_trainer):
    module = DistillationModule(
        "convnet",
        Teacher(nets(2)),
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms={
            "ce": {"loss": "cross_entropy", "weight": 0.5},
            "ensemble_kd": {"distiller": "ensemble_kd", "weight": 0.5},
        },
    )
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert torch.isfinite(trainer.callback_metrics["train/loss/ensemble_kd"])
    assert all(not p.requires_grad for net in module.teacher.nets for p in net.parameters())


def test_recipe_trains_count_members_and_takes_a_teacher_list(tmp_path):
    common = [
        "--method",
        "ensemble_kd",
        "--data",
        "digits",
        "--fast",
        "--trainer.enable_progress_bar",
        "false",
    ]
    res = distill.main([*common, "--out", str(tmp_path / "a"), "--teacher_train.count", "2"])
    cached = sorted((Path(distill.cache_dir()) / "teachers").glob("digits-*.ckpt"))
    assert len(cached) >= 2 and set(res["runs"]) == {"student", "ensemble_kd"}
    keys = {p.name for p in cached}
    # member 0 is the single teacher's cache entry: a plain (count 1) teacher reuses it, no training
    one = {**res["config"], "teacher_train": {**res["config"]["teacher_train"], "count": 1}}
    net, _ = distill._member_net(one, DigitsDataModule(), tmp_path, 0)
    assert isinstance(net, torch.nn.Module)
    # a list of checkpoints is an ensemble teacher
    spec = ",".join(str(p) for p in cached[:2])
    res2 = distill.main([*common, "--out", str(tmp_path / "b"), "--teacher", spec])
    assert res2["teacher"] == spec and 0.0 <= res2["teacher_acc"] <= 1.0
    assert {p.name for p in (Path(distill.cache_dir()) / "teachers").glob("digits-*.ckpt")} == keys
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["terms"]["ensemble_kd"]["distiller"] == "ensemble_kd"


# == random_teacher =============================================================================
def test_random_teacher_loss_matches_formula(rng):
    s = torch.randn(5, 12, generator=rng) * 2
    t = torch.randn(5, 12, generator=rng) * 2
    for ts_, tt_ in ((1.0, 1.0), (0.1, 0.04)):
        pt, ps = np_softmax(t.numpy() / tt_), np_softmax(s.numpy() / ts_)
        ce = -(pt * np.log(ps)).sum(-1)
        got = random_teacher_loss(s, t, ts_, tt_, reduction="none")
        np.testing.assert_allclose(got.numpy(), ce, rtol=1e-5, atol=1e-5)
        # CE = KL + H(teacher); the KL variant subtracts the entropy
        kl = random_teacher_loss(s, t, ts_, tt_, subtract_entropy=True, reduction="none")
        np.testing.assert_allclose(kl.numpy(), np_kl(pt, ps), rtol=1e-4, atol=1e-5)
        ent = -(pt * np.log(pt)).sum(-1)
        np.testing.assert_allclose((got - kl).numpy(), ent, rtol=1e-4, atol=1e-5)
    assert random_teacher_loss(s, t).item() == pytest.approx(
        random_teacher_loss(s, t, reduction="none").mean().item()
    )
    # a student equal to its teacher: KL 0 and a zero gradient (CE at its minimum)
    sg = t.clone().requires_grad_(True)
    random_teacher_loss(sg, t, reduction="sum").backward()
    assert torch.allclose(sg.grad, torch.zeros_like(sg), atol=1e-6)
    assert torch.allclose(
        random_teacher_loss(t, t, subtract_entropy=True, reduction="none"), torch.zeros(5), atol=1e-6
    )
    # finite for huge logits and bf16
    big = torch.randn(4, 9, generator=rng) * 1e4
    for a in (big, big.bfloat16()):
        a = a.clone().requires_grad_(True)
        v = random_teacher_loss(a, big.flip(0))
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match="same size"):
        random_teacher_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        random_teacher_loss(s, t, student_temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        random_teacher_loss(s, t, reduction="batch")


def test_dino_head_shapes_and_weight_norm(rng):
    head = DINOHead(16, out_dim=32, hidden_dims=[24, 20], bottleneck_dim=8)
    x = torch.randn(3, 16, generator=rng)
    out = head(x)
    assert out.shape == (3, 32)
    # L2 bottleneck + unit-norm rows with gain 1: outputs are cosines in [-1, 1]
    assert out.abs().max() <= 1.0 + 1e-6
    z = F.normalize(head.bottleneck(head.mlp(x)), dim=-1)
    assert torch.allclose(out, z @ F.normalize(head.weight, dim=-1).t(), atol=1e-6)
    assert DINOHead(16, 32, [], 8)(x).shape == (3, 32)


def rt_module(global_seed=1, **kw):
    torch.manual_seed(global_seed)
    spec = {"distiller": "random_teacher", "hidden_dims": [32], "bottleneck_dim": 8, "out_dim": 64, **kw}
    return ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        loss={"random_teacher": spec},
        optimizer={"name": "adam", "lr": 0.01},
    )


def test_random_teacher_is_seeded_frozen_and_of_the_students_architecture():
    x = DigitsDataModule().example_input(4)
    a, b, c = rt_module(1), rt_module(2), rt_module(1, seed=5)
    for m in (a, b, c):
        m.prepare(x)
    ta, tb, tc = (m.loss_terms["random_teacher"] for m in (a, b, c))
    assert isinstance(ta, RandomTeacherLoss) and not ta.needs_teacher and not ta.needs_target
    enc = ta.teacher.nets[0].encoder
    assert type(enc) is type(a.model) and [p.shape for p in enc.parameters()] == [
        p.shape for p in a.model.parameters()
    ]
    # same seed: the same teacher whatever the global RNG; another seed: another teacher
    assert ta.fingerprint() == tb.fingerprint() != tc.fingerprint()
    with torch.no_grad():
        assert torch.equal(ta.teacher(x).logits, tb.teacher(x).logits)
    # not the student's initialisation, not optimised, not saved, in eval even after module.train()
    assert not torch.equal(enc.fc.weight, a.model.fc.weight)
    ids = {id(p) for p in a.parameters()}
    assert all(id(p) not in ids and not p.requires_grad for p in ta.teacher.nets[0].parameters())
    assert not any(k.startswith("loss_terms.random_teacher.teacher") for k in a.state_dict())
    a.train()
    assert not ta.teacher.nets[0].training
    # a student given as a module (no spec): deep-copied and re-initialised under the seed
    torch.manual_seed(0)
    net = create_model("convnet", num_classes=10, in_chans=1, width=4)
    m1 = ClassificationModule(
        net,
        num_classes=10,
        loss={"rt": {"distiller": "random_teacher", "hidden_dims": [8], "bottleneck_dim": 4, "out_dim": 16}},
    )
    m2 = ClassificationModule(
        create_model("convnet", num_classes=10, in_chans=1, width=4),
        num_classes=10,
        loss={"rt": {"distiller": "random_teacher", "hidden_dims": [8], "bottleneck_dim": 4, "out_dim": 16}},
    )
    m1.prepare(x)
    m2.prepare(x)
    assert m1.loss_terms["rt"].fingerprint() == m2.loss_terms["rt"].fingerprint()


def test_random_teacher_run_probe_and_checkpoint(tmp_path, make_trainer):
    module = rt_module()
    dm = DigitsDataModule(batch_size=64, val_split=0.2, seed=0)
    probe = KNNProbe(k=5, linear_epochs=3)
    trainer = make_trainer(max_epochs=1, limit_train_batches=4, num_sanity_val_steps=1, callbacks=[probe])
    term = module.loss_terms["random_teacher"]
    trainer.fit(module, datamodule=dm)
    teacher_before = term.fingerprint()
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss/random_teacher"])
    assert 0.0 <= m["val/knn_acc"] <= 1.0 and 0.0 <= m["val/linear_probe_acc"] <= 1.0
    assert len(probe.results) == 1  # the sanity check was skipped
    # the teacher did not move; the student head did (it is trained with the student)
    fresh = rt_module()
    fresh.prepare(dm.example_input())
    assert term.fingerprint() == fresh.loss_terms["random_teacher"].fingerprint() == teacher_before
    assert not torch.equal(term.head.weight, fresh.loss_terms["random_teacher"].head.weight)
    # checkpoint: the head and the teacher's checksum; a strict load into a fresh module
    trainer.save_checkpoint(tmp_path / "rt.ckpt")
    state = torch.load(tmp_path / "rt.ckpt", weights_only=True)["state_dict"]
    loaded = rt_module(global_seed=5)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.loss_terms["random_teacher"].head.weight, term.head.weight)
    loaded.prepare(dm.example_input())  # rebuilds the teacher and checks it against the checksum
    other = rt_module(seed=3)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        other.prepare(dm.example_input())


def test_random_teacher_bad_arguments():
    for kw, match in [
        ({"out_dim": 0}, "out_dim"),
        ({"bottleneck_dim": -1}, "bottleneck_dim"),
        ({"hidden_dims": [0]}, "hidden_dims"),
        ({"student_temperature": 0.0}, "temperature"),
        ({"seed": 0.5}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            RandomTeacherLoss(**kw)
    term = RandomTeacherLoss(out_dim=8, hidden_dims=[4], bottleneck_dim=2)
    with pytest.raises(ValueError, match="embedding"):
        term.setup(Step(Batch(torch.zeros(2, 1, 8, 8)), ModelOutput(torch.zeros(2, 10)), None))
    with pytest.raises(ValueError, match="dry run"):
        term(Step(Batch(torch.zeros(2, 1, 8, 8)), ModelOutput(torch.zeros(2, 10), torch.zeros(2, 4)), None))


# == the probe callback =========================================================================
def np_knn(train_x, train_y, test_x, k, num_classes, metric):
    preds = []
    for q in test_x:  # one query at a time, explicit distances
        if metric == "l2":
            d = np.array([np.sum((q - p) ** 2) for p in train_x])
        else:
            d = np.array([-(q @ p) / (np.linalg.norm(q) * np.linalg.norm(p)) for p in train_x])
        nearest = np.argsort(d, kind="stable")[:k]
        preds.append(int(np.argmax(np.bincount(train_y[nearest], minlength=num_classes))))
    return np.array(preds)


def test_knn_matches_an_explicit_loop(rng):
    train_x = torch.randn(60, 5, generator=rng).double()
    train_y = torch.randint(0, 4, (60,), generator=rng)
    test_x = torch.randn(25, 5, generator=rng).double()
    for metric in ("l2", "cosine"):
        for k in (1, 4, 7):
            got = knn_predict(train_x, train_y, test_x, k, 4, metric, chunk=7)
            ref = np_knn(train_x.numpy(), train_y.numpy(), test_x.numpy(), k, 4, metric)
            assert np.array_equal(got.numpy(), ref), (metric, k)
    # a tie between two labels goes to the smaller one; k larger than the training set is clipped
    tx = torch.tensor([[0.0], [2.0]])
    assert knn_predict(tx, torch.tensor([3, 1]), torch.tensor([[1.0]]), 2, 4).item() == 1
    assert knn_predict(tx, torch.tensor([3, 1]), torch.tensor([[0.1]]), 50, 4).item() == 1


def np_linear_probe(x, y, xt, c, epochs, lr, wd, bs, standardize, b1=0.9, b2=0.999, eps=1e-8):
    """Zero-initialised softmax regression trained with AdamW (decoupled weight decay), in NumPy."""
    x, xt = x.astype(np.float64), xt.astype(np.float64)
    if standardize:
        mu, sd = x.mean(0), x.std(0, ddof=1)
        sd[sd < 1e-6] = 1.0
        x, xt = (x - mu) / sd, (xt - mu) / sd
    params = [np.zeros((c, x.shape[1])), np.zeros(c)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = 0
    for _ in range(epochs):
        for s in range(0, len(x), bs):
            xb, yb = x[s : s + bs], y[s : s + bs]
            p = np_softmax(xb @ params[0].T + params[1])
            p[np.arange(len(yb)), yb] -= 1.0
            grads = [p.T @ xb / len(yb), p.mean(0)]
            t += 1
            for i, g in enumerate(grads):
                params[i] *= 1 - lr * wd
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                params[i] -= lr * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
    return (xt @ params[0].T + params[1]).argmax(-1), params


def test_linear_probe_matches_numpy_adamw(rng):
    centers = torch.randn(3, 6, generator=rng) * 2
    y = torch.randint(0, 3, (70,), generator=rng)
    x = centers[y] + torch.randn(70, 6, generator=rng)
    yt = torch.randint(0, 3, (30,), generator=rng)
    xt = centers[yt] + torch.randn(30, 6, generator=rng)
    for standardize in (False, True):
        preds, w, b = linear_probe(
            x, y, xt, 3, epochs=4, lr=0.05, weight_decay=0.01, batch_size=16, standardize=standardize
        )
        ref_preds, (rw, rb) = np_linear_probe(
            x.numpy(), y.numpy(), xt.numpy(), 3, 4, 0.05, 0.01, 16, standardize
        )
        np.testing.assert_allclose(w.numpy(), rw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.numpy(), rb, rtol=1e-4, atol=1e-5)
        assert np.array_equal(preds.numpy(), ref_preds)
    # separable data: a perfect probe
    preds, _, _ = linear_probe(x, y, x, 3, epochs=200, lr=0.05, batch_size=70)
    assert (preds == y).float().mean() > 0.95


def test_probe_callback_logs_what_an_independent_computation_gives(make_trainer):
    torch.manual_seed(0)
    module = ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        optimizer={"name": "adam", "lr": 0.01},
    )
    dm = DigitsDataModule(batch_size=64, val_split=0.2, seed=0)
    probe = KNNProbe(k=3, linear_epochs=2, linear_batch_size=128)
    make_trainer(max_epochs=1, limit_train_batches=3, num_sanity_val_steps=2, callbacks=[probe]).fit(
        module, datamodule=dm
    )
    assert [r["epoch"] for r in probe.results] == [0]
    module.eval()
    with torch.no_grad():
        train = [dm.train_set[i] for i in range(len(dm.train_set))]
        val = [dm.val_set[i] for i in range(len(dm.val_set))]
        tx = forward_output(module.model, torch.stack([b.input for b in train])).embedding.numpy()
        vx = forward_output(module.model, torch.stack([b.input for b in val])).embedding.numpy()
    ty = np.array([int(b.target) for b in train])
    vy = np.array([int(b.target) for b in val])
    knn = (np_knn(tx, ty, vx, 3, 10, "l2") == vy).mean()
    lin = (np_linear_probe(tx, ty, vx, 10, 2, 1e-3, 1e-2, 128, False)[0] == vy).mean()
    assert probe.results[0]["knn_acc"] == pytest.approx(knn, abs=1.5 / len(vy))
    assert probe.results[0]["linear_probe_acc"] == pytest.approx(lin, abs=1.5 / len(vy))


def test_probe_callback_arguments_state_and_registry():
    for kw, match in [
        ({"k": 0}, "k must"),
        ({"metric": "l1"}, "metric"),
        ({"linear_epochs": -1}, "linear_epochs"),
        ({"linear_lr": 0.0}, "linear_lr"),
        ({"linear_weight_decay": -1.0}, "linear_weight_decay"),
        ({"linear_batch_size": 0}, "linear_batch_size"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"max_train_samples": 0}, "max_train_samples"),
        ({"prefix": "a/b"}, "prefix"),
    ]:
        with pytest.raises(ValueError, match=match):
            KNNProbe(**kw)
    with pytest.raises(TypeError, match="embedding_fn"):
        KNNProbe(embedding_fn=3)
    a, b = KNNProbe(k=5), KNNProbe(k=7, metric="cosine")
    assert a.state_key != b.state_key and "'k': 5" in a.state_key
    a.results = [{"epoch": 0, "knn_acc": 0.5}]
    b.load_state_dict(a.state_dict())
    assert b.results == a.results and b.results is not a.results
    assert isinstance(build("callback", "knn_probe", k=3), KNNProbe)


def test_configs_build():
    for name, terms in (
        ("ensemble_kd", {"ce", "ensemble_kd"}),
        ("random_teacher", {"random_teacher"}),
        ("random_teacher_cifar100", {"random_teacher"}),
    ):
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert cfg["method"] == name.replace("_cifar100", "")
        assert set(build_terms(cfg["terms"])) == terms
        for cb, kw in (cfg.get("callbacks") or {}).items():
            assert isinstance(build("callback", cb, **kw), KNNProbe)
    assert yaml.safe_load((CONFIGS / "ensemble_kd.yaml").read_text())["teacher_train"]["count"] == 3
