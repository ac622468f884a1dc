"""`mlp`: a small multi-layer perceptron for tabular inputs (regression heads, tests)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from toolkit.registry import register


@register("model", "mlp")
class MLP(nn.Module):
    """Linear → ReLU (→ Dropout) blocks of `hidden` widths, then a linear head of `num_classes`
    outputs (the bins of a histogram loss, 1 for squared error, or classes). Inputs are flattened,
    so images work too. timm-style API (`forward_features`, `forward_head(pre_logits=...)`,
    `get_classifier`, `num_features`) so every toolkit part treats it like the other models.

    Args:
        num_classes: output size; in_chans: input features (flattened size).
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_chans: int = 10,
        hidden: list[int] | tuple[int, ...] = (64, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_chans
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.features = nn.Sequential(*layers)
        self.num_features = width
        self.num_classes = num_classes
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(torch.flatten(x, 1))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
