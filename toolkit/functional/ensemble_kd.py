"""Ensemble distillation: KD towards the averaged prediction of K frozen teachers (Kim, Kotha, Liang &
Hashimoto, "Pre-training under infinite compute", 2025, arXiv 2509.14786; Hinton, Vinyals & Dean
2015 for distilling an ensemble).

    p̄^τ = (1/K) Σ_k softmax(t_k/τ)                 combine="probs"  (mean of the members' distributions)
    p̄^τ = softmax(((1/K) Σ_k t_k)/τ)               combine="logits" (mean of the members' logits)
    L_ens = τ² · KL(p̄^τ ‖ softmax(s/τ))

With K = 1 both are Hinton KD; K identical teachers give the KD of one of them.

Confirmed from the paper (abstract): K independently trained (heavily regularised) members, their
ensemble is distilled into a smaller student ("8× smaller, retains 83% of the ensembling
benefit"). Not readable here: the distillation loss itself and how the members are combined; a
public replication of the paper's ensembles (the NanoGPT "slowrun" notes) describes logit
averaging, which is the default here and the `Teacher` class's default; mean probabilities (the
classical ensemble, Hinton et al.) is `combine="probs"`. The loss form is (inferred) token-level KD
to the ensemble, mixed with cross-entropy through the term weights. Computed in float32 in log
space (log p̄ = logsumexp_k log softmax(t_k/τ) − log K), stable for logits of magnitude 1e4 and bf16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, check_temperature, reduce

COMBINES = ("logits", "probs")


def ensemble_log_probs(
    teacher_logits: Tensor | Sequence[Tensor], temperature: float = 1.0, combine: str = "logits"
) -> Tensor:
    """log p̄^τ (B, C) of K members' logits, given as a (K, B, C) tensor or a list of (B, C)."""
    check_temperature(temperature)
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    stacked = _stack(teacher_logits).float() / temperature
    if combine == "logits":
        return F.log_softmax(stacked.mean(0), dim=-1)
    return torch.logsumexp(F.log_softmax(stacked, dim=-1), dim=0) - math.log(stacked.shape[0])


def ensemble_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | Sequence[Tensor],
    temperature: float = 1.0,
    combine: str = "logits",
    reduction: str = "mean",
) -> Tensor:
    """τ²·KL(p̄^τ ‖ softmax(s/τ)) per sample (see the module docstring).

    Args:
        student_logits: (B, C).
        teacher_logits: the members' logits, (K, B, C) or a list of K (B, C) tensors.
        temperature: τ > 0.
        combine: "logits" (mean logits) or "probs" (mean of the members' softmax at τ).
        reduction: "mean", "sum" or "none" (B,).
    """
    check_reduction(reduction)
    stacked = _stack(teacher_logits)
    if stacked.shape[1:] != student_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"each teacher's logits {tuple(stacked.shape[1:])} must match the student's (B, C) "
            f"{tuple(student_logits.shape)}: all members must predict the student's classes"
        )
    log_t = ensemble_log_probs(stacked, temperature, combine)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_sample = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2
    return reduce(per_sample, reduction)


def _stack(teacher_logits: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(teacher_logits, Tensor):
        if teacher_logits.dim() != 3:
            raise ValueError(
                f"teacher logits must be (K, B, C) or a list of (B, C), got shape {tuple(teacher_logits.shape)}"
            )
        return teacher_logits
    members = list(teacher_logits)
    if not members:
        raise ValueError("the ensemble needs at least one teacher")
    shapes = {tuple(m.shape) for m in members}
    if len(shapes) > 1:
        raise ValueError(f"ensemble members returned logits of different shapes {sorted(shapes)}")
    return torch.stack([m.float() for m in members])
