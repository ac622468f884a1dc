"""The teacher cache on disk (issue 7, item 2): files, fingerprint, top-k rule, record and
precompute modes, later runs that never run the teacher, DDP, recipes, and the benchmark's
cached-vs-live KD loss check. Real Trainer runs on DigitsDataModule; the teacher's forward passes
are counted with a forward hook on its classifier (`forward_output` calls `forward_features` and
the classifier, so a hook on the network itself would not fire)."""

import numpy as np
import pytest
import torch
from helpers import run_ddp_script
from helpers import small_kd_module as module
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from toolkit.data import DigitsDataModule
from toolkit.distill import Teacher, TeacherCache, build_teacher_cache
from toolkit.distill.cache_store import read_manifest, resolve_top_k, topk_compress, topk_expand
from toolkit.models import create_model

FITNET = {
    "ce": {"loss": "cross_entropy", "weight": 0.5},
    "kd": {"distiller": "kd", "weight": 0.5},
    "fitnet": {
        "distiller": "fitnet",
        "weight": 1.0,
        "student_layer": "features.3",
        "teacher_layer": "features.3",
    },
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def teacher_net(seed: int = 0, capture: bool = False) -> torch.nn.Module:
    """The convnet teacher; `net.rows` counts the samples its forward runs on (`net.logits`
    keeps each call's logits when `capture`)."""
    torch.manual_seed(seed)
    net = create_model("convnet", num_classes=10, in_chans=1, width=8)
    net.rows, net.logits = 0, []

    def hook(module, inputs, output):
        net.rows += len(output)
        if capture:
            net.logits.append(output.detach().clone())

    net.get_classifier().register_forward_hook(hook)
    return net


def digits(**kw) -> DigitsDataModule:
    return DigitsDataModule(
        batch_size=64, val_split=0.1, train_subset=kw.pop("train_subset", 256), seed=0, **kw
    )


def fit(make_trainer, m, dm, epochs: int = 1, **kw):
    make_trainer(max_epochs=epochs, limit_val_batches=0, **kw).fit(m, datamodule=dm)
    return m


class Indices(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((trainer.current_epoch, outputs["index"].clone()))


# -- the top-k rule ---------------------------------------------------------------------------


def test_topk_rebuild_is_fkd_marginal_smoothing():
    """softmax of the rebuilt logits = FKD's marginal smoothing of the teacher's softmax: the
    top-k probabilities kept, (1 − Σ top-k)/(C − k) on every other class (NumPy, float64)."""
    rng = np.random.default_rng(0)
    for scale, k, c in ((3.0, 5, 20), (30.0, 3, 10), (0.1, 1, 7), (8.0, 99, 100)):
        z = rng.normal(size=(6, c)) * scale
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = np.argsort(-z, axis=1)[:, :k]
        expected = np.repeat(((1 - np.take_along_axis(p, top, 1).sum(1)) / (c - k))[:, None], c, axis=1)
        np.put_along_axis(expected, top, np.take_along_axis(p, top, 1), 1)

        values, indices = topk_compress(torch.tensor(z, dtype=torch.float64), k)
        rebuilt = topk_expand(values, indices, c)
        assert values.shape == (6, k + 1) and indices.shape == (6, k)
        np.testing.assert_allclose(
            torch.softmax(rebuilt.double(), -1).numpy(), expected, rtol=1e-5, atol=1e-7
        )
        # the partition function is kept and the fill never exceeds a top-k logit
        np.testing.assert_allclose(
            torch.logsumexp(rebuilt.double(), -1).numpy(), np.log(np.exp(z).sum(1)), rtol=1e-5
        )
        assert bool((values[:, -1:] <= values[:, :-1]).all())


def test_top_k_settings():
    assert resolve_top_k("auto", 100) is None and resolve_top_k("auto", 1000) == 10
    assert resolve_top_k(None, 1000) is None and resolve_top_k(5, 10) == 5
    for bad in (0, 10, 2.5, True, "all"):
        with pytest.raises(ValueError, match="top_k"):
            resolve_top_k(bad, 10)
    with pytest.raises(ValueError, match="teacher_cache_dir"):
        module(teacher_net(), teacher_cache=True, teacher_cache_top_k=3)
    with pytest.raises(ValueError, match="teacher_cache_fill"):
        module(teacher_net(), teacher_cache_dir="x", teacher_cache_fill="sometimes")
    with pytest.raises(ValueError, match="teacher cache dtype"):
        TeacherCache(10, directory="x", dtype="int8")


# -- record mode, later runs, exactness -------------------------------------------------------


def test_record_run_stores_the_live_logits_exactly_and_a_new_run_never_runs_the_teacher(
    tmp_path, make_trainer
):
    path = tmp_path / "cache"
    net = teacher_net(capture=True)
    seen = Indices()
    first = fit(make_trainer, module(net, teacher_cache_dir=path), digits(), epochs=2, callbacks=[seen])
    n = 256
    assert net.rows == 2 + n  # the dry run, then epoch 0 only
    assert first.teacher_cache.misses == n and first.teacher_cache.hits == n
    files = first.teacher_cache.files
    assert sorted(p.name for p in path.iterdir()) == ["logits.bin", "manifest.json", "written.u8"]
    # float32 full logits: the rows are the live teacher's outputs on the training batches, bit for bit
    epoch0 = [index for epoch, index in seen.batches if epoch == 0]
    assert len(epoch0) == len(net.logits) - 1
    for index, live in zip(epoch0, net.logits[1:]):
        assert torch.equal(files.logits[index], live)
    assert int(files.written.sum()) == n

    # a new run (new module, new teacher object with the same weights) reads every row: no forward at all,
    # not even the dry run, and trains exactly as the second epoch of the first run saw the rows
    net2 = teacher_net()
    again = fit(make_trainer, module(net2, teacher_cache_dir=path), digits(), epochs=2)
    assert net2.rows == 0 and again.teacher_cache.misses == 0 and again.teacher_cache.hits == 2 * n
    reference = fit(make_trainer, module(teacher_net()), digits(), epochs=2)  # live teacher, no cache
    for a, b in zip(reference.model.state_dict().values(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resumed_run_reads_the_cache_and_keeps_it_out_of_the_checkpoint(tmp_path, make_trainer):
    path = tmp_path / "cache"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(
        make_trainer,
        module(teacher_net(), teacher_cache_dir=path),
        digits(),
        enable_checkpointing=True,
        callbacks=[ckpt],
    )
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher_cache.table") for k in state)  # the rows live on disk only
    net = teacher_net()
    resumed = module(net, teacher_cache_dir=path)
    make_trainer(max_epochs=3, limit_val_batches=0).fit(
        resumed, datamodule=digits(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert net.rows == 0 and resumed.teacher_cache.hits == 2 * 256


def test_precompute_mode_and_build_function(tmp_path, make_trainer):
    # in on_train_start: one pass over every (sample, view) row, then training reads only
    net = teacher_net()
    dm = digits(augment=True, augment_views=2)
    m = fit(make_trainer, module(net, teacher_cache_dir=tmp_path / "a", teacher_cache_fill="precompute"), dm)
    assert net.rows == 2 + 2 * 256 and m.teacher_cache.misses == 0 and m.teacher_cache.complete
    # build_teacher_cache gives the same rows (up to the teacher's batch composition) and is resumable
    net_b = teacher_net()
    cache = build_teacher_cache(net_b, digits(augment=True, augment_views=2), tmp_path / "b", batch_size=32)
    assert net_b.rows == 2 * 256 and cache.complete and cache.views == 2
    torch.testing.assert_close(cache.files.logits, m.teacher_cache.files.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.files.written, m.teacher_cache.files.written)
    again = build_teacher_cache(net_b, digits(augment=True, augment_views=2), tmp_path / "b")
    assert net_b.rows == 2 * 256 and again.complete  # nothing left to compute
    with pytest.raises(ValueError, match="augment_views"):
        build_teacher_cache(teacher_net(), digits(augment=True), tmp_path / "c")


def test_top_k_cache_serves_the_rebuilt_logits_in_every_epoch(tmp_path, make_trainer):
    path = tmp_path / "topk"
    net = teacher_net(capture=True)
    seen = Indices()
    m = fit(
        make_trainer, module(net, teacher_cache_dir=path, teacher_cache_top_k=3), digits(), callbacks=[seen]
    )
    files = m.teacher_cache.files
    assert files.top_k == 3 and files.dtype == "float16"  # top-k defaults to fp16 values
    assert {"topk_values.bin", "topk_indices.bin"} <= {p.name for p in path.iterdir()}
    for (_, index), live in zip(seen.batches, net.logits[1:]):
        values, indices = topk_compress(live, 3)
        expected = topk_expand(values.half(), indices, 10)
        read, _, written = files.read(index, ())
        assert bool(written.all()) and torch.equal(read, expected)
        assert torch.equal(files.topk_indices[index].long(), indices)


def test_teacher_features_are_cached_for_feature_terms(tmp_path, make_trainer):
    path = tmp_path / "fitnet"
    first = fit(make_trainer, module(teacher_net(), FITNET, teacher_cache_dir=path), digits(), epochs=2)
    manifest = read_manifest(path)
    assert manifest["layout"]["features"] == {"features.3": {"file": "feature_0.bin", "shape": [8, 4, 4]}}
    net = teacher_net()
    again = fit(make_trainer, module(net, FITNET, teacher_cache_dir=path), digits(), epochs=2)
    assert net.rows == 0
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)  # the same cached logits and features in both runs
    # a logit-only run may read this complete cache; a run tapping other features may not
    kd_net = teacher_net()
    fit(make_trainer, module(kd_net, teacher_cache_dir=path), digits())
    assert kd_net.rows == 0
    other = dict(
        FITNET, fitnet={**FITNET["fitnet"], "teacher_layer": "features.7", "student_layer": "features.7"}
    )
    with pytest.raises(ValueError, match=r"also read \['features.7'\]"):
        fit(make_trainer, module(teacher_net(), other, teacher_cache_dir=path), digits())


# -- the fingerprint --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("fingerprint") / "cache"
    build_teacher_cache(teacher_net(), digits(), path)
    return path


def test_the_same_run_opens_the_cache(built, make_trainer):
    net = teacher_net()
    fit(make_trainer, module(net, teacher_cache_dir=built), digits())
    assert net.rows == 0


@pytest.mark.parametrize(
    "change, match",
    [
        ("weights", r"teacher weights \(weights_sha256"),
        ("data", r"data \(.*train_indices_sha256.*train_subset"),
        ("transforms", r"transforms \(augment: false in the cache, true now"),
        ("storage", r"storage \(dtype.*mode.*top_k"),
    ],
)
def test_a_cache_for_another_run_is_refused_at_setup(built, make_trainer, change, match):
    net = teacher_net(seed=1 if change == "weights" else 0)
    kw = {"teacher_cache_top_k": 4} if change == "storage" else {}
    dm = {
        "data": digits(train_subset=200),
        "transforms": digits(augment=True, augment_views=2),
    }.get(change, digits())
    written = built.joinpath("written.u8").read_bytes()
    with pytest.raises(ValueError, match=match) as err:
        fit(make_trainer, module(net, teacher_cache_dir=built, **kw), dm)
    assert "Use another teacher_cache_dir" in str(err.value) and f"delete {built}" in str(err.value)
    assert net.rows == 0  # refused before any teacher pass
    assert built.joinpath("written.u8").read_bytes() == written  # and the cache is untouched


def test_a_cache_needs_a_datamodule_and_a_teacher_with_weights(tmp_path, make_trainer):
    dm = digits()
    dm.setup("fit")
    m = module(teacher_net(), teacher_cache_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="toolkit DataModule"):
        make_trainer(max_epochs=1, limit_val_batches=0).fit(m, train_dataloaders=dm.train_dataloader())
    with pytest.raises(ValueError, match="plain callable"):
        build_teacher_cache(Teacher(lambda x: torch.zeros(len(x), 10)), digits(), tmp_path / "y")


# -- cached vs live KD loss (the benchmark's check) -------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cached_and_live_kd_losses_agree_within_the_storage_rounding(tmp_path, dtype):
    from benchmarks.teacher_cache import kd_loss_agreement

    teacher = Teacher(teacher_net())
    dm = digits(augment=True, augment_views=2)
    cache = build_teacher_cache(teacher, dm, tmp_path / dtype, dtype=dtype)
    result = kd_loss_agreement(teacher, cache, dm, batches=2)
    assert result["samples"] == 2 * 2 * 64
    assert result["equal_to_rounded"] and result["within_rounding"]
    if dtype == "float32":
        assert result["max_abs_diff"] < 1e-5  # the same values, up to the teacher's batch composition
    else:
        assert 0 < result["max_abs_diff"] <= 1e-2


# -- DDP and recipes --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ci
def test_ddp_ranks_fill_disjoint_rows_equal_to_a_single_process_build(tmp_path, make_trainer):
    ranks = run_ddp_script("ddp_teacher_cache.py", tmp_path)
    dm = DigitsDataModule(
        batch_size=32, val_split=0.1, train_subset=300, augment=True, augment_views=2, seed=0
    )
    dm.setup("fit")
    all_keys = sorted((i * 2 + v) for i in dm.train_sample_indices.tolist() for v in range(2))
    # record mode: per epoch the ranks trained on disjoint samples, together every (sample, view) row once
    for epoch in ("0", "1"):
        mine = [set(rk["keys"][epoch]) for rk in ranks]
        assert not mine[0] & mine[1]
    assert sorted(k for rk in ranks for e in ("0", "1") for k in rk["keys"][e]) == all_keys
    for rk in ranks:
        assert rk["record_rows"] == 2 + 300  # dry run + its half of each epoch's samples
        assert rk["precompute_rows"] == 2 + 300 and rk["precompute_misses"] == 0  # its half of 600 rows

    reference = build_teacher_cache(teacher_net(), dm, tmp_path / "single")
    for name in ("record", "precompute"):
        cache = TeacherCache(10, views=2, directory=tmp_path / name)
        cache.attach(Teacher(teacher_net()), dm)  # the same fingerprint as the single-process build
        cache.create()
        assert torch.equal(cache.files.written, reference.files.written)
        assert int(cache.files.written.sum()) == 600
        torch.testing.assert_close(cache.files.logits, reference.files.logits, atol=1e-5, rtol=1e-5)

    # a run in this (another) process reads the DDP-built cache without running the teacher
    net = teacher_net()
    m = module(net, teacher_cache_dir=tmp_path / "record")
    dm2 = DigitsDataModule(
        batch_size=32, val_split=0.1, train_subset=300, augment=True, augment_views=2, seed=0
    )
    fit(make_trainer, m, dm2, epochs=2)
    assert net.rows == 0 and m.teacher_cache.hits == 600


def test_distill_recipe_teacher_cache_flag(tmp_path, monkeypatch):
    from recipes import distill

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "toolkit-cache"))
    cache = tmp_path / "tc"
    args = [
        "--data",
        "digits",
        "--fast",
        "--trainer.enable_progress_bar",
        "false",
        "--teacher-cache",
        str(cache),
    ]
    res = distill.main(["--method", "kd", "--out", str(tmp_path / "a"), *args])
    manifest = read_manifest(cache / "seed0")
    assert manifest is not None and res["config"]["teacher_cache_dir"] == str(cache)
    written = np.fromfile(cache / "seed0" / "written.u8", dtype=np.uint8)
    assert int(written.sum()) == manifest["data"]["num_train_samples"]
    # another logit method of the same seed shares the directory; a feature method gets its own
    distill.main(["--compare", "dkd,fitnet", "--out", str(tmp_path / "b"), *args])
    assert sorted(p.name for p in (cache / "seed0").iterdir() if p.is_dir())[0].startswith("features-")
