"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge
Distillation", CVPR 2022; official code: megvii-research/mdistiller `mdistiller/distillers/DKD.py`).

With p = softmax(z / τ) for the teacher (T) and the student (S) and y the true class:

    b = [p_y, 1 − p_y]                                  binary target / non-target split
    p̂ = softmax(z_{¬y} / τ)                             distribution over the C − 1 non-target classes
    TCKD = τ² · KL(b^T ‖ b^S)
    NCKD = τ² · KL(p̂^T ‖ p̂^S)
    L_DKD = α · TCKD + β · NCKD

Classical KD is the special case KD = TCKD + (1 − p_y^T) · NCKD (the paper's reformulation, Eq. 1):
KD couples the non-target term to the teacher's confidence; DKD gives each part its own weight.

Confirmed against the official code:
- TCKD is the KL of the two-bin distributions obtained by summing the softmax over the target
  and over the non-target classes (`cat_mask`); NCKD is the KL of the softmaxes with the target
  class removed. Both are multiplied by τ².
- Both KLs are summed over the batch and divided by the batch size (`size_average=False` then
  `/ target.shape[0]`): the mean over samples of the per-sample values computed here.
- Defaults of the CIFAR-100 configs (`mdistiller/engine/cfg.py`): α = 1, β = 8, τ = 4, CE weight 1,
  warm-up 20 epochs (the DKD part times min(epoch / 20, 1)); ImageNet uses α = 0.5, β = 0.5, τ = 1.

Numerics (where this differs from the code on purpose): the official NCKD removes the target by
subtracting 1000 from z_y / τ before the softmax. That equals exact removal only while the logits
stay below ~1000·τ in magnitude; beyond it (e.g. logits of 1e4 at τ = 4) the target leaks back in.
Here the non-target logits are gathered into a (B, C − 1) tensor, so the target is excluded
exactly at any magnitude and the NCKD gradient w.r.t. z_y is exactly zero. The two bins of TCKD
are computed in log space (log p_y = z_y/τ − lse(z/τ), log(1 − p_y) = lse(z_{¬y}/τ) − lse(z/τ)),
so no log(0) appears when p_y saturates. Everything is computed in float32 (bf16 inputs are
upcast), as `kd_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.functional._reduce import (
    check_logits_and_target,
    check_nonnegative,
    check_reduction,
    check_temperature,
    reduce,
)


def non_target(values: Tensor, target: Tensor) -> Tensor:
    """The (B, C − 1) entries of a (B, C) tensor other than each row's target, in class order.

    A gather (no boolean indexing, so no device sync): column j of the result is class
    j + [j ≥ y]. Its gradient w.r.t. the target entry is exactly zero.
    """
    c = values.shape[-1]
    j = torch.arange(c - 1, device=values.device).expand(values.shape[0], c - 1)
    return values.gather(-1, j + (j >= target.unsqueeze(-1)).long())


def _binary_and_non_target_log_probs(z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """log [p_y, 1 − p_y] (B, 2) and log softmax(z_{¬y}) (B, C − 1), from tempered logits z."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    z_nt = non_target(z, target)
    lse_nt = torch.logsumexp(z_nt, dim=-1, keepdim=True)
    z_y = z.gather(-1, target.unsqueeze(-1))
    log_binary = torch.cat([z_y - lse, lse_nt - lse], dim=-1)
    return log_binary, z_nt - lse_nt


def dkd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each (B,) per sample and already multiplied by τ²."""
    check_temperature(temperature)
    check_logits_and_target(student_logits, teacher_logits, target, "DKD")
    log_b_s, log_q_s = _binary_and_non_target_log_probs(student_logits.float() / temperature, target)
    log_b_t, log_q_t = _binary_and_non_target_log_probs(teacher_logits.float() / temperature, target)
    # KL(p ‖ q) = Σ p (log p − log q); the log-probabilities are finite, so 0·(finite) = 0 when p
    # underflows
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1) * temperature**2
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1) * temperature**2
    return tckd, nckd


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """α·TCKD + β·NCKD per sample (see the module docstring).

    Args:
        student_logits, teacher_logits: (B, C) with the same C ≥ 2.
        target: (B,) class indices.
        alpha: weight ≥ 0 of TCKD (target-class KD). CIFAR-100: 1; ImageNet: 0.5.
        beta: weight ≥ 0 of NCKD (non-target-class KD). CIFAR-100: 8 for most pairs; ImageNet: 0.5.
        temperature: τ > 0. CIFAR-100: 4; ImageNet: 1.
        reduction: "mean" (over the batch, as the official code), "sum" or "none" (B,).
    """
    check_reduction(reduction)
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return reduce(alpha * tckd + beta * nckd, reduction)
