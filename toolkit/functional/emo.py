"""EMO: Earth Mover Distance Optimisation for auto-regressive language models.

Ren, Wu & Zhu, "EMO: Earth Mover Distance Optimization for Auto-Regressive Language Modeling"
(ICLR 2024, arXiv 2310.04691); official code DRSY/EMO (`emo_patch.py`,
`language_modeling/gpt2.py`).

With q = softmax(z) the model's next-token distribution over V tokens, y the target token and
Ê the row-L2-normalised cost embedding (V, D), the earth mover distance between the one-hot
target and q under the cost c(u, v) = 1 − cos(e_u, e_v) is bounded above by (the paper's
differentiable upper bound)

    emo(z, y) = 1 − (qᵀÊ)·Ê_y = Σ_v q_v·(1 − cos(e_v, e_y))   ∈ [0, 2]

and the per-token training loss mixes it with the MLE loss, rescaled to the MLE's magnitude:

    ℓ = ½·(mle + sg[mle / (emo + 1e-10)]·emo),    mle = −log q_y,   sg = stop-gradient

so the *value* of ℓ equals mle exactly while its gradient is half MLE's and half the EMO bound's
(rescaled per token). Tokens whose target is `ignore_index` give 0 and leave the mean.

Confirmed from the official code: the cost embedding is a copy of `lm_head.weight` taken when the
model is built (`self.cost_embedding = self.lm.lm_head.weight.data.clone()`, frozen), its rows
L2-normalised at each step; q from `log_softmax(...).exp()`; the one-hot target smoothed by 1e-15
and L1-normalised (here an exact one-hot: the difference is at most V·1e-15); the 1e-10 in the
ratio; the loss `((mle / (emo + 1e-10)).detach() * emo + mle) * 0.5` averaged over non-ignored
tokens. The code's `adaptive_emo` mode uses the current head weight (detached) instead of the
frozen copy: `EMOLoss(cost_embedding="adaptive")`. Rows of the cost embedding with zero norm are
normalised with the norm clamped at 1e-12 (the official code would divide by 0). Computed in
float32 (bf16 inputs upcast); finite for logits of 1e4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional._reduce import check_reduction


def _check(logits: Tensor, target: Tensor, cost_embedding: Tensor, ignore_index: int) -> None:
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., V), got shape {tuple(logits.shape)}")
    if target.is_floating_point():
        raise ValueError("EMO needs integer token targets (the one-hot target defines the transport)")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target must have the logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(target.shape)}"
        )
    vocab = logits.shape[-1]
    if cost_embedding.dim() != 2 or cost_embedding.shape[0] != vocab:
        raise ValueError(
            f"cost_embedding must be (V, D) with V = {vocab} (one row per vocabulary entry, e.g. the LM head's "
            f"weight), got {tuple(cost_embedding.shape)}"
        )
    if target.device.type == "cpu" and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}")


def emo_distance(logits: Tensor, target: Tensor, cost_embedding: Tensor, ignore_index: int = -100) -> Tensor:
    """The per-token EMD upper bound 1 − (qᵀÊ)·Ê_y (..., V) -> (...), in [0, 2]; 0 at ignored tokens."""
    _check(logits, target, cost_embedding, ignore_index)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    e = cost_embedding.detach().float()
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q = torch.softmax(logits.float(), dim=-1)
    dist = 1.0 - ((q @ e) * e[safe]).sum(-1)
    return torch.where(valid, dist, 0.0)


def emo_loss(
    logits: Tensor,
    target: Tensor,
    cost_embedding: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """EMO's per-token loss ½(mle + sg[mle/(emo + 1e-10)]·emo) of logits (..., V) against targets (...).

    `cost_embedding` (V, D) is treated as a constant. "mean" averages over non-ignored tokens;
    "none" returns (...) per-token losses (0 at ignored tokens).
    """
    check_reduction(reduction)
    _check(logits, target, cost_embedding, ignore_index)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    z = logits.float()
    mle = F.cross_entropy(z.reshape(-1, z.shape[-1]), safe.reshape(-1), reduction="none").reshape(safe.shape)
    emo = emo_distance(z, safe, cost_embedding)
    per_token = 0.5 * (mle + (mle / (emo + 1e-10)).detach() * emo)
    per_token = torch.where(valid, per_token, 0.0)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp_min(1)


__all__ = ["emo_distance", "emo_loss"]
