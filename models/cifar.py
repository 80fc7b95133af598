"""The CIFAR ResNets of He et al. (2015), section 4.2.

Three stages of 16/32/64 channels with n basic blocks each (6n+2 layers) and
option-A shortcuts: where the shape changes, the identity is subsampled by 2 and
zero-padded in channels, so shortcuts carry no parameters. Parameter names match the
reference checkpoints (github.com/akamaster/pytorch_resnet_cifar10), whose classifier
is called ``linear``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from resnet_serve.models.backbone import Backbone


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels on both sides."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.pad = (planes - in_planes) // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            PadShortcut(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.embedding_dim = 64
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3")

    def forward_stages(self, x: Tensor, keep: tuple[str, ...] = ()) -> tuple[Tensor, list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        maps = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in keep:
                maps.append(x)
        return self.pool(x), maps

    def forward_head(self, features: Tensor) -> Tensor:
        return self.linear(features)


def resnet20_cifar10(**kwargs: Any) -> CifarResNet:
    return CifarResNet(20, **kwargs)


def resnet32_cifar10(**kwargs: Any) -> CifarResNet:
    return CifarResNet(32, **kwargs)


def resnet44_cifar10(**kwargs: Any) -> CifarResNet:
    return CifarResNet(44, **kwargs)


def resnet56_cifar10(**kwargs: Any) -> CifarResNet:
    return CifarResNet(56, **kwargs)


def resnet110_cifar10(**kwargs: Any) -> CifarResNet:
    return CifarResNet(110, **kwargs)


def resnet1202_cifar10(**kwargs: Any) -> CifarResNet:
    return CifarResNet(1202, **kwargs)
