"""Distillers that train a second network inside the loss term: BD-KD (an online teacher, the
term's `peer`) and Robust Mean Teacher (an EMA copy of the student)."""

import lightning as L
import numpy as np
import pytest
import torch
from helpers import StopAfter
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import toolkit.distill  # noqa: F401 - registers the distillers
from toolkit import Progress, Step
from toolkit.data import DigitsDataModule
from toolkit.distill.bdkd import BDKDLoss
from toolkit.distill.mean_teacher import MeanTeacherLoss
from toolkit.functional import kd_loss
from toolkit.functional.bdkd import bdkd_balance, bdkd_student_loss, bdkd_teacher_loss
from toolkit.functional.mean_teacher import ema_update_, rmt_augment, symmetric_cross_entropy
from toolkit.models import create_model
from toolkit.modules import DistillationModule
from toolkit.types import Batch, ModelOutput


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.fixture
def pair(rng):
    return torch.randn(6, 5, generator=rng) * 2, torch.randn(6, 5, generator=rng) * 2


# ---------------------------------------------------------------------------------------------
# BD-KD: the maths
# ---------------------------------------------------------------------------------------------


def np_bdkd(s, t, tau, kappa=0.0):
    """(student part, teacher part) per sample, one row at a time."""
    student, teacher = [], []
    for si, ti in zip(np.asarray(s), np.asarray(t), strict=True):
        ls, lt = np_log_softmax(si / tau), np_log_softmax(ti / tau)
        ps, pt = np.exp(ls), np.exp(lt)
        hs, ht = -(ps * ls).sum(), -(pt * lt).sum()
        lam = float(hs > ht) if kappa == 0 else 1.0 / (1.0 + np.exp(-(hs - ht) / kappa))
        forward = (pt * (lt - ls)).sum()  # KL(p_t ‖ p_s)
        reverse = (ps * (ls - lt)).sum()  # KL(p_s ‖ p_t)
        student.append(tau**2 * ((1 - lam) * forward + lam * reverse))
        teacher.append(tau**2 * forward)  # the teacher minimises KL(p_t ‖ p_s) over its own logits
    return np.array(student), np.array(teacher)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("kappa", [0.0, 0.3])
def test_bdkd_matches_loop_formula(pair, tau, kappa):
    s, t = pair
    exp_s, exp_t = np_bdkd(s.numpy(), t.numpy(), tau, kappa)
    got_s = bdkd_student_loss(s, t, tau, kappa, reduction="none")
    got_t = bdkd_teacher_loss(t, s, tau, reduction="none")
    np.testing.assert_allclose(got_s.numpy(), exp_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_t.numpy(), exp_t, rtol=1e-5, atol=1e-6)
    assert bdkd_student_loss(s, t, tau, kappa).item() == pytest.approx(exp_s.mean(), rel=1e-5)
    assert bdkd_student_loss(s, t, tau, kappa, reduction="sum").item() == pytest.approx(exp_s.sum(), rel=1e-5)
    assert bdkd_teacher_loss(t, s, tau, reduction="sum").item() == pytest.approx(exp_t.sum(), rel=1e-5)


def test_bdkd_balance_picks_the_direction_by_entropy(pair):
    s, t = pair
    sharper, flatter = t * 3.0, t / 3.0  # same ranking, lower / higher entropy than the teacher
    assert bdkd_balance(sharper, t).tolist() == [0.0] * 6
    assert bdkd_balance(flatter, t).tolist() == [1.0] * 6
    # an over-confident student gets the forward KL, i.e. Hinton's KD term (another code path) ...
    assert torch.allclose(
        bdkd_student_loss(sharper, t, 4.0, reduction="none"), kd_loss(sharper, t, 4.0, "none")
    )
    # ... an under-confident one the reverse KL, i.e. KD with the roles swapped
    assert torch.allclose(
        bdkd_student_loss(flatter, t, 4.0, reduction="none"), kd_loss(t, flatter, 4.0, "none")
    )
    # the teacher's regulariser has the value of the forward KL, KL(p_t ‖ p_s)
    assert torch.allclose(bdkd_teacher_loss(t, s, 2.0, reduction="none"), kd_loss(s, t, 2.0, "none"))
    lam = bdkd_balance(s, t, 1.0, sharpness=0.5)
    assert ((lam > 0) & (lam < 1)).all()
    # a very soft balance is the symmetric (Jeffreys) mean of the two directions
    sym = 0.5 * (kd_loss(s, t, 1.0, "none") + kd_loss(t, s, 1.0, "none"))
    assert torch.allclose(bdkd_student_loss(s, t, 1.0, sharpness=1e6, reduction="none"), sym, atol=1e-5)


