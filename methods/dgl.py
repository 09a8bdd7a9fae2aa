"""DGL: decoupled greedy learning with local losses (Belilovsky, Eickenberg, Oyallon, ICML 2020)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from dbench.config import MAX_SEED
from dbench.errors import DbenchError
from dbench.method import LOCAL_LOSS, UNLOCKED, UP, Send, SideModel, Stage, StepProgram
from dbench.objective import SEQUENCE_RANK, cross_entropy, label_shape
from dbench.optim import OptimConfig
from dbench.registry import METHODS
# BatchNorm that normalizes a batch of one value per channel with its running statistics (a batch of one
# sample reaching the head's MLP); any larger batch exactly as nn.BatchNorm. See methods/dni.py.
from dbench.method_tools import SynthBatchNorm1d, SynthBatchNorm2d

HEAD = "head"  # the side model's name
HEAD_SHAPE = ("width", "depth", "pooled", "mlp")  # the options that shape an image model's head
REDUCE = 4  # the head's first pool divides each spatial side by this (rounded up), as the released code


@dataclass(frozen=True)
class HeadOptions:
    """Options of the auxiliary heads (defaults: the released code's CIFAR head, its "mlp-sr" type)."""

    width: int | None = field(default=None, metadata={
        "help": "channels of the 1x1 convolutions (units for flat features); none: the module's output channels"})
    depth: int = field(default=3, metadata={"help": "1x1 convolution layers (conv-BN-ReLU) of each head"})
    pooled: int = field(default=2, metadata={"help": "side of the average pool before the head's linear layers"})
    mlp: int = field(default=3, metadata={"help": "hidden linear layers (linear-BN-ReLU) before the head's output layer"})
    aux_seed: int = field(default=0, metadata={"help": "seed of the heads' initial weights"})

    def validate(self) -> None:
        if self.width is not None and self.width < 1:
            raise DbenchError(f"bad width {self.width}: must be >= 1 (or none: the module's output channels)")
        if self.depth < 0:
            raise DbenchError(f"bad depth {self.depth}: must be >= 0")
        if self.pooled < 1:
            raise DbenchError(f"bad pooled {self.pooled}: must be >= 1")
        if self.mlp < 0:
            raise DbenchError(f"bad mlp {self.mlp}: must be >= 0")
        if not 0 <= self.aux_seed <= MAX_SEED:
            raise DbenchError(f"bad aux_seed {self.aux_seed}: must be >= 0 and at most {MAX_SEED}")


class AuxiliaryHead(nn.Module):
    """``A_k``: class scores from a module's output.

    Conv features (N, C, H, W): an average pool to ``ceil(H/4) x ceil(W/4)``,
    ``depth`` 1x1 conv (no bias)-BN-ReLU layers of ``width`` channels, an
    average pool to ``pooled x pooled`` (never pooled up: a smaller map keeps
    its size), then ``mlp`` linear-BN-ReLU layers as wide as the flattened
    pool, and a linear layer to the classes; without hidden linear layers a
    BatchNorm comes between the pool and that linear layer. Flat features
    (N, F): the same without the pools (a 1x1 convolution on one pixel is a
    linear layer): ``depth`` linear (no bias)-BN-ReLU layers of ``width``
    units, ``mlp`` linear-BN-ReLU layers, the output layer. ``width`` None is
    the number of channels (features) of the module's output, as in the
    released code. Its BatchNorm layers normalize a batch with one value per
    channel (one sample of flat features, an epoch's last batch) with their
    running statistics, as DNI's synthesizers do; any other batch exactly as
    ``nn.BatchNorm``. Sequence features (N, T, F), a transformer's residual
    stream: a LayerNorm and a linear layer to the classes (the vocabulary) at
    every position, the shape of a language model's own head.
    """

    def __init__(self, shape: tuple[int, ...], num_classes: int, width: int | None, depth: int, pooled: int,
                 mlp: int):
        super().__init__()
        if len(shape) == SEQUENCE_RANK:
            # A transformer's residual stream (positions, width): per token, the shape of the model's own head,
            # a LayerNorm and a linear map to the vocabulary. The conv head's options do not apply (see check_model).
            self.net = nn.Sequential(nn.LayerNorm(shape[-1]), nn.Linear(shape[-1], num_classes))
            return
        if len(shape) not in (1, 3):
            raise DbenchError(f"method 'dgl' puts an auxiliary head on (channels, height, width), flat or "
                              f"(positions, width) features; a module's output has shape {tuple(shape)} per sample")
        channels = shape[0]
        width = width if width is not None else channels
        conv = len(shape) == 3
        layers: list[nn.Module] = []
        features = channels
        if conv:
            h, w = (math.ceil(s / REDUCE) for s in shape[1:])
            layers.append(nn.AdaptiveAvgPool2d((h, w)))
        for _ in range(depth):
            if conv:
                layers += [nn.Conv2d(features, width, 1, bias=False), SynthBatchNorm2d(width), nn.ReLU()]
            else:
                layers += [nn.Linear(features, width, bias=False), SynthBatchNorm1d(width), nn.ReLU()]
            features = width
        if conv:
            side = (min(pooled, h), min(pooled, w))
            layers.append(nn.AdaptiveAvgPool2d(side))
            if mlp == 0:
                layers.append(SynthBatchNorm2d(features))
            layers.append(nn.Flatten())
            features *= side[0] * side[1]
        elif mlp == 0:
            layers.append(SynthBatchNorm1d(features))
        for _ in range(mlp):
            layers += [nn.Linear(features, features), SynthBatchNorm1d(features), nn.ReLU()]
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def make_head(shape: tuple[int, ...], num_classes: int, options: HeadOptions) -> AuxiliaryHead:
    return AuxiliaryHead(shape, num_classes, options.width, options.depth, options.pooled, options.mlp)


@METHODS.register("dgl")
class DecoupledGreedy(Stage):
    """Module k < K learns from its own local loss ``f(A_k(h_k), y)``; no gradient crosses a module boundary.

    Iteration t at module k < K: receive ``h_{k-1}^t`` as a value (no gradient
    at the input), forward, send ``h_k^t`` up (computed before this step's
    update), compute the local loss through the auxiliary head ``A_k`` with
    the labels ``y^t``, backward (into the head and the module), update both.
    The top module trains on the true loss and sends nothing down: no message
    ever goes down. ``A_k`` is ``AuxiliaryHead``, built at the first step from
    ``aux_seed`` and k, in the dtype of ``h_k``; its parameters, gradients,
    SGD state and BatchNorm statistics are counted under "auxiliary_head".

    The head has its own SGD optimizer with the run's settings (lr, momentum,
    weight decay, Nesterov), and ``set_lr`` moves its lr with the module's, so
    it follows the schedule. This is ALGORITHMS.md's "one optimizer per module
    covering its head" in numbers: torch's SGD updates
    each parameter on its own, so two optimizers with equal settings step
    exactly as one with two parameter groups. Kept apart because the module's
    optimizer is what the meters read as the network's: its state is counted
    as "optimizer" memory, and its parameters are the weights ``w_k`` whose
    gradient ``g_k`` is σ's; the head belongs to neither.

    Where it differs from the released code (eugenium/DGL):
    - Its CIFAR head ("mlp-sr", ``auxillary_classifier2``) pools up to 2x2
      whatever the map's size; dbench never pools up (a map smaller than
      ``pooled`` keeps its size). Flat features (a cut after a Flatten) get
      the linear equivalent described in ``AuxiliaryHead``, which the released
      code has no case for.
    - Its ResNet script (``ddg_comparison``) recreates the optimizers at each
      lr decay, dropping their momentum; dbench keeps one optimizer per module
      and head throughout and only changes the lr.
    - Its layer-wise CIFAR script trains the last module through one more
      auxiliary net; dbench's top module is the model's own top (its
      classifier) on the true loss, as ALGORITHMS.md says and as the released
      ResNet script does.
    - It runs the modules one after another in one process; dbench runs them
      as stages that exchange activations only, which gives the same numbers.
    """

    name = "dgl"
    summary = "decoupled greedy learning: each module trains on a local loss through its own auxiliary head"
    family = LOCAL_LOSS
    table_order = 7
    locking = UNLOCKED  # every module updates from its own loss; the heads' cost leaves no closed form
    Options = HeadOptions

    @classmethod
    def boundary_step(cls, output_shape: tuple[int, ...], device: torch.device, options: HeadOptions,
                      num_classes: int | None) -> Callable[[], None]:
        """One head step (forward, backward to the head's input, SGD update) at an output of this shape.

        The SGD update has momentum and weight decay (dbench's defaults): the most a head step costs.
        """
        if not num_classes:
            raise DbenchError("method 'dgl' trains a classifier head per module: it needs the number of classes")
        # Profiling must not move the global generator: a run's numbers may not depend on its --split.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            head = make_head(tuple(output_shape[1:]), num_classes, options).to(device)
            h = torch.randn(output_shape).to(device).requires_grad_()
            y = torch.randint(0, num_classes, label_shape(output_shape)).to(device)
        optimizer = OptimConfig().make(head.parameters())

        def head_step() -> None:
            loss = cross_entropy(head(h), y)
            optimizer.zero_grad(set_to_none=True)
            h.grad = None
            loss.backward()  # also the gradient at the head's input, which the module's backward then takes
            optimizer.step()

        return head_step

    @classmethod
    def check_model(cls, options: HeadOptions, model: dict) -> None:
        if model["inputs"] != "text":
            return
        shaped = {name: getattr(options, name) for name in HEAD_SHAPE
                  if getattr(options, name) != getattr(HeadOptions(), name)}
        if shaped:
            given = ", ".join(f"{k}={v}" for k, v in shaped.items())
            raise DbenchError(f"option(s) {given} of 'dgl' shape the conv head of an image model; on "
                              f"{model['name']} every head is a LayerNorm and a linear map to the vocabulary per "
                              f"token: drop them")

    def __init__(self, index: int, num_stages: int, module: nn.Module, device: torch.device, optim: OptimConfig,
                 loss_fn: nn.Module, options: HeadOptions | None = None, num_classes: int | None = None):
        super().__init__(index, num_stages, module, device, optim, loss_fn, options, num_classes)
        if not self.is_last and not self.num_classes:
            raise DbenchError(f"method {self.name!r} trains a classifier head on every module below the top: "
                              f"give the trainer num_classes")
        o = self.options
        self.optim = optim  # the run's SGD settings, for the head's optimizer
        # Declared by every module, as DNI's synthesizers, so every module reports the category (the top builds none).
        self.declare_side(HEAD, SideModel(
            build=lambda shape: make_head(shape, self.num_classes, o),
            optimizer=self._head_optimizer,
            seed=o.aux_seed * 1000 + self.index,
            category="auxiliary_head",
        ))
        self.local_loss: torch.Tensor | None = None  # last local loss (detached), for inspection

    def _head_optimizer(self, parameters) -> torch.optim.Optimizer:
        optimizer = self.optim.make(parameters)
        # The head is built at the first step, after the run has set that step's lr on the module's optimizer.
        for group in optimizer.param_groups:
            group["lr"] = self.optimizer.param_groups[0]["lr"]
        return optimizer

    @property
    def head(self) -> AuxiliaryHead | None:
        """This module's auxiliary head, once the first step has built it."""
        return self.built_side(HEAD)

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        if self.head is not None:  # the head follows the run's schedule
            for group in self.side_optimizer(HEAD).param_groups:
                group["lr"] = lr

    def train_step(self, t, x, y) -> StepProgram:
        if self.is_last:
            return (yield from self.top_step(t, x, y, teach=None))  # the true loss; nothing goes down
        x = yield from self.receive_input(x, needs_grad=False, t=t)  # a value: no gradient crosses the boundary
        out = self.module(x)
        yield Send(UP, out, (t,))  # h_k^t, before this step's update
        loss = self.weighted(self.loss_fn(self.side(HEAD, out)(out), y))  # f(A_k(h_k^t), y^t)
        self.backward(loss)
        yield from self.apply_update()
        yield from self.side_update(HEAD)
        self.local_loss = self.share(loss)
        return None
