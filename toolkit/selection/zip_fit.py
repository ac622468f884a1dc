"""`zip_fit`: keep the training texts most aligned with a target set by gzip compression
(ZIP-FIT, Obbad et al. 2024, arXiv 2410.18194; maths and what was confirmed from the official
code in `toolkit.functional.zip_fit`).

No model is involved: the scores are a pure function of the training texts and the target set,
computed once, when the subset is first chosen (`score_epochs=0`: before any training), and kept
in the callback's checkpointed state. The training texts come from the DataModule's
`train_texts()` (every toolkit text DataModule: `text`, `fortunes`, `text_file`, `hf_disk`),
in `train_sample_indices` order. The highest scores are kept (`mode="hardest"`, the default).

The target set is a list of strings or a path to a text file:

- a Debian fortune (strfile) file, i.e. entries separated by lines holding only `%`
  (e.g. /usr/share/games/fortunes/science): one target per entry;
- any other file: one target per non-blank line (`target_format="lines"` forces this,
  `"fortunes"` forces the strfile reading; default `"auto"` picks strfile when some line is `%`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from toolkit.data.text import read_strfile
from toolkit.functional.zip_fit import _check_level, zip_fit_scores
from toolkit.selection.pruning import pruning_selector
from toolkit.selection.scorer import Scorer
from toolkit.selection.scores import SampleScores

TARGET_FORMATS = ("auto", "lines", "fortunes")


def read_targets(path: str | os.PathLike, target_format: str = "auto") -> list[str]:
    """The target texts of a file: strfile entries (`%` separators) or non-blank lines."""
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"target_format must be one of {TARGET_FORMATS}, got {target_format!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no target file at {path}: give zip_fit's target as a list of strings or a text file "
            "(one example per line, or a fortune file with `%` separator lines)"
        )
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    if target_format == "fortunes" or (target_format == "auto" and any(ln.strip() == "%" for ln in lines)):
        return read_strfile(path)
    return [ln for ln in lines if ln.strip()]


class ZipFitScorer(Scorer):
    """ZIP-FIT alignment of every training text with a target set (higher = more aligned = kept).

    Args:
        target: the target texts (a list of strings) or a path to a text file (see the module
            docstring for the formats).
        target_format: how a target file is read: "auto", "lines" or "fortunes".
        level: gzip compression level (default 9, Python's gzip default).
        workers: processes used to compute the scores (the result does not depend on it).
    """

    name = "zip_fit"

    def __init__(
        self,
        target: Sequence[str] | str | os.PathLike,
        target_format: str = "auto",
        level: int = 9,
        workers: int = 1,
    ) -> None:
        _check_level(level)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if isinstance(target, (str, os.PathLike)):
            self.target_source = str(target)
            texts = read_targets(target, target_format)
        else:
            if target_format not in TARGET_FORMATS:
                raise ValueError(f"target_format must be one of {TARGET_FORMATS}, got {target_format!r}")
            self.target_source = "list"
            texts = list(target)
            bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
            if bad:
                raise TypeError(
                    f"target texts must be strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}"
                )
        if not texts:
            raise ValueError(
                f"the zip_fit target set is empty ({self.target_source}): give at least one target text"
            )
        self.target_texts, self.level, self.workers = texts, level, workers
        self.texts: list[str] | None = None
        self._scores: Tensor | None = None  # (N,) float64 in `sample_indices` order, once computed

    def bind_data(self, datamodule: Any) -> None:
        get = getattr(datamodule, "train_texts", None)
        if not callable(get):
            raise TypeError(
                f"zip_fit scores training texts, but {type(datamodule).__name__} has no train_texts(): use a text "
                "DataModule (text, fortunes, text_file, hf_disk) or give yours a train_texts() method returning "
                "the text of every training sample in train_sample_indices order"
            )
        self.texts = list(get())

    def bind(self, sample_indices: Tensor) -> None:
        super().bind(sample_indices)
        if self.texts is None:
            raise TypeError("zip_fit needs the training texts: DataPruning passes them through bind_data()")
        if len(self.texts) != len(sample_indices):
            raise ValueError(
                f"train_texts() gave {len(self.texts)} texts for {len(sample_indices)} training samples: it must "
                "return one text per training sample, in train_sample_indices order"
            )

    def scores(self) -> SampleScores:
        if self._scores is None or len(self._scores) != len(self.sample_indices):
            self._scores = zip_fit_scores(
                self.texts, self.target_texts, level=self.level, workers=self.workers
            )
        out = SampleScores(
            {"selector": self.name, "targets": len(self.target_texts), "target": self.target_source}
        )
        out.add(self.sample_indices, self._scores)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"scores": None if self._scores is None else self._scores.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores = state.get("scores")
        self._scores = None if scores is None else torch.as_tensor(scores).double().clone()


zip_fit = pruning_selector("zip_fit", ZipFitScorer, score_epochs=0)

__all__ = ["TARGET_FORMATS", "ZipFitScorer", "read_targets", "zip_fit"]