def test_bdkd_zero_for_equal_distributions(pair):
    s, _ = pair
    assert torch.allclose(bdkd_student_loss(s, s + 3.0, reduction="none"), torch.zeros(6), atol=1e-6)
    assert torch.allclose(bdkd_teacher_loss(s - 1.0, s, reduction="none"), torch.zeros(6), atol=1e-6)


def test_bdkd_gradients_go_to_their_own_network(pair):
    s0, t0 = pair
    tau = 2.0
    # student part on forward-KL samples: d/ds τ²·KL(p_t ‖ p_s) = τ·(p_s − p_t); nothing into t
    s, t = (s0 * 3).requires_grad_(True), t0.clone().requires_grad_(True)
    bdkd_student_loss(s, t, tau, reduction="sum").backward()
    expected = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t0 / tau, -1))
    assert torch.allclose(s.grad, expected, atol=1e-5)
    assert t.grad is None
    # teacher part: d/dt τ²·KL(p_t ‖ p_s) = τ·p_t ⊙ (log p_t − log p_s − KL); nothing into s
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    bdkd_teacher_loss(t, s, tau, reduction="sum").backward()
    log_pt, log_ps = torch.log_softmax(t0 / tau, -1), torch.log_softmax(s0 / tau, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1, keepdim=True)
    assert torch.allclose(t.grad, tau * log_pt.exp() * (log_pt - log_ps - kl), atol=1e-5)
    assert s.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bdkd_finite_for_extreme_logits_and_bf16(pair, dtype):
    s, t = pair
    for scale in (1.0, 1e4):
        a = (s * scale).to(dtype).requires_grad_(True)
        b = (t * scale).to(dtype).requires_grad_(True)
        loss = bdkd_student_loss(a, b) + bdkd_teacher_loss(b, a)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        assert loss.dtype == torch.float32


def test_bdkd_rejects_bad_inputs(pair):
    s, t = pair
    with pytest.raises(ValueError, match="temperature must be > 0"):
        bdkd_student_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="sharpness must be >= 0"):
        bdkd_balance(s, t, sharpness=-1.0)
    with pytest.raises(ValueError, match="same classes"):
        bdkd_student_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="same classes"):
        bdkd_teacher_loss(t[0], s[0])
    with pytest.raises(ValueError, match="reduction"):
        bdkd_teacher_loss(t, s, reduction="avg")
    with pytest.raises(ValueError, match="peer_ce_weight must be >= 0"):
        BDKDLoss(peer_ce_weight=-1)
    with pytest.raises(TypeError, match="peer must be a model name"):
        BDKDLoss(peer=3)
    with pytest.raises(ValueError, match="peer_kwargs go with a named peer"):
        BDKDLoss(peer_kwargs={"width": 4})


# ---------------------------------------------------------------------------------------------
# BD-KD: the term, its peer, Lightning runs and resume
# ---------------------------------------------------------------------------------------------

ADAM = {"name": "adam", "lr": 0.01}


def digits(**kw):
    kw.setdefault("batch_size", 64)
    kw.setdefault("augment", True)  # random crops: the resume must restore the RNG as well
    return DigitsDataModule(val_split=0.1, seed=0, **kw)


