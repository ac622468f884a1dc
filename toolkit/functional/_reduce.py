"""The reduction and the argument checks every per-sample loss shares."""

from __future__ import annotations

from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Reduce a (B,) per-sample loss by 'mean', 'sum' or 'none'."""
    check_reduction(reduction)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use e.g. temperature=4.0")


def check_nonnegative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_logits_and_target(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, method: str
) -> None:
    """(B, C) logits with the same C ≥ 2 and (B,) class-index targets in [0, C)."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must both be (B, C) with the same classes"
        )
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"{method} needs at least 2 classes (a target and a non-target), got {num_classes}")
    if target.is_floating_point():
        raise ValueError(f"{method} needs class-index targets (B,): the target class splits the distribution")
    if target.shape != student_logits.shape[:1]:
        raise ValueError(f"target must be (B,) = ({student_logits.shape[0]},), got {tuple(target.shape)}")
    if (
        target.device.type == "cpu"
        and target.numel()
        and bool(((target < 0) | (target >= num_classes)).any())
    ):
        # checked on CPU only: on accelerators this would sync every step (the bus checks once)
        raise ValueError(f"targets must be class indices in [0, {num_classes})")


def check_class_logits(logits: Tensor, target: Tensor, method: str) -> None:
    """One model's (B, C) logits with C ≥ 2 and (B,) class-index targets in [0, C)."""
    if logits.dim() != 2:
        raise ValueError(f"{method} needs (B, C) logits, got shape {tuple(logits.shape)}")
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"{method} needs at least 2 classes, got {num_classes}")
    if target.is_floating_point():
        raise ValueError(
            f"{method} needs class-index targets (B,) (integers), got a floating-point tensor; "
            "soft targets are not supported by this loss"
        )
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be (B,) = ({logits.shape[0]},), got {tuple(target.shape)}")
    if (
        target.device.type == "cpu"
        and target.numel()
        and bool(((target < 0) | (target >= num_classes)).any())
    ):
        # checked on CPU only: on accelerators this would sync every step (the bus checks once)
        raise ValueError(f"targets must be class indices in [0, {num_classes})")
