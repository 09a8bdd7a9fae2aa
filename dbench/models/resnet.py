"""ImageNet ResNets adapted to 32x32 inputs.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(the ImageNet architectures of table 1), with the stem changed for CIFAR as in
the widely used kuangliu/pytorch-cifar adaptation: a 3x3 stride-1 conv with 64
channels and no max pool, so the four stages (64/128/256/512 channels, strides
1, 2, 2, 2) see 32, 16, 8 and 4 pixel feature maps. Shortcuts are 1x1 conv + BN
projections where the shape changes, identities elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn

from dbench.registry import MODELS
from dbench.models.base import BlockModel, conv1x1, conv3x3, conv_bn_relu, init_weights, pool_linear_head
from dbench.models.resnet_cifar import BasicBlock, projection


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = projection(in_ch, out_ch, stride)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def imagenet_resnet(bottleneck: bool, stage_sizes: tuple[int, ...], num_classes: int, name: str) -> BlockModel:
    expansion = Bottleneck.expansion if bottleneck else 1
    blocks: list[nn.Module] = [conv_bn_relu(3, 64)]
    in_ch = 64
    for planes, first_stride, size in zip((64, 128, 256, 512), (1, 2, 2, 2), stage_sizes):
        for i in range(size):
            stride = first_stride if i == 0 else 1
            if bottleneck:
                blocks.append(Bottleneck(in_ch, planes, stride))
            else:
                blocks.append(BasicBlock(in_ch, planes, stride))
            in_ch = planes * expansion
    blocks.append(pool_linear_head(in_ch, num_classes))
    model = BlockModel(blocks, name)
    init_weights(model)
    return model


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10) -> BlockModel:
    """ResNet-18 (He et al. 2016), CIFAR stem: basic blocks 2-2-2-2."""
    return imagenet_resnet(False, (2, 2, 2, 2), num_classes, "resnet18")


@MODELS.register("resnet34")
def resnet34(num_classes: int = 10) -> BlockModel:
    """ResNet-34 (He et al. 2016), CIFAR stem: basic blocks 3-4-6-3."""
    return imagenet_resnet(False, (3, 4, 6, 3), num_classes, "resnet34")


@MODELS.register("resnet50")
def resnet50(num_classes: int = 10) -> BlockModel:
    """ResNet-50 (He et al. 2016), CIFAR stem: bottleneck blocks 3-4-6-3."""
    return imagenet_resnet(True, (3, 4, 6, 3), num_classes, "resnet50")


@MODELS.register("resnet101")
def resnet101(num_classes: int = 10) -> BlockModel:
    """ResNet-101 (He et al. 2016), CIFAR stem: bottleneck blocks 3-4-23-3."""
    return imagenet_resnet(True, (3, 4, 23, 3), num_classes, "resnet101")


@MODELS.register("resnet152")
def resnet152(num_classes: int = 10) -> BlockModel:
    """ResNet-152 (He et al. 2016), CIFAR stem: bottleneck blocks 3-8-36-3."""
    return imagenet_resnet(True, (3, 8, 36, 3), num_classes, "resnet152")
