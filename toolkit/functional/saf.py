"""Sharpness-Aware Training for Free (Du, Zhou, Feng, Tan & Zhou, NeurIPS 2022, arXiv 2205.14083):
the trajectory loss, a KL divergence between the network's current outputs and the outputs it gave
the same samples Ẽ epochs earlier,

    L_tra,i = τ² · KL( softmax(ŷ_i^(e−Ẽ) / τ) ‖ softmax(f_θ(x_i) / τ) )

added as L = CE + λ · mean_i L_tra,i in the epochs e with E_start < e (< E_end). It penalises sudden
drops of the loss along the weight trajectory, which the paper relates to SAM's sharpness term, at
the cost of an (N, Ẽ+1, C) memory of past outputs instead of a second forward/backward pass.

CONFIRMED from the official code (AngusDujw/SAF `SAF_train.py`): the KL direction (past outputs
are the target distribution), the τ² factor, the per-sample sum over classes and the batch mean
(`F.kl_div(F.softmax(output/τ).log(), F.softmax(past/τ), reduction="none").sum(-1).mean() * τ**2`),
the memory of Ẽ+1 slots per sample written at slot `epoch % (Ẽ+1)` and read at slot
`(epoch − Ẽ) % (Ẽ+1)`, recorded from the training forward pass (augmented inputs) by sample
index, and the activation test `epoch > kl_start_epoch and epoch < kl_end_epoch` (0-based
epochs). Defaults from its README/run.sh: λ = 0.3 (`--reinforce`), τ = 5, E_start = 5, Ẽ = 3
(`--minus_epoch`, README: 2 or 3).
"""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import reduce
from toolkit.functional.kd import kd_loss


def saf_slots(epoch: int, minus_epoch: int) -> tuple[int, int]:
    """(slot written at `epoch`, slot holding the outputs of epoch − Ẽ) of an Ẽ+1-slot memory."""
    if minus_epoch < 1:
        raise ValueError(f"minus_epoch (Ẽ) must be >= 1, got {minus_epoch}")
    return epoch % (minus_epoch + 1), (epoch - minus_epoch) % (minus_epoch + 1)


def saf_trajectory_loss(
    logits: Tensor,
    past_logits: Tensor,
    temperature: float = 5.0,
    valid: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """τ²·KL(softmax(past/τ) ‖ softmax(logits/τ)) per sample (summed over classes).

    `valid` (B,) bool: samples without a record from Ẽ epochs earlier contribute 0 (they still
    count in the batch mean, as every sample does in the reference where all have records).
    Float32 internally (stable for large logits and bf16 inputs)."""
    per_sample = kd_loss(logits, past_logits, temperature, reduction="none")
    if valid is not None:
        if valid.shape != per_sample.shape:
            raise ValueError(f"valid must be ({per_sample.shape[0]},), got {tuple(valid.shape)}")
        per_sample = per_sample * valid.to(per_sample.dtype)
    return reduce(per_sample, reduction)
