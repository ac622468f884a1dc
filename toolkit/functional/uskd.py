"""Universal Self-Knowledge Distillation (USKD; Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge
Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized
Soft Labels", ICCV 2023, arXiv 2303.13005; official code: yzd-v/cls_KD
`mmcls/models/dis_losses/uskd.py` (= `mmcls/distillation/losses/uskd.py`) and
`mmcls/distillation/distillers/classification_distiller.py`).

NKD (`toolkit.functional.nkd`) with soft labels the student makes for itself, no teacher. With s the
student's final logits, S = softmax(s), y the true class, w the logits of a weak linear classifier
on a mid-level feature and W = softmax(w):

    target label      p_y = S_y² + 1 − mean_batch(S_y²)          (detached)
    target term       L_t = −p_y · log S_y
    weak term         L_w = μ · CE_ls(w, y),   CE against 0.9·onehot(y) + 0.1/C
    rank score        r_c = W_c / (1 − W_y + 1e−6) + log S_c / (1 − log S_y + 1e−6)
    Zipf labels       z_c = 1 / rank_c (rank 1 = largest r over all C classes), then ẑ = z_{¬y} / Σ z_{¬y}
    non-target term   L_n = −Σ_{i≠y} ẑ_i · log softmax(s_{¬y})_i     (detached ẑ)
    L_USKD = α·L_t + β·L_n + L_w

The target term is NKD's with the student's own squared, batch-centred target probability as the
soft target (the paper: "smooths the target logit of the student"); the non-target term is NKD's
normalised non-target cross-entropy (λ = 1) with Zipf's-law labels ordered by the weak head and the
final logits together ("uses the rank of the intermediate feature"); the weak head itself is
trained by the label-smoothed CE scaled by μ.

Confirmed against the official code (the paper's body could not be read through the search
tools here; only its abstract, which agrees):
- the rank uses the weak head's *probabilities* and the final head's *log*-probabilities (the
  code reassigns `s_i = log_softmax(logit_s)` before building the rank); both are normalised by
  their target entry as written above, including the 1e−6; the target class takes part in the
  ranking, and its Zipf weight is then dropped and the rest renormalised, so a non-target class
  gets 1/1 only when it outranks the target;
- the target probability is squared and centred with the batch mean (`p_t.mean(0)`), so the
  per-sample values depend on the batch; the labels p_y and ẑ are detached;
- every part is a mean over the batch (the mean of the per-sample values here); CE on the
  final head is kept at weight 1 beside USKD (`ori_loss` in the distiller); no temperature;
- defaults α = 1, β = 0.1, μ = 0.005 (ImageNet configs, e.g. `res18_sd_img.py`); the CIFAR-100
  ResNet-18 config `res18_sd_cifar.py` uses α = 0.1, β = 0.1, μ = 0.1; the weak head reads the
  globally average-pooled output of the second-to-last backbone stage (`neck(fea_s[-2])`, 256
  channels for ResNet-18) through one linear layer.
- Not reproduced: the code's mixup/cutmix branch (soft labels: the top-2 classes and their
  mixing weights); these functions take class-index targets.

Computed in float32 from log_softmax with an exact gather of the non-target logits (no masking),
so it is finite for logits of magnitude 1e4 and in bf16, and the non-target term has exactly zero
gradient w.r.t. the target logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_logits_and_target, check_nonnegative, check_reduction, reduce
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.dkd import non_target

WEAK_LABEL_SMOOTHING = 0.1  # the weak head's target: 0.9·onehot + 0.1/C (fixed in the official code)
RANK_EPS = 1e-6  # the official code's guard in the rank's denominators


def _check(logits: Tensor, weak_logits: Tensor, target: Tensor) -> None:
    if weak_logits.shape != logits.shape:
        raise ValueError(
            f"USKD: the weak head's logits {tuple(weak_logits.shape)} must have the final logits' shape "
            f"{tuple(logits.shape)}: build the weak head with one output per class"
        )
    check_logits_and_target(logits, weak_logits, target, "USKD")


def zipf_non_target_labels(logits: Tensor, weak_logits: Tensor, target: Tensor) -> Tensor:
    """ẑ (B, C − 1): Zipf's-law soft labels over the non-target classes, in class order, ranked by
    W_c / (1 − W_y) + log S_c / (1 − log S_y) (see the module docstring); rows sum to 1; detached."""
    _check(logits, weak_logits, target)
    with torch.no_grad():
        y = target.unsqueeze(-1)
        log_s = F.log_softmax(logits.float(), dim=-1)
        w = F.softmax(weak_logits.float(), dim=-1)
        score = w / (1 - w.gather(-1, y) + RANK_EPS) + log_s / (1 - log_s.gather(-1, y) + RANK_EPS)
        order = score.argsort(dim=-1, descending=True, stable=True)
        position = order.argsort(dim=-1)  # 0 for the highest score
        zipf = 1.0 / (position + 1).float()
        nz = non_target(zipf, target)
        return nz / nz.sum(-1, keepdim=True)


def uskd_parts(
    logits: Tensor, weak_logits: Tensor, target: Tensor, mu: float = 0.005
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_t, L_n, L_w), each (B,) per sample; L_w already scaled by μ, L_t and L_n without α, β."""
    check_nonnegative("mu", mu)
    nz = zipf_non_target_labels(logits, weak_logits, target)
    s = logits.float()
    y = target.unsqueeze(-1)
    log_s_y = F.log_softmax(s, dim=-1).gather(-1, y).squeeze(-1)
    s_y2 = log_s_y.detach().exp() ** 2
    p_y = s_y2 + 1 - s_y2.mean()
    target_term = -p_y * log_s_y
    non_target_term = -(nz * F.log_softmax(non_target(s, target), dim=-1)).sum(-1)
    weak_term = mu * cross_entropy(
        weak_logits, target, label_smoothing=WEAK_LABEL_SMOOTHING, reduction="none"
    )
    return target_term, non_target_term, weak_term


def uskd_loss(
    logits: Tensor,
    weak_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    reduction: str = "mean",
) -> Tensor:
    """α·L_t + β·L_n + L_w per sample (see the module docstring).

    Args:
        logits: (B, C) the student's final logits (C ≥ 2).
        weak_logits: (B, C) the weak head's logits on a mid-level feature.
        target: (B,) class indices.
        alpha: α ≥ 0, weight of the soft target term (ImageNet: 1; CIFAR-100: 0.1).
        beta: β ≥ 0, weight of the Zipf non-target term (0.1).
        mu: μ ≥ 0, weight of the weak head's label-smoothed CE (ImageNet: 0.005; CIFAR-100: 0.1).
        reduction: "mean" (over the batch, as the official code), "sum" or "none" (B,). The
            batch mean inside p_y makes each sample's value depend on the batch.
    """
    check_reduction(reduction)
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    target_term, non_target_term, weak_term = uskd_parts(logits, weak_logits, target, mu)
    return reduce(alpha * target_term + beta * non_target_term + weak_term, reduction)
