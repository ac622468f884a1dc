"""Progressive self-knowledge distillation (Kim et al., "Self-Knowledge Distillation with
Progressive Refinement of Targets", ICCV 2021).

At epoch t (0-based) of T: α_t = α_T · (t + 1) / T, and the target of sample i is

    ỹ_i = (1 − α_t) · onehot(y_i) + α_t · P_i^(t−1)

where P_i^(t−1) is the softmax the model itself gave sample i in the previous epoch (the one-hot
label in the first epoch). The loss is the cross-entropy with ỹ. Followed: the official code
(lgcnsai/PS-KD-Pytorch `main.py`: `alpha_t = alpha_T * ((epoch + 1) / end_epoch)`, memory
initialised with one-hot labels at epoch 0, updated with each step's softmax; `loss/pskd_loss.py`:
`(-targets * log_softmax(output)).mean(0).sum()`, i.e. the batch mean of per-sample soft CE).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from toolkit.functional.cross_entropy import cross_entropy


def ps_kd_alpha(epoch: int, max_epochs: int, alpha_T: float = 0.8) -> float:
    """α_t = α_T · (epoch + 1) / max_epochs (epoch is 0-based)."""
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    return alpha_T * (epoch + 1) / max_epochs


def ps_kd_targets(target: Tensor, past_probs: Tensor, alpha_t: float) -> Tensor:
    """ỹ = (1 − α_t)·onehot(y) + α_t·past_probs."""
    onehot = F.one_hot(target, past_probs.shape[-1]).to(past_probs.dtype)
    return (1 - alpha_t) * onehot + alpha_t * past_probs


def ps_kd_loss(
    logits: Tensor, target: Tensor, past_probs: Tensor, alpha_t: float, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of `logits` against the progressively refined targets."""
    if not 0.0 <= alpha_t <= 1.0:
        raise ValueError(f"alpha_t must be in [0, 1], got {alpha_t}")
    return cross_entropy(logits, ps_kd_targets(target, past_probs.float(), alpha_t), reduction=reduction)
