"""BD-KD, balanced divergences for online knowledge distillation (Amara, Sepahvand, Meyer, Gross &
Clark, "BD-KD: Balancing the Divergences for Online Knowledge Distillation", arXiv 2212.12965;
v2 in ECCV format).

Online distillation: a large network T (the "teacher") and the compact network S (the "student",
the one deployed) are trained together from scratch, each with cross-entropy plus a divergence
to the other's tempered distribution p^τ = softmax(z / τ). With FKL = KL(p_t ‖ p_s) (forward,
mass-covering for the student) and RKL = KL(p_s ‖ p_t) (reverse, mode-seeking for the student),
H the entropy of a tempered distribution and λ_i ∈ [0, 1] a per-sample balance:

    student:  L_S,i = CE(s_i, y_i) + τ²·[(1 − λ_i)·KL(p_t,i ‖ p_s,i) + λ_i·KL(p_s,i ‖ p_t,i)]    (p_t detached)
              λ_i = 1[H(p_s,i) > H(p_t,i)]                          (sharpness κ = 0, the default)
              λ_i = sigmoid((H(p_s,i) − H(p_t,i)) / κ)              (κ > 0, a soft balance)
    teacher:  L_T,i = CE(t_i, y_i) + τ²·KL(p_t,i ‖ p_s,i)                                        (p_s detached)

What could be confirmed, and from where: only the paper's opening (title, abstract, start of the
introduction; arxiv.org/html/2212.12965v2 and the v1 abstract) and third-party summaries of it
(sciencestack.ai/paper/2212.12965) could be read with the tools available here; the method
section, its equations and hyper-parameters could not, and no official code was found. From
those sources: it is online KD with both networks trained; the larger network is the teacher,
the compact one the student, and the student is the network the method is for ("student-centred
training"); the student's distillation term is a *sample-wise* weighting of forward and reverse
KL guided by the entropy gap between the teacher's and the student's predictions; the teacher's
objective is changed too, using a reverse KL as a regulariser; the goal is accuracy and
calibration (ECE) of the student.

Decided here where that material is silent (NOT confirmed against the paper's equations):
- The balance rule λ_i. A sample on which the student is less confident than the teacher
  (H_s > H_t) gets the reverse KL, whose zero-forcing gradient removes the student's mass where
  the teacher has none (sharpening it); a sample on which the student is over-confident
  (H_s ≤ H_t) gets the forward KL, whose mass-covering gradient p_s − p_t moves mass onto the
  teacher's other modes (softening it). Both are minimised at p_s = p_t, so the rule balances the
  student's confidence towards the teacher's. λ is a weight, not differentiated. κ > 0 gives a
  smooth version (κ → ∞: the symmetric ½·(FKL + RKL)).
- "Reverse KL" for the teacher is taken in the usual optimised-distribution-first sense,
  KL(p_t ‖ p_s) minimised over the teacher (mode-seeking towards the student), i.e. the reverse of
  the conventional online (DML) teacher term KL(p_s ‖ p_t); this is the reading under which the
  teacher's loss is "adjusted" as the abstract says.
- Entropies are those of the tempered distributions the divergences compare; τ² keeps the
  gradients on the CE scale (Hinton et al.); unit weights on every part, as in DML.

Numerics: everything in float32 from log_softmax (stable for logits of 1e4 and for bf16 inputs);
p·log p is computed as exp(log p)·log p, which is exactly 0 where p underflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_nonnegative, check_reduction, check_temperature, reduce


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must both be (B, C) with the same classes"
        )


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def entropy(log_p: Tensor) -> Tensor:
    """H(p) = −Σ p·log p per row, from log-probabilities (B, C) -> (B,)."""
    return -(log_p.exp() * log_p).sum(-1)


def bdkd_balance(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, sharpness: float = 0.0
) -> Tensor:
    """λ (B,) in [0, 1]: the weight of the reverse KL for each sample (1 − λ goes to the forward KL).

    κ = `sharpness` = 0: λ = 1 where the student's tempered entropy exceeds the teacher's, else 0;
    κ > 0: λ = sigmoid((H_s − H_t) / κ). Computed without gradient (a weight, not a loss).
    """
    check_temperature(temperature)
    check_nonnegative("sharpness", sharpness)
    _check_pair(student_logits, teacher_logits)
    with torch.no_grad():
        h_s = entropy(F.log_softmax(student_logits.detach().float() / temperature, dim=-1))
        h_t = entropy(F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1))
        if sharpness == 0:
            return (h_s > h_t).float()
        return torch.sigmoid((h_s - h_t) / sharpness)


def bdkd_student_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    sharpness: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """The student's distillation term τ²·[(1 − λ)·KL(p_t ‖ p_s) + λ·KL(p_s ‖ p_t)] per sample.

    The teacher logits are detached here (the teacher gets its own loss, `bdkd_teacher_loss`).
    """
    check_reduction(reduction)
    lam = bdkd_balance(student_logits, teacher_logits, temperature, sharpness)
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_sample = ((1 - lam) * _kl(log_pt, log_ps) + lam * _kl(log_ps, log_pt)) * temperature**2
    return reduce(per_sample, reduction)


def bdkd_teacher_loss(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float = 4.0, reduction: str = "mean"
) -> Tensor:
    """The teacher's regulariser τ²·KL(p_t ‖ p_s) per sample (reverse KL for the teacher, mode-seeking
    towards the student); the student logits are detached. Add CE(t, y) for the teacher's loss."""
    check_reduction(reduction)
    check_temperature(temperature)
    _check_pair(student_logits, teacher_logits)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_ps = F.log_softmax(student_logits.detach().float() / temperature, dim=-1)
    return reduce(_kl(log_pt, log_ps) * temperature**2, reduction)
