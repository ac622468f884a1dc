"""The CIFAR networks of the KD literature, with the widths and depths used by CRD/mdistiller.

ResNet (He et al. 2016, CIFAR variant): 3×3 stem to `widths[0]`, three stages of BasicBlocks with
`widths[1:]` channels (strides 1, 2, 2), global average pooling, linear classifier. Depth 6n+2
with n blocks per stage: resnet8 (n=1) ... resnet110 (n=18); the "x4" variants use widths
(32, 64, 128, 256) instead of (16, 16, 32, 64).

Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation BasicBlocks, depth 6n+4, widths
(16, 16k, 32k, 64k): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, wrn_28_10 ...

They follow timm's API (`forward_features`, `forward_head(pre_logits=...)`, `get_classifier`,
`num_classes`) so every toolkit part treats them like timm models. Stages are named `layer1..3`
(ResNet) and `block1..3` (WRN), as in the KD papers' code, so feature-method configs carry over.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from toolkit.registry import register


class _TimmLikeHead:
    """forward_head/get_classifier/reset shared by the CIFAR nets."""

    fc: nn.Linear
    num_classes: int

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(_TimmLikeHead, nn.Module):
    def __init__(
        self, depth: int, widths=(16, 16, 32, 64), num_classes: int = 100, in_chans: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
            self.add_module(f"layer{i + 1}", stages[-1])
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.shortcut = None if in_planes == planes else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(self.drop(self.relu(self.bn2(self.conv1(o)))))
        return out + shortcut


class WideResNet(_TimmLikeHead, nn.Module):
    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        in_planes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, stride if j == 0 else 1, drop_rate))
                in_planes = planes
            self.add_module(f"block{i + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn(x))


class ConvNet(_TimmLikeHead, nn.Module):
    """A small plain CNN: `depth` blocks of 3×3 conv + BN + ReLU + 2×2 max-pool (width doubling per
    block), then the feature map average-pooled to `head_pool`×`head_pool`, flattened, and a
    linear classifier (the classic small MNIST-style net; keeping spatial layout in the head
    matters at these widths).

    The deliberately small student of the default demonstration (much smaller than the teacher,
    which is where KD pays off)."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, width: int = 16, depth: int = 2, head_pool: int = 4
    ):
        super().__init__()
        layers, c = [], in_chans
        for i in range(depth):
            w = width * 2**i
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.head_pool = head_pool
        self.num_classes = num_classes
        self.num_features = c * head_pool * head_pool
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, self.head_pool), 1)
        return x if pre_logits else self.fc(x)


def _resnet(depth: int, widths=(16, 16, 32, 64)):
    def make(num_classes: int = 100, in_chans: int = 3) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_chans)

    return make


def _wrn(depth: int, k: int):
    def make(num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, k, num_classes, in_chans, drop_rate)

    return make


for _d in (8, 14, 20, 32, 44, 56, 110):
    register("model", f"resnet{_d}")(_resnet(_d))
for _d in (8, 32):
    register("model", f"resnet{_d}x4")(_resnet(_d, (32, 64, 128, 256)))
for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    register("model", f"wrn_{_d}_{_k}")(_wrn(_d, _k))
register("model", "convnet")(ConvNet)
