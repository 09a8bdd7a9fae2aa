"""Wide Residual Networks.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016. WRN-d-k has
(d-4)/6 pre-activation basic blocks per stage, widths 16k/32k/64k after a
16-channel stem conv. A 1x1 conv projection on the pre-activated input is the
shortcut where the shape changes, as in the authors' code.

No dropout: decoupled methods (features replay, for one) recompute a module's
forward pass to get its gradient, and dropout would draw a different mask on the
replay than on the original pass, so the two would disagree.
"""
from __future__ import annotations

import torch
from torch import nn

from dbench.registry import MODELS
from dbench.models.base import BlockModel, conv1x1, conv3x3, init_weights, preact_head


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3(stride), BN-ReLU-conv3x3, plus the shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.needs_projection = stride != 1 or in_ch != out_ch
        self.shortcut = conv1x1(in_ch, out_ch, stride) if self.needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = self.shortcut(pre) if self.needs_projection else x
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


def wide_resnet(depth: int, widen: int, num_classes: int, name: str) -> BlockModel:
    assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
    n = (depth - 4) // 6
    # Pre-activation: the stem is the bare conv; its BN-ReLU is the first block's.
    blocks: list[nn.Module] = [conv3x3(3, 16)]
    in_ch = 16
    for width, first_stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
        for i in range(n):
            blocks.append(WideBasicBlock(in_ch, width, first_stride if i == 0 else 1))
            in_ch = width
    blocks.append(preact_head(in_ch, num_classes))
    model = BlockModel(blocks, name)
    init_weights(model)
    return model


@MODELS.register("wrn28_10")
def wrn28_10(num_classes: int = 10) -> BlockModel:
    """WRN-28-10 (Zagoruyko & Komodakis 2016): 4 wide blocks per stage, widths 160/320/640, no dropout."""
    return wide_resnet(28, 10, num_classes, "wrn28_10")
