"""BD-KD (online distillation with balanced forward/reverse KL) as a loss term that owns and trains
the second network; maths in `toolkit.functional.bdkd`."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from toolkit.distill.networks import build_network, student_spec
from toolkit.functional._reduce import check_nonnegative, check_temperature
from toolkit.functional.bdkd import bdkd_student_loss, bdkd_teacher_loss
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.models.output import forward_output
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import Batch


@register("distiller", "bdkd")
class BDKDLoss(LossTerm):
    """BD-KD: the student learns from an online teacher through a per-sample balance of forward
    and reverse KL; the teacher, trained at the same time, is owned and optimised by this term.

    Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation" (arXiv
    2212.12965). The module's model is the compact *student* (the network the method is for);
    the term's `peer` is the *teacher*, trained from scratch alongside it. Per sample:

        value_i = τ²·[(1 − λ_i)·KL(p_t ‖ p_s) + λ_i·KL(p_s ‖ p_t)]              → student (p_t detached)
                + w_ce·CE(t_i, y_i) + w_kd·τ²·KL(p_t ‖ p_s)                       → teacher (p_s detached)

    with p = softmax(z/τ) and λ_i = 1[H(p_s,i) > H(p_t,i)] (or sigmoid((H_s − H_t)/κ) for κ > 0).
    The student's own CE is the run's `ce` term. Only the paper's abstract and summaries of it
    could be read here: the sample-wise weighting guided by the entropy gap, and a reverse-KL
    regulariser on the teacher, are the paper's; the exact rule above, τ and the weights are
    decided in `toolkit.functional.bdkd` and not confirmed against its equations.

    The peer is a submodule: it is optimised by the module's optimiser (the same optimiser and
    learning-rate schedule as the student), saved in checkpoints (strict resume), and evaluated
    beside the student (`eval_logits`: logged as `val/peer/acc`, `test/peer/acc`). It is built
    during the module's dry run from `peer` (a model name) or, by default, from the student's own
    model spec (same architecture, a fresh initialisation: DML-style peers); `peer` may also be an
    `nn.Module`. The term's weight scales both halves, so keep it at 1 and weigh the student's CE
    with the `ce` term (the teacher's parts have `peer_ce_weight`, `peer_kd_weight`).

    When to use: no pretrained teacher, or a teacher that should keep learning; the paper targets
    compact, well-calibrated students (lower ECE) on CIFAR-10/100, Tiny-ImageNet and ImageNet.
    Cost: one forward/backward of the peer per step. Needs class-index targets.

    Args:
        peer: the teacher network: a model name for `create_model` (built with the student's
            `num_classes` and `in_chans`), an `nn.Module`, or None for the student's architecture.
        peer_kwargs: extra `create_model` arguments for a named peer (e.g. {"width": 16}).
        temperature: τ > 0 of every softmax (not confirmed from the paper; 4 as in offline KD).
        sharpness: κ ≥ 0 of the balance; 0 = the hard entropy-gap switch.
        peer_ce_weight: weight of the teacher's CE (1, as the student's CE in DML).
        peer_kd_weight: weight of the teacher's reverse-KL regulariser (1).
    """

    needs_teacher = False
    needs_target = True

    def __init__(
        self,
        peer: str | nn.Module | None = None,
        peer_kwargs: dict[str, Any] | None = None,
        temperature: float = 4.0,
        sharpness: float = 0.0,
        peer_ce_weight: float = 1.0,
        peer_kd_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_nonnegative("sharpness", sharpness)
        check_nonnegative("peer_ce_weight", peer_ce_weight)
        check_nonnegative("peer_kd_weight", peer_kd_weight)
        if peer is not None and not isinstance(peer, (str, nn.Module)):
            raise TypeError(
                f"peer must be a model name, an nn.Module or None (the student's architecture), got {type(peer).__name__}"
            )
        if peer_kwargs is not None and not isinstance(peer, str):
            raise ValueError("peer_kwargs go with a named peer: give peer='<model name>' too")
        self.temperature = float(temperature)
        self.sharpness = float(sharpness)
        self.peer_ce_weight = float(peer_ce_weight)
        self.peer_kd_weight = float(peer_kd_weight)
        self.peer_name = peer if isinstance(peer, str) else None
        self.peer_kwargs = dict(peer_kwargs or {})
        self.peer_spec: dict[str, Any] | None = None
        self.peer: nn.Module | None = peer if isinstance(peer, nn.Module) else None

    # -- the peer ---------------------------------------------------------------------------
    def _spec(self, example: Step) -> dict[str, Any]:
        module = example.module
        own = student_spec(module)
        if self.peer_name is None:
            if own is None:
                raise ValueError(
                    "bdkd builds its peer from the student's model name, but this student was given as an "
                    "nn.Module: pass peer='<model name>' (with peer_kwargs) or peer=<nn.Module>"
                )
            return own
        kwargs = {"num_classes": example.student.logits.shape[-1]}
        in_chans = (own or {}).get("kwargs", {}).get("in_chans")
        x = example.batch.input
        if in_chans is None and isinstance(x, Tensor) and x.dim() == 4:
            in_chans = x.shape[1]
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        return {"name": self.peer_name, "kwargs": {**kwargs, **self.peer_kwargs}}

    def setup(self, example: Step) -> None:
        if self.peer is None:
            self.peer_spec = self._spec(example)
            self.peer = build_network(self.peer_spec, example.student.logits.device)

    def get_extra_state(self) -> Any:
        return {"peer_spec": self.peer_spec}

    def set_extra_state(self, state: Any) -> None:
        spec = (state or {}).get("peer_spec")
        if spec is not None and self.peer is None:
            self.peer_spec = spec
            self.peer = build_network(spec)

    def _peer(self) -> nn.Module:
        if self.peer is None:
            raise RuntimeError(
                "the bdkd peer is built during the module's dry run: train with a toolkit DataModule, set "
                "module.example_input_array, or call module.prepare(example_input) first"
            )
        return self.peer

    # -- loss and evaluation ----------------------------------------------------------------
    def forward(self, step: Step) -> Tensor:
        teacher = forward_output(self._peer(), step.batch.input).logits
        student = step.student.logits
        if teacher.shape != student.shape:
            raise ValueError(
                f"the bdkd peer predicts {tuple(teacher.shape)} but the student {tuple(student.shape)}: "
                "build the peer for the student's classes"
            )
        to_student = bdkd_student_loss(student, teacher, self.temperature, self.sharpness, reduction="none")
        to_teacher = self.peer_ce_weight * cross_entropy(teacher, step.target, reduction="none")
        to_teacher = to_teacher + self.peer_kd_weight * bdkd_teacher_loss(
            teacher, student, self.temperature, reduction="none"
        )
        return to_student + to_teacher

    def eval_logits(self, batch: Batch) -> dict[str, Tensor]:
        if self.peer is None:
            return {}
        return {"peer": forward_output(self.peer, batch.input).logits}

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sharpness={self.sharpness}, "
            f"peer_ce_weight={self.peer_ce_weight}, peer_kd_weight={self.peer_kd_weight}"
        )
