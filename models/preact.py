"""Pre-activation ResNets: He et al. (2016), *Identity Mappings in Deep Residual Networks*.

BN and ReLU come before each convolution, the shortcut stays an identity, and a final
BN-ReLU precedes the pooling. Where a block changes the shape, a bias-free 1x1 convolution
projects the pre-activated input (the shortcut of the paper's code, github.com/KaimingHe/
resnet-1k-layers). One class serves the ImageNet nets (7x7 stem, max pool, four stages) and
the paper's CIFAR nets (3x3 stem, three stages of 16/32/64 planes).

Module names follow timm's ``ResNetV2`` (``timm.models.resnetv2``, the non-BiT variants), so
timm's state dicts load with ``strict=True``: ``stem.conv``, ``stages.N.blocks.M.{norm1,
conv1, norm2, conv2[, norm3, conv3], downsample.conv}``, ``norm``, ``head.fc`` (a 1x1
convolution). The stages are exposed to ``--features`` as ``layer1``... like the rest of
the family.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_serve.models.backbone import Backbone
from resnet_serve.models.resnet import conv1x1, conv3x3

Stem = Literal["imagenet", "cifar"]


class NormAct(nn.BatchNorm2d):
    """BatchNorm then ReLU: timm's ``BatchNormAct2d``, whose state dict is a BatchNorm's."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(super().forward(x))


class Downsample(nn.Module):
    """The projection shortcut, applied to the pre-activated input (timm's
    ``DownsampleConv`` with ``preact=True``: no norm of its own)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv = conv1x1(in_chs, out_chs, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class PreActBlock(nn.Module):
    """What the basic and bottleneck units share: ``norm1`` and the shortcut."""

    expansion: int = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int, preact_shortcut: bool) -> None:
        super().__init__()
        self.downsample = (
            Downsample(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None
        )
        self.norm1 = NormAct(in_chs)
        self.preact_shortcut = preact_shortcut

    def residual(self, x_preact: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x_preact = self.norm1(x)
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        else:
            shortcut = x_preact if self.preact_shortcut else x
        return self.residual(x_preact) + shortcut


class PreActBasic(PreActBlock):
    """Two 3x3 convolutions (timm's ``PreActBasic``)."""

    def __init__(
        self, in_chs: int, planes: int, stride: int = 1, preact_shortcut: bool = False
    ) -> None:
        super().__init__(in_chs, planes, stride, preact_shortcut)
        self.conv1 = conv3x3(in_chs, planes, stride)
        self.norm2 = NormAct(planes)
        self.conv2 = conv3x3(planes, planes)

    def residual(self, x_preact: Tensor) -> Tensor:
        return self.conv2(self.norm2(self.conv1(x_preact)))


class PreActBottleneck(PreActBlock):
    """1x1, 3x3, 1x1 with 4x expansion (timm's ``PreActBottleneck``), strided on the 3x3."""

    expansion: int = 4
    stride_on_3x3: bool = True

    def __init__(
        self, in_chs: int, planes: int, stride: int = 1, preact_shortcut: bool = False
    ) -> None:
        super().__init__(in_chs, planes * self.expansion, stride, preact_shortcut)
        self.conv1 = conv1x1(in_chs, planes, 1 if self.stride_on_3x3 else stride)
        self.norm2 = NormAct(planes)
        self.conv2 = conv3x3(planes, planes, stride if self.stride_on_3x3 else 1)
        self.norm3 = NormAct(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)

    def residual(self, x_preact: Tensor) -> Tensor:
        return self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(x_preact)))))


class PaperBottleneck(PreActBottleneck):
    """The bottleneck of the paper's CIFAR code, which strides the first 1x1 convolution
    (timm, like torchvision's V1.5, moved the stride to the 3x3)."""

    stride_on_3x3 = False


