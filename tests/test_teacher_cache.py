"""TeacherCache: teacher logits per (sample index, augmentation view), in real Trainer runs."""

import pytest
import torch
from helpers import small_kd_module as module
from torch import nn

from toolkit.data import DigitsDataModule, IndexSampler
from toolkit.distill import TeacherCache
from toolkit.models import create_model
from toolkit.modules import DistillationModule
from toolkit.types import Batch


class CountingTeacher(nn.Module):
    """A teacher network that counts the samples it is run on."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = create_model("convnet", num_classes=10, in_chans=1, width=8)
        self.rows = 0

    def forward(self, x):
        self.rows += len(x)
        return self.net(x)


def digits(**kw):
    return DigitsDataModule(batch_size=64, val_split=0.1, train_subset=320, seed=0, **kw)


def test_cache_unit_computes_each_key_once():
    calls = []

    def teacher(x):
        calls.append(len(x))
        return x.sum(1, keepdim=True) * torch.arange(1.0, 4.0)  # (B, 3), a function of the input

    cache = TeacherCache(3, views=2)
    x = torch.randn(5, 4)
    index = torch.tensor([7, 0, 3, 9, 1])
    expected = teacher(x)
    calls.clear()
    first = cache.logits(index, epoch=0, inputs=x, teacher=teacher)
    assert torch.equal(first, expected) and calls == [5]
    again = cache.logits(index, epoch=2, inputs=x, teacher=teacher)  # view 2 mod 2 = 0: all cached
    assert torch.equal(again, expected) and calls == [5]
    # epoch 1 is the other view: computed; then a batch mixing cached and new samples runs only the new
    cache.logits(index, epoch=1, inputs=x, teacher=teacher)
    assert calls == [5, 5]
    x2 = torch.cat([x[:2], torch.randn(3, 4)])
    index2 = torch.tensor([7, 0, 11, 12, 13])
    mixed = cache.logits(index2, epoch=0, inputs=x2, teacher=teacher)
    assert calls == [5, 5, 3]
    assert torch.equal(mixed, teacher(x2))
    assert (cache.hits, cache.misses) == (5 + 2, 5 + 5 + 3)


def test_cache_unit_errors_and_dict_inputs():
    with pytest.raises(ValueError, match="views"):
        TeacherCache(3, views=0)
    cache = TeacherCache(2)
    inputs = {"input_ids": torch.arange(6).view(3, 2), "attention_mask": torch.ones(3, 2)}
    index = torch.tensor([0, 1, 2])
    out = cache.logits(index, 0, inputs, lambda d: d["input_ids"].float())
    assert torch.equal(out, inputs["input_ids"].float())
    with pytest.raises(ValueError, match="gives 3 logits"):
        cache.logits(torch.tensor([5]), 0, inputs["input_ids"][:1], lambda x: torch.zeros(1, 3))
    cache.set_views(1)
    with pytest.raises(ValueError, match="augmentation view"):
        cache.set_views(2)  # entries were keyed with one view


def test_sampler_views_repeat_the_augmentation_key():
    sampler = IndexSampler(list(range(10)), seed=0, with_epoch=True, views=3)
    keys = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        keys.append({e for _, e in sampler})
    assert keys == [{0}, {1}, {2}, {0}]
    with pytest.raises(ValueError, match="views"):
        IndexSampler(list(range(10)), views=0)
    with pytest.raises(ValueError, match="augment_views"):
        DigitsDataModule(augment_views=0)


def test_cached_run_skips_the_teacher_after_the_first_epoch_and_matches_live(make_trainer):
    dm = digits()
    dm.setup("fit")
    n_train = len(dm.train_set)

    live_teacher = CountingTeacher()
    live = module(live_teacher)
    make_trainer(max_epochs=3, limit_val_batches=0).fit(live, datamodule=digits())

    cached_teacher = CountingTeacher()
    cached = module(cached_teacher, teacher_cache=True)
    make_trainer(max_epochs=3, limit_val_batches=0).fit(cached, datamodule=digits())

    # the dry run sees 2 example inputs; then the live run sees every sample every epoch
    assert live_teacher.rows == 2 + 3 * n_train
    assert cached_teacher.rows == 2 + n_train  # only the first epoch
    assert int(cached.teacher_cache.table.written.sum()) == n_train
    for a, b in zip(live.model.state_dict().values(), cached.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_augmented_data_needs_views(make_trainer):
    with pytest.raises(ValueError, match="augment_views"):
        make_trainer(max_epochs=1).fit(
            module(CountingTeacher(), teacher_cache=True), datamodule=digits(augment=True)
        )

    # "auto" quietly runs the live teacher instead
    teacher = CountingTeacher()
    auto = module(teacher, teacher_cache="auto")
    dm = digits(augment=True)
    make_trainer(max_epochs=2, limit_val_batches=0).fit(auto, datamodule=dm)
    assert not auto._cache_active and teacher.rows == 2 + 2 * len(dm.train_set)

    # with K views the teacher runs in the first K epochs only
    teacher = CountingTeacher()
    viewed = module(teacher, teacher_cache=True)
    dm = digits(augment=True, augment_views=2)
    make_trainer(max_epochs=4, limit_val_batches=0).fit(viewed, datamodule=dm)
    n = len(dm.train_set)
    assert viewed.teacher_cache.views == 2
    assert teacher.rows == 2 + 2 * n and int(viewed.teacher_cache.table.written.sum()) == 2 * n


def test_feature_terms_and_bad_arguments_are_refused(make_trainer):
    terms = {
        "ce": {"loss": "cross_entropy"},
        "fitnet": {"distiller": "fitnet", "student_layer": "features.3", "teacher_layer": "net.features.3"},
    }
    torch.manual_seed(0)
    m = DistillationModule(
        "convnet",
        CountingTeacher(),
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        terms=terms,
        teacher_cache=True,
    )
    with pytest.raises(ValueError, match="teacher features"):
        make_trainer(max_epochs=1).fit(m, datamodule=digits())
    with pytest.raises(ValueError, match="teacher_cache must be"):
        module(CountingTeacher(), teacher_cache="yes")
    with pytest.raises(ValueError, match="teacher_cache_dtype"):
        module(CountingTeacher(), teacher_cache=True, teacher_cache_dtype="int8")


def test_batches_without_indices_are_refused():
    m = module(CountingTeacher(), teacher_cache=True)
    m._cache_active = True
    m.prepare(torch.zeros(2, 1, 8, 8))
    m.train()
    with pytest.raises(ValueError, match="teacher_cache keeps per-sample memory"):
        m.teacher_output(Batch(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)))


def test_cache_is_checkpointed_and_resumes(tmp_path, make_trainer):
    from lightning.pytorch.callbacks import ModelCheckpoint

    teacher = CountingTeacher()
    m = module(teacher, teacher_cache=True, teacher_cache_dtype="float16")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(max_epochs=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt]).fit(
        m, datamodule=digits()
    )
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    table = state["teacher_cache.table._extra_state"]
    assert table["values"].dtype == torch.float16 and bool(table["written"].any())
    assert state["teacher_cache._extra_state"] == {"views": 1}

    # resumed: the restored table serves epoch 2 without running the teacher on training data
    teacher2 = CountingTeacher()
    m2 = module(teacher2, teacher_cache=True, teacher_cache_dtype="float16")
    make_trainer(max_epochs=2, limit_val_batches=0).fit(
        m2, datamodule=digits(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert teacher2.rows == 2  # the dry run only
    torch.testing.assert_close(m2.teacher_cache.table.values, m.teacher_cache.table.values)

    # a checkpoint filled with one view does not resume on data with two
    m3 = module(CountingTeacher(), teacher_cache=True, teacher_cache_dtype="float16")
    with pytest.raises(ValueError, match="augmentation view"):
        make_trainer(max_epochs=2, limit_val_batches=0).fit(
            m3, datamodule=digits(augment=True, augment_views=2), ckpt_path=tmp_path / "last.ckpt"
        )
