"""Selectors `forgetting` (Toneva et al. 2019) and `zip_fit` (Obbad et al. 2024): exact values
against hand-written sequences and gzip computed here, state through checkpoints, errors, and
short real Lightning runs (digits for forgetting, the Debian fortunes for zip_fit)."""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import StopAfter
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from toolkit.functional.forgetting import UNSEEN, forgetting_scores, forgetting_update
from toolkit.functional.subset import select_subset
from toolkit.functional.zip_fit import gzip_size, normalized_compression_distance, zip_fit_scores
from toolkit.registry import build, get
from toolkit.selection import DataPruning, ForgettingScorer, ZipFitScorer
from toolkit.selection.zip_fit import read_targets
from toolkit.types import Batch

FORTUNES = Path("/usr/share/games/fortunes")
needs_fortunes = pytest.mark.skipif(
    not (FORTUNES / "science").is_file(), reason="Debian package `fortunes` not installed"
)


def empty_state():
    return (
        torch.zeros(0, dtype=torch.int8),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.bool),
    )


def count_by_loop(presentations):
    """Independent count: {index: (forgets, learned)} from [(time, index, correct)] in any order."""
    seq: dict[int, list[int]] = {}
    for _, i, c in sorted(presentations, key=lambda p: p[0]):
        seq.setdefault(i, []).append(c)
    out = {}
    for i, accs in seq.items():
        events = sum(1 for a, b in zip(accs, accs[1:]) if a == 1 and b == 0)
        out[i] = (events, any(accs))
    return out


# A hand-written run: (time, sample index, correct). Indices are not contiguous and the rows are
# listed out of time order; sample 11 is never learned, sample 5 is never presented.
PRESENTATIONS = [
    (3, 2, 1),
    (0, 7, 0),
    (1, 2, 1),
    (2, 11, 0),
    (5, 2, 0),
    (4, 7, 1),
    (6, 4, 1),
    (8, 2, 1),
    (7, 7, 1),
    (9, 11, 0),
    (10, 2, 0),
    (11, 7, 0),
    (12, 4, 1),
    (13, 7, 1),
]
# sample 2: 1 1 0 1 0 -> 2 events; 7: 0 1 1 0 1 -> 1; 4: 1 1 -> 0; 11: 0 0 -> never learned
EXPECTED = {2: (2, True), 7: (1, True), 4: (0, True), 11: (0, False)}


def as_tensors(rows):
    t, i, c = zip(*rows)
    return torch.tensor(i), torch.tensor(c, dtype=torch.bool), torch.tensor(t)


# == forgetting: maths ==============================================================================


def test_forgetting_update_counts_a_hand_written_sequence():
    assert count_by_loop(PRESENTATIONS) == EXPECTED  # the test's own loop agrees with the hand count
    index, correct, order = as_tensors(PRESENTATIONS)
    last, forgets, learned = forgetting_update(index, correct, *empty_state(), order=order)
    assert len(last) == 12
    for i, (events, was_learned) in EXPECTED.items():
        assert int(forgets[i]) == events and bool(learned[i]) == was_learned, i
    assert last[2] == 0 and last[7] == 1 and last[4] == 1 and last[11] == 0
    assert last[5] == UNSEEN and forgets[5] == 0 and not learned[5]


def test_forgetting_update_split_in_epochs_equals_one_pass():
    """Applying the rows in two chunks (an epoch boundary between them) gives the same state,
    including the transition that spans the boundary."""
    index, correct, order = as_tensors(PRESENTATIONS)
    whole = forgetting_update(index, correct, *empty_state(), order=order)
    first = order <= 4  # sample 2 is correct at t=3 and wrong at t=5: the event straddles the chunks
    state = forgetting_update(index[first], correct[first], *empty_state(), order=order[first])
    state = forgetting_update(index[~first], correct[~first], *state, order=order[~first])
    for a, b in zip(whole, state):
        assert torch.equal(a, b)