def online_module(term, seed=1, student="convnet"):
    torch.manual_seed(seed)
    teacher = create_model("resnet8", num_classes=10, in_chans=1)  # the recipe's teacher: unused here
    return DistillationModule(
        student,
        teacher,
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4} if student == "convnet" else None,
        terms={"ce": {"loss": "cross_entropy", "weight": 1.0}, **term},
        optimizer=ADAM,
    )


BDKD = {"bdkd": {"distiller": "bdkd", "weight": 1.0, "peer": "convnet", "peer_kwargs": {"width": 6}}}


def test_bdkd_term_trains_the_peer_and_reports_it(make_trainer):
    module = online_module(BDKD)
    dm = digits(train_subset=256)
    assert module._teacher_needed is False  # the recipe's pretrained teacher is never run
    trainer = make_trainer(max_epochs=1, limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    term = module.loss_terms["bdkd"]
    assert term.peer_spec == {"name": "convnet", "kwargs": {"num_classes": 10, "in_chans": 1, "width": 6}}
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in term.peer.parameters()} <= opt_params
    fresh = create_model("convnet", num_classes=10, in_chans=1, width=6)
    assert fresh.state_dict().keys() == term.peer.state_dict().keys()
    assert "val/peer/acc" in trainer.callback_metrics
    res = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert 0 <= res["test/peer/acc"] <= 1
    # the term's value is the student's BD part plus the peer's CE and regulariser
    batch = next(iter(dm.train_dataloader()))
    module.train()
    x, y = batch.input, batch.target
    with torch.no_grad():
        t = term.peer(x)
        s = module.model(x)
        got = term(Step(Batch(x, y), ModelOutput(s), None, Progress(), module))
    expected = (
        bdkd_student_loss(s, t, 4.0, reduction="none")
        + torch.nn.functional.cross_entropy(t, y, reduction="none")
        + bdkd_teacher_loss(t, s, 4.0, reduction="none")
    )
    assert torch.allclose(got, expected, atol=1e-5)


def test_bdkd_default_peer_is_the_students_architecture_freshly_initialised():
    module = online_module({"bdkd": {"distiller": "bdkd"}})
    module.prepare(torch.randn(2, 1, 8, 8))
    peer = module.loss_terms["bdkd"].peer
    assert module.loss_terms["bdkd"].peer_spec == module.model_spec
    assert peer.state_dict().keys() == module.model.state_dict().keys()
    assert any(
        not torch.equal(a, b) for a, b in zip(peer.parameters(), module.model.parameters(), strict=True)
    )


def test_bdkd_needs_a_peer_spec_for_a_module_student():
    torch.manual_seed(0)
    student = create_model("convnet", num_classes=10, in_chans=1, width=4)
    module = DistillationModule(
        student, create_model("resnet8", num_classes=10, in_chans=1), terms={"bdkd": {"distiller": "bdkd"}}
    )
    with pytest.raises(ValueError, match="pass peer='<model name>'"):
        module.prepare(torch.randn(2, 1, 8, 8))
    # an explicit module peer is used as given
    peer = create_model("convnet", num_classes=10, in_chans=1, width=4)
    module = DistillationModule(
        student, create_model("resnet8", num_classes=10, in_chans=1), terms={"bdkd": BDKDLoss(peer=peer)}
    )
    module.prepare(torch.randn(2, 1, 8, 8))
    assert module.loss_terms["bdkd"].peer is peer


def _final_state(tmp_path, term, stop_after=None, max_epochs=3):
    kw = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=max_epochs,
        limit_val_batches=1,
        deterministic=True,
    )
    L.seed_everything(7, workers=True)
    module = online_module(term, seed=3)
    if stop_after is None:
        L.Trainer(enable_checkpointing=False, **kw).fit(module, datamodule=digits(train_subset=192))
        return module.state_dict()
    ckpt_dir = tmp_path / "ckpt"
    cb = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb, StopAfter(stop_after)], **kw).fit(module, datamodule=digits(train_subset=192))
    # a fresh process would start from scratch: new objects, another RNG state
    torch.manual_seed(12345)
    L.seed_everything(7, workers=True)
    resumed = online_module(term, seed=99)
    cb = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb], **kw).fit(
        resumed, datamodule=digits(train_subset=192), ckpt_path=str(ckpt_dir / "last.ckpt")
    )
    return resumed.state_dict()


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


