"""PS-KD as a loss term; maths in `toolkit.functional.ps_kd`, memory in `SampleMemory`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.distill.memory import SampleMemory
from toolkit.functional.ps_kd import ps_kd_alpha, ps_kd_loss
from toolkit.registry import register
from toolkit.terms import LossTerm, Step
from toolkit.types import require_index


@register("distiller", "ps_kd")
class PSKDLoss(LossTerm):
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
        if memory_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"memory_dtype must be float32, float16 or bfloat16, got {memory_dtype!r}")
        self.alpha_T = float(alpha_T)
        self.memory_dtype = memory_dtype
        self.memory: SampleMemory | None = None

    def _memory(self, num_classes: int) -> SampleMemory:
        if self.memory is None:
            self.memory = SampleMemory(num_classes, getattr(torch, self.memory_dtype))
        return self.memory

    def setup(self, example: Step) -> None:
        self._memory(example.student.logits.shape[-1])

    def forward(self, step: Step) -> Tensor:
        index = require_index(step.batch, "ps_kd")
        logits = step.student.logits
        memory = self._memory(logits.shape[-1])
        past, written = memory.read(index)
        onehot = F.one_hot(step.target, logits.shape[-1]).to(past.dtype)
        past = torch.where(written.unsqueeze(-1), past, onehot)
        alpha_t = ps_kd_alpha(step.progress.epoch, step.progress.max_epochs, self.alpha_T)
        loss = ps_kd_loss(logits, step.target, past, alpha_t, reduction="none")
        if self.training:
            memory.write(index, logits.detach().float().softmax(-1))
        return loss

    def get_extra_state(self):
        return {
            "has_memory": self.memory is not None,
            "num_classes": None if self.memory is None else self.memory.row_shape[0],
        }

    def set_extra_state(self, state) -> None:
        if state["has_memory"]:
            self._memory(state["num_classes"])

    def extra_repr(self) -> str:
        return f"alpha_T={self.alpha_T}"
