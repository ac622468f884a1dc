"""What language-model loss terms read from a `Step`: the hidden states and the output layer.

`CausalLMModule` gives them directly (`LMOutput.embedding` = the hidden states of the predicted
tokens, `head_weight`, `head_bias`, `logit_softcap`, `sequence_index`). Under other modules the
head is looked up on the module's model: `get_classifier()` (timm-style nets, whose
`ModelOutput.embedding` is the classifier's input) or `get_output_embeddings()`.
"""

from __future__ import annotations

from torch import Tensor, nn

from toolkit.models.output import unwrap
from toolkit.terms import Step


def head_inputs(step: Step, who: str) -> tuple[Tensor, Tensor, Tensor | None, float | None]:
    """(hidden (N, D), head weight (V, D), head bias (V,) or None, logit softcap or None)."""
    out = step.student
    weight = getattr(out, "head_weight", None)
    if weight is not None and out.embedding is not None:
        return out.embedding, weight, getattr(out, "head_bias", None), getattr(out, "logit_softcap", None)
    model = getattr(step.module, "model", None)
    core = unwrap(model) if isinstance(model, nn.Module) else None
    head = None
    if core is not None:
        for getter in ("get_classifier", "get_output_embeddings"):
            if hasattr(core, getter):
                head = getattr(core, getter)()
                break
    if (
        isinstance(head, nn.Linear)
        and out.embedding is not None
        and out.embedding.shape[-1] == head.in_features
    ):
        return out.embedding, head.weight, head.bias, None
    raise ValueError(
        f"{who} needs the hidden states and the output layer's weight: train with "
        "toolkit.modules.CausalLMModule (it hands them to the terms), or use a model whose "
        "get_classifier()/get_output_embeddings() is an nn.Linear applied to ModelOutput.embedding"
    )


def sequence_index(step: Step) -> Tensor | None:
    """The batch row (sequence) of every token under `CausalLMModule`, else None (one row per sample)."""
    return getattr(step.student, "sequence_index", None)


__all__ = ["head_inputs", "sequence_index"]
