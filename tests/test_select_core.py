"""Data selection core: SampleScores, select_subset, subset sampling (exactly once under DDP),
DataPruning (schedule, files, TensorBoard, resume, errors), label noise, el2n and random, and the
prune recipe."""

import lightning as L
import numpy as np
import pytest
import torch
from helpers import StopAfter, run_ddp_script
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from toolkit import build
from toolkit.data.samplers import IndexSampler
from toolkit.functional.el2n import el2n_score
from toolkit.functional.subset import select_subset
from toolkit.modules import ClassificationModule
from toolkit.selection import DataPruning, EL2NScorer, RandomScorer, SampleScores


def digits(**kw):
    return build("data", "digits", **{"batch_size": 32, "seed": 0, **kw})


def classifier(seed=0, width=4):
    torch.manual_seed(seed)
    return ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        loss="cross_entropy",
        model_kwargs={"width": width},
        optimizer={"name": "sgd", "lr": 0.05},
    )


TRAINER = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=1,
    num_sanity_val_steps=0,
)


class SeenIndices(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch.index.tolist())


# -- el2n -------------------------------------------------------------------------------------------


def test_el2n_against_the_formula_and_its_limits():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1e4, -1e4, 0.0]])
    y = torch.tensor([0, 2, 1])
    p = np.exp(z.numpy().astype(np.float64) - z.numpy().max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[y.numpy()]
    np.testing.assert_allclose(el2n_score(z, y).numpy(), np.sqrt(((p - onehot) ** 2).sum(1)), rtol=1e-6)
    # a confident right prediction scores 0, a confident wrong one sqrt(2) (the maximum)
    right = torch.tensor([[1e4, 0.0, 0.0]])
    assert el2n_score(right, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)
    assert el2n_score(right, torch.tensor([1])).item() == pytest.approx(2**0.5, rel=1e-6)
    assert torch.isfinite(el2n_score(z.bfloat16(), y)).all()
    with pytest.raises(ValueError, match="labels out of range"):
        el2n_score(z, torch.tensor([0, 3, 1]))


# -- select_subset ----------------------------------------------------------------------------------


def test_select_subset_keeps_the_hardest_easiest_and_drops_the_very_hardest():
    index = torch.tensor([10, 3, 7, 1, 5, 8, 2, 9, 4, 6])
    score = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 0.8, 0.0, 0.7, 0.6, 0.2])
    ranked = sorted(
        zip(index.tolist(), score.tolist()), key=lambda t: (-t[1], t[0])
    )  # ties: lower index first
    assert select_subset(index, score, 0.3).tolist() == sorted(i for i, _ in ranked[:3])
    assert select_subset(index, score, 0.3, drop_hardest=0.2).tolist() == sorted(i for i, _ in ranked[2:5])
    easiest = sorted(zip(index.tolist(), score.tolist()), key=lambda t: (t[1], t[0]))
    assert select_subset(index, score, 0.4, "easiest").tolist() == sorted(i for i, _ in easiest[:4])
    assert select_subset(index, score, 1.0).tolist() == sorted(index.tolist())
    assert len(select_subset(index, score, 0.01)) == 1  # at least one sample
    # ties between 7 and 1 (both 0.5) go to the lower index
    assert select_subset(index, score, 0.5).tolist() == sorted([10, 8, 9, 4, 1])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"keep": 0.0}, "keep must be a fraction in \\(0, 1\\]"),
        ({"keep": 1.5}, "keep must be a fraction"),
        ({"keep": 0.5, "mode": "middle"}, "mode must be one of"),
        ({"keep": 0.5, "drop_hardest": 0.6}, "drop_hardest must be in"),
        ({"keep": 0.5, "mode": "easiest", "drop_hardest": 0.1}, "drop_hardest applies"),
    ],
)
def test_select_subset_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        select_subset(torch.arange(4), torch.rand(4), **kw)
    with pytest.raises(ValueError, match="NaN"):
        select_subset(torch.arange(2), torch.tensor([0.1, float("nan")]), 0.5)


# -- SampleScores -----------------------------------------------------------------------------------