class PreActStage(nn.Module):
    def __init__(self, blocks: list[PreActBlock]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """A 1x1 convolution over the pooled features, as timm's ``ClassifierHead(use_conv=True)``
    (so ``head.fc.weight`` has timm's shape ``[classes, C, 1, 1]``)."""

    def __init__(self, in_chs: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(in_chs, num_classes, kernel_size=1, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        return torch.flatten(self.fc(features[:, :, None, None]), 1)


class PreActResNet(Backbone):
    def __init__(
        self,
        block: type[PreActBasic | PreActBottleneck],
        layers: list[int],
        planes: tuple[int, ...],
        stem: Stem = "imagenet",
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if len(layers) != len(planes):
            raise ValueError(f"{len(layers)} stage depths for {len(planes)} stage widths")
        stem_chs = 64 if stem == "imagenet" else 16
        if stem == "imagenet":
            self.stem = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(3, stem_chs, kernel_size=7, stride=2, padding=3, bias=False),
                    pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                )
            )
        else:
            self.stem = nn.Sequential(OrderedDict(conv=conv3x3(3, stem_chs)))
        in_chs = stem_chs
        self.stages = nn.Sequential()
        for i, (depth, width) in enumerate(zip(layers, planes, strict=True)):
            blocks: list[PreActBlock] = []
            for j in range(depth):
                blocks.append(
                    block(
                        in_chs,
                        width,
                        stride=2 if i > 0 and j == 0 else 1,
                        # The paper's CIFAR nets activate conv1's output once, before it
                        # splits into the first unit's two paths; timm's ImageNet nets do not.
                        preact_shortcut=stem == "cifar" and i == 0 and j == 0,
                    )
                )
                in_chs = width * block.expansion
            self.stages.add_module(str(i), PreActStage(blocks))
        self.norm = NormAct(in_chs)
        self.embedding_dim = in_chs
        self.head = ClassifierHead(in_chs, num_classes)
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(layers)))

        for name, m in self.named_modules():
            if name == "head.fc":
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor, keep: tuple[str, ...] = ()) -> tuple[Tensor, list[Tensor]]:
        """A pre-activation stage ends on a residual sum, not an activation; the last stage's
        map is taken after the final BN-ReLU, the map the embedding pools (as timm's
        ``forward_intermediates(norm=True)``), so pooling it again gives the embedding.
        """
        x = self.stem(x)
        maps = []
        last = len(self.stages) - 1
        for i, (name, stage) in enumerate(zip(self.stage_names, self.stages, strict=True)):
            x = stage(x)
            if i == last:
                x = self.norm(x)
            if name in keep:
                maps.append(x)
        return self.pool(x), maps

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)


_IMAGENET_PLANES = (64, 128, 256, 512)
_CIFAR_PLANES = (16, 32, 64)


def resnetv2_50(**kwargs: Any) -> PreActResNet:
    return PreActResNet(PreActBottleneck, [3, 4, 6, 3], _IMAGENET_PLANES, **kwargs)


def resnetv2_101(**kwargs: Any) -> PreActResNet:
    return PreActResNet(PreActBottleneck, [3, 4, 23, 3], _IMAGENET_PLANES, **kwargs)


def _cifar(depth: int, bottleneck: bool, num_classes: int = 10) -> PreActResNet:
    # Depth counts the convolutions and the classifier: 6n+2 with basic units, 9n+2 with
    # bottlenecks, n units per stage.
    per_unit = 9 if bottleneck else 6
    if (depth - 2) % per_unit:
        raise ValueError(f"depth must be {per_unit}n+2, got {depth}")
    block = PaperBottleneck if bottleneck else PreActBasic
    n = (depth - 2) // per_unit
    return PreActResNet(block, [n] * 3, _CIFAR_PLANES, stem="cifar", num_classes=num_classes)


def preact_resnet110_cifar10(**kwargs: Any) -> PreActResNet:
    return _cifar(110, bottleneck=False, **kwargs)


def preact_resnet164_cifar10(**kwargs: Any) -> PreActResNet:
    return _cifar(164, bottleneck=True, **kwargs)


def preact_resnet1001_cifar10(**kwargs: Any) -> PreActResNet:
    return _cifar(1001, bottleneck=True, **kwargs)
