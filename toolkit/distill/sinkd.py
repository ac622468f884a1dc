"""Sinkhorn knowledge distillation (batch-wise) as a loss term; maths in
`toolkit.functional.sinkd`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import check_temperature
from toolkit.functional.sinkd import check_sinkhorn, sinkd_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("distiller", "sinkd")
class SinKDLoss(LossTerm):
    """SinKD: Sinkhorn cost between the batch of student and the batch of teacher distributions.

    Cui et al., "Sinkhorn Distance Minimization for Knowledge Distillation" (LREC-COLING 2024;
    TNNLS 2024). L = Σ_ij P_ij·M_ij with M_ij = ‖softmax(s_i/τ) − softmax(t_j/τ)‖₁ over all B×B
    student/teacher pairs of the batch and P the plan after N Sinkhorn-Knopp normalisations of
    exp(−M/ε). What the paper's text (readable here only up to its introduction) states and this
    follows: a Sinkhorn (entropic Wasserstein) distance between the teacher's and the student's
    tempered softmax distributions, in a batch-wise form that compares the batch's distributions
    jointly instead of sample by sample. Cost, ε, N and τ follow the authors' official code
    (github.com/2018cx/SinKD, `loss.py`, named as the paper's code in its TNNLS abstract); they
    are not confirmed against the paper's equations, which could not be read (see
    `toolkit.functional.sinkd`).

    A batch-level term: it returns a scalar, has no per-sample form, so sample weighters do not
    apply to it, and under DDP it sees each device's local batch. Its value grows with the batch
    size (unit marginals), so rescale its weight if the batch size changes.

    The official code adds it to CE and KD: loss = (1 − α)·CE + α·KD + β·c·L with α = 0.8,
    β = 0.8, batch 16 and c = 0.001 (GLUE, `loss.py` at commit eb4b3da; 0.002 in the version at
    2b91a8e, 0.0008 in the T0/GPT-Neo code), its KD being the soft-target cross-entropy −Σ p_t^T log p_s^T (T = 3,
    annealed to 1) without the T² factor that `KDLoss` has.

    When to use: logit distillation where teacher and student distributions overlap little
    (the paper's motivation, on GLUE/SuperGLUE with BERT, T0 and GPT-Neo students).

    Args:
        temperature: τ > 0 of both softmaxes (official code: 2).
        epsilon: ε > 0, entropic regularisation (official code: 0.1).
        iterations: N ≥ 1 row-then-column normalisations (official code: 20).
    """

    needs_teacher = True
    needs_target = False

    def __init__(self, temperature: float = 2.0, epsilon: float = 0.1, iterations: int = 20) -> None:
        super().__init__()
        check_temperature(temperature)
        check_sinkhorn(epsilon, iterations)
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.iterations = iterations

    def forward(self, step: Step) -> Tensor:
        return sinkd_loss(
            step.student.logits, step.teacher.logits, self.temperature, self.epsilon, self.iterations
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, epsilon={self.epsilon}, iterations={self.iterations}"