def test_forgetting_update_without_order_uses_the_given_order_and_keeps_inputs():
    index, correct, order = as_tensors(sorted(PRESENTATIONS))
    state = empty_state()
    last, forgets, learned = forgetting_update(index, correct.long(), *state)
    assert [int(forgets[i]) for i in (2, 7, 4, 11)] == [2, 1, 0, 0]
    assert all(len(s) == 0 for s in state)  # inputs untouched
    again = forgetting_update(torch.tensor([4]), torch.tensor([False]), last, forgets, learned)
    assert int(again[1][4]) == 1 and int(forgets[4]) == 0


def test_forgetting_scores_rank_never_learned_highest():
    forgets = torch.tensor([2, 0, 0, 1])
    learned = torch.tensor([True, True, False, True])
    assert forgetting_scores(forgets, learned, 5.0).tolist() == [2.0, 0.0, 5.0, 1.0]
    with pytest.raises(ValueError, match="must exceed"):
        forgetting_scores(forgets, learned, 2.0)


def test_forgetting_update_errors():
    s = empty_state()
    with pytest.raises(ValueError, match="2 indices but 1"):
        forgetting_update(torch.tensor([0, 1]), torch.tensor([True]), *s)
    with pytest.raises(ValueError, match="booleans or 0/1"):
        forgetting_update(torch.tensor([0]), torch.tensor([2]), *s)
    with pytest.raises(ValueError, match=">= 0"):
        forgetting_update(torch.tensor([-1]), torch.tensor([True]), *s)
    with pytest.raises(ValueError, match="order keys"):
        forgetting_update(torch.tensor([0]), torch.tensor([True]), *s, order=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="state sizes differ"):
        forgetting_update(
            torch.tensor([0]), torch.tensor([True]), s[0], torch.zeros(3, dtype=torch.long), s[2]
        )


# == forgetting: the scorer =========================================================================


def logits_for(correct, target, num_classes=3):
    """(B, C) logits whose argmax is the target where `correct`, another class otherwise."""
    pred = torch.where(torch.tensor(correct, dtype=torch.bool), target, (target + 1) % num_classes)
    return torch.nn.functional.one_hot(pred, num_classes).float() * 5


def feed(scorer, epochs):
    """Feed epochs of batches [(index list, correct list)] as a toolkit module's outputs would."""
    for batches in epochs:
        for index, correct in batches:
            target = torch.tensor(index) % 3
            batch = Batch(torch.zeros(len(index), 2), target, torch.tensor(index))
            scorer.observe(None, batch, {"loss": torch.tensor(0.0), "logits": logits_for(correct, target)})
        scorer.end_epoch()


# three epochs over samples 0..5; 5 is never learned, 4 never presented
EPOCHS = [
    [([0, 1], [1, 1]), ([2, 3], [0, 1]), ([5], [0])],
    [([3, 0], [0, 0]), ([1, 2, 5], [1, 1, 0])],
    [([2, 5, 1], [0, 0, 0]), ([0, 3], [1, 1])],
]


def test_forgetting_scorer_counts_batches_and_scores_never_learned_as_epochs():
    scorer = ForgettingScorer()
    scorer.bind(torch.arange(6))
    feed(scorer, EPOCHS)
    scores = scorer.scores()
    assert scores.index.tolist() == list(range(6))
    # 0: 1 0 1 -> 1; 1: 1 1 0 -> 1; 2: 0 1 0 -> 1; 3: 1 0 1 -> 1; 4: unseen -> 3; 5: never -> 3
    assert scores.score.tolist() == [1.0, 1.0, 1.0, 1.0, 3.0, 3.0]
    assert scorer.epochs == 3


def test_forgetting_never_learned_stays_above_repeated_presentations():
    """A sample shown many times in one epoch (a padded sampler) may be forgotten more often than
    there are epochs: never-learned samples still rank above it."""
    scorer = ForgettingScorer()
    scorer.bind(torch.arange(2))
    feed(scorer, [[([0, 1], [1, 0]), ([0], [0]), ([0], [1]), ([0], [0]), ([0], [1]), ([0], [0])]])
    assert scorer.scores().score.tolist() == [3.0, 4.0]


