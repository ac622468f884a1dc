"""Logit-based distillers as loss terms; maths in `toolkit.functional`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import check_temperature
from toolkit.functional.kd import kd_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("distiller", "kd")
class KDLoss(LossTerm):
    """Hinton KD: τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), per sample.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (2015). Mixed with cross-entropy
    through the bus weights: the classic (1 − α)·CE + α·KD is `{"ce": 1 − α, "kd": α}`.

    When to use: the baseline every distiller is compared with; works with any teacher that
    predicts the same classes. Expected effect: a small student gains most when data are limited
    and training is long enough (short runs can be worse than the student alone).

    Args:
        temperature: τ > 0; CIFAR papers use 4, ImageNet 1-2.
    """

    needs_teacher = True
    needs_target = False

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature = float(temperature)

    def forward(self, step: Step) -> Tensor:
        return kd_loss(step.student.logits, step.teacher.logits, self.temperature, reduction="none")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
