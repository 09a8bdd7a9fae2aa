"""Reversible ResNets (RevNets) as PETRA trains them, as flat blocks every method can train.

Gomez, Ren, Urtasun, Grosse, "The Reversible Residual Network", NeurIPS 2017, in the layout of PETRA's
released code (stephane-rivaud/PETRA, ``async_torch/models/models_RevNet.py``; docs/ALGORITHMS.md, "PETRA",
gives the layout with its lines). A block's input and output are one tensor holding two halves along the
channels, ``(x, x̃)``:

- a reversible block (``Reversible``): ``y = x̃ + F(x)``, ``ỹ = x``, output ``(y, ỹ)``; its input is
  recovered from its output by ``inverse``: ``x = ỹ``, ``x̃ = y − F(ỹ)`` (exact up to rounding, with the
  same weights and, for BatchNorm, the same statistics). Two consecutive blocks with F and G are RevNet's
  ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` up to the order of the halves.
- a downsampling block (``Downsampling``: the first of a stage whose width or resolution changes) is not
  reversible: PETRA keeps its input.
- the stem (conv with bias, BN, ReLU; the ImageNet stem: 7×7 stride 2 and a 2×2 max-pool) ends with the two
  halves; the head concatenates them (they are one tensor already), pools and classifies.

Every conv has a bias and every layer keeps torch's default initialisation, as the released code does.
Parameter counts, checked by tests against those the ALGORITHMS.md section counted from the code's tensors:
RevNet-18 (CIFAR stem, 10 classes) 11,185,802; RevNet-50 (ImageNet stem, 1000 classes) 30,421,608.
"""
from __future__ import annotations

import torch
from torch import nn

from dbench.models.base import BlockModel
from dbench.registry import MODELS


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=True)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, relu: bool = True) -> list[nn.Module]:
    return [_conv(in_ch, out_ch, kernel, stride), nn.BatchNorm2d(out_ch), *([nn.ReLU()] if relu else [])]