def test_forgetting_scorer_state_survives_a_checkpoint_mid_epoch(tmp_path):
    straight = ForgettingScorer()
    straight.bind(torch.arange(6))
    feed(straight, EPOCHS)

    first = ForgettingScorer()
    first.bind(torch.arange(6))
    feed(first, EPOCHS[:1])
    index, correct = EPOCHS[1][0]  # one batch of epoch 2, then "killed"
    target = torch.tensor(index) % 3
    first.observe(
        None, Batch(torch.zeros(2, 2), target, torch.tensor(index)), {"logits": logits_for(correct, target)}
    )
    torch.save({"scorer": first.state_dict()}, tmp_path / "s.ckpt")

    resumed = ForgettingScorer()
    resumed.bind(torch.arange(6))
    resumed.load_state_dict(torch.load(tmp_path / "s.ckpt", weights_only=True)["scorer"])
    feed(resumed, [EPOCHS[1][1:], EPOCHS[2]])
    for key in ("last", "forgets", "learned"):
        assert torch.equal(getattr(resumed, key), getattr(straight, key)), key
    assert resumed.epochs == straight.epochs
    assert torch.equal(resumed.scores().score, straight.scores().score)


class PlainNet(L.LightningModule):
    """A plain LightningModule (no loss bus): training_step returns the loss tensor only."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return nn.functional.cross_entropy(self.model(x), y)


def test_forgetting_without_logits_runs_the_model_in_eval_mode_without_side_effects():
    torch.manual_seed(0)
    module = PlainNet().train()
    x, y = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
    bn = module.model[1]
    before = bn.running_mean.clone()
    scorer = ForgettingScorer()
    got = scorer.correct(module, Batch(x, y, torch.arange(5)), torch.tensor(1.0))
    module.eval()
    with torch.no_grad():
        expected = module.model(x).argmax(-1) == y
    assert torch.equal(got, expected)
    assert torch.equal(bn.running_mean, before)  # eval-mode forward: statistics untouched
    module.train()
    scorer.correct(module, Batch(x, y, torch.arange(5)), None)
    assert module.training and module.model.training


def test_forgetting_soft_targets_use_their_argmax():
    target = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    got = ForgettingScorer().correct(
        None, Batch(torch.zeros(2, 1), target, torch.arange(2)), {"logits": logits}
    )
    assert got.tolist() == [True, False]


def test_forgetting_reads_bf16_and_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 0.0, 1e4]], dtype=torch.bfloat16)
    batch = Batch(torch.zeros(2, 1), torch.tensor([0, 1]), torch.arange(2))
    assert ForgettingScorer().correct(None, batch, {"logits": logits}).tolist() == [True, False]


def test_forgetting_errors_name_the_fix():
    scorer = ForgettingScorer()
    with pytest.raises(ValueError, match="needs the dataset index.*IndexedDataset"):
        scorer.observe(
            None, Batch(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)), {"logits": torch.zeros(2, 3)}
        )
    with pytest.raises(ValueError, match="class targets"):
        scorer.observe(None, Batch(torch.zeros(2, 2), None, torch.arange(2)), {"logits": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="score_epochs must be >= 1"):
        DataPruning(ForgettingScorer(), keep=0.5, score_epochs=0)


def test_forgetting_is_registered_as_a_selector_keeping_the_most_forgotten():
    cb = build("selector", "forgetting", keep=0.3)
    assert isinstance(cb, DataPruning) and isinstance(cb.scorer, ForgettingScorer)
    assert cb.mode == "hardest" and cb.keep == 0.3 and cb.pass_epochs == [2]
    assert get("selector", "forgetting").scorer_cls is ForgettingScorer


# == forgetting: a real run on digits ================================================================


class Recorder(Callback):
    """Independent record of what each training batch showed: (epoch, index, correct)."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ok = outputs["logits"].argmax(-1) == batch.target
        for i, c in zip(batch.index.tolist(), ok.tolist()):
            self.rows.append((trainer.current_epoch, i, c))


def digits_module():
    from toolkit.modules import ClassificationModule

    return ClassificationModule(
        "convnet", num_classes=10, in_chans=1, loss="cross_entropy", model_kwargs={"width": 8}
    )


RUN = dict(
    accelerator="cpu",
    devices=1,
    max_epochs=2,
    limit_val_batches=1,
    num_sanity_val_steps=0,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    deterministic=True,
)


