"""Cr-KD (class-relation KD for novel class discovery): the official computations, the clustering
accuracy against brute force, limits, numerics, errors, the known/novel data split, the term,
and the stages (known-class teacher, discovery) through the recipe, with an exact resume."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from recipes import distill
from recipes.stages import run_stages, stage_dir
from toolkit import Progress, Step, build
from toolkit.data import DigitsDataModule
from toolkit.distill import Teacher
from toolkit.distill.crkd import CRKDLoss, PadClasses, _second_view
from toolkit.functional.crkd import (
    cluster_accuracy,
    crkd_kd_loss,
    ncd_targets,
    sinkhorn_knopp,
    split_cluster_accuracy,
    swapped_prediction_loss,
)
from toolkit.models import create_model
from toolkit.modules import DistillationModule
from toolkit.types import Batch, ModelOutput

K = 3  # known classes in the small examples (of C = 5)


# -- transcriptions of the official code (kleinzcy/Cr-KD-NCD) -----------------------------------------
def official_sinkhorn(logits, num_iters=3, epsilon=0.05):
    """model/losses.py SinkhornKnopp.forward."""
    Q = torch.exp(logits / epsilon).t()
    B = Q.shape[1]
    K_ = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(num_iters):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K_
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def official_kd(origin_logits, new_logits, mask_lab, nlc, temperature, T):
    """model/losses.py KD with (views, heads, B, classes) tensors, then .mean() as in rKD.py."""
    origin_logits, new_logits = origin_logits / temperature, new_logits / temperature
    origin_logits = origin_logits.detach()
    preds = F.softmax(origin_logits[:, :, ~mask_lab] / T, dim=-1)
    pseudo_logits = new_logits[:, :, ~mask_lab]
    pseudo_preds = F.softmax(pseudo_logits[:, :, :, :nlc] / T, dim=-1)
    pseudo_preds_all = F.softmax(pseudo_logits / T, dim=-1)
    weight = torch.sum(pseudo_preds_all[:, :, :, :nlc], dim=-1, keepdim=True)
    weight = weight / torch.mean(weight)
    loss = torch.mean(torch.sum(-torch.log(pseudo_preds) * preds * (T**2) * weight, dim=-1), dim=[0, 2])
    return loss.mean()


def official_swapped(logits, targets, temperature, num_large_crops, num_crops):
    """rKD.py swapped_prediction with cross_entropy_loss, logits/targets (views, B, C) for one head."""
    loss = 0
    for view in range(num_large_crops):
        for other_view in np.delete(range(num_crops), view):
            preds = F.log_softmax(logits[other_view] / temperature, dim=-1)
            loss += torch.mean(-torch.sum(targets[view] * preds, dim=-1), dim=-1)
    return loss / (num_large_crops * (num_crops - 1))


@pytest.fixture
def ncd_batch(rng):
    s = torch.randn(8, 5, generator=rng)
    t = torch.randn(8, K, generator=rng)
    y = torch.tensor([0, 3, 1, 4, 2, 3, 0, 4])  # labels >= K are the unlabelled (novel) samples
    return s, t, y


# -- Sinkhorn-Knopp and targets ----------------------------------------------------------------------
def test_sinkhorn_knopp_matches_the_official_code_and_is_stable(rng):
    logits = torch.randn(16, 4, generator=rng) * 0.8  # cosine-like logits: the official exp is finite
    ours = sinkhorn_knopp(logits)
    assert torch.allclose(ours, official_sinkhorn(logits.clone()), rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours.sum(-1), torch.ones(16), atol=1e-6)  # each sample's assignment sums to 1
    # more iterations equalise the cluster masses (B / K each)
    many = sinkhorn_knopp(logits, num_iters=200)
    assert torch.allclose(many.sum(0), torch.full((4,), 16 / 4), atol=1e-3)
    # large logits: the official exp(logits / ε) overflows; subtracting the maximum does not
    big = logits * 1e4
    assert not torch.isfinite(official_sinkhorn(big.clone())).all()
    assert torch.isfinite(sinkhorn_knopp(big)).all() and torch.allclose(
        sinkhorn_knopp(big).sum(-1), torch.ones(16)
    )
    assert torch.isfinite(sinkhorn_knopp(logits.bfloat16())).all()
    # a shift of all logits changes nothing
    assert torch.allclose(sinkhorn_knopp(logits + 7.0), ours, atol=1e-6)


def test_targets_never_read_novel_labels(ncd_batch):
    s, _, y = ncd_batch
    targets = ncd_targets(s, y, K)
    labelled = y < K
    assert torch.equal(targets[labelled, :K], F.one_hot(y[labelled], K).float())
    assert torch.equal(targets[labelled, K:], torch.zeros(int(labelled.sum()), 2))
    assert torch.equal(targets[~labelled, :K], torch.zeros(int((~labelled).sum()), K))
    assert torch.allclose(targets[~labelled, K:], sinkhorn_knopp(s[~labelled, K:]))
    other = torch.where(y >= K, 7 - y, y)  # other novel labels, same known ones
    assert torch.equal(ncd_targets(s, other, K), targets)


def test_swapped_prediction_matches_the_official_loop(ncd_batch, rng):
    s, _, y = ncd_batch
    s2 = s + 0.3 * torch.randn(8, 5, generator=rng)
    t1, t2 = ncd_targets(s, y, K), ncd_targets(s2, y, K)
    ours = swapped_prediction_loss([s, s2], [t1, t2], 0.1)
    assert ours.shape == (8,)
    ref = official_swapped(torch.stack([s, s2]), torch.stack([t1, t2]), 0.1, 2, 2)
    assert torch.allclose(ours.mean(), ref, rtol=1e-5)
    # per sample: ½[CE(s2 | t1) + CE(s | t2)], written out
    for i in range(8):
        ce = lambda logits, tgt: -(tgt * torch.log_softmax(logits / 0.1, -1)).sum()  # noqa: E731
        assert torch.isclose(ours[i], 0.5 * (ce(s2[i], t1[i]) + ce(s[i], t2[i])), rtol=1e-5)
    # one view: its own targets (self-labelling)
    single = swapped_prediction_loss([s], [t1], 1.0)
    assert torch.allclose(single, -(t1 * torch.log_softmax(s, -1)).sum(-1))


# -- the Cr-KD term's maths --------------------------------------------------------------------------
def test_crkd_kd_matches_the_official_code_with_gradients(ncd_batch):
    s, t, y = ncd_batch
    mask_lab = y < K
    for tau, T in [(0.1, 4.0), (1.0, 4.0), (0.5, 1.0)]:
        s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        ref = official_kd(t.view(1, 1, 8, K), s1.view(1, 1, 8, 5), mask_lab, K, tau, T)
        ours = crkd_kd_loss(s2, t, ~mask_lab, tau, T)
        assert torch.allclose(ours, ref, rtol=1e-5)
        ref.backward()
        ours.backward()  # the gate is not detached: the same gradient as the official
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)
    per = crkd_kd_loss(s, t, ~mask_lab, 0.1, 4.0, reduction="none")
    assert torch.equal(per[mask_lab], torch.zeros(int(mask_lab.sum())))
    assert torch.allclose(per.sum() / (~mask_lab).sum(), crkd_kd_loss(s, t, ~mask_lab, 0.1, 4.0))
    assert torch.allclose(per.sum(), crkd_kd_loss(s, t, ~mask_lab, 0.1, 4.0, reduction="sum"))


def test_crkd_kd_formula_and_minimum(ncd_batch):
    s, t, y = ncd_batch
    unl = y >= K
    tau, T = 0.5, 2.0
    per = crkd_kd_loss(s, t, unl, tau, T, reduction="none")
    # written out with NumPy: gate from the full softmax, normalised over the unlabelled samples
    sn, tn = s.double().numpy() / (tau * T), t.double().numpy() / (tau * T)
    e_all = np.exp(sn - sn.max(-1, keepdims=True))
    gate = (e_all[:, :K] / e_all.sum(-1, keepdims=True)).sum(-1)
    gate = gate / gate[unl.numpy()].mean()
    q = np.exp(tn - tn.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    p = np.exp(sn[:, :K] - sn[:, :K].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.where(unl.numpy(), T**2 * gate * -(q * np.log(p)).sum(-1), 0.0)
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5, atol=1e-7)
    # novel logits far below the known ones: every gate is 1 and the KD is T²·CE(q, p), smallest
    # (the teacher's entropy) when the known head equals the teacher
    student = torch.cat([t, torch.full((8, 2), -1e4)], dim=1)
    at_teacher = crkd_kd_loss(student, t, unl, 1.0, T, reduction="none")
    q = torch.softmax(t / T, -1)
    entropy = -(q * torch.log(q)).sum(-1) * T**2
    assert torch.allclose(at_teacher[unl], entropy[unl], atol=1e-5)
    moved = student.clone()
    moved[:, 0] += 1.0
    assert (crkd_kd_loss(moved, t, unl, 1.0, T, reduction="none")[unl] > at_teacher[unl]).all()


def test_crkd_numerics_and_errors(ncd_batch):
    s, t, y = ncd_batch
    unl = y >= K
    for scale in (1e4, -1e4):
        sg = (s * scale).requires_grad_(True)
        loss = crkd_kd_loss(sg, t * scale, unl, 0.1, 4.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(sg.grad).all()
        tg = ncd_targets(sg.detach(), y, K)
        assert torch.isfinite(swapped_prediction_loss([sg, sg], [tg, tg], 0.1)).all()
    sb = s.bfloat16().requires_grad_(True)
    loss = crkd_kd_loss(sb, t.bfloat16(), unl, 0.1, 4.0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(sb.grad.float()).all()
    with pytest.raises(ValueError, match="at least one unlabelled"):
        crkd_kd_loss(s, t, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="must predict more"):
        crkd_kd_loss(s[:, :K], t, unl)
    with pytest.raises(ValueError, match="bool mask"):
        crkd_kd_loss(s, t, unl.long())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        crkd_kd_loss(s, t, unl, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        crkd_kd_loss(s, t, unl, reduction="avg")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn_knopp(s, epsilon=0.0)
    with pytest.raises(ValueError, match="one target per view"):
        swapped_prediction_loss([s, s], [s])
    for kwargs, message in [
        ({"num_known": 0}, "num_known must be an integer >= 1"),
        ({"alpha": -1.0}, "alpha must be >= 0"),
        ({"kd_temperature": 0}, "temperature must be > 0"),
        ({"num_views": 3}, "num_views must be 1 or 2"),
        ({"sk_iters": 0}, "sk_iters must be >= 1"),
        ({"view_padding": -1}, "view_padding must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            CRKDLoss(**kwargs)


# -- clustering accuracy (Hungarian) against brute force ---------------------------------------------
def brute_force_cluster_accuracy(pred, true):
    ids = sorted(set(pred) | set(true))
    best = 0
    for perm in itertools.permutations(ids):
        mapping = dict(zip(ids, perm))
        best = max(best, sum(mapping[p] == t for p, t in zip(pred, true)))
    return best / len(true)


def test_cluster_accuracy_is_the_best_one_to_one_matching(rng):
    for _ in range(20):
        true = torch.randint(0, 4, (30,), generator=rng).tolist()
        pred = torch.randint(0, 5, (30,), generator=rng).tolist()
        assert np.isclose(cluster_accuracy(pred, true), brute_force_cluster_accuracy(pred, true))
    true = torch.arange(40) % 5
    permuted = (true * 3 + 1) % 5  # the same partition under other ids
    assert cluster_accuracy(permuted, true) == 1.0
    assert cluster_accuracy(torch.zeros(40, dtype=torch.long), true) == pytest.approx(8 / 40)
    with pytest.raises(ValueError, match="differ in length"):
        cluster_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match=">= 0"):
        cluster_accuracy([-1, 1], [0, 1])


def test_split_cluster_accuracy_matches_brute_force(rng):
    true = torch.randint(0, 5, (25,), generator=rng).tolist()
    pred = torch.randint(0, 5, (25,), generator=rng).tolist()
    out = split_cluster_accuracy(pred, true, num_known=2)
    ids = list(range(5))
    best = -1
    for perm in itertools.permutations(ids):
        score = sum(perm[p] == t for p, t in zip(pred, true))
        if score > best:
            best = score
    assert np.isclose(out["all"], best / 25)
    # the seen / novel parts under an optimal assignment (scores tie-break equally: check the sum)
    seen = [i for i, t in enumerate(true) if t < 2]
    novel = [i for i, t in enumerate(true) if t >= 2]
    assert np.isclose(out["seen"] * len(seen) + out["novel"] * len(novel), best)
    assert np.isnan(split_cluster_accuracy([0, 1], [3, 4], num_known=2)["seen"])


# -- the known / novel data split ----------------------------------------------------------------------
def test_known_classes_split_the_data_consistently():
    def data(split, known=3):
        dm = DigitsDataModule(
            batch_size=64, train_subset=400, val_split=0.1, known_classes=known, class_split=split
        )
        dm.setup("fit")
        return dm

    full, known, novel, all_ = data("all", None), data("known"), data("novel"), data("all")
    assert (known.num_classes, novel.num_classes, all_.num_classes, full.num_classes) == (3, 7, 10, 10)
    assert known.num_known == novel.num_known == all_.num_known == 3
    items = {
        name: [dm.train_set[i] for i in range(len(dm.train_set))]
        for name, dm in [("full", full), ("known", known), ("novel", novel), ("all", all_)]
    }
    original = {int(b.index): int(b.target) for b in items["full"]}
    # the same samples whatever the split: known ones in "known", the rest in "novel", all in "all"
    assert {int(b.index) for b in items["all"]} == set(original)
    assert {int(b.index) for b in items["known"]} == {i for i, t in original.items() if t < 3}
    assert {int(b.index) for b in items["novel"]} == {i for i, t in original.items() if t >= 3}
    assert all(
        int(b.target) == original[int(b.index)] for b in items["known"] + items["all"]
    )  # int K: same ids
    assert all(int(b.target) == original[int(b.index)] - 3 for b in items["novel"])
    # a list of known classes: relabelled in the order given, known first in "all"
    listed = data("all", [7, 2])
    assert listed.class_map[7] == 0 and listed.class_map[2] == 1 and listed.class_map[0] == 2
    test_targets = {int(listed.test_set[i].target) for i in range(len(listed.test_set))}
    assert test_targets == set(range(10))
    only = data("known", [7, 2])
    assert {int(only.test_set[i].target) for i in range(len(only.test_set))} == {0, 1}
    for kwargs, message in [
        ({"class_split": "known"}, "needs known_classes"),
        ({"class_split": "seen", "known_classes": 2}, "class_split must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            DigitsDataModule(**kwargs)
    for known_classes, message in [
        (10, "leaves no novel class"),
        ([1, 1], "distinct class ids"),
        ([12], "distinct"),
    ]:
        with pytest.raises(ValueError, match=message):
            DigitsDataModule(known_classes=known_classes).setup("fit")


# -- the term ------------------------------------------------------------------------------------------
def test_pad_classes_keeps_the_known_logits_and_pads_with_nan(rng):
    net = create_model("convnet", num_classes=K, in_chans=1, width=4)
    padded = PadClasses(net, 5)
    x = torch.randn(4, 1, 8, 8, generator=rng)
    net.eval(), padded.eval()
    out = padded(x)
    assert out.shape == (4, 5) and torch.equal(out[:, :K], net(x)) and torch.isnan(out[:, K:]).all()
    teacher = Teacher(padded)
    assert teacher.num_classes == 5
    with pytest.raises(ValueError, match="more than num_classes"):
        PadClasses(net, 2)(x)


def test_crkd_term_value_is_cluster_plus_scaled_kd(ncd_batch, rng):
    s, t, y = ncd_batch
    model = create_model("convnet", num_classes=5, in_chans=1, width=4)
    module = DistillationModule(
        model, Teacher(PadClasses(create_model("convnet", num_classes=K, in_chans=1), 5))
    )
    x = torch.randn(8, 1, 8, 8, generator=rng)
    term = build("distiller", "crkd", num_known=K, alpha=0.2, temperature=0.5, kd_temperature=2.0)
    assert isinstance(term, CRKDLoss) and term.needs_teacher and not CRKDLoss(alpha=0.0).needs_teacher
    model.eval()  # BatchNorm in eval: the second view's forward is reproducible below
    logits = model(x)
    step = Step(
        Batch(x, y),
        ModelOutput(logits),
        ModelOutput(torch.cat([t, torch.full((8, 2), float("nan"))], 1)),
        Progress(global_step=3),
        module,
    )
    got = term(step)
    # the same computation through the official transcriptions: the second view is drawn from the step
    x2 = _second_view(x, torch.Generator().manual_seed(0 * 1_000_003 + 3), 2, True)
    logits2 = model(x2)
    t1, t2 = ncd_targets(logits.detach(), y, K), ncd_targets(logits2.detach(), y, K)
    cluster = official_swapped(torch.stack([logits, logits2]), torch.stack([t1, t2]), 0.5, 2, 2)
    kd = official_kd(t.view(1, 1, 8, K), logits.view(1, 1, 8, 5), y < K, K, 0.5, 2.0)
    assert torch.allclose(got.mean(), cluster + 0.2 * kd, rtol=1e-5)
    assert torch.equal(term(step), got)  # the view is a function of the step: reproducible
    other = Step(step.batch, step.student, step.teacher, Progress(global_step=4), module)
    assert not torch.equal(term(other), got)
    # alpha = 0: the swapped prediction alone, no teacher read
    no_kd = CRKDLoss(num_known=K, alpha=0.0, temperature=0.5)
    assert torch.allclose(
        no_kd(Step(step.batch, step.student, None, step.progress, module)).mean(), cluster, rtol=1e-5
    )


# -- the stages through the recipe ---------------------------------------------------------------------
def test_crkd_stages_through_the_recipe(tmp_path):
    out = tmp_path / "crkd"
    args = [
        "--method",
        "crkd",
        "--data",
        "digits",
        "--fast",
        "--out",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
    ]
    res = distill.main(args)
    (records,) = res["stages"]["crkd"]
    assert [r["name"] for r in records] == ["known_teacher", "discover_no_kd", "discover"]
    teacher_ckpt = torch.load(records[0]["path"], weights_only=False)
    assert teacher_ckpt["state_dict"]["model.fc.weight"].shape[0] == 5  # digits 0-4 only
    for r in records[1:]:
        metrics = r["results"]
        for key in (
            "novel_acc",
            "test_novel_acc",
            "test_all_acc",
            "test_seen_acc",
            "test_agnostic_novel_acc",
        ):
            assert 0.0 <= metrics[key] <= 1.0, key
    assert res["student_acc"] == records[-1]["results"]["novel_acc"]
    table = (out / "results.md").read_text()
    assert "crkd stage discover (novel_acc)" in table and "crkd stage discover_no_kd (novel_acc)" in table
    stage_json = json.loads((stage_dir(out, "discover", 0) / "stage.json").read_text())
    assert stage_json["status"] == "done"


def test_crkd_discovery_resumes_exactly(tmp_path):
    cfg = {k: v for k, v in distill.DEFAULTS.items() if k != "fast"}
    from recipes.common import load_yaml

    cfg.update(load_yaml(Path(__file__).resolve().parents[1] / "recipes/configs/distill/crkd.yaml"))
    cfg.update(
        data="digits",
        data_args={"batch_size": 64, "train_subset": 256, "val_split": 64, "test_subset": 128},
        student_args={"width": 4},
        epochs=2,
        method_args={},
        trainer={"deterministic": True, "enable_progress_bar": False, "limit_val_batches": 1},
    )

    class Boom(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("interrupted")

    straight = run_stages(cfg, 0, tmp_path / "a")
    with pytest.raises(RuntimeError, match="interrupted"):
        run_stages(cfg, 0, tmp_path / "b", callbacks={"discover": [Boom()]})
    resumed = run_stages(cfg, 0, tmp_path / "b")
    wa = torch.load(straight[-1]["path"], weights_only=False)["state_dict"]
    wb = torch.load(resumed[-1]["path"], weights_only=False)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed[-1]["results"]["novel_acc"] == straight[-1]["results"]["novel_acc"]
