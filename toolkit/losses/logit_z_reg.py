"""The PaLM log²Z regulariser as an add-on loss term; maths in `toolkit.functional.logit_z_reg`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional.logit_z_reg import logit_z_reg
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "logit_z_reg")
class LogitZRegLoss(LossTerm):
    """log²Z of the output softmax (Chowdhery et al., "PaLM", 2022: "z_loss"), per sample/token.

        R(z) = (log Σ_v exp z_v)²

    An add-on term: put it beside the main loss with a small weight (PaLM: 1e-4), e.g.
    `terms: {ce: {loss: cross_entropy}, z: {loss: logit_z_reg, weight: 1.0e-4}}`. Cross-entropy
    is blind to a shift of all logits; this term pins their log-partition near 0, which keeps the
    output logits bounded (training stability in large, long or low-precision runs). Targets equal
    to `ignore_index` (when the batch has targets) are left out.

    Hyper-parameters: the term weight (the coefficient; 1e-4 in PaLM), `ignore_index` (-100).
    With `linear_cross_entropy` (no logits), use its `z_loss` option instead: this term needs the
    logits and would make `CausalLMModule` compute them.

    Expected effect: the loss it is added to barely changes; log Z (logged as this term's value)
    stays near 0 instead of drifting.
    """

    needs_target = False

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, step: Step) -> Tensor:
        target = step.target
        if target is not None and target.is_floating_point():
            target = None  # soft targets: every row counts
        return logit_z_reg(step.student.logits, target, self.ignore_index, reduction="none")
