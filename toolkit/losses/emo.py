"""EMO (earth mover distance optimisation) as a loss term; maths in `toolkit.functional.emo`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from toolkit.functional.emo import emo_loss
from toolkit.losses._lm import head_inputs
from toolkit.registry import register
from toolkit.terms import LossTerm, Step

COST_EMBEDDINGS = ("frozen", "adaptive")


@register("loss", "emo")
class EMOLoss(LossTerm):
    """EMO (Ren, Wu & Zhu, "EMO: Earth Mover Distance Optimization for Auto-Regressive Language
    Modeling", ICLR 2024, arXiv 2310.04691): MLE mixed with a differentiable upper bound of the
    earth mover distance between the one-hot target and the model's distribution,

        emo = 1 − (qᵀÊ)·Ê_y,   ℓ = ½·(mle + sg[mle / (emo + 1e-10)]·emo)   (value = mle)

    with Ê the row-normalised cost embedding: a frozen copy of the output layer's weight taken
    before training (`cost_embedding="frozen"`, the paper's; the copy is saved in checkpoints) or
    the current weight, detached (`"adaptive"`, the official code's `adaptive_emo`). The cost
    1 − cos(e_u, e_v) makes probability on tokens whose embeddings are close to the target's cost
    little, so the model is not pushed away from plausible alternatives as hard as by MLE.

    When to use: language-model training or fine-tuning (the paper: continual fine-tuning of
    pretrained LLMs on ~25k sentences; also from scratch). Works on any (tokens or samples) × V
    logits whose output layer can be read (`CausalLMModule`, or a classifier with
    `get_classifier()`). Needs the logits (the full softmax).

    Hyper-parameters: `cost_embedding` ("frozen"), `ignore_index` (-100). The logged value equals
    the MLE loss; only the gradient differs.
    """

    def __init__(self, cost_embedding: str = "frozen", ignore_index: int = -100) -> None:
        super().__init__()
        if cost_embedding not in COST_EMBEDDINGS:
            raise ValueError(f"cost_embedding must be one of {COST_EMBEDDINGS}, got {cost_embedding!r}")
        self.mode = cost_embedding
        self.ignore_index = ignore_index
        # the frozen copy: empty until the dry run (or the first step), then (V, D); a buffer, so
        # it is saved with the module and a resumed run keeps the embedding of the start
        self.register_buffer("cost_embedding", torch.empty(0), persistent=True)

    def _head_weight(self, step: Step) -> Tensor:
        return head_inputs(step, "emo")[1]

    def setup(self, example: Step) -> None:
        if self.mode == "frozen" and self.cost_embedding.numel() == 0:
            self.cost_embedding = self._head_weight(example).detach().clone()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "cost_embedding")
        if saved is not None and saved.shape != self.cost_embedding.shape:
            self.cost_embedding = torch.empty_like(saved, device=self.cost_embedding.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, step: Step) -> Tensor:
        if self.mode == "adaptive":
            cost = self._head_weight(step).detach()
        else:
            if self.cost_embedding.numel() == 0:  # no dry run: copy the weight now, before any update
                self.setup(step)
            cost = self.cost_embedding
        return emo_loss(step.student.logits, step.target, cost, self.ignore_index, reduction="none")

    def extra_repr(self) -> str:
        return f"cost_embedding={self.mode!r}"
