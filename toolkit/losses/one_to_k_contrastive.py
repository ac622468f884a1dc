"""1-to-K contrastive loss as a loss term on embeddings; maths in `toolkit.functional.one_to_k`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import check_temperature
from toolkit.functional.one_to_k import one_to_k_contrastive_embeddings
from toolkit.losses._embedding import embedding_of
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "one_to_k_contrastive")
class OneToKContrastiveLoss(LossTerm):
    """1-to-K contrastive loss (Nie et al., KDD 2024, arXiv 2406.18254): each anchor is aligned
    with its K positives at once, L = (L_anchor→candidates + L_candidate→anchors)/2/K, with the
    anchor-to-candidates term summing −log softmax over all K positives; K = 1 is the symmetric
    CLIP loss.

    On a labelled batch (B, D) the first sample of each class is the anchor and the class's other
    samples its K candidates (`one_to_k_contrastive_embeddings`); P×K batches give P anchors
    with K − 1 positives each.

    Args: temperature τ (official: learned, clamped to [0.001, 0.5]; fixed here, default 0.07);
    normalize (L2, as the paper).
    """

    def __init__(self, temperature: float = 0.07, normalize: bool = True) -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature, self.normalize = float(temperature), bool(normalize)

    def forward(self, step: Step) -> Tensor:
        return one_to_k_contrastive_embeddings(
            embedding_of(step), step.target, self.temperature, self.normalize, reduction="none"
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