def test_forgetting_prunes_digits_after_the_first_epoch():
    L.seed_everything(0)
    dm = build("data", "digits", batch_size=32)
    pruning = DataPruning(ForgettingScorer(), keep=0.5, score_epochs=1)
    rec = Recorder()
    L.Trainer(callbacks=[pruning, rec], enable_checkpointing=False, **RUN).fit(digits_module(), datamodule=dm)

    train = dm.train_sample_indices
    first = [(i, c) for e, i, c in rec.rows if e == 0]
    assert sorted(i for i, _ in first) == train.tolist()  # every sample once in epoch 1
    # after one epoch: 0 events for samples right at their one presentation, 1 (= epochs, never
    # learned) for the others; the hardest half is kept
    expected = torch.zeros(int(train.max()) + 1)
    for i, c in first:
        expected[i] = 0.0 if c else 1.0
    assert pruning.selections == [{"epoch": 1, "kept": round(len(train) / 2)}]
    assert torch.equal(pruning.subset, select_subset(train, expected[train], 0.5, "hardest"))
    second = sorted(i for e, i, _ in rec.rows if e == 1)
    assert second == pruning.subset.tolist()  # epoch 2 trains on the subset, each sample once
    assert 0 < (expected[train] == 1).sum() < len(train)  # the run did learn some, not all


def small_digits():
    return build("data", "digits", batch_size=32, train_subset=320)


