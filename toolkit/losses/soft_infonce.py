"""Soft-InfoNCE as a loss term on embeddings; maths in `toolkit.functional.soft_infonce`."""

from __future__ import annotations

from torch import Tensor

from toolkit.functional._reduce import check_temperature
from toolkit.functional.soft_infonce import (
    ESTIMATORS,
    check_soft_infonce_args,
    soft_infonce_embeddings,
)
from toolkit.losses._embedding import embedding_of
from toolkit.registry import register
from toolkit.terms import LossTerm, Step


@register("loss", "soft_infonce")
class SoftInfoNCELoss(LossTerm):
    """Soft-InfoNCE (Li et al., *Rethinking Negative Pairs in Code Search*, EMNLP 2023): InfoNCE
    whose negatives are weighted by w_ij = max((β − α·π_ij)/(β − α/n), 0.1), π_ij = softmax_j of a
    relatedness estimate / t, so likely false negatives are pushed away less.

    On a labelled batch (B, D): every sample is a query, its positive the next sample of its
    class (P×K batches), the other samples candidates (`soft_infonce_embeddings`); scores are
    cosine similarities / `temperature`.

    Args: alpha 1, beta 1, t 1, min_weight 0.1 (official defaults); temperature 0.1 (ours: the
    official scores are raw dot products of unnormalised encoders); estimator "embedding" (the
    detached cosine similarities, the paper's "trained model" estimate taken from the current
    model) or "labels" (same class = related). alpha 0 is InfoNCE.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        alpha: float = 1.0,
        beta: float = 1.0,
        t: float = 1.0,
        estimator: str = "embedding",
        min_weight: float = 0.1,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_soft_infonce_args(alpha, beta, t, min_weight)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.temperature, self.alpha, self.beta, self.t = (
            float(temperature),
            float(alpha),
            float(beta),
            float(t),
        )
        self.estimator, self.min_weight, self.normalize = estimator, float(min_weight), bool(normalize)

    def forward(self, step: Step) -> Tensor:
        return soft_infonce_embeddings(
            embedding_of(step),
            step.target,
            self.temperature,
            self.alpha,
            self.beta,
            self.t,
            self.estimator,
            self.min_weight,
            self.normalize,
            reduction="none",
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, t={self.t}, "
            f"estimator={self.estimator!r}"
        )
