"""The logit-level losses of Dual-Head Knowledge Distillation (Yang, Zong, Huang, Feng & An,
"Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head",
arXiv 2411.08937; official code: penghui-yang/DHKD `distiller_zoo/BinaryKL.py`,
`distiller_zoo/BinaryKLNorm.py`, `helper/loops.py`, `train_student.py`).

Softmax probabilities forget a logit vector's shift ([2, 3, 4] and [−2, −1, 0] give the same
softmax); the paper adds a logit-level loss that sees it. Each class is treated as a binary
problem through the sigmoid. With s, t the student and teacher logits, τ the temperature and σ the
logistic function:

    BinaryKL(s, t)     = τ² · Σ_c KL(Bern(σ(t_c/τ)) ‖ Bern(σ(s_c/τ)))
    BinaryKL-Norm(s, t) = τ² · Σ_c KL(Bern(½) ‖ Bern(σ(d_c))),   d = (s − t)/τ
                        = τ² · Σ_c log cosh(d_c / 2)

BinaryKL-Norm is the one DHKD trains with (`--distill dhkd` builds `BinaryKLNorm`): it compares
the logit *difference* with 0, so it is zero exactly at s = t, symmetric in s − t, and its gradient
τ/2·tanh(d/2) is bounded by τ/2 per class. The identity
½log(½/σ(d)) + ½log(½/(1 − σ(d))) = log cosh(d/2) is exact (σ(d)(1 − σ(d)) = 1/(4cosh²(d/2))).
Combined with CE on one linear classifier the two losses pull the head apart (the paper's
neural-collapse analysis), so DHKD gives this loss its own auxiliary head (`toolkit.distill.dhkd`).

Confirmed against the official code:
- both losses are summed over the classes, divided by the batch size and multiplied by τ², i.e.
  the mean over samples of the per-sample values here; τ = 2 (`--BinaryKL_T 2`) in the README's
  CIFAR-100 and ImageNet commands;
- the teacher logits enter without gradient (computed under `no_grad`).

Numerics (where this differs from the code on purpose): the code clamps σ(·) to [1e−8, 1 − 1e−8]
before taking logs, which flattens the loss and zeroes its gradient once |s_c − t_c| > 18.4·τ
(BinaryKL-Norm) or |z_c| > 18.4·τ (BinaryKL). Here the same quantities are computed exactly in log
space (log σ(z) = −softplus(−z), log cosh via softplus), in float32, so they stay finite, with the
true gradient, for logits of magnitude 1e4 and for bf16 inputs; inside the clamp's range both
agree to float32 precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction, check_temperature, reduce


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must both be (B, C) with the same classes"
        )


def log_cosh(x: Tensor) -> Tensor:
    """log cosh(x), accurate for any magnitude: log1p(2·sinh²(x/2)) for |x| < 10 (no cancellation
    near 0, where it is ≈ x²/2), |x| + softplus(−2|x|) − log 2 beyond (no overflow)."""
    a = x.abs()
    small = a.clamp(max=10.0)  # keeps the unused branch finite, so its zero gradient is not NaN
    return torch.where(
        a < 10.0, torch.log1p(2.0 * torch.sinh(small / 2.0) ** 2), a + F.softplus(-2.0 * a) - math.log(2.0)
    )


def binary_kl_norm_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """DHKD's BinaryKL-Norm: τ²·Σ_c KL(Bern(½) ‖ Bern(σ((s_c − t_c)/τ))) per sample.

    Args:
        student_logits: (B, C), the auxiliary head's logits in DHKD.
        teacher_logits: (B, C), the teacher's (no gradient flows into them).
        temperature: τ > 0 (paper and code: 2).
        reduction: "mean" (over the batch, as the official code), "sum" or "none" (B,).
    """
    check_reduction(reduction)
    check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    d = (student_logits.float() - teacher_logits.float().detach()) / temperature
    per_sample = log_cosh(d / 2.0).sum(-1) * temperature**2
    return reduce(per_sample, reduction)


def binary_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """The paper's plain BinaryKL: τ²·Σ_c KL(Bern(σ(t_c/τ)) ‖ Bern(σ(s_c/τ))) per sample.

    The logit-level loss the paper starts from (the ablation's "BinaryKL"); DHKD itself trains with
    `binary_kl_norm_loss`. Arguments as there.
    """
    check_reduction(reduction)
    check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    s = student_logits.float() / temperature
    t = teacher_logits.float().detach() / temperature
    # KL(Bern(p) ‖ Bern(q)) = p(log p − log q) + (1 − p)(log(1 − p) − log(1 − q)), with
    # log σ(z) = −softplus(−z) and log(1 − σ(z)) = −softplus(z); both weights are finite
    p = t.sigmoid()
    kl = p * (F.softplus(-s) - F.softplus(-t)) + (1 - p) * (F.softplus(s) - F.softplus(t))
    return reduce(kl.sum(-1) * temperature**2, reduction)
