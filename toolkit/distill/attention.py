"""Attention transfer as a loss term; maths in `toolkit.functional.attention`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from toolkit.distill.fitnet import check_path, feature_at
from toolkit.functional.attention import MODES, attention_transfer_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("distiller", "attention_transfer")
class AttentionTransferLoss(LossTerm):
    """Activation-based attention transfer over pairs of student/teacher layers, per sample.

    Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017). For each pair j the
    spatial attention maps Q = vec(Σ_c |A_c|^p) of the student and teacher feature maps are
    L2-normalised and compared; the term returns, per sample,

        mode="paper":  ½ · Σ_j ‖Q̂_S^j − Q̂_T^j‖₂  / (H_j·W_j)     (eq. 2)
        mode="code":       Σ_j ‖Q̂_S^j − Q̂_T^j‖₂² / (H_j·W_j)     (official code, CRD, mdistiller)

    and the bus weight is β: with β = 1000 (the published value everywhere) mode "paper" is the
    paper's eq. 2 with its stated β (10³ divided by the attention map size and the batch size,
    per layer) and mode "code" is exactly `β · Σ_j (at(s) − at(t)).pow(2).mean()` of the official
    code and of mdistiller (`FEAT_WEIGHT: 1000`). The paper's formula is the default (METHODS.md:
    follow the paper where code and paper disagree); the benchmark config that reproduces the
    mdistiller number uses mode "code". See `toolkit.functional.attention` for the differences.

    Feature maps must be 4-D (B, C, H, W); channel counts may differ (no trainable parts). When a
    pair's spatial sizes differ, the student's attention map is resized to the teacher's
    (average-pooled when larger, bilinearly upsampled when smaller) before normalisation.

    When to use: CNN teacher and student with stages of matching resolution (e.g. CIFAR ResNets,
    `layer1..3`); cheap, no projector. Usually combined with CE (weight 1), optionally with KD.

    Args:
        student_layers: module paths of the student's maps (one per pair).
        teacher_layers: module paths of the teacher's maps, same length and order.
        p: attention-map exponent (2 in the paper).
        mode: "paper" (default) or "code" (see above).
    """

    needs_teacher = True
    needs_target = False

    def __init__(
        self,
        student_layers: Sequence[str] | str,
        teacher_layers: Sequence[str] | str,
        p: float = 2.0,
        mode: str = "paper",
    ) -> None:
        super().__init__()
        student_layers = [student_layers] if isinstance(student_layers, str) else list(student_layers)
        teacher_layers = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
        if len(student_layers) != len(teacher_layers):
            raise ValueError(
                f"attention_transfer pairs layers one to one: got {len(student_layers)} student_layers "
                f"{student_layers} and {len(teacher_layers)} teacher_layers {teacher_layers}"
            )
        if not student_layers:
            raise ValueError("attention_transfer needs at least one (student_layer, teacher_layer) pair")
        self.student_layers = [
            check_path(p_, "student_layers", "attention_transfer") for p_ in student_layers
        ]
        self.teacher_layers = [
            check_path(p_, "teacher_layers", "attention_transfer") for p_ in teacher_layers
        ]
        if not p >= 1:
            raise ValueError(f"attention_transfer: p must be >= 1, got {p} (the paper uses p=2)")
        if mode not in MODES:
            raise ValueError(f"attention_transfer: mode must be one of {MODES}, got {mode!r}")
        self.p = float(p)
        self.mode = mode
        self.student_features = tuple(dict.fromkeys(self.student_layers))
        self.teacher_features = tuple(dict.fromkeys(self.teacher_layers))

    def _maps(self, step: Step) -> tuple[list[Tensor], list[Tensor]]:
        s = [
            feature_at(step.student.features, p, "student", "attention_transfer") for p in self.student_layers
        ]
        t = [
            feature_at(step.teacher.features, p, "teacher", "attention_transfer") for p in self.teacher_layers
        ]
        return s, t

    def setup(self, example: Step) -> None:
        """Check every tapped map is 4-D (the dry run), naming the layer when it is not."""
        if example.teacher is None:
            raise ValueError("attention_transfer needs a teacher: use it in a DistillationModule")
        students, teachers = self._maps(example)
        for side, paths, maps in (
            ("student", self.student_layers, students),
            ("teacher", self.teacher_layers, teachers),
        ):
            for path, m in zip(paths, maps):
                if m.dim() != 4:
                    raise ValueError(
                        f"attention_transfer needs 4-D (B, C, H, W) feature maps, but {side} layer {path!r} gives "
                        f"shape {tuple(m.shape)}: tap a convolutional stage (e.g. 'layer1'), not a linear or pooled layer"
                    )

    def forward(self, step: Step) -> Tensor:
        s, t = self._maps(step)
        return attention_transfer_loss(s, t, p=self.p, reduction="none", mode=self.mode)

    def extra_repr(self) -> str:
        return (
            f"student_layers={self.student_layers}, teacher_layers={self.teacher_layers}, p={self.p}, "
            f"mode={self.mode!r}"
        )
