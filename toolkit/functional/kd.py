"""Hinton knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", 2015).

    L_KD = τ² · KL(p_t^τ ‖ p_s^τ) = τ² · Σ_c p_t^τ(c) · (log p_t^τ(c) - log p_s^τ(c))
    p^τ = softmax(z / τ)

The τ² factor keeps the soft-target gradients on the scale of the hard-label ones when τ changes.
A run typically mixes it with cross-entropy: (1 - α)·CE + α·L_KD.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, check_temperature, reduce


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) per sample, summed over classes.

    Both logits are (B, C) with the same C; computed in float32 via log_softmax (stable for very
    large logits and bf16 inputs). `reduction="mean"` averages over the batch ("batchmean").
    """
    check_reduction(reduction)
    check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: teacher and student must predict the same classes"
        )
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_sample = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2
    return reduce(per_sample, reduction)
