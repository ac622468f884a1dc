"""`loss_reweighting`: dynamic per-sample weights from the current losses (Sow et al., ICLR 2025);
maths in `toolkit.functional.loss_reweighting`.

Composition with the bus and DDP. The weights w (Σ w = 1) are a softmax over the *global* batch:
the per-sample losses of every rank are gathered (detached) and every rank computes the same w.
The paper's objective is Σ_global w_i·ℓ_i. The bus takes the mean over the local batch of B_r
samples, and DDP averages the gradients of the W ranks, so the loss the optimiser sees is

    (1/W)·Σ_r (1/B_r)·Σ_{i∈r} s_i·ℓ_i,

which equals Σ_global w_i·ℓ_i when the weight returned for sample i of rank r is
s_i = W·B_r·w_i (the official code's `world_size · Σ_local w_i ℓ_i`, divided by the bus's 1/B_r).
In one process s_i = B·w_i; with uniform w and equal local batches s_i = 1 (the plain mean).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.distill.memory import gather_rows
from toolkit.functional.loss_reweighting import check_loss_reweighting, loss_reweighting_weights
from toolkit.registry import register
from toolkit.selection.weighting import SampleWeighting
from toolkit.terms import Step


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@register("selector", "loss_reweighting")
class LossReweighting(SampleWeighting):
    """Dynamic loss-based sample reweighting: w = softmax((f(ℓ̃) − max f)/r) over the global batch.

    Sow, Woisetschläger, Bulusu, Wang, Jacobsen & Liang, *Dynamic Loss-Based Sample Reweighting for
    Improved Large Language Model Pretraining* (ICLR 2025, arXiv 2502.06733). Each step, the
    per-sample losses of the global batch are normalised to [−δ, δ] and mapped by a strategy f;
    the weights are a softmax of f at temperature r (see `toolkit.functional.loss_reweighting`).
    During a warm-up the loss is the plain mean (the official code's `burnout_steps`: no
    reweighting until the losses are informative).

    When to use: large, redundant training sets (LLM pretraining in the paper; any classifier
    here). Expected effect: faster convergence; LinUpper (default) spends less of each step on
    already-learnt, low-loss samples while capping the weight of the highest losses.

    Args:
        strategy: "linupper" (paper's recommendation), "quadratic" (mid-range losses first),
            "extremes" (both ends) or "uniform" (f = ℓ̃, still a reweighting unless r is large).
        r: softmax temperature (official configs: 1.0 for GPT-2 124M, 0.4 for 684M); r → ∞ gives
            the plain mean.
        delta: δ of the normalisation (paper: 1).
        warmup: optimiser steps without reweighting: an int is a step count, a float in [0, 1) a
            fraction of the planned steps (official configs: 1000 of 20000 steps = 0.05).
        log_every_n_steps: see `SampleWeighting`.
    """

    name = "loss_reweighting"

    def __init__(
        self,
        strategy: str = "linupper",
        r: float = 1.0,
        delta: float = 1.0,
        warmup: int | float = 0.05,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(log_every_n_steps)
        check_loss_reweighting(strategy, r, delta)
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
            raise TypeError(
                f"warmup must be an int (steps) or a float in [0, 1) (a fraction), got {warmup!r}"
            )
        if isinstance(warmup, int) and warmup < 0:
            raise ValueError(f"warmup as a step count must be >= 0, got {warmup}")
        if isinstance(warmup, float) and not 0 <= warmup < 1:
            raise ValueError(
                f"warmup as a fraction of the planned steps must be in [0, 1), got {warmup}; give steps as an int"
            )
        self.strategy, self.r, self.delta, self.warmup = strategy, float(r), float(delta), warmup

    @property
    def state_key(self) -> str:
        return f"SampleWeighting[{self.name}, {self.strategy}, r={self.r}]"

    def in_warmup(self, step: Step) -> bool:
        if isinstance(self.warmup, int):
            return step.progress.global_step < self.warmup
        return step.progress.fraction < self.warmup

    def weights(self, step: Step, per_sample_loss: Tensor) -> Tensor:
        if self.in_warmup(step):
            return torch.ones_like(per_sample_loss)
        return self.local_weights(per_sample_loss)

    def local_weights(self, per_sample_loss: Tensor) -> Tensor:
        """s_i = W·B_r·w_i for this rank's samples (a collective call under DDP; see the module docstring)."""
        rank, world = _world()
        losses = per_sample_loss.detach().float()
        b = losses.shape[0]
        owner, global_losses = gather_rows(
            torch.full((b,), rank, dtype=torch.long, device=losses.device), losses
        )
        w = loss_reweighting_weights(global_losses, self.strategy, self.r, self.delta).to(losses.device)
        return w[owner == rank] * (world * b)

    def state_dict(self) -> dict[str, Any]:
        # Stateless beyond the step count (restored by Lightning): recorded to check a resume.
        return {"strategy": self.strategy, "r": self.r, "delta": self.delta, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
