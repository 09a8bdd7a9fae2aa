"""The shape every dbench model has: a flat list of blocks.

Decoupled backpropagation methods split a network into stages at block
boundaries and give each stage its own update (local losses, delayed
gradients, replayed features). Keeping every model a flat ``nn.Sequential`` of
blocks makes those split points explicit and identical across methods.
"""
from __future__ import annotations

import torch
from torch import nn


class BlockModel(nn.Sequential):
    """A model whose children, in order, are its blocks.

    Calling it runs the blocks one after the other (``nn.Sequential``), so
    ``model(x)`` equals feeding ``x`` through ``model.blocks`` by hand.
    """

    def __init__(self, blocks: list[nn.Module], name: str, inputs: str = "image", context: int | None = None):
        super().__init__(*blocks)
        self.name = name
        # What the model reads, as a data set's ``kind`` says it ("image", "text"): the plan refuses a mismatch.
        self.inputs = inputs
        self.context = context  # the longest sequence a text model reads (its position table); None for images

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_weights(model: nn.Module) -> None:
    """Kaiming normal (fan_out, relu) for convs, BN to identity, linear layers left at the PyTorch default."""
    if any(p.is_meta for p in model.parameters()):
        # Meta tensors hold no values, and normal_() on one imports torch._dynamo
        # (~1.5 s), which would make describe() slow for no benefit.
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=False))


def pool_linear_head(in_ch: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))


def preact_head(in_ch: int, num_classes: int) -> nn.Sequential:
    """Final BN-ReLU of a pre-activation network, then pool and classify."""
    return nn.Sequential(
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_ch, num_classes),
    )


def describe(name: str) -> dict:
    """Name, parameter count, block count, inputs and context of a registered model, as it comes
    (its default number of classes: 10 for the image models, the 256 bytes for the language models).

    The model is built on the meta device, so no memory is allocated and no
    weights are initialised: describing even the largest model is cheap.
    """
    from dbench.registry import MODELS

    with torch.device("meta"):
        model = MODELS.get(name)()
    return {"name": name, "params": count_params(model), "blocks": len(model),
            "inputs": getattr(model, "inputs", "image"), "context": getattr(model, "context", None)}
