"""Squared error as a loss term: the regression baseline; maths in `toolkit.functional.mse`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional.mse import check_standardisation, squared_error, squared_error_decode
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "mse")
class MSELoss(LossTerm):
    """Per-sample squared error of a single-output regression model, (o − (y − loc)/scale)²; the
    prediction is loc + scale·o (`decode`, used by `RegressionModule`).

    Args:
        loc, scale: a fixed standardisation of the target (e.g. the training mean and standard
            deviation), so that a network initialised near 0 starts near the data.
    """

    num_outputs = 1

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        check_standardisation(loc, scale)
        self.loc, self.scale = float(loc), float(scale)

    def forward(self, step: Step) -> Tensor:
        if not step.target.is_floating_point():
            raise ValueError("mse needs floating-point regression targets; for classes use cross_entropy")
        return squared_error(step.student.logits, step.target, self.loc, self.scale, reduction="none")

    def decode(self, logits: Tensor) -> Tensor:
        return squared_error_decode(logits, self.loc, self.scale)

    def extra_repr(self) -> str:
        return f"loc={self.loc}, scale={self.scale}"