MEAN_TEACHER = {"mean_teacher": {"distiller": "mean_teacher", "weight": 1.0, "momentum": 0.9}}


@pytest.mark.parametrize("term", [BDKD, MEAN_TEACHER], ids=["bdkd", "mean_teacher"])
def test_resume_continues_exactly_with_the_second_network(tmp_path, term):
    straight = _final_state(tmp_path / "a", term)
    resumed = _final_state(tmp_path / "b", term, stop_after=1)
    name = next(iter(term))
    inner = "peer" if name == "bdkd" else "ema"
    assert any(k.startswith(f"loss_terms.{name}.{inner}.") for k in straight)
    assert_same_state(straight, resumed)


@pytest.mark.parametrize("term", [BDKD, MEAN_TEACHER], ids=["bdkd", "mean_teacher"])
def test_load_from_checkpoint_rebuilds_the_second_network(tmp_path, make_trainer, term):
    module = online_module(term)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=digits(train_subset=128))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = DistillationModule.load_from_checkpoint(
        tmp_path / "m.ckpt", teacher=create_model("resnet8", num_classes=10, in_chans=1)
    )  # strict: the peer / EMA net is rebuilt from the term's extra state before its weights load
    assert_same_state(module.state_dict(), loaded.state_dict())
    name = next(iter(term))
    x = torch.randn(3, 1, 8, 8)
    module.eval(), loaded.eval()
    key = "peer" if name == "bdkd" else "ema"
    with torch.no_grad():
        assert torch.equal(
            module.loss_terms[name].eval_logits(Batch(x))[key],
            loaded.loss_terms[name].eval_logits(Batch(x))[key],
        )


# ---------------------------------------------------------------------------------------------
# Robust Mean Teacher: the maths
# ---------------------------------------------------------------------------------------------


def np_sce(s, t, a=None):
    out = []
    for i in range(len(s)):
        ls, lt = np_log_softmax(s[i]), np_log_softmax(t[i])
        ps, pt = np.exp(ls), np.exp(lt)
        if a is None:
            out.append(-0.5 * ((pt * ls).sum() + (ps * lt).sum()))
        else:
            la = np_log_softmax(a[i])
            pa = np.exp(la)
            out.append(-0.25 * ((pt * ls).sum() + (ps * lt).sum() + (pt * la).sum() + (pa * lt).sum()))
    return np.array(out)


def official_symmetric_entropy(x, x_aug, x_ema):
    """The official `symmetric_entropy` of rmt.py, as written there."""
    return (
        -0.25 * (x_ema.softmax(1) * x.log_softmax(1)).sum(1)
        - 0.25 * (x.softmax(1) * x_ema.log_softmax(1)).sum(1)
        - 0.25 * (x_ema.softmax(1) * x_aug.log_softmax(1)).sum(1)
        - 0.25 * (x_aug.softmax(1) * x_ema.log_softmax(1)).sum(1)
    )


def test_sce_matches_loop_formula_and_official_code(pair, rng):
    s, t = pair
    a = torch.randn(6, 5, generator=rng)
    np.testing.assert_allclose(
        symmetric_cross_entropy(s, t, a, reduction="none").numpy(),
        np_sce(s.numpy(), t.numpy(), a.numpy()),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        symmetric_cross_entropy(s, t, reduction="none").numpy(), np_sce(s.numpy(), t.numpy()), rtol=1e-5
    )
    assert torch.allclose(
        symmetric_cross_entropy(s, t, a, reduction="none"), official_symmetric_entropy(s, a, t)
    )
    assert symmetric_cross_entropy(s, t, a).item() == pytest.approx(
        np_sce(s.numpy(), t.numpy(), a.numpy()).mean()
    )
    assert symmetric_cross_entropy(s, t, reduction="sum").item() == pytest.approx(
        np_sce(s.numpy(), t.numpy()).sum(), rel=1e-5
    )


