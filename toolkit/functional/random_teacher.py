"""Distillation from a random teacher (Sarnthein, Bachmann, Anagnostidis & Hofmann, "Random Teachers
are Good Teachers", ICML 2023, arXiv 2302.12091; official code: github.com/safelix/dinopl).

A student is trained label-free to match the output distribution of a frozen, randomly initialised
teacher of the same architecture (encoder + DINO head) on the same view of each input:

    L = −Σ_k softmax(t/τ_t)_k · log softmax(s/τ_s)_k        (cross-entropy H(p_t, p_s))
      = KL(p_t ‖ p_s) + H(p_t)                              (same gradient: H(p_t) has none)

Confirmed from the official code (`dinopl/core.py` `multicrop_loss`, `configs/cifar10_distillation_v2.json`):
the minimised loss is the cross-entropy (`loss: "CE"`; KL = CE − H(teacher) is logged), τ_t = τ_s = 1,
no centering (`t_cmom = s_cmom = nan`), one view paired with itself (`mc: 1x32`,
`loss_pairing: same`), teacher never updated (`t_mode: no_update`) and run in eval mode
(`t_eval: true`). Per sample here; the code averages over the batch. Float32, log-space.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, check_temperature, reduce


def random_teacher_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    subtract_entropy: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """H(softmax(t/τ_t), softmax(s/τ_s)) per sample; with `subtract_entropy` the KL instead.

    Args:
        student_logits, teacher_logits: (B, K) head outputs of the same size.
        student_temperature, teacher_temperature: τ_s, τ_t > 0 (paper: 1 and 1).
        subtract_entropy: return KL(p_t ‖ p_s) = H(p_t, p_s) − H(p_t) (same gradient, 0 at a match).
        reduction: "mean", "sum" or "none" (B,).
    """
    check_reduction(reduction)
    check_temperature(student_temperature)
    check_temperature(teacher_temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} outputs must both "
            "be (B, K) of the same size"
        )
    log_s = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / teacher_temperature, dim=-1)
    p_t = log_t.exp()
    per_sample = (p_t * ((log_t if subtract_entropy else 0.0) - log_s)).sum(-1)
    return reduce(per_sample, reduction)