def basic_residual(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """F of a BasicBlock: conv3×3–BN–ReLU–conv3×3–BN–ReLU (a ReLU after the last BN, unlike ResNet's)."""
    return nn.Sequential(*_conv_bn(in_ch, out_ch, 3, stride), *_conv_bn(out_ch, out_ch, 3))


def bottleneck_residual(in_ch: int, hidden: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """F of a Bottleneck: conv1×1–BN–ReLU–conv3×3(stride)–BN–ReLU–conv1×1–BN–ReLU."""
    return nn.Sequential(*_conv_bn(in_ch, hidden, 1), *_conv_bn(hidden, hidden, 3, stride),
                         *_conv_bn(hidden, out_ch, 1))


class Reversible(nn.Module):
    """``(x, x̃) → (x̃ + F(x), x)``, with ``inverse``."""

    reversible = True

    def __init__(self, residual: nn.Module):
        super().__init__()
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, x_tilde = h.chunk(2, dim=1)
        return torch.cat([x_tilde + self.residual(x), x], dim=1)

    def inverse(self, out: torch.Tensor) -> torch.Tensor:
        """The input this block's output came from (the same weights; BatchNorm as in the forward)."""
        y, y_tilde = out.chunk(2, dim=1)
        return torch.cat([y_tilde, y - self.residual(y_tilde)], dim=1)

    def reconstruct(self, out: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The inverse and a recomputed forward in one evaluation of F, for a backward (RevNet's own).

        Returns ``((x, x̃), recomputed)``: the input's two halves, recovered from ``out`` as in
        :meth:`inverse` and made leaves that need a gradient (the input is their concatenation along the
        channels), and ``x̃ + F(x), x`` computed from them with a graph. F is evaluated once, on
        ``x = ỹ``, where :meth:`inverse` and then the forward would evaluate it twice on the same values,
        so the halves, the output's graph and every gradient through it are the same numbers.
        """
        y, x = out.detach().chunk(2, dim=1)
        x.requires_grad_()  # a view of ``out``, laid out as the forward's x was in its input
        f = self.residual(x)
        x_tilde = (y - f.detach()).requires_grad_()
        return (x, x_tilde), torch.cat([x_tilde + f, x], dim=1)


class Downsampling(nn.Module):
    """The first block of a stage that changes width or resolution: not reversible.

    BasicBlock: ``h = F1(x)`` (conv3×3 stride s–BN–ReLU), ``y = F2(h) + BN(conv1×1_s(x̃))``, ``ỹ = h``.
    Bottleneck: ``y = F(x) + BN(conv1×1_s(x̃))``, ``ỹ = BN(conv1×1_s(x))`` (two separate 1×1 convs).
    """

    reversible = False

    def __init__(self, in_ch: int, out_ch: int, stride: int, hidden: int | None = None):
        super().__init__()
        self.bottleneck = hidden is not None
        if self.bottleneck:
            self.residual = bottleneck_residual(in_ch, hidden, out_ch, stride)
            self.carry = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride, relu=False))
        else:
            self.first = nn.Sequential(*_conv_bn(in_ch, out_ch, 3, stride))
            self.second = nn.Sequential(*_conv_bn(out_ch, out_ch, 3))
        self.shortcut = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride, relu=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, x_tilde = h.chunk(2, dim=1)
        if self.bottleneck:
            return torch.cat([self.residual(x) + self.shortcut(x_tilde), self.carry(x)], dim=1)
        inner = self.first(x)
        return torch.cat([self.second(inner) + self.shortcut(x_tilde), inner], dim=1)


def stem(width: int, imagenet: bool) -> nn.Sequential:
    """To the two halves of ``width`` channels each: conv (3×3, or 7×7 stride 2 then a 2×2 max-pool)."""
    if imagenet:
        return nn.Sequential(*_conv_bn(3, 2 * width, 7, 2), nn.MaxPool2d(2, 2))
    return nn.Sequential(*_conv_bn(3, 2 * width, 3))


def head(width: int, num_classes: int) -> nn.Sequential:
    """The halves together (one tensor already), global average pool, linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def revnet(stages: list[int], widths: list[int], num_classes: int, name: str, *, bottleneck: bool = False,
           imagenet: bool = False, stem_width: int = 64) -> BlockModel:
    """A RevNet of ``stages[i]`` blocks at half-width ``widths[i]`` (a Bottleneck's hidden width; its output is
    4×). A stage's first block downsamples (stride 2, stride 1 for the first stage) where the width or the
    resolution changes, as PETRA's ``make_layers_revnet*`` lay them out."""
    blocks: list[nn.Module] = [stem(stem_width, imagenet)]
    in_ch = stem_width
    for i, (count, width) in enumerate(zip(stages, widths)):
        out_ch = 4 * width if bottleneck else width
        stride = 1 if i == 0 else 2
        for j in range(count):
            if j == 0 and (stride != 1 or in_ch != out_ch):
                blocks.append(Downsampling(in_ch, out_ch, stride, hidden=width if bottleneck else None))
            elif bottleneck:
                blocks.append(Reversible(bottleneck_residual(out_ch, width, out_ch)))
            else:
                blocks.append(Reversible(basic_residual(out_ch, out_ch)))
            in_ch = out_ch
    blocks.append(head(in_ch, num_classes))
    return BlockModel(blocks, name)


@MODELS.register("revnet18")
def revnet18(num_classes: int = 10) -> BlockModel:
    """RevNet-18 (PETRA's layout, CIFAR stem): BasicBlocks [2, 2, 2, 2] at half-widths 64-512; 11.2M parameters."""
    return revnet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, "revnet18")


@MODELS.register("revnet34")
def revnet34(num_classes: int = 10) -> BlockModel:
    """RevNet-34 (PETRA's layout, CIFAR stem): BasicBlocks [3, 4, 6, 3] at half-widths 64-512."""
    return revnet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, "revnet34")


@MODELS.register("revnet50")
def revnet50(num_classes: int = 10) -> BlockModel:
    """RevNet-50 (PETRA's layout, CIFAR stem): Bottlenecks [3, 4, 6, 3], hidden 64-512, output 256-2048."""
    return revnet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, "revnet50", bottleneck=True)


@MODELS.register("revnet14")
def revnet14(num_classes: int = 10) -> BlockModel:
    """A CIFAR RevNet as small as resnet20, for tests: BasicBlocks [2, 2, 2] at half-widths 16, 32, 64."""
    return revnet([2, 2, 2], [16, 32, 64], num_classes, "revnet14", stem_width=16)
