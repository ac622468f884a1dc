"""Ensemble distillation as a loss term; maths in `toolkit.functional.ensemble_kd`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from toolkit.distill.teacher import Teacher
from toolkit.functional._reduce import check_temperature
from toolkit.functional.ensemble_kd import COMBINES, ensemble_kd_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("distiller", "ensemble_kd")
class EnsembleKDLoss(LossTerm):
    """KD towards the averaged prediction of several frozen teachers: τ²·KL(p̄^τ ‖ p_s^τ).

    Kim, Kotha, Liang & Hashimoto, "Pre-training under infinite compute" (2025): independently
    trained members are ensembled and the ensemble is distilled into one (smaller) student, which
    keeps most of the ensemble's gain (83% at 8× fewer parameters in the paper). The teachers are
    the module's `Teacher` (`DistillationModule(student, [net1, net2, net3], ...)`, or
    `Teacher([...])`); `python -m recipes.distill --method ensemble_kd` trains `teacher_train.count`
    members that differ by seed, or takes `--teacher a.ckpt,b.ckpt,c.ckpt`.

    The term runs the members itself (`Teacher.forward_members`: frozen, eval, no_grad, one pass
    per member) because combining at τ needs every member's logits: mean probabilities at τ are
    not the softmax at τ of any single combined logit vector. So `needs_teacher` is False (the
    module does not also run the combined teacher) but the module must have a `teacher`
    attribute. A module without one (a user's own LossBus module passing `teacher=` to `loss_from`)
    gets KD on `step.teacher.logits`, the teacher's own combination. Mix with cross-entropy through
    the bus weights: (1 − α)·CE + α·ensemble KD is `{"ce": 1 − α, "ensemble_kd": α}`.

    When to use: several teachers of the same classes exist (different seeds, architectures or
    data orders) and one deployable student is wanted. Expected effect: the ensemble is a better
    teacher than any member (lower loss, better calibrated soft labels), so the student improves
    over KD from one member; with K = 1 it is plain KD.

    Args:
        temperature: τ > 0 (the demonstration's KD uses 1, CIFAR papers 4).
        combine: "logits" (mean of the members' logits; the `Teacher` default and, per a public
            replication, the paper's ensembles) or "probs" (mean of their softmax at τ).
    """

    needs_teacher = False  # the members are run by the term itself (see above)
    needs_target = False

    def __init__(self, temperature: float = 1.0, combine: str = "logits") -> None:
        super().__init__()
        check_temperature(temperature)
        if combine not in COMBINES:
            raise ValueError(
                f"combine must be one of {COMBINES} (mean logits or mean probabilities), got {combine!r}"
            )
        self.temperature = float(temperature)
        self.combine = combine

    @staticmethod
    def _teacher(step: Step) -> Teacher | None:
        teacher = getattr(step.module, "teacher", None)
        return teacher if isinstance(teacher, Teacher) else None

    def setup(self, example: Step) -> None:
        if self._teacher(example) is None and example.teacher is None:
            raise ValueError(
                "ensemble_kd needs teachers: use DistillationModule(student, [net1, net2, ...]) or give the "
                "module a `teacher` attribute holding a toolkit Teacher"
            )

    def forward(self, step: Step) -> Tensor:
        teacher = self._teacher(step)
        if teacher is not None:
            members: Any = [m.logits for m in teacher.forward_members(step.batch.input)]
        elif step.teacher is not None:
            members = [step.teacher.logits]
        else:
            raise ValueError(
                "ensemble_kd found no teacher: the module has no `teacher` and the step carries none"
            )
        return ensemble_kd_loss(
            step.student.logits, members, self.temperature, self.combine, reduction="none"
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, combine={self.combine!r}"
