"""Robust Mean Teacher as a loss term that owns the EMA teacher; maths in
`toolkit.functional.mean_teacher`."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.distill.networks import build_network, plain_copy, student_spec
from toolkit.functional.mean_teacher import ema_update_, rmt_augment, symmetric_cross_entropy
from toolkit.models.output import forward_output
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import Batch


@register("distiller", "mean_teacher")
class MeanTeacherLoss(LossTerm):
    """Robust Mean Teacher: symmetric cross-entropy between the student and its own EMA.

    Döbler, Marsden & Yang, "Robust Mean Teacher for Continual and Gradual Test-Time
    Adaptation" (CVPR 2023); formula and defaults from the official code (see
    `toolkit.functional.mean_teacher`). Per sample, with p, p_aug the student's softmax on x and
    on RMT's augmented view of x, and p̄ the EMA teacher's on x:

        L_SCE = −¼·[Σ p̄ log p + Σ p log p̄ + Σ p̄ log p_aug + Σ p_aug log p̄],   θ̄ ← α·θ̄ + (1 − α)·θ

    The teacher is not the recipe's pretrained teacher (`needs_teacher` is False): it is an
    exponential moving average of the student, created in the dry run (same architecture,
    same initial weights), updated in `on_train_batch_end` after every optimiser step, never
    optimised (no gradients), saved in checkpoints (strict resume) and evaluated beside the
    student (`eval_logits`: `val/ema/acc`; RMT's own prediction, student + EMA logits, as
    `val/ema_ensemble/acc`). As in the official code and Mean Teacher, only the parameters are
    averaged; the EMA net runs in the module's mode, so in training its BatchNorm layers use
    batch statistics (RMT's setting) and keep their own running statistics for evaluation.

    On labelled data (this toolkit's classification runs) RMT is: the run's CE on the labels
    (RMT's source-replay CE, λ_src = 1) + λ_trg·L_SCE (this term's weight, 1). Parts of RMT not
    reproduced, because they belong to test-time adaptation of a source-pretrained model to an
    unlabelled, shifted target stream: the contrastive term (SupCon between the test feature,
    its augmented view and the nearest *source* class prototype, through a 128-d projector,
    τ = 0.1), the warm-up of the mean teacher on 50,000 source samples, and BatchNorm without
    running statistics. RMT has no noisy-label or semi-supervised part.

    When to use: a regulariser for any classifier, without a pretrained teacher; the EMA net is
    usually the better model to keep late in training. Cost: a second student forward/backward
    (the augmented view) and an EMA forward per step. With short runs lower the momentum: with
    α = 0.999 the EMA still holds 0.999^n of its initial weights after n steps.

    Args:
        momentum: α in [0, 1] (RMT: 0.999).
        augment: use the augmented view (RMT); False gives the two-term form −½[Σ p̄ log p + Σ p log p̄].
        soft_augment: the milder parameter set of the transform (RMT uses the strong one).
        noise_std: σ of the Gaussian pixel noise of the transform (0.005).
        mean, std: the per-channel normalisation of the inputs; default: the DataModule's `mean`/`std`.
        ensemble: also evaluate student + EMA logits (RMT's prediction).
    """

    needs_teacher = False
    needs_target = False

    def __init__(
        self,
        momentum: float = 0.999,
        augment: bool = True,
        soft_augment: bool = False,
        noise_std: float = 0.005,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        ensemble: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}; RMT uses 0.999")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}; RMT uses 0.005")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (the inputs' normalisation), or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {list(std)}")
        self.momentum = float(momentum)
        self.augment = bool(augment)
        self.soft_augment = bool(soft_augment)
        self.noise_std = float(noise_std)
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.ensemble = bool(ensemble)
        self.ema_spec: dict[str, Any] | None = None
        self.ema: nn.Module | None = None
        self._module_ref: Any = None

    # -- the EMA network --------------------------------------------------------------------
    def setup(self, example: Step) -> None:
        module = example.module
        if module is None or not isinstance(getattr(module, "model", None), nn.Module):
            raise ValueError(
                "mean_teacher copies the student: its dry-run Step must carry the module (step.module)"
            )
        self._module_ref = weakref.ref(module)
        if self.ema is not None:
            return
        student = module.model
        self.ema_spec = student_spec(module)
        ema = build_network(self.ema_spec) if self.ema_spec is not None else plain_copy(student)
        ema.load_state_dict(student.state_dict())
        for p in ema.parameters():
            p.requires_grad_(False)
        self.ema = ema.to(example.student.logits.device)

    def get_extra_state(self) -> Any:
        return {"ema_spec": self.ema_spec}

    def set_extra_state(self, state: Any) -> None:
        spec = (state or {}).get("ema_spec")
        if spec is not None and self.ema is None:
            self.ema_spec = spec
            self.ema = build_network(spec)
            for p in self.ema.parameters():
                p.requires_grad_(False)

    def _ema(self) -> nn.Module:
        if self.ema is None:
            raise RuntimeError(
                "the mean_teacher EMA network is made during the module's dry run: train with a toolkit "
                "DataModule, set module.example_input_array, or call module.prepare(example_input) first"
            )
        return self.ema

    def _student(self, module: Any = None) -> nn.Module:
        module = module if module is not None else (self._module_ref() if self._module_ref else None)
        if module is None:
            raise RuntimeError("mean_teacher has no student: it is set up by the module's dry run")
        return module.model

    def _norm(self, module: Any) -> tuple[Any, Any]:
        if self.mean is not None:
            return self.mean, self.std
        dm = getattr(getattr(module, "_trainer", None), "datamodule", None)
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
        if mean is None or std is None:
            raise ValueError(
                "mean_teacher's augmented view works in [0, 1] pixel space and needs the inputs' normalisation: "
                "use a toolkit image DataModule, give the term mean=[...] and std=[...], or augment=False"
            )
        return mean, std

    # -- loss, update, evaluation ---------------------------------------------------------------
    def forward(self, step: Step) -> Tensor:
        ema = self._ema()
        x = step.batch.input
        with torch.no_grad():
            teacher = forward_output(ema, x).logits
        aug = None
        if self.augment:
            mean, std = self._norm(step.module)
            x_aug = rmt_augment(x, mean, std, soft=self.soft_augment, noise_std=self.noise_std)
            aug = forward_output(self._student(step.module), x_aug).logits
            _drop_tapped(step.module)
        return symmetric_cross_entropy(step.student.logits, teacher, aug, reduction="none")

    def on_train_batch_end(self, module: Any) -> None:
        ema_update_(self._ema().parameters(), self._student(module).parameters(), self.momentum)

    def eval_logits(self, batch: Batch) -> dict[str, Tensor]:
        if self.ema is None:
            return {}
        out = {"ema": forward_output(self.ema, batch.input).logits}
        module = self._module_ref() if self._module_ref else None
        if self.ensemble and module is not None:
            out["ema_ensemble"] = forward_output(module.model, batch.input).logits + out["ema"]
            _drop_tapped(module)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_module_ref"] = None  # a weak reference does not pickle (e.g. for spawned processes)
        return state

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, augment={self.augment}, soft_augment={self.soft_augment}"


def _drop_tapped(module: Any) -> None:
    """An extra student forward also fills its feature taps: drop those tensors now."""
    taps = getattr(module, "_student_taps", None)
    if taps is not None:
        taps.features = {}
