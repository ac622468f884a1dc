"""Cross-entropy as a loss term (label smoothing, soft targets); maths in
`toolkit.functional.cross_entropy`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional.cross_entropy import cross_entropy
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "cross_entropy")
class CrossEntropyLoss(LossTerm):
    """Per-sample cross-entropy of the student's logits against the batch targets.

    Args:
        label_smoothing: ε in q = (1 − ε)·onehot + ε/C.
        ignore_index: targets with this value contribute 0.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, step: Step) -> Tensor:
        return cross_entropy(
            step.student.logits, step.target, self.label_smoothing, self.ignore_index, reduction="none"
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"