def test_sce_limits_and_symmetry(pair):
    s, t = pair
    # symmetric in student and teacher; the augmented view equal to the plain one gives the two-term form
    assert torch.allclose(
        symmetric_cross_entropy(s, t, reduction="none"), symmetric_cross_entropy(t, s, reduction="none")
    )
    assert torch.allclose(
        symmetric_cross_entropy(s, t, s.clone(), reduction="none"),
        symmetric_cross_entropy(s, t, reduction="none"),
    )
    # all views equal: the entropy of the common distribution (the minimum over the teacher's side)
    log_p = torch.log_softmax(s, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    assert torch.allclose(symmetric_cross_entropy(s, s + 2.0, s - 1.0, reduction="none"), entropy, atol=1e-6)


def test_sce_gradient_closed_form(pair):
    s0, t = pair
    s = s0.clone().requires_grad_(True)
    symmetric_cross_entropy(s, t, reduction="sum").backward()
    p, log_q = torch.softmax(s0, -1), torch.log_softmax(t, -1)
    q = log_q.exp()
    # d/ds of −Σ q log p is p − q; of −Σ p log q it is −p ⊙ (log q − ⟨p, log q⟩)
    expected = 0.5 * ((p - q) - p * (log_q - (p * log_q).sum(-1, keepdim=True)))
    assert torch.allclose(s.grad, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sce_finite_for_extreme_logits_and_bf16(pair, dtype):
    s, t = pair
    for scale in (1.0, 1e4):
        a = (s * scale).to(dtype).requires_grad_(True)
        v = symmetric_cross_entropy(a, (t * scale).to(dtype), (t * -scale).to(dtype))
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(a.grad).all()


def test_ema_update_is_exact():
    e, c = (
        [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])],
        [torch.tensor([5.0, -2.0]), torch.tensor([[1.0]])],
    )
    ema_update_(e, c, 0.75)
    assert e[0].tolist() == [2.0, 1.0] and e[1].tolist() == [[2.5]]
    ema_update_(e, c, 1.0)
    assert e[0].tolist() == [2.0, 1.0]
    ema_update_(e, c, 0.0)
    assert e[0].tolist() == [5.0, -2.0] and e[1].tolist() == [[1.0]]
    with pytest.raises(ValueError, match="momentum must be in"):
        ema_update_(e, c, 1.5)
    with pytest.raises(ValueError, match="not the same architecture"):
        ema_update_(e, c[:1], 0.5)
    with pytest.raises(ValueError, match="does not match"):
        ema_update_([torch.zeros(3)], [torch.zeros(2)], 0.5)


def test_rmt_augment(rng):
    # a uniform image stays uniform (edge padding, no fill enters the centre crop) up to the noise
    flat = torch.full((4, 3, 16, 16), 0.5)
    torch.manual_seed(0)
    out = rmt_augment(flat)
    assert out.shape == flat.shape and out.dtype == flat.dtype
    assert out.flatten(1).std(1).max() < 0.02 and (out >= 0).all() and (out <= 1).all()
    # one draw per batch (as the official transform on a batch tensor); reproducible from the seed
    x = torch.rand(4, 1, 12, 12, generator=rng)
    mean, std = [0.3], [0.37]
    xn = (x - 0.3) / 0.37
    torch.manual_seed(5)
    a = rmt_augment(xn, mean, std)
    torch.manual_seed(5)
    b = rmt_augment(xn, mean, std)
    assert torch.equal(a, b) and not torch.allclose(a, xn)
    pixels = a * 0.37 + 0.3
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert rmt_augment(xn.requires_grad_(True), mean, std).requires_grad is False
    with pytest.raises(ValueError, match="image batch"):
        rmt_augment(torch.randn(4, 10))
    with pytest.raises(ValueError, match="noise_std"):
        rmt_augment(flat, noise_std=-1.0)


# ---------------------------------------------------------------------------------------------
# Robust Mean Teacher: the term, the EMA, Lightning runs
# ---------------------------------------------------------------------------------------------


