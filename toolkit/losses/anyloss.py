"""AnyLoss (a confusion-matrix metric as a batch-level loss) as a loss term; maths in
`toolkit.functional.anyloss`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional.anyloss import anyloss, check_anyloss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "anyloss")
class AnyLoss(LossTerm):
    """AnyLoss: L = 1 − M(TP, FN, FP, TN) on the batch's soft confusion matrix.

    Han, Moniz & Chawla, *AnyLoss: Transforming Classification Metrics into Loss Functions*
    (KDD 2024, arXiv 2405.14745). Each prediction p = sigmoid(z) is sharpened by
    A(p) = sigmoid(L·(p − 0.5)) and counted softly (TP = Σ y·A, FP = Σ (1 − y)·A, ...); the loss is
    one minus the chosen metric of those counts, so training optimises the metric itself.
    Multi-class logits are scored one-vs-rest per class (sigmoid per class), macro- or
    micro-averaged (our extension; the paper is binary).

    BATCH-LEVEL: returns one scalar per batch (no per-sample losses, so sample weighters and data
    scores that need per-sample values do not see it). Batches must contain every class.

    When to use: imbalanced binary problems where F1, balanced accuracy or G-mean is the target
    metric. Expected effect: a better value of that metric than BCE on imbalanced data (the paper's
    102 tabular data sets and four imbalanced ones); on balanced multi-class data, about CE's
    accuracy at best.

    Args:
        metric: "f1" (default), "fbeta", "accuracy", "balanced_accuracy", "gmean" (√(TPR·TNR), KDD
            code) or "gmean_surrogate" (TP·TN/(n⁺n⁻), extension code).
        beta: β of F_β (only with metric="fbeta").
        L: amplifying scale of A (paper code: 73; the extension suggests [2, 70]).
        average: None (binary for (B,) logits, "macro" for (B, C)), "macro", "micro", or "binary"
            (class 1 of (B, 2) logits).
        eps: s, the denominators' smoothing (1e-5, extension code).
    """

    def __init__(
        self,
        metric: str = "f1",
        beta: float = 1.0,
        L: float = 73.0,
        average: str | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_anyloss(metric, beta, L, average, eps)
        self.metric = metric
        self.beta = float(beta)
        self.L = float(L)
        self.average = average
        self.eps = float(eps)

    def forward(self, step: Step) -> Tensor:
        return anyloss(
            step.student.logits, step.target, self.metric, self.beta, self.L, self.average, self.eps
        )

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, beta={self.beta}, L={self.L}, average={self.average!r}"
