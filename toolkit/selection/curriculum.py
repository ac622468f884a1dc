"""`curriculum`: easy samples first, weighted by precomputed easiness over the first m epochs
(Training Curricula for Open Domain Answer Re-Ranking, SIGIR 2020); maths in
`toolkit.functional.curriculum`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from toolkit.functional.curriculum import (
    MAPPINGS,
    check_curriculum,
    curriculum_weight,
    difficulty_to_easiness,
)
from toolkit.registry import register
from toolkit.selection.el2n import EL2NScorer
from toolkit.selection.scorer import PassScorer, scoring_model
from toolkit.selection.scores import SampleScores
from toolkit.selection.weighting import SampleWeighting, as_sample_scores, lookup, training_pass
from toolkit.terms import Step
from toolkit.types import require_index


@register("selector", "curriculum")
class Curriculum(SampleWeighting):
    """Difficulty curriculum: W = D·(1 − e/m) + e/m in epoch e < m, 1 afterwards.

    MacAvaney, Nardini, Perego, Tonellotto, Goharian & Frieder, *Training Curricula for Open Domain
    Answer Re-Ranking* (SIGIR 2020, arXiv 2004.14269). Each sample's easiness D ∈ [0, 1] is fixed
    before training; its loss weight starts at D (hard samples barely count) and rises linearly to
    1 at epoch m, after which training is plain. `anti=True` reverses it (hard samples first).

    D comes from per-sample difficulty scores (high = hard), mapped to [0, 1] by rank (default:
    D uniform on [0, 1] whatever the scores' scale), min-max, or used as they are
    (`mapping="easiness"`, e.g. the paper's heuristics). The scores are either given (`scores=`:
    a .pt/.npy file saved by another selector, e.g. `recipes.prune --selector el2n` or
    `DataPruning(save_scores=...)`, a `SampleScores`, or a dense tensor keyed by sample index;
    recommended: difficulty measured by a model trained before), or computed at the start of the
    first fit by a scoring pass of the *initial* model (`scorer`, default EL2N: meaningful when
    fine-tuning a pretrained model, close to uniform for a freshly initialised one). They are
    kept in checkpoints: a resumed run does not rescore.

    When to use: training that benefits from seeing clean, prototypical samples first (the paper:
    BERT and ConvKNRM re-rankers, up to +4% MRR and +9% P@1); noisy data (hard ≈ mislabelled).

    Args:
        end_epoch: m, the epoch at which the curriculum ends (paper: 20 "epochs" of OpenNIR, i.e.
            fixed-size chunks of training; here Lightning epochs).
        anti: hard samples first.
        scores: given difficulty scores (see above); None scores with `scorer`.
        mapping: "rank", "minmax" or "easiness" (see `toolkit.functional.curriculum`).
        higher_is_harder: False when a high score means easy (e.g. a confidence).
        scorer: a `PassScorer` for the initial scoring pass (default `EL2NScorer()`).
        log_every_n_steps: see `SampleWeighting`.
    """

    name = "curriculum"

    def __init__(
        self,
        end_epoch: int = 20,
        anti: bool = False,
        scores: str | Path | SampleScores | Tensor | None = None,
        mapping: str = "rank",
        higher_is_harder: bool = True,
        scorer: PassScorer | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(log_every_n_steps)
        check_curriculum(end_epoch)
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
        if scorer is not None and not isinstance(scorer, PassScorer):
            raise TypeError(
                f"scorer must be a toolkit PassScorer (e.g. EL2NScorer()), got {type(scorer).__name__}"
            )
        self.end_epoch, self.anti, self.mapping, self.higher_is_harder = (
            end_epoch,
            bool(anti),
            mapping,
            higher_is_harder,
        )
        self.given = None if scores is None else as_sample_scores(scores, "scores")
        self.scorer = scorer
        # state: easiness D per sample index (NaN where none)
        self.easiness: Tensor | None = None
        self._table: Tensor | None = None

    @property
    def state_key(self) -> str:
        return f"SampleWeighting[{self.name}, m={self.end_epoch}, anti={self.anti}]"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._module is None or self.easiness is not None:
            return  # not set up for fit, or restored from a checkpoint
        scores = self.given if self.given is not None else self.score(trainer, pl_module)
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "train_sample_indices"):
            scores.check_covers(dm.train_sample_indices, "the training set")
        index, score = scores.index, scores.score
        d = torch.full((int(index.max()) + 1 if len(index) else 0,), float("nan"))
        d[index] = difficulty_to_easiness(score, self.mapping, self.higher_is_harder)
        self.easiness, self._table = d, None

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SampleScores:
        """Difficulty of every training sample under the initial model (one scoring pass)."""
        scorer = self.scorer if self.scorer is not None else EL2NScorer()
        model = scoring_model(pl_module)
        # a scorer may need gradients (GraNd): enabled as in DataPruning's scoring passes
        index, score = training_pass(
            trainer, pl_module, lambda b: scorer.score_batch(model, b), self.name, grad=True
        )
        out = SampleScores({"selector": self.name, "scorer": scorer.name})
        out.add(index, score)
        return out

    def weights(self, step: Step, per_sample_loss: Tensor) -> Tensor:
        index = require_index(step.batch, self.name)
        if self.easiness is None:
            raise RuntimeError(f"{self.name}: the easiness is computed at the start of fit")
        if self._table is None or self._table.device != index.device:
            self._table = self.easiness.to(index.device)
        d = lookup(self._table, index, self.name)
        return curriculum_weight(d, step.progress.epoch, self.end_epoch, self.anti)

    def state_dict(self) -> dict[str, Any]:
        return {"easiness": None if self.easiness is None else self.easiness.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.easiness, self._table = state["easiness"], None