def test_sample_scores_running_means_files_and_coverage(tmp_path):
    s = SampleScores({"data": "x"})
    s.add(torch.tensor([4, 1, 4]), torch.tensor([1.0, 2.0, 3.0]))
    s.add(torch.tensor([1]), torch.tensor([4.0]))
    assert s.index.tolist() == [1, 4] and s.score.tolist() == [3.0, 2.0]
    dense = s.dense()
    assert len(dense) == 5 and torch.isnan(dense[[0, 2, 3]]).all() and dense[4] == 2.0
    for suffix in (".pt", ".npy"):
        loaded = SampleScores.load(s.save(tmp_path / f"s{suffix}"))
        assert torch.equal(loaded.index, s.index) and torch.allclose(loaded.score, s.score)
    assert np.isnan(np.load(tmp_path / "s.npy")[0])
    s.check_covers(torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="cover 2 samples but the training set has 3"):
        s.check_covers(torch.tensor([1, 4, 7]))
    mean = SampleScores.mean_of([s, SampleScores.load(tmp_path / "s.pt")])
    assert torch.allclose(mean.score, s.score) and mean.meta["runs"] == 2
    other = SampleScores()
    other.add(torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="different samples"):
        SampleScores.mean_of([s, other])
    with pytest.raises(ValueError, match="non-finite"):
        s.add(torch.tensor([0]), torch.tensor([float("inf")]))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read scores"):
        SampleScores.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=".pt or .npy"):
        s.save(tmp_path / "s.csv")
    state = s.state_dict()
    restored = SampleScores()
    restored.load_state_dict(state)
    assert torch.equal(restored.index, s.index) and torch.equal(restored.score, s.score)


