"""PS-KD as a loss term; maths in `toolkit.functional.ps_kd`, memory in `SampleMemory`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.distill.memory import ClassMemoryTerm
from toolkit.functional.ps_kd import ps_kd_alpha, ps_kd_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import require_index


@register("distiller", "ps_kd")
class PSKDLoss(ClassMemoryTerm, LossTerm):
    """Progressive self-KD: CE against (1 − α_t)·onehot + α_t·(last epoch's own softmax).

    Kim et al., ICCV 2021. A self-distillation method: no teacher network is run; the "teacher"
    is the student's own predictions from the previous epoch, kept per sample index in a
    `SampleMemory` (saved in checkpoints, gathered across DDP ranks). It replaces the plain CE.

    When to use: any classifier; a regulariser that also improves calibration. Expected effect:
    small accuracy gains and lower ECE (CIFAR-100, ImageNet in the paper).

    Args:
        alpha_T: the final mixing weight α_T (paper: 0.8).
        memory_dtype: storage of the N×C memory (float16 halves it for large data sets).
    """

    needs_index = True

    def __init__(self, alpha_T: float = 0.8, memory_dtype: str = "float32") -> None:
        super().__init__()
        if not 0.0 <= alpha_T <= 1.0:
            raise ValueError(f"alpha_T must be in [0, 1], got {alpha_T}")
        self.alpha_T = float(alpha_T)
        self.init_memory(memory_dtype)

    def forward(self, step: Step) -> Tensor:
        index = require_index(step.batch, "ps_kd")
        logits = step.student.logits
        memory = self.class_memory(logits.shape[-1])
        past, written = memory.read(index)
        onehot = F.one_hot(step.target, logits.shape[-1]).to(past.dtype)
        past = torch.where(written.unsqueeze(-1), past, onehot)
        alpha_t = ps_kd_alpha(step.progress.epoch, step.progress.max_epochs, self.alpha_T)
        loss = ps_kd_loss(logits, step.target, past, alpha_t, reduction="none")
        if self.training:
            memory.write(index, logits.detach().float().softmax(-1))
        return loss

    def extra_repr(self) -> str:
        return f"alpha_T={self.alpha_T}"
