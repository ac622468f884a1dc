"""EL2N score (Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet", NeurIPS 2021).

    EL2N(x, y) = ‖softmax(f(x)) − onehot(y)‖₂

the L2 norm of the error vector, computed early in training (and, in the paper, averaged over
several independent runs). Only a forward pass is needed. High EL2N = hard or mislabelled.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from toolkit.types import check_targets


def el2n_score(logits: Tensor, target: Tensor) -> Tensor:
    """(B,) EL2N of logits (B, C) against class targets (B,), in float32."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got {tuple(logits.shape)}")
    check_targets(target, logits.shape[1])
    p = logits.float().softmax(-1)
    return (p - F.one_hot(target.long(), logits.shape[1]).float()).norm(dim=-1)
