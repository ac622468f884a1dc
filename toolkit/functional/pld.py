"""Plackett-Luce Distillation (Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise Knowledge
Distillation", arXiv 2506.12542, NeurIPS 2025).

    π* = (y, then the other classes by descending teacher logit)        teacher-optimal permutation
    α_k = softmax(t / τ)[π*_k]                                           teacher confidence of the class at step k
    L_PLD(s) = Σ_{k=1}^{C} α_k · [ log Σ_{j≥k} exp(s_{π*_j}) − s_{π*_k} ]

Each summand is one step of the Plackett-Luce likelihood of π* under the *unsoftened* student
logits s (a log-sum-exp over the classes not yet chosen minus the chosen one), weighted by the
teacher's softmax probability of the class chosen at that step. The first step is cross-entropy on
the true label, so PLD replaces CE + KD: it is used alone, without a separate CE term or mixing
weight.

Confirmed from the paper's text (v3 / NeurIPS camera-ready: Sec. 4.1-4.2, Sec. 5.1, Sec. 5.2.2,
Table 6, Appendix A and the reference implementation in Appendix C):
- π* puts the ground-truth label first, then all other classes in descending teacher logit.
- α_k = q^T_{π*_k}: the teacher softmax probability *of the class at position k* (not the k-th
  largest probability); Appendix C computes `softmax(t_perm / temperature)` on the permuted teacher
  logits, i.e. softmax(t/τ) gathered by π*.
- τ (τ_T in the paper) softens only the teacher weights; the student's logits are not scaled.
  Appendix C's default is τ = 1, the ImageNet ablation (Table 6) finds τ = 1 best; the CIFAR-100
  runs (Sec. 5.1) use τ = 4 ("PLD uses the same temperature (τ = 4.0)" as DIST).
- The loss is summed over positions and averaged over the batch (Appendix C).
- Special cases stated in Sec. 4.2: α = (1, 0, …, 0) gives cross-entropy; uniform α = 1/C gives
  ListMLE on π* (scaled by 1/C).
- PLD replaces CE + KD ("eliminating the need for separate cross-entropy terms", Sec. 1).

Computed in float32; the suffix log-sum-exps are one `torch.logcumsumexp` over the reversed
permuted logits, so it is stable for logits of magnitude 1e4 and in bf16. Translation invariant in
s (adding a constant to every logit changes nothing) and convex in s (Appendix A.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, check_temperature, reduce


def teacher_optimal_permutation(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """π* (B, C): the target class first, then the others by descending teacher logit.

    Ties between teacher logits keep class-index order (stable sort), so π* is deterministic; a
    non-finite teacher logit cannot displace the target from the first position.
    """
    order = torch.sort(teacher_logits, dim=-1, descending=True, stable=True).indices
    not_target = (order != target.unsqueeze(-1)).to(torch.int8)
    # a stable ascending sort on "is not the target" moves the target to the front and keeps the
    # teacher order of the others
    to_front = torch.sort(not_target, dim=-1, stable=True).indices
    return order.gather(-1, to_front)


def pld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Σ_k softmax(t/τ)[π*_k]·(log Σ_{j≥k} exp s_{π*_j} − s_{π*_k}) per sample.

    Args:
        student_logits, teacher_logits: (B, C) with the same C.
        target: (B,) class indices; samples whose target is `ignore_index` give 0 and are left out
            of the mean (as in `cross_entropy`).
        temperature: τ > 0 of the teacher softmax that gives the weights (paper: 1 on ImageNet,
            4 on CIFAR-100).
        reduction: "mean" (over the non-ignored samples), "sum" or "none" (B,).
    """
    check_reduction(reduction)
    check_temperature(temperature)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must both be (B, C) with the same classes"
        )
    if target.is_floating_point():
        raise ValueError("PLD needs class-index targets (B,): the true label is the first choice of π*")
    if target.shape != student_logits.shape[:1]:
        raise ValueError(f"target must be (B,) = ({student_logits.shape[0]},), got {tuple(target.shape)}")
    num_classes = student_logits.shape[-1]
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    if safe.device.type == "cpu" and bool(((safe < 0) | (safe >= num_classes)).any()):
        # checked on CPU only: on accelerators this would sync every step (the bus checks once)
        raise ValueError(
            f"targets must be class indices in [0, {num_classes}) or ignore_index={ignore_index}"
        )

    s = student_logits.float()
    t = teacher_logits.float()
    perm = teacher_optimal_permutation(t, safe)
    s_perm = s.gather(-1, perm)
    # log Σ_{j≥k} exp(s_{π*_j}): a cumulative log-sum-exp over the reversed order
    suffix_lse = torch.logcumsumexp(s_perm.flip(-1), dim=-1).flip(-1)
    alpha = F.softmax(t / temperature, dim=-1).gather(-1, perm)
    per_sample = (alpha * (suffix_lse - s_perm)).sum(-1) * valid
    if reduction == "mean":
        return per_sample.sum() / valid.sum().clamp_min(1)
    return reduce(per_sample, reduction)