class RecordStudent(Callback):
    """The student's parameters right after each optimiser step (before the EMA update)."""

    def __init__(self):
        self.steps = []
        self.initial_ema = None

    def on_train_start(self, trainer, pl_module):
        self.initial_ema = [p.detach().clone() for p in pl_module.loss_terms["mean_teacher"].ema.parameters()]
        self.initial_student = [p.detach().clone() for p in pl_module.model.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append([p.detach().clone() for p in pl_module.model.parameters()])


def test_mean_teacher_ema_follows_the_recursion_and_is_evaluated(make_trainer):
    alpha = 0.8
    module = online_module({"mean_teacher": {"distiller": "mean_teacher", "weight": 1.0, "momentum": alpha}})
    assert module._teacher_needed is False
    rec = RecordStudent()
    trainer = make_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, callbacks=[rec])
    trainer.fit(module, datamodule=digits(train_subset=256))
    term = module.loss_terms["mean_teacher"]
    # the EMA starts as the student (same architecture and weights)
    for e, s in zip(rec.initial_ema, rec.initial_student, strict=True):
        assert torch.equal(e, s)
    expected = rec.initial_ema
    for step in rec.steps:
        expected = [alpha * e + (1 - alpha) * s for e, s in zip(expected, step, strict=True)]
    assert len(rec.steps) == 4
    for e, got in zip(expected, term.ema.parameters(), strict=True):
        assert torch.allclose(e, got, atol=1e-6)
        assert not got.requires_grad and got.grad is None
    assert {"val/ema/acc", "val/ema_ensemble/acc"} <= set(trainer.callback_metrics)


def test_mean_teacher_term_value_and_options(make_trainer):
    module = online_module({"mean_teacher": {"distiller": "mean_teacher", "augment": False}})
    module.prepare(torch.randn(2, 1, 8, 8))
    term = module.loss_terms["mean_teacher"]
    x = torch.randn(5, 1, 8, 8)
    module.train()
    s = module.model(x)
    with torch.no_grad():
        t = term.ema(x)
    got = term(Step(Batch(x, torch.zeros(5, dtype=torch.long)), ModelOutput(s), None, Progress(), module))
    assert torch.allclose(got, symmetric_cross_entropy(s, t, reduction="none"), atol=1e-6)
    # the augmented view needs the inputs' normalisation outside a toolkit DataModule
    module = online_module({"mean_teacher": {"distiller": "mean_teacher"}})
    module.prepare(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="needs the inputs' normalisation"):
        module.loss_terms["mean_teacher"](
            Step(Batch(x), ModelOutput(module.model(x)), None, Progress(), module)
        )
    explicit = MeanTeacherLoss(mean=[0.3], std=[0.37])
    assert explicit._norm(None) == ([0.3], [0.37])


def test_mean_teacher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="momentum must be in"):
        MeanTeacherLoss(momentum=1.2)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        MeanTeacherLoss(noise_std=-0.1)
    with pytest.raises(ValueError, match="give both mean and std"):
        MeanTeacherLoss(mean=[0.5])
    with pytest.raises(ValueError, match="std must be > 0"):
        MeanTeacherLoss(mean=[0.5], std=[0.0])
    with pytest.raises(RuntimeError, match="dry run"):
        MeanTeacherLoss().on_train_batch_end(None)


def test_mean_teacher_copy_of_a_module_student_has_no_taps():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    hint = {"distiller": "fitnet", "student_layer": "1", "teacher_layer": "layer1", "weight": 0.0}
    module = DistillationModule(
        student,
        create_model("resnet8", num_classes=10, in_chans=1),
        num_classes=10,
        terms={"mean_teacher": {"distiller": "mean_teacher", "augment": False}, "hint": hint},
    )
    module.prepare(torch.randn(2, 1, 8, 8))
    ema = module.loss_terms["mean_teacher"].ema
    assert ema is not None and module.loss_terms["mean_teacher"].ema_spec is None
    assert all(not m._forward_hooks for m in ema.modules())
    assert any(m._forward_hooks for m in module.model.modules())
