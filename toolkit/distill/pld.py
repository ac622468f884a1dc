"""Plackett-Luce Distillation as a loss term; maths in `toolkit.functional.pld`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import check_temperature
from toolkit.functional.pld import pld_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("distiller", "pld")
class PLDLoss(LossTerm):
    """PLD: Σ_k softmax(t/τ)[π*_k]·(log Σ_{j≥k} exp s_{π*_j} − s_{π*_k}), per sample.

    Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation" (arXiv
    2506.12542, NeurIPS 2025). π* is the teacher-optimal permutation: the true label first, then
    the other classes by descending teacher logit; each Plackett-Luce step of the student's
    (unsoftened) logits is weighted by the teacher's softmax probability of the class chosen there.
    Formula, weights, temperature and the "replaces CE + KD" usage are confirmed from the paper's
    text and its Appendix C code (details in `toolkit.functional.pld`).

    Use it *instead of* cross-entropy + KD: its first step is the CE on the true label, so a run
    is `{"pld": {"distiller": "pld"}}` with no CE term and no mixing weight. Needs class-index
    targets and a teacher predicting the same classes.

    When to use: a logit distiller with no CE/KD weight to tune; the paper reports gains over KD
    and DIST on CIFAR-100 and ImageNet, largest when the teacher is confident (the weights follow
    its confidence; with a near-uniform teacher the loss loses its emphasis on the top choice).

    Args:
        temperature: τ > 0 of the teacher softmax giving the weights (the student is not
            softened). Paper: 1 on ImageNet (best in its ablation, 0.5-4 tried), 4 on CIFAR-100.
        ignore_index: targets with this value contribute 0.
    """

    needs_teacher = True
    needs_target = True

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature = float(temperature)
        self.ignore_index = ignore_index

    def forward(self, step: Step) -> Tensor:
        return pld_loss(
            step.student.logits,
            step.teacher.logits,
            step.target,
            self.temperature,
            reduction="none",
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
