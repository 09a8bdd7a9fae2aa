"""CIFAR ResNets.

``resnet8`` .. ``resnet110``: He, Zhang, Ren, Sun, "Deep Residual Learning for
Image Recognition", CVPR 2016, section 4.2: three stages of n basic blocks with
16/32/64 channels, depth 6n+2. Where a block changes shape the shortcut is a
1x1 conv + BN projection (the paper's option B); everywhere else it is the
identity. Option B adds ~2.8k parameters over the paper's option A counts.

``resnet164``: He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual
Networks", ECCV 2016: pre-activation bottleneck blocks, 18 per stage, bottleneck
widths 16/32/64 with expansion 4, projection shortcut where the shape changes.
"""
from __future__ import annotations

import torch
from torch import nn

from dbench.registry import MODELS
from dbench.models.base import (
    BlockModel,
    conv1x1,
    conv3x3,
    conv_bn_relu,
    init_weights,
    pool_linear_head,
    preact_head,
)


def projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = projection(in_ch, out_ch, stride)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1, plus the shortcut.

    A projection shortcut takes the pre-activated input, as in the paper; an
    identity shortcut takes the raw input.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv1x1(in_ch, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.needs_projection = stride != 1 or in_ch != out_ch
        self.shortcut = conv1x1(in_ch, out_ch, stride) if self.needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = self.shortcut(pre) if self.needs_projection else x
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


def cifar_resnet(depth: int, num_classes: int, name: str) -> BlockModel:
    assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
    n = (depth - 2) // 6
    blocks: list[nn.Module] = [conv_bn_relu(3, 16)]
    in_ch = 16
    for width, first_stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            blocks.append(BasicBlock(in_ch, width, first_stride if i == 0 else 1))
            in_ch = width
    blocks.append(pool_linear_head(in_ch, num_classes))
    model = BlockModel(blocks, name)
    init_weights(model)
    return model


def preact_bottleneck_resnet(depth: int, num_classes: int, name: str) -> BlockModel:
    assert (depth - 2) % 9 == 0, "pre-activation bottleneck ResNet depth must be 9n+2"
    n = (depth - 2) // 9
    # Pre-activation: the stem is the bare conv; its BN-ReLU is the first block's.
    blocks: list[nn.Module] = [conv3x3(3, 16)]
    in_ch = 16
    for planes, first_stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            blocks.append(PreActBottleneck(in_ch, planes, first_stride if i == 0 else 1))
            in_ch = planes * PreActBottleneck.expansion
    blocks.append(preact_head(in_ch, num_classes))
    model = BlockModel(blocks, name)
    init_weights(model)
    return model


@MODELS.register("resnet8")
def resnet8(num_classes: int = 10) -> BlockModel:
    """CIFAR ResNet-8 (He et al. 2016): 1 basic block per stage."""
    return cifar_resnet(8, num_classes, "resnet8")


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10) -> BlockModel:
    """CIFAR ResNet-20 (He et al. 2016): 3 basic blocks per stage."""
    return cifar_resnet(20, num_classes, "resnet20")


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10) -> BlockModel:
    """CIFAR ResNet-32 (He et al. 2016): 5 basic blocks per stage."""
    return cifar_resnet(32, num_classes, "resnet32")


@MODELS.register("resnet44")
def resnet44(num_classes: int = 10) -> BlockModel:
    """CIFAR ResNet-44 (He et al. 2016): 7 basic blocks per stage."""
    return cifar_resnet(44, num_classes, "resnet44")


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10) -> BlockModel:
    """CIFAR ResNet-56 (He et al. 2016): 9 basic blocks per stage."""
    return cifar_resnet(56, num_classes, "resnet56")


@MODELS.register("resnet110")
def resnet110(num_classes: int = 10) -> BlockModel:
    """CIFAR ResNet-110 (He et al. 2016): 18 basic blocks per stage."""
    return cifar_resnet(110, num_classes, "resnet110")


@MODELS.register("resnet164")
def resnet164(num_classes: int = 10) -> BlockModel:
    """Pre-activation bottleneck ResNet-164 (He et al., "Identity Mappings", 2016)."""
    return preact_bottleneck_resnet(164, num_classes, "resnet164")
