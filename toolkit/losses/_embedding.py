"""What the metric-learning terms read from a step: the embedding and the labels."""

from __future__ import annotations

from torch import Tensor

from toolkit.terms import Step


def embedding_of(step: Step) -> Tensor:
    """The step's embedding (B, D): `ModelOutput.embedding` (the `EmbeddingModule`'s output, or a
    classifier's penultimate pooled features), else the model's output itself."""
    emb = step.student.embedding
    return step.student.logits if emb is None else emb
