"""Normalized Knowledge Distillation (Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge
Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized
Soft Labels", ICCV 2023, arXiv 2303.13005; official code: yzd-v/cls_KD
`mmcls/models/dis_losses/nkd.py`).

With y the true class, T = softmax(t), S = softmax(s) (no temperature) and the normalised
non-target distributions over the C − 1 other classes at temperature λ,

    T̂ = softmax(t_{¬y} / λ),   Ŝ = softmax(s_{¬y} / λ)
    L_NKD = −T_y · log S_y  −  γ · λ² · Σ_{i≠y} T̂_i · log Ŝ_i

The paper's reading: at λ = 1 the soft-label cross-entropy splits exactly as
CE(T, S) = −T_y log S_y − (1 − T_y) log(1 − S_y) − (1 − T_y) Σ_{i≠y} T̂_i log Ŝ_i; the non-target
part of KD asks Σ_{i≠y} T_i log S_i to match although Σ_{i≠y} T_i ≠ Σ_{i≠y} S_i. NKD normalises the
non-target logits so both sums are 1, drops the −(1 − T_y) log(1 − S_y) term and replaces the
per-sample factor (1 − T_y) with a constant γ.

Confirmed against the official code:
- The target term uses the unsoftened softmaxes (λ does not enter it) and the teacher's T_y is
  detached; the non-target term is a cross-entropy (not a KL: it is not zero at Ŝ = T̂; it equals
  γλ²·(H(T̂) + KL(T̂ ‖ Ŝ)), so its student gradient is that of the KL).
- The non-target distributions exclude the target class: the fixed mask
  `ones_like(logit_s).scatter_(1, label, 0)`. An older version of the file (in
  `mmcls/distillation/losses/nkd.py`) used `scatter_(1, label, 1)`, an all-ones mask that kept
  the target inside the "non-target" softmax; that bug is not reproduced here.
- Both terms are means over the batch (`.mean()`), i.e. the mean of the per-sample values here.
- Soft (B, C) labels (mixup / cutmix) are turned into class indices by their argmax, as the code.
- Defaults: λ (`temp`) = 1, γ = 1.5 (ImageNet ResNet-34 → ResNet-18 config); the repository's only
  CIFAR-100 config (ResNet-34 → ResNet-18) uses λ = 3, γ = 3.5.
- The loss is added, unweighted, to the student's own classification loss (the official
  `ClassificationDistiller` keeps the head's CE at weight 1 and adds `loss_nkd`): CE + NKD.

Computed in float32 with log_softmax and an exact gather of the non-target logits (no −1000
masking), so it is finite for logits of magnitude 1e4 and in bf16, and the non-target term has
exactly zero gradient w.r.t. the target logits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import (
    check_logits_and_target,
    check_nonnegative,
    check_reduction,
    check_temperature,
    reduce,
)
from toolkit.functional.dkd import non_target


def class_indices(target: Tensor) -> Tensor:
    """(B,) class indices from (B,) indices or (B, C) soft labels (argmax, as the official code)."""
    return target.argmax(-1) if target.dim() == 2 else target


def nkd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(−T_y·log S_y, −λ²·Σ_{i≠y} T̂_i·log Ŝ_i), each (B,) per sample; the second without γ."""
    check_temperature(temperature)
    target = class_indices(target)
    check_logits_and_target(student_logits, teacher_logits, target, "NKD")
    s, t = student_logits.float(), teacher_logits.float()
    y = target.unsqueeze(-1)
    log_s_y = F.log_softmax(s, dim=-1).gather(-1, y).squeeze(-1)
    t_y = F.softmax(t, dim=-1).gather(-1, y).squeeze(-1).detach()
    target_term = -t_y * log_s_y
    log_s_hat = F.log_softmax(non_target(s, target) / temperature, dim=-1)
    t_hat = F.softmax(non_target(t, target) / temperature, dim=-1)
    non_target_term = -(t_hat * log_s_hat).sum(-1) * temperature**2
    return target_term, non_target_term


def nkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    gamma: float = 1.5,
    reduction: str = "mean",
) -> Tensor:
    """−T_y·log S_y − γ·λ²·Σ_{i≠y} T̂_i·log Ŝ_i per sample (see the module docstring).

    Args:
        student_logits, teacher_logits: (B, C) with the same C ≥ 2.
        target: (B,) class indices, or (B, C) soft labels (their argmax is used).
        temperature: λ > 0 of the normalised non-target softmaxes only. Default 1 (ImageNet).
        gamma: γ ≥ 0, weight of the non-target term. Default 1.5 (ImageNet).
        reduction: "mean" (over the batch, as the official code), "sum" or "none" (B,).
    """
    check_reduction(reduction)
    check_nonnegative("gamma", gamma)
    target_term, non_target_term = nkd_parts(student_logits, teacher_logits, target, temperature)
    return reduce(target_term + gamma * non_target_term, reduction)
