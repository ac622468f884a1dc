"""KD++'s ND loss: exact values, the official computation, limits, gradients, numerics, the
teacher class means computed at fit start, the projector, checkpoints and bit-exact resume."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import StopAfter, config_module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from toolkit import Progress, Step, build
from toolkit.data import DigitsDataModule
from toolkit.distill import Teacher
from toolkit.distill.nd import NDLoss
from toolkit.functional.nd import class_means, nd_loss
from toolkit.models import create_model
from toolkit.models.output import forward_output
from toolkit.modules import ClassificationModule, DistillationModule
from toolkit.types import Batch

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "distill"


@pytest.fixture
def emb(rng):
    s = torch.randn(8, 5, generator=rng) * 2
    t = torch.randn(8, 5, generator=rng) * 2
    means = torch.randn(4, 5, generator=rng)
    y = torch.tensor([0, 3, 1, 1, 2, 0, 3, 2])
    return s, t, means, y


def np_nd(s, t, means, y):
    """Per sample, one at a time: 1 − ⟨s, c_y/‖c_y‖⟩ / max(‖s‖, ‖t‖)."""
    s, t, means = (a.double().numpy() for a in (s, t, means))
    out = []
    for si, ti, k in zip(s, t, y.tolist()):
        e = means[k] / np.sqrt((means[k] ** 2).sum())
        out.append(1 - float(si @ e) / max(np.sqrt((si**2).sum()), np.sqrt((ti**2).sum())))
    return np.array(out)


def official_direct_norm_loss(s_emb, t_emb, t_emb_json, labels, nd_loss_factor=1.0):
    """WangYZ1608/Knowledge-Distillation-via-ND CIFAR/utils.py DirectNormLoss (`.cuda()` dropped;
    T_EMB is the class-mean JSON: {"class": [values]})."""
    assert s_emb.size() == t_emb.size()
    loss = 0.0
    for s, t, i in zip(s_emb, t_emb, labels):
        i = i.item()
        center = torch.tensor(t_emb_json[str(i)])
        e_c = center / center.norm(p=2)
        max_norm = max(s.norm(p=2), t.norm(p=2))
        loss += 1 - torch.dot(s, e_c) / max_norm
    return loss * nd_loss_factor / len(labels)


def test_nd_matches_formula_and_reductions(emb):
    s, t, means, y = emb
    ref = np_nd(s, t, means, y)
    per = nd_loss(s, t, means, y, reduction="none")
    assert per.shape == (8,) and per.dtype == torch.float32
    np.testing.assert_allclose(per.numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(nd_loss(s, t, means, y)), ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(nd_loss(s, t, means, y, reduction="sum")), ref.sum(), rtol=1e-5)


def test_nd_matches_the_official_code(rng):
    s = torch.randn(32, 64, generator=rng).relu() * 3  # post-ReLU embeddings, as in the CIFAR nets
    t = torch.randn(32, 64, generator=rng).relu() * 3
    means = torch.randn(10, 64, generator=rng).relu() + 0.1
    y = torch.randint(0, 10, (32,), generator=rng)
    json_means = {str(k): means[k].tolist() for k in range(10)}
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ours, ref = nd_loss(s1, t, means, y), official_direct_norm_loss(s2, t, json_means, y)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    ours.backward()
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


def test_nd_limits_norm_and_direction(emb):
    s, t, means, y = emb
    e = F.normalize(means, dim=-1)[y]
    t_norm = t.norm(dim=-1, keepdim=True)
    zeros = torch.zeros(8)
    # zero exactly when s points along e_y with ‖s‖ ≥ ‖t‖ ...
    for k in (1.0, 3.0):
        assert torch.allclose(nd_loss(k * t_norm * e, t, means, y, reduction="none"), zeros, atol=1e-6)
    # ... and 1 − ‖s‖/‖t‖ along e_y with a smaller norm: it rewards a larger norm up to the teacher's
    half = nd_loss(0.5 * t_norm * e, t, means, y, reduction="none")
    assert torch.allclose(half, torch.full((8,), 0.5), atol=1e-6)
    # beyond the teacher's norm only the direction counts: 1 − cos(s, e_y), scale-free
    big = s / s.norm(dim=-1, keepdim=True) * (t_norm + 1)
    cos = F.cosine_similarity(big, e, dim=-1)
    assert torch.allclose(nd_loss(big, t, means, y, reduction="none"), 1 - cos, atol=1e-6)
    assert torch.allclose(nd_loss(2 * big, t, means, y, reduction="none"), 1 - cos, atol=1e-6)
    # in [0, 2]; 2 exactly opposite; monotone in the angle to e_y (in a plane through e_y)
    assert torch.allclose(
        nd_loss(-2 * t_norm * e, t, means, y, reduction="none"), torch.full((8,), 2.0), atol=1e-6
    )
    v = nd_loss(s, t, means, y, reduction="none")
    assert ((v >= 0) & (v <= 2)).all()
    ortho = torch.randn(8, 5)
    ortho = F.normalize(ortho - (ortho * e).sum(-1, keepdim=True) * e, dim=-1)
    angles = torch.linspace(0, torch.pi, 7)
    vals = torch.stack(
        [
            nd_loss((torch.cos(a) * e + torch.sin(a) * ortho) * 2 * t_norm, t, means, y, reduction="none")
            for a in angles
        ]
    )
    assert (vals[1:] > vals[:-1]).all()
    # only the direction of the class mean matters, not its length
    assert torch.allclose(nd_loss(s, t, means * 7.5, y, reduction="none"), v, atol=1e-6)


def test_nd_gradients(emb):
    s, t, means, y = emb
    e = F.normalize(means, dim=-1)[y]
    t_norm = t.norm(dim=-1, keepdim=True)
    # below the teacher's norm, along e_y: the gradient is −e_y/‖t‖, it pushes the norm up
    sg = (0.5 * t_norm * e).requires_grad_(True)
    nd_loss(sg, t, means, y, reduction="sum").backward()
    assert torch.allclose(sg.grad, -e / t_norm, atol=1e-6)
    # above it: the gradient is orthogonal to s (norm-neutral) and turns s towards e_y
    big = (s / s.norm(dim=-1, keepdim=True) * (t_norm + 1)).requires_grad_(True)
    nd_loss(big, t, means, y, reduction="sum").backward()
    assert torch.allclose((big.grad * big.detach()).sum(-1), torch.zeros(8), atol=1e-6)
    assert ((-big.grad * e).sum(-1) >= -1e-7).all()
    # no gradient reaches the teacher's embedding or the class means
    tg, mg = t.clone().requires_grad_(True), means.clone().requires_grad_(True)
    v = nd_loss(s.clone().requires_grad_(True), tg, mg, y)
    v.backward()
    assert tg.grad is None and mg.grad is None


def test_nd_numerics(rng):
    y = torch.tensor([0, 1, 2, 1])
    means = torch.randn(3, 6, generator=rng)
    for scale in (1e4, 1e-20):
        s = (torch.randn(4, 6, generator=rng) * scale).requires_grad_(True)
        t = torch.randn(4, 6, generator=rng) * scale
        v = nd_loss(s, t, means, y)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(s.grad).all()
    s, t = torch.randn(4, 6, generator=rng), torch.randn(4, 6, generator=rng)
    got = nd_loss(s.bfloat16(), t.bfloat16(), means.bfloat16(), y)
    assert got.dtype == torch.float32
    assert torch.allclose(
        got, nd_loss(s.bfloat16().float(), t.bfloat16().float(), means.bfloat16().float(), y)
    )
    # all-zero student and teacher embeddings, and an all-zero class mean: a loss of 1, no NaN
    zs = torch.zeros(4, 6, requires_grad=True)
    v = nd_loss(zs, torch.zeros(4, 6), torch.zeros(3, 6), y, reduction="none")
    v.sum().backward()
    assert torch.equal(v.detach(), torch.ones(4)) and torch.isfinite(zs.grad).all()


def test_nd_bad_inputs(emb):
    s, t, means, y = emb
    with pytest.raises(ValueError, match="same D"):
        nd_loss(s, t[:, :3], means, y)
    with pytest.raises(ValueError, match="same D"):
        nd_loss(s[0], t[0], means, y)
    with pytest.raises(ValueError, match="class means"):
        nd_loss(s, t, means[:, :2], y)
    with pytest.raises(ValueError, match="class-index targets"):
        nd_loss(s, t, means, F.one_hot(y, 4).float())
    with pytest.raises(ValueError, match="class-index targets"):
        nd_loss(s, t, means, y[:3])
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        nd_loss(s, t, means, torch.full((8,), 4))
    with pytest.raises(ValueError, match="reduction"):
        nd_loss(s, t, means, y, reduction="avg")
    for kw, match in [
        ({"dropout": 1.0}, "dropout"),
        ({"student_feature": ""}, "student_feature"),
        ({"teacher_feature": 3}, "teacher_feature"),
    ]:
        with pytest.raises(ValueError, match=match):
            NDLoss(**kw)


def test_class_means_function(rng):
    e = torch.randn(20, 3, generator=rng)
    y = torch.tensor([0, 2] * 10)
    means, counts = class_means(e, y, 4)
    assert counts.tolist() == [10, 0, 10, 0]
    for k in range(4):
        rows = [i for i in range(20) if int(y[i]) == k]
        expected = e[rows].mean(0) if rows else torch.zeros(3)
        assert torch.allclose(means[k], expected, atol=1e-6)
    with pytest.raises(ValueError, match="class_means needs"):
        class_means(e, y[:3], 4)


# == the term =====================================================================================
def small_teacher(seed=0):
    torch.manual_seed(seed)
    return Teacher(create_model("resnet8", num_classes=10, in_chans=1))


def nd_module(seed=1, teacher=None, width=4, terms=None):
    torch.manual_seed(seed)
    return DistillationModule(
        "convnet",
        teacher or small_teacher(),
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": width},
        optimizer={"name": "adam", "lr": 0.01},
        terms=terms
        or {
            "ce": {"loss": "cross_entropy"},
            "kd": {
                "distiller": "kd",
                "weight": {"schedule": "linear", "start": 0.0, "end": 1.0, "end_epoch": 1},
            },
            "nd": {"distiller": "nd", "weight": 2.0},
        },
    )


def test_term_setup_projector_and_value():
    term = build("distiller", "nd")
    assert isinstance(term, NDLoss) and term.needs_teacher and term.needs_target
    assert term.student_features == ("fc:input",) and term.teacher_features == ("fc:input",)
    # convnet width 4 on 8×8 digits: a 128-d embedding; resnet8: 64-d -> the EmbTrans projector
    m = nd_module()
    m.prepare(torch.randn(2, 1, 8, 8))
    nd = m.loss_terms["nd"]
    spec = nd.projector["embedding"].spec
    assert (spec["in_dim"], spec["out_dim"], spec["kind"], spec["dropout"]) == (128, 64, "bn_linear", 0.5)
    # equal widths (a width-4 convnet teacher: 128-d too): no projector
    same = nd_module(teacher=Teacher(create_model("convnet", num_classes=10, in_chans=1, width=4)))
    same.prepare(torch.randn(2, 1, 8, 8))
    assert "embedding" not in same.loss_terms["nd"].projector
    # the value: nd_loss on the projected student embedding, the teacher's, and its class means
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    b = Batch(x, y)
    m.eval()
    step = Step(b, m.student_output(b), m.teacher_output(b), Progress(), m)
    with pytest.raises(RuntimeError, match="class means are not computed"):
        nd(step)
    means = torch.randn(10, 64)
    nd.set_class_means(means)
    s_emb = forward_output(m.model, x).embedding
    t_emb = forward_output(m.teacher.nets[0], x).embedding
    expected = nd_loss(nd.projector["embedding"](s_emb), t_emb, means, y, reduction="none")
    assert torch.allclose(nd(step), expected, atol=1e-6)
    # soft targets are read through their argmax
    soft = Step(Batch(x, F.one_hot(y, 10).float() * 0.8 + 0.02), step.student, step.teacher, Progress(), m)
    assert torch.allclose(nd(soft), expected, atol=1e-6)
    assert "class_means=(10, 64)" in repr(nd)


def test_class_means_from_a_pass_over_batches():
    teacher = small_teacher()
    teacher.tap(["fc:input"])
    term = NDLoss()
    rng = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(16, 1, 8, 8, generator=rng), torch.randint(0, 10, (16,), generator=rng))
        for _ in range(3)
    ]
    batches.append((torch.randn(4, 1, 8, 8, generator=rng), torch.arange(4)))  # every class present
    got = term.compute_class_means(teacher, batches, 10)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ref, counts = class_means(forward_output(teacher.nets[0], x).embedding, y, 10)
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(term.class_means, got)
    # a class never seen: a warning, and a zero mean
    with pytest.warns(UserWarning, match=r"no training samples of classes \[9\]"):
        term.compute_class_means(teacher, [(x[y != 9], y[y != 9])], 10)
    assert torch.equal(term.class_means[9], torch.zeros(64))
    with pytest.raises(ValueError, match="no targets"):
        term.compute_class_means(teacher, [(x,)], 10)
    with pytest.raises(ValueError, match="gave no batches"):
        term.compute_class_means(teacher, [], 10)
    with pytest.raises(ValueError, match=r"must be \(C, D\)"):
        term.set_class_means(torch.zeros(3))


class Watch(Callback):
    def __init__(self):
        self.means_at_first_batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.means_at_first_batch is None:
            self.means_at_first_batch = pl_module.loss_terms["nd"].class_means.clone()


def test_class_means_are_computed_at_fit_start_and_checkpointed(make_trainer, tmp_path):
    m = nd_module()
    dm = DigitsDataModule(batch_size=64, val_split=0.1, seed=0, train_subset=300)
    watch = Watch()
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[watch])
    trainer.fit(m, datamodule=dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss/nd"]) and torch.isfinite(metrics["train/loss/kd"])
    assert m.term_weight("kd") == pytest.approx(1.0)  # KD's warm-up ramp, a weight schedule: done at epoch 1
    # before the first step, from one teacher pass over the whole training set (not the 3 batches)
    ref, counts = class_means(
        torch.cat([forward_output(m.teacher.nets[0], b.input).embedding for b in dm.train_dataloader()]),
        torch.cat([b.target for b in dm.train_dataloader()]),
        10,
    )
    assert counts.sum() == 300
    assert torch.allclose(watch.means_at_first_batch, ref, atol=1e-5)
    assert torch.equal(m.loss_terms["nd"].class_means, watch.means_at_first_batch)  # never recomputed
    # the projector trains with the student; the means are a buffer, not a parameter
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    nd = m.loss_terms["nd"]
    assert {id(p) for p in nd.parameters()} <= opt_params and len(list(nd.parameters())) > 0
    assert "loss_terms.nd.class_means" in dict(m.named_buffers())
    # the checkpoint carries them: a fresh module (no dry run, empty means) loads strictly
    path = tmp_path / "nd.ckpt"
    trainer.save_checkpoint(path)
    loaded = DistillationModule.load_from_checkpoint(path, teacher=m.teacher)
    assert torch.equal(loaded.loss_terms["nd"].class_means, nd.class_means)
    for k, v in m.state_dict().items():
        other = loaded.state_dict()[k]
        assert torch.equal(v, other) if torch.is_tensor(v) else v == other, k
    # means set beforehand (e.g. the official JSON files) are kept, not recomputed
    m2 = nd_module()
    preset = torch.randn(10, 64)
    m2.loss_terms["nd"].set_class_means(preset)
    make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(m2, datamodule=dm)
    assert torch.equal(m2.loss_terms["nd"].class_means, preset)


def test_errors_outside_a_distillation_module(make_trainer):
    m = ClassificationModule(
        "convnet", num_classes=10, in_chans=1, model_kwargs={"width": 4}, loss={"nd": {"distiller": "nd"}}
    )
    with pytest.raises(ValueError, match="nd needs a teacher"):
        make_trainer(max_epochs=1, limit_train_batches=1).fit(m, datamodule=DigitsDataModule(batch_size=64))
    ens = nd_module(teacher=Teacher([create_model("resnet8", num_classes=10, in_chans=1) for _ in range(2)]))
    with pytest.raises(ValueError, match="not an ensemble"):
        ens.prepare(torch.randn(2, 1, 8, 8))
    wrong = nd_module(terms={"nd": {"distiller": "nd", "teacher_feature": "layer9:input"}})
    with pytest.raises(ValueError, match=r"no submodule 'layer9'.*layer"):
        wrong.prepare(torch.randn(2, 1, 8, 8))


def test_bf16_mixed_run_is_finite(make_trainer):
    m = nd_module()
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, precision="bf16-mixed")
    trainer.fit(m, datamodule=DigitsDataModule(batch_size=64))
    assert torch.isfinite(trainer.callback_metrics["train/loss/nd"])
    assert all(torch.isfinite(p).all() for p in m.parameters())


def final_weights(tmp_path, teacher, stop_after=None):
    kw = dict(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    def dm():
        return DigitsDataModule(batch_size=64, val_split=0.1, seed=0, augment=True, train_subset=400)

    L.seed_everything(7)
    module = nd_module(seed=3, teacher=teacher)
    if stop_after is None:
        L.Trainer(enable_checkpointing=False, **kw).fit(module, datamodule=dm())
        return module.state_dict()
    cb = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb, StopAfter(stop_after)], **kw).fit(module, datamodule=dm())
    L.seed_everything(99)
    resumed = nd_module(seed=42, teacher=teacher)
    cb = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[cb], **kw).fit(resumed, datamodule=dm(), ckpt_path=str(tmp_path / "last.ckpt"))
    return resumed.state_dict()


def test_resume_continues_exactly(tmp_path):
    """Projector (with dropout), class means and KD warm-up: a resumed run ends bit for bit where a
    straight one does (the means come from the checkpoint, the RNG stream is not shifted)."""
    teacher = small_teacher()
    straight = final_weights(tmp_path / "a", teacher)
    resumed = final_weights(tmp_path / "b", teacher, stop_after=1)
    assert straight.keys() == resumed.keys()
    for k in straight:
        if torch.is_tensor(straight[k]):
            assert torch.equal(straight[k], resumed[k]), k
        else:
            assert straight[k] == resumed[k], k


# == configs ======================================================================================


@pytest.mark.parametrize(
    "name, shape, projector, weights, kd_weight, tau, warmup",
    [
        # the demonstration: KD++ on the demo's KD (0.5·CE + 0.5·KD, τ = 1), λ_nd = 2·λ_ce
        ("nd", (2, 1, 28, 28), (256, 1024), (0.5, 1.0), 0.5, 1.0, 2.5),
        ("nd_cifar100", (2, 3, 32, 32), None, (1.0, 2.0), 3.5, 4.0, 20),
    ],
)
def test_configs_build_with_the_official_recipe(name, shape, projector, weights, kd_weight, tau, warmup):
    cfg, m = config_module(name, shape)
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert raw["method"] == "nd" and set(raw["terms"]) == {"ce", "kd", "nd"}
    terms = raw["terms"]
    assert (terms["ce"]["weight"], terms["nd"]["weight"]) == weights and terms["kd"]["temperature"] == tau
    assert terms["kd"]["weight"] == {
        "schedule": "linear",
        "start": 0.0,
        "end": kd_weight,
        "end_epoch": warmup,
    }
    nd = m.loss_terms["nd"]
    if projector is None:
        assert "embedding" not in nd.projector  # ResNet8x4 and ResNet32x4 are both 256 wide
    else:
        spec = nd.projector["embedding"].spec
        assert (spec["in_dim"], spec["out_dim"]) == projector
    if name == "nd_cifar100":
        assert cfg["optimizer"]["nesterov"] is True and cfg["optimizer"]["lr"] == 0.1
        assert cfg["data_args"]["batch_size"] == 128 and cfg["epochs"] == 240