def fit_forgetting(tmp_path, stop_after=None):
    """Final (module, DataPruning) of a 3-epoch run choosing after epoch 1, optionally killed after
    `stop_after` epochs and resumed from its last checkpoint by fresh objects."""
    L.seed_everything(0)
    pruning = DataPruning(ForgettingScorer(), keep=0.5, score_epochs=1)
    module = digits_module()
    if stop_after is None:
        L.Trainer(callbacks=[pruning], enable_checkpointing=False, **{**RUN, "max_epochs": 3}).fit(
            module, datamodule=small_digits()
        )
        return module, pruning
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    trainer = L.Trainer(callbacks=[pruning, ckpt, StopAfter(stop_after)], **{**RUN, "max_epochs": 3})
    trainer.fit(module, datamodule=small_digits())
    assert trainer.current_epoch == stop_after and pruning.scorer.epochs == stop_after
    L.seed_everything(123)
    module = digits_module()  # other initial weights: the checkpoint wins
    pruning = DataPruning(ForgettingScorer(), keep=0.5, score_epochs=1)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    L.Trainer(callbacks=[pruning, ckpt], **{**RUN, "max_epochs": 3}).fit(
        module, datamodule=small_digits(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    return module, pruning


def test_forgetting_pruning_resumes_exactly(tmp_path):
    straight_module, straight = fit_forgetting(tmp_path / "a")
    resumed_module, resumed = fit_forgetting(tmp_path / "b", stop_after=2)
    assert torch.equal(straight.subset, resumed.subset)
    assert straight.selections == resumed.selections
    for key in ("last", "forgets", "learned"):
        assert torch.equal(getattr(straight.scorer, key), getattr(resumed.scorer, key)), key
    assert straight.scorer.epochs == resumed.scorer.epochs == 3
    for k, v in straight_module.state_dict().items():
        assert torch.equal(v, resumed_module.state_dict()[k]), k


# == zip_fit: maths =================================================================================

CODE = [
    "def add(a, b):\n    return a + b\n",
    "def mul(a, b):\n    return a * b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]
IN_DOMAIN = [
    "def sub(a, b):\n    return a - b\n",
    "for j in range(5):\n    print(j * j)\n",
    "class Line:\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n",
]
OUT_OF_DOMAIN = [
    "Le petit chat dort tranquillement sur le canapé du salon.",
    "Rainfall totals across the northern valleys reached record levels last spring.",
    "Zebras graze quietly near the muddy watering hole at dusk.",
]


def gzip_ncd(x: str, t: str) -> float:
    """NCD written out with gzip directly (candidate first, no separator, level 9)."""
    c = lambda s: len(gzip.compress(s.encode("utf-8")))  # noqa: E731
    return (c(x + t) - min(c(x), c(t))) / max(c(x), c(t))


def test_ncd_exact_value_against_gzip():
    x, t = IN_DOMAIN[0], CODE[0]
    expected = gzip_ncd(x, t)
    assert normalized_compression_distance(x, t) == expected
    assert gzip_size(x) == len(gzip.compress(x.encode("utf-8")))
    scores = zip_fit_scores([x, OUT_OF_DOMAIN[0]], CODE[:2])
    manual = [1 - (gzip_ncd(s, CODE[0]) + gzip_ncd(s, CODE[1])) / 2 for s in (x, OUT_OF_DOMAIN[0])]
    assert scores.dtype == torch.float64 and scores.tolist() == pytest.approx(manual, abs=1e-15)
    # the concatenation is ordered (candidate first): NCD(x, t) is built from x + t
    assert normalized_compression_distance("é" * 3 + "abc", "abc") == gzip_ncd("é" * 3 + "abc", "abc")


def test_ncd_of_a_text_with_itself_is_small():
    text = " ".join(CODE) * 2
    assert normalized_compression_distance(text, text) < 0.1
    assert normalized_compression_distance(text, OUT_OF_DOMAIN[1] * 4) > 0.5
    assert zip_fit_scores([text], [text]).item() > 0.9


def test_in_domain_candidates_outrank_out_of_domain_ones():
    scores = zip_fit_scores(OUT_OF_DOMAIN + IN_DOMAIN, CODE)
    out, inside = scores[: len(OUT_OF_DOMAIN)], scores[len(OUT_OF_DOMAIN) :]
    assert inside.min() > out.max()
    kept = select_subset(torch.arange(6), scores, 0.5, "hardest")
    assert kept.tolist() == [3, 4, 5]


def test_zip_fit_scores_are_deterministic_whatever_the_workers():
    texts = OUT_OF_DOMAIN + IN_DOMAIN + CODE
    a = zip_fit_scores(texts, CODE)
    assert torch.equal(a, zip_fit_scores(texts, CODE))
    assert torch.equal(a, zip_fit_scores(texts, CODE, workers=2, chunk_size=3))
    assert len(zip_fit_scores([], CODE)) == 0


def test_zip_fit_errors():
    with pytest.raises(ValueError, match="target set is empty"):
        zip_fit_scores(CODE, [])
    with pytest.raises(TypeError, match="one string"):
        zip_fit_scores(CODE, "def f(): pass")
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        zip_fit_scores(["a", 3], CODE)
    with pytest.raises(ValueError, match="level"):
        zip_fit_scores(CODE, CODE, level=0)
    with pytest.raises(ValueError, match="workers"):
        zip_fit_scores(CODE, CODE, workers=0)
    with pytest.raises(ValueError, match="target set is empty"):
        ZipFitScorer([])
    with pytest.raises(TypeError, match="must be strings"):
        ZipFitScorer(["ok", None])
    with pytest.raises(FileNotFoundError, match="no target file"):
        ZipFitScorer("/nonexistent/targets.txt")
    with pytest.raises(ValueError, match="target_format"):
        ZipFitScorer(CODE, target_format="csv")


# == zip_fit: target files and data =================================================================


def test_target_files_lines_and_fortune_format(tmp_path):
    lines = tmp_path / "t.txt"
    lines.write_text("first target\n\n  \nsecond target\n")
    assert read_targets(lines) == ["first target", "second target"]
    fortune = tmp_path / "f"
    fortune.write_text("one\nline two\n%\nthree\n%\n")
    assert read_targets(fortune) == ["one\nline two", "three"]
    assert read_targets(fortune, "lines") == ["one", "line two", "%", "three", "%"]
    assert read_targets(lines, "fortunes") == ["first target\n\n  \nsecond target"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="target set is empty"):
        ZipFitScorer(empty)
    assert ZipFitScorer(fortune).target_texts == ["one\nline two", "three"]


def test_zip_fit_refuses_data_without_texts():
    scorer = ZipFitScorer(CODE)
    with pytest.raises(TypeError, match="no train_texts.*text DataModule"):
        scorer.bind_data(build("data", "digits", batch_size=32))
    with pytest.raises(TypeError, match="no train_texts"):
        L.Trainer(callbacks=[DataPruning(ZipFitScorer(CODE), keep=0.5, score_epochs=0)], **RUN).fit(
            digits_module(), datamodule=build("data", "digits", batch_size=32, train_subset=320)
        )


def test_zip_fit_checks_one_text_per_sample():
    class Short:
        def train_texts(self):
            return ["only one"]

    scorer = ZipFitScorer(CODE)
    scorer.bind_data(Short())
    with pytest.raises(ValueError, match="1 texts for 3 training samples"):
        scorer.bind(torch.arange(3))


def test_zip_fit_is_registered_to_select_before_training():
    cb = build("selector", "zip_fit", keep=0.25, target=CODE, level=6)
    assert isinstance(cb.scorer, ZipFitScorer) and cb.scorer.level == 6
    assert cb.pass_epochs == [0] and cb.first_selection == 0 and cb.mode == "hardest"


def test_zip_fit_state_keeps_the_scores():
    scorer = ZipFitScorer(CODE)
    scorer.texts = IN_DOMAIN + OUT_OF_DOMAIN
    scorer.bind(torch.tensor([1, 4, 6, 7, 9, 12]))
    first = scorer.scores()
    assert first.index.tolist() == [1, 4, 6, 7, 9, 12]
    assert torch.equal(first.score, zip_fit_scores(IN_DOMAIN + OUT_OF_DOMAIN, CODE).float())
    other = ZipFitScorer(["unrelated"])
    other.texts = scorer.texts
    other.bind(scorer.sample_indices)
    other.load_state_dict(scorer.state_dict())
    assert torch.equal(other.scores().score, first.score)  # restored, not recomputed


class BagOfTokens(L.LightningModule):
    """A tiny text classifier, a plain LightningModule: mean token embedding -> linear."""

    def __init__(self, vocab_size, num_classes):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(8, num_classes)

    def training_step(self, batch, batch_idx):
        ids, mask = batch.input["input_ids"], batch.input["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return nn.functional.cross_entropy(self.head(pooled), batch.target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class IndexRecorder(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += batch.index.tolist()


@needs_fortunes
def test_zip_fit_prunes_fortunes_before_training():
    from toolkit.data.lm import default_tokenizer
    from toolkit.data.text import FortunesDataModule

    target = FORTUNES / "science"  # strfile format, read entry by entry
    dm = FortunesDataModule(max_per_class=30, tokenizer=default_tokenizer(), batch_size=16, val_split=0)
    texts = dm.train_texts()
    assert len(texts) == len(dm.train_sample_indices)
    assert texts[0] == dm.texts_train[int(dm.train_sample_indices[0])]
    pruning = build("selector", "zip_fit", keep=0.5, target=target)
    seen = IndexRecorder()
    L.seed_everything(0)
    L.Trainer(
        callbacks=[pruning, seen],
        enable_checkpointing=False,
        **{**RUN, "max_epochs": 1, "limit_val_batches": 0},
    ).fit(BagOfTokens(len(dm.tokenizer), dm.num_classes), datamodule=dm)
    expected = zip_fit_scores(texts, read_targets(target))
    assert pruning.selections == [{"epoch": 0, "kept": round(len(texts) / 2)}]
    assert torch.equal(pruning.subset, select_subset(dm.train_sample_indices, expected, 0.5, "hardest"))
    assert sorted(seen.seen) == pruning.subset.tolist()  # the first epoch already trains on the subset


def test_lm_data_gives_the_text_of_each_training_sequence():
    from toolkit.data.lm import CausalLMDataModule, default_tokenizer

    texts = [f"the number {i} is written here" for i in range(40)]
    dm = CausalLMDataModule(texts, tokenizer=default_tokenizer(), seq_len=8, val_split=0.25)
    got = dm.train_texts()
    dm.setup("fit")
    assert len(got) == len(dm.train_set)
    first = int(dm.train_set.indices[0])
    assert got[0] == dm.tokenizer.decode(dm.train_blocks[first].tolist())
    assert all(isinstance(t, str) and t for t in got)
