"""`SampleScores`: one score per training sample, keyed by sample index (`Batch.index`).

Scores are accumulated as running means (one value per sample per scoring pass, or per seed when
runs are averaged), gathered across DDP ranks, and saved as a file another run can reuse:

- `.pt`: `{"index": (M,) int64, "score": (M,) float32, "count": (M,), "num_samples": N, "meta": {...}}`;
- `.npy`: a dense float array of length N (the largest index + 1), NaN where a sample has no score,
  so `scores[i]` is sample i's score.

Loading checks that the scores cover exactly the run's training samples (`check_covers`): scores
computed on another data set, split or seed are an error, not a silent mismatch.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.distill.memory import gather_rows


class SampleScores:
    """Running-mean scores keyed by sample index."""

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.total = torch.zeros(0, dtype=torch.float64)
        self.count = torch.zeros(0, dtype=torch.long)
        self.meta: dict[str, Any] = dict(meta or {})

    def __len__(self) -> int:
        return int((self.count > 0).sum())

    def _grow(self, n: int) -> None:
        if n > len(self.total):
            self.total = torch.cat([self.total, self.total.new_zeros(n - len(self.total))])
            self.count = torch.cat([self.count, self.count.new_zeros(n - len(self.count))])

    def add(self, index: Tensor, score: Tensor) -> None:
        """Add one observation per sample (a sample may repeat: each counts once)."""
        index = torch.as_tensor(index).detach().long().cpu().flatten()
        score = torch.as_tensor(score).detach().double().cpu().flatten()
        if index.shape != score.shape:
            raise ValueError(f"{len(index)} indices but {len(score)} scores")
        if not torch.isfinite(score).all():
            bad = index[~torch.isfinite(score)][:5].tolist()
            raise ValueError(f"non-finite scores for samples {bad}: the scoring model diverged")
        if index.numel():
            if int(index.min()) < 0:
                raise ValueError("sample indices must be >= 0")
            self._grow(int(index.max()) + 1)
            self.total.index_add_(0, index, score)
            self.count.index_add_(0, index, torch.ones_like(index))

    def add_gathered(self, index: Tensor, score: Tensor) -> None:
        """`add` with every DDP rank's (index, score) pairs (a collective call under DDP)."""
        device = index.device
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())  # NCCL gathers CUDA tensors only
        self.add(*gather_rows(index.long().to(device), score.float().to(device)))

    @property
    def index(self) -> Tensor:
        """Indices of the scored samples, sorted."""
        return torch.nonzero(self.count > 0).flatten()

    @property
    def score(self) -> Tensor:
        """Mean score of each scored sample, in the order of `index` (float32)."""
        i = self.index
        return (self.total[i] / self.count[i]).float()

    def dense(self) -> Tensor:
        """(N,) mean scores with NaN where a sample has none."""
        out = torch.full((len(self.total),), float("nan"), dtype=torch.float64)
        seen = self.count > 0
        out[seen] = self.total[seen] / self.count[seen]
        return out.float()

    def check_covers(self, sample_indices: Tensor, what: str = "the training set") -> None:
        """Raise unless every one of `sample_indices` has a score and no other sample has one."""
        want = torch.as_tensor(sample_indices).long()
        have = self.index
        if len(have) != len(want) or not torch.equal(have, want.sort().values):
            missing = want[~torch.isin(want, have)]
            extra = have[~torch.isin(have, want)]
            raise ValueError(
                f"the scores cover {len(have)} samples but {what} has {len(want)}: {len(missing)} samples "
                f"have no score (e.g. {missing[:5].tolist()}), {len(extra)} scored samples are not in it "
                f"(e.g. {extra[:5].tolist()}). Scores are keyed by sample index: compute them on the same "
                "data set, split and seed (the scores' meta says where they came from: "
                f"{self.meta or 'nothing recorded'})"
            )

    # -- averaging several runs -------------------------------------------------------------
    @classmethod
    def mean_of(cls, runs: list[SampleScores]) -> SampleScores:
        """Average of several runs' mean scores (each run weighs the same, as Data Diet's
        average over independent initialisations)."""
        if not runs:
            raise ValueError("mean_of needs at least one SampleScores")
        first = runs[0].index
        for r in runs[1:]:
            if not torch.equal(r.index, first):
                raise ValueError("the runs scored different samples: they cannot be averaged")
        out = cls({**runs[0].meta, "runs": len(runs)})
        for r in runs:
            out.add(r.index, r.score)
        return out

    # -- files and checkpoints --------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npy":
            np.save(path, self.dense().numpy())
        elif path.suffix == ".pt":
            torch.save(
                {
                    "index": self.index,
                    "score": self.score,
                    "count": self.count[self.index],
                    "num_samples": len(self.total),
                    "meta": self.meta,
                },
                path,
            )
        else:
            raise ValueError(f"scores are saved as .pt or .npy, got {path.name!r}")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SampleScores:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no scores file at {path}")
        out = cls({"file": str(path)})
        try:
            if path.suffix == ".npy":
                dense = torch.from_numpy(np.load(path, allow_pickle=False)).double()
                if dense.dim() != 1:
                    raise ValueError(
                        f"expected a 1-D array of per-sample scores, got shape {tuple(dense.shape)}"
                    )
                seen = ~torch.isnan(dense)
                out._grow(len(dense))
                out.total[seen], out.count[seen] = dense[seen], 1
            elif path.suffix == ".pt":
                blob = torch.load(path, map_location="cpu", weights_only=True)
                index, score = blob["index"].long(), blob["score"].double()
                out.meta.update(blob.get("meta", {}))
                out._grow(int(blob["num_samples"]))
                out.total[index], out.count[index] = score, 1
            else:
                raise ValueError(f"scores files are .pt or .npy, got {path.name!r}")
        except (
            OSError,
            KeyError,
            TypeError,
            RuntimeError,
            ValueError,
            EOFError,
            pickle.UnpicklingError,
        ) as e:
            raise ValueError(f"cannot read scores from {path}: {e}") from e
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.clone(), "count": self.count.clone(), "meta": dict(self.meta)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.count = state["total"].clone(), state["count"].clone()
        self.meta = dict(state.get("meta", {}))