# -- subset sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_subset_sampler_serves_every_kept_position_once_with_equal_batch_counts(world, batch):
    data = list(range(200))
    for kept in (1, 5, 31, 64, 65, 97, 128, 129, 130, 200):
        subset = torch.randperm(200, generator=torch.Generator().manual_seed(kept))[:kept]
        samplers = [
            IndexSampler(data, seed=3, subset=subset, batch_size=batch, num_replicas=world, rank=r)
            for r in range(world)
        ]
        for epoch in (0, 1):
            for s in samplers:
                s.set_epoch(epoch)
            per_rank = [list(s) for s in samplers]
            assert [len(p) for p in per_rank] == [len(s) for s in samplers]
            assert len({-(-len(p) // batch) for p in per_rank}) == 1  # same number of batches everywhere
            flat = [i for p in per_rank for i in p]
            assert set(flat) == set(subset.tolist())
            steps = -(-kept // (world * batch))
            infeasible = kept - (steps - 1) * world * batch < world
            assert len(flat) - kept == (0 if not infeasible else world - (kept - (steps - 1) * world * batch))
        if world == 1:
            assert len(flat) == kept  # one process: never a repeat


def test_subset_sampler_order_depends_only_on_seed_epoch_and_subset():
    subset = torch.tensor([5, 9, 2, 7, 11])
    a, b = IndexSampler(list(range(20)), seed=1, subset=subset), IndexSampler(list(range(20)), seed=1)
    b.set_subset(subset)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == sorted(subset.tolist())
    with pytest.raises(ValueError, match="positions must be in"):
        a.set_subset(torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="distinct"):
        a.set_subset(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="empty"):
        a.set_subset(torch.tensor([], dtype=torch.long))


# -- label noise ------------------------------------------------------------------------------------


def test_label_noise_corrupts_the_training_split_only_and_depends_on_the_seed():
    clean, noisy = digits(seed=3), digits(seed=3, label_noise=0.4)
    clean.setup("fit")
    noisy.setup("fit")
    n = len(noisy.train_sample_indices)
    assert torch.equal(noisy.clean_train_targets, clean.train_targets)
    relabelled = (noisy.noisy_labels >= 0).sum().item()
    assert relabelled == round(0.4 * n)  # exactly this many drawn (some keep their class by chance)
    changed = (noisy.train_targets != clean.train_targets).float().mean().item()
    assert 0.4 * 0.9 - 0.06 < changed < 0.4 * 0.9 + 0.06  # 9 in 10 draws differ from the true class
    items = [noisy.train_set[(i, 0)] for i in range(n)]
    assert torch.equal(torch.stack([it.target for it in items]), noisy.train_targets)
    for split in ("val_set", "test_set"):
        a, b = getattr(noisy, split), getattr(clean, split)
        assert all(int(a[i].target) == int(b[i].target) for i in range(len(a)))
    again = digits(seed=3, label_noise=0.4)
    again.setup("fit")
    assert torch.equal(again.train_targets, noisy.train_targets)
    other = digits(seed=4, label_noise=0.4)
    other.setup("fit")
    assert not torch.equal(other.noisy_labels >= 0, noisy.noisy_labels >= 0)
    with pytest.raises(ValueError, match="label_noise must be a fraction"):
        digits(label_noise=1.0)


# -- DataPruning in real runs -----------------------------------------------------------------------


def test_pruning_after_scoring_serves_the_subset_logs_and_saves_scores(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dm = digits(train_subset=300, val_split=0.1)
    pruning = build("selector", "el2n", keep=0.4, score_epochs=1, save_scores=str(tmp_path / "el2n.pt"))
    seen = SeenIndices()
    module = classifier()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    kw = {**TRAINER, "logger": logger}
    L.Trainer(max_epochs=3, callbacks=[pruning, seen], **kw).fit(module, datamodule=dm)
    every = dm.train_sample_indices.tolist()
    assert sorted(seen.seen[0]) == every
    kept = pruning.subset.tolist()
    assert len(kept) == 120 and sorted(seen.seen[1]) == kept == sorted(seen.seen[2])
    assert pruning.selections == [{"epoch": 1, "kept": 120}]
    scores = SampleScores.load(tmp_path / "el2n.pt")
    assert scores.index.tolist() == every and scores.meta["selector"] == "el2n"
    assert kept == select_subset(scores.index, scores.score, 0.4).tolist()  # the hardest 40%
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert "selection/el2n/scores" in events.Tags()["histograms"]
    assert events.Scalars("selection/kept")[0].value == pytest.approx(0.4)
    # the saved scores prune another run from its first epoch
    again = SeenIndices()
    reuse = DataPruning(EL2NScorer(), keep=0.4, scores=tmp_path / "el2n.pt")
    L.Trainer(max_epochs=1, callbacks=[reuse, again], **TRAINER).fit(
        classifier(), datamodule=digits(train_subset=300, val_split=0.1)
    )
    assert sorted(again.seen[0]) == kept


def test_scoring_pass_scores_are_el2n_of_the_model_without_augmentation():
    dm = digits(train_subset=200, val_split=0.1, augment=True)
    pruning = DataPruning(EL2NScorer(), keep=0.5, score_epochs=0)
    module = classifier()
    L.Trainer(max_epochs=1, limit_train_batches=0, callbacks=[pruning], **TRAINER).fit(module, datamodule=dm)
    dm.setup("fit")
    plain = build("data", "digits", batch_size=32, seed=0, train_subset=200, val_split=0.1)  # no augmentation
    plain.setup("fit")
    module.eval()
    xs = torch.stack([plain.train_set[i].input for i in range(len(plain.train_set))])
    with torch.no_grad():
        expected = el2n_score(module.model(xs), plain.train_targets)
    scores = pruning.scorer.scores()
    assert scores.index.tolist() == plain.train_sample_indices.tolist()
    torch.testing.assert_close(scores.score, expected, rtol=1e-5, atol=1e-6)


def test_random_selector_is_uniform_seeded_and_reselects_freshly():
    dm = digits(train_subset=300, val_split=0.1)
    dm.setup("fit")
    subsets = []
    for seed in (0, 0, 1):
        scorer = RandomScorer(seed)
        scorer.bind(dm.train_sample_indices)
        s = scorer.scores()
        subsets.append(select_subset(s.index, s.score, 0.5).tolist())
        nxt = scorer.scores()
        assert not torch.equal(nxt.score, s.score)  # a new round draws anew
    assert subsets[0] == subsets[1] != subsets[2]
    seen = SeenIndices()
    pruning = build("selector", "random", keep=0.5, seed=0)
    L.Trainer(max_epochs=1, callbacks=[pruning, seen], **TRAINER).fit(
        classifier(), datamodule=digits(train_subset=300, val_split=0.1)
    )
    assert sorted(seen.seen[0]) == subsets[0]  # random prunes before the first epoch


def final_state(tmp_path, stop_after=None):
    kw = {**TRAINER, "max_epochs": 4, "deterministic": True, "limit_train_batches": 4}

    def dm():
        return digits(train_subset=300, val_split=0.1, augment=True)

    def pruning():
        return build("selector", "el2n", keep=0.5, score_epochs=1, reselect_every=1)

    L.seed_everything(1)
    module = classifier(seed=5)
    if stop_after is None:
        p = pruning()
        L.Trainer(callbacks=[p], **kw).fit(module, datamodule=dm())
        return module.state_dict(), p
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    kw["enable_checkpointing"] = True
    L.Trainer(callbacks=[pruning(), ckpt, StopAfter(stop_after)], **kw).fit(module, datamodule=dm())
    L.seed_everything(99)
    resumed, p = classifier(seed=42), pruning()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[p, ckpt], **kw).fit(resumed, datamodule=dm(), ckpt_path=str(tmp_path / "last.ckpt"))
    return resumed.state_dict(), p


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight, p1 = final_state(tmp_path / "a")
    resumed, p2 = final_state(tmp_path / "b", stop_after=2)
    assert p1.selections == p2.selections and torch.equal(p1.subset, p2.subset)
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="keep must be a fraction"):
        build("selector", "el2n", keep=0.0)
    with pytest.raises(ValueError, match="keep must be a fraction"):
        build("selector", "el2n", keep=1.2)
    with pytest.raises(ValueError, match="score_epochs"):
        build("selector", "el2n", keep=0.5, score_epochs=-1)
    with pytest.raises(ValueError, match="reselect_every"):
        build("selector", "el2n", keep=0.5, reselect_every=0)
    with pytest.raises(KeyError, match="Did you mean 'el2n'"):
        build("selector", "el2m", keep=0.5)
    # scores of another data set size
    other = SampleScores()
    other.add(torch.arange(50), torch.rand(50))
    other.save(tmp_path / "other.pt")
    pruning = DataPruning(EL2NScorer(), keep=0.5, scores=tmp_path / "other.pt")
    with pytest.raises(
        ValueError, match="the scores cover 50 samples but this DigitsDataModule's training set has"
    ):
        L.Trainer(max_epochs=1, callbacks=[pruning], **TRAINER).fit(
            classifier(), datamodule=digits(train_subset=100)
        )
    # a DataModule that cannot serve a subset
    from torch.utils.data import DataLoader, TensorDataset

    class Plain(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(
                TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=4
            )

    with pytest.raises(TypeError, match="set_train_subset"):
        L.Trainer(max_epochs=1, callbacks=[build("selector", "el2n", keep=0.5)], **TRAINER).fit(
            classifier(), datamodule=Plain()
        )
    # a scoring batch without sample indices
    from toolkit.types import Batch

    with pytest.raises(ValueError, match="needs the dataset index"):
        EL2NScorer().pass_batch(classifier().model, Batch(torch.randn(2, 1, 8, 8), torch.tensor([0, 1])))


def test_a_plain_lightning_module_without_the_loss_bus_can_be_pruned():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch.input), batch.target)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = SeenIndices()
    pruning = build("selector", "el2n", keep=0.3, score_epochs=1)
    L.Trainer(max_epochs=2, callbacks=[pruning, seen], **{**TRAINER, "limit_val_batches": 0}).fit(
        Plain(), datamodule=digits(train_subset=200, val_split=0.1)
    )
    assert sorted(seen.seen[1]) == pruning.subset.tolist() and len(pruning.subset) == 60


# -- DDP --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ci
def test_ddp_pruning_reselecting_every_epoch(tmp_path):
    ranks = run_ddp_script("ddp_pruning.py", tmp_path)
    every = ranks[0]["train_indices"]
    assert len(every) == 301
    selections = ranks[0]["selections"]
    assert [s["epoch"] for s in selections] == [1, 2, 3]
    assert selections == ranks[1]["selections"]  # identical scores and subsets on both ranks
    served = {0: every, **{s["epoch"]: s["subset"] for s in selections}}
    for epoch, expected in served.items():
        a, b = (rk["seen"][str(epoch)] for rk in ranks)
        assert sorted(a + b) == sorted(expected), epoch  # every kept sample exactly once
        assert abs(len(a) - len(b)) <= 1
    # the gathered scores equal a single-process scoring pass with the same weights
    dm = digits(val_split=0.1, train_subset=301)
    dm.setup("fit")
    weights = torch.load(tmp_path / "weights0.pt", weights_only=True)
    for sel, w in zip(selections, weights):
        module = classifier()
        module.model.load_state_dict(w)
        module.eval()
        scorer = EL2NScorer()
        with torch.no_grad():
            for batch in dm.scoring_dataloader():
                scorer.pass_batch(module.model, batch)
        scorer.end_pass()
        dense = torch.tensor(sel["scores"])
        torch.testing.assert_close(dense[scorer.scores().index], scorer.scores().score, rtol=1e-5, atol=1e-6)
        assert (
            sel["subset"] == select_subset(scorer.scores().index, dense[scorer.scores().index], 0.47).tolist()
        )


# -- the recipe -------------------------------------------------------------------------------------


def test_prune_recipe_scores_prunes_retrains_and_reuses_scores(tmp_path):
    from recipes import prune

    quiet = ["--trainer.enable_progress_bar", "false"]
    res = prune.main(
        [
            "--selector",
            "el2n",
            "--data",
            "digits",
            "--fast",
            "--keep",
            "0.3,0.6",
            "--out",
            str(tmp_path / "a"),
            *quiet,
        ]
    )
    assert set(res["runs"]) == {
        "all data",
        "el2n keep 0.3",
        "random keep 0.3",
        "el2n keep 0.6",
        "random keep 0.6",
    }
    out = tmp_path / "a"
    for f in (
        "results.json",
        "results.md",
        "accuracy_vs_kept.png",
        "scores.pt",
        "scores.npy",
        "scores/seed0.pt",
    ):
        assert (out / f).exists(), f
    assert "el2n keep 0.3" in (out / "results.md").read_text()
    scores = SampleScores.load(out / "scores.pt")
    assert scores.meta["selector"] == "el2n" and len(scores) == 256
    again = prune.main(
        [
            "--selector",
            "el2n",
            "--data",
            "digits",
            "--fast",
            "--keep",
            "0.3",
            "--scores",
            str(out / "scores.pt"),
            "--out",
            str(tmp_path / "b"),
            *quiet,
        ]
    )
    assert again["scores_file"] == str(out / "scores.pt")
    assert again["runs"]["el2n keep 0.3"]["acc_per_seed"] == res["runs"]["el2n keep 0.3"]["acc_per_seed"]


def test_split_seed_fixes_the_data_set_while_the_seed_varies_the_run():
    a, b, c = digits(seed=0, split_seed=5), digits(seed=1, split_seed=5, label_noise=0.2), digits(seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.train_sample_indices, b.train_sample_indices)
    assert not torch.equal(a.train_sample_indices, c.train_sample_indices)
    again = digits(seed=7, split_seed=5, label_noise=0.2)
    again.setup("fit")
    assert torch.equal(again.train_targets, b.train_targets)  # the same noisy labels
    sa, sb = IndexSampler(list(range(10)), seed=a.seed), IndexSampler(list(range(10)), seed=b.seed)
    assert list(sa) != list(sb)  # the order still follows the run seed


def test_train_recipe_attaches_a_selector_on_noisy_labels(tmp_path):
    from recipes import train

    res = train.main(
        [
            "--selector",
            "elr",
            "--selector.lam",
            "2.0",
            "--noisy-labels",
            "0.4",
            "--data",
            "digits",
            "--fast",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["selector"] == "elr" and res["label_noise"] == 0.4
    assert res["config"]["selector_args"] == {"beta": 0.7, "lam": 2.0}  # the prune config's, overridden
    assert res["extra_per_seed"][0]["label_noise"] == 0.4
    assert "cross_entropy + elr" in (tmp_path / "results.md").read_text()
    with pytest.raises(KeyError, match="unknown selector 'elrr'"):
        train.main(["--selector", "elrr", "--data", "digits", "--fast", "--out", str(tmp_path / "x")])


def test_scoring_mode_uses_channels_last_weights_and_restores_everything():
    from toolkit.selection import scoring_mode

    module = classifier(width=8)
    model = module.model
    model.train()
    params = list(model.parameters())
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        model.eval()
        plain = model(x)
        model.train()
    with scoring_mode(model):
        assert not model.training and not torch.is_grad_enabled()
        conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-6)
    assert model.training and torch.is_grad_enabled()
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(a is b for a, b in zip(params, model.parameters()))  # the same Parameter objects
    with scoring_mode(model, channels_last=False):
        assert all(p.is_contiguous() for p in model.parameters())
