"""The Z-loss (spherical family) as a loss term; maths in `toolkit.functional.spherical_z`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional.spherical_z import check_spherical_z, spherical_z_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "spherical_z")
class SphericalZLoss(LossTerm):
    """Z-loss: L = (1/a)·softplus(a·(b − z_y)), z_y = (o_y − mean(o))/std(o) over the classes.

    de Brébisson & Vincent, *The Z-loss: a shift and scale invariant classification loss belonging
    to the Spherical Family* (arXiv 1604.08859, 2016). It replaces cross-entropy. The loss sees the
    logits only through their standardised target score, so it is invariant to shifting and to
    (positively) rescaling them: it ranks the target class against the others rather than
    calibrating probabilities, which matches top-k metrics; in the spherical family its gradient
    through a huge output layer can be computed independently of the class count (not implemented
    here). Not to be confused with the PaLM "z-loss" log²Z regulariser (`logit_z_reg`).

    When to use: very many classes, top-k or ranking metrics, logits whose scale should not matter.
    Expected effect: accuracy close to CE on small problems, better top-k on word-level language
    modelling (the paper); no calibrated probabilities (softmax of the logits is not trained).

    Args:
        a: softplus sharpness, > 0 (ours: 1; the paper tunes it per task, no default is given).
        b: margin on the standardised target score (ours: 1). |z_y| ≤ √(C − 1), so b ≥ √(C − 1)
            can never be reached: keep b below it (√9 = 3 for 10 classes).
    """

    def __init__(self, a: float = 1.0, b: float = 1.0) -> None:
        super().__init__()
        check_spherical_z(a, b)
        self.a = float(a)
        self.b = float(b)

    def forward(self, step: Step) -> Tensor:
        return spherical_z_loss(step.student.logits, step.target, self.a, self.b, reduction="none")

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}"
