"""DCO (the pass@N-aligned, confidence-limited cross-entropy) as a loss term; maths in
`toolkit.functional.dco`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.functional.dco import LEVELS, check_n, dco_from_log_prob
from toolkit.losses._lm import sequence_index
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "dco")
class DCOLoss(LossTerm):
    """DCO (Chen, Raventós, Cheng, Ganguli & Druckmann, "Rethinking Fine-Tuning when Scaling
    Test-Time Compute: Limiting Confidence Improves Mathematical Reasoning", NeurIPS 2025, arXiv
    2502.07154): the negative log-probability that at least one of N samples is correct,

        L = −log(1 − (1 − p̂)^N),   ∇L = F(N, p̂)·∇(−log p̂),   F → 0 as p̂ → 1 (N > 1)

    p̂ the probability of the whole answer (`level="sequence"`, the paper's) or of each token
    (`level="token"`). N = 1 is cross-entropy; larger N stops pushing examples the model already
    gets right towards more confidence, which keeps pass@N rising with training where CE makes it
    fall (the paper's finding on MATH and MiniF2F).

    When to use: fine-tuning for a known test-time sampling budget N (pass@N, best-of-N with a
    verifier). Needs the logits.

    Under `CausalLMModule` a sequence is one row of the batch: its loss L_b is spread over its
    valid tokens (L_b / n_b each), so the bus's token mean is Σ_b L_b / Σ_b n_b and N = 1 equals
    the token-mean cross-entropy exactly. Under a classifier every sample is a one-token answer.

    Hyper-parameters: `n` (4; the paper sweeps it, matching the evaluation budget), `level`
    ("sequence"), `ignore_index` (-100).
    """

    def __init__(self, n: float = 4, level: str = "sequence", ignore_index: int = -100) -> None:
        super().__init__()
        check_n(n)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.n = float(n)
        self.level = level
        self.ignore_index = ignore_index

    def forward(self, step: Step) -> Tensor:
        logits, target = step.student.logits, step.target
        if logits.dim() != 2 or target.shape != logits.shape[:1]:
            raise ValueError(
                f"dco expects (N, V) logits and (N,) targets per step, got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}; use toolkit.functional.dco_loss for other layouts"
            )
        valid = target != self.ignore_index
        safe = torch.where(valid, target, 0)
        log_p = torch.where(valid, -F.cross_entropy(logits.float(), safe, reduction="none"), 0.0)
        seq = sequence_index(step)
        if self.level == "token" or seq is None:
            return torch.where(valid, dco_from_log_prob(log_p, self.n), 0.0)
        rows = int(seq.max()) + 1 if seq.numel() else 0
        seq_log_p = log_p.new_zeros(rows).index_add(0, seq, log_p)
        count = torch.zeros(rows, device=seq.device).index_add_(0, seq, valid.float())
        per_sequence = dco_from_log_prob(seq_log_p, self.n)
        return torch.where(valid, per_sequence[seq] / count[seq].clamp_min(1), 0.0)

    def extra_repr(self) -> str:
        return f"n={self.n}, level={self.level!r}"
