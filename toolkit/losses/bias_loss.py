"""Bias loss (cross-entropy weighted by feature-map variance) as a loss term; maths in
`toolkit.functional.bias_loss`."""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.distill.fitnet import check_path, feature_at
from toolkit.functional._reduce import check_class_logits
from toolkit.functional.bias_loss import bias_weights, check_bias_args, feature_variance
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.registry import register
from toolkit.terms import LossTerm, Step

NORMALISATIONS = ("batch", "running_min")


@register("loss", "bias_loss")
class BiasLoss(LossTerm):
    """Bias loss: L_i = (exp(β·v̂_i) − 1 + α)·CE(z_i, y_i), v̂ the min-max scaled variance of the
    sample's feature map.

    Abrahamyan et al., "Bias Loss for Mobile Neural Networks" (ICCV 2021, arXiv 2107.11170),
    official code lusinlu/bias-loss-skipblocknet. Samples whose feature map varies little carry few
    distinctive features ("random predictions" in the paper): their cross-entropy is scaled down
    to α, the most diverse sample of the batch gets e^β − 1 + α. The weights are computed from the
    detached features, so no gradient flows through them.

    The feature: the student's tapped module `layer` (a FeatureTap installed by the module, as
    the feature distillers do), whose output should be the last convolutional feature map before
    global pooling, as the official code's ResNet-18 `layer4` output. Default "features": the
    toolkit `convnet`'s convolutional trunk (conv-BN-ReLU-max-pool blocks), the map its head
    pools. Use "layer3" for the CIFAR ResNets (`resnet8x4`, ...) and "relu" for the WRNs (the
    final BN-ReLU). For timm models, the last stage (e.g. "layer4" for ResNets).

    When to use: compact networks (the paper's mobile CNNs) trained with cross-entropy. Reported
    effect: CIFAR-100 top-1 ResNet-18 75.51 vs 74.33 (CE), DenseNet-121 77.83 vs 75.98,
    ShuffleNetV2 0.5× 72.00 vs 71.55 (official README); not reproduced here.

    Args:
        layer: module path of the student feature map (see above).
        alpha: α ≥ 0, the weight of the least diverse sample (0.3, official).
        beta: β ≥ 0 in exp(β·v̂) (0.3, official).
        normalisation: "batch" subtracts the batch's minimum variance (the official "local"
            mode); "running_min" the smallest variance seen in training so far (the official
            "global" mode, its default; a buffer saved in checkpoints, per process under DDP),
            still divided by the batch's range. Default "batch": stateless.
    """

    def __init__(
        self, layer: str = "features", alpha: float = 0.3, beta: float = 0.3, normalisation: str = "batch"
    ) -> None:
        super().__init__()
        self.layer = check_path(layer, "layer", "bias_loss")
        check_bias_args(alpha, beta)
        if normalisation not in NORMALISATIONS:
            raise ValueError(
                f"bias_loss: normalisation must be one of {NORMALISATIONS}, got {normalisation!r}"
            )
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.normalisation = normalisation
        self.student_features = (self.layer,)
        self.register_buffer("running_min", torch.tensor(float("inf")))

    def setup(self, example: Step) -> None:
        feature_variance(feature_at(example.student.features, self.layer, "student", "bias_loss"))

    def forward(self, step: Step) -> Tensor:
        logits = step.student.logits
        check_class_logits(logits, step.target, "bias_loss")
        features = feature_at(step.student.features, self.layer, "student", "bias_loss")
        if features.shape[0] != logits.shape[0]:
            raise ValueError(f"bias_loss: {features.shape[0]} feature rows for {logits.shape[0]} logits rows")
        v = feature_variance(features)
        v_min = None
        if self.normalisation == "running_min":
            if self.training:
                self.running_min.copy_(torch.minimum(self.running_min, v.min().to(self.running_min)))
            v_min = torch.minimum(self.running_min, v.min().to(self.running_min))
        w = bias_weights(v, self.alpha, self.beta, v_min)
        return w * cross_entropy(logits, step.target, reduction="none")

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, alpha={self.alpha}, beta={self.beta}, normalisation={self.normalisation!r}"
