"""DNI and cDNI: decoupled neural interfaces with synthetic gradients (Jaderberg et al., ICML 2017)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dbench.config import MAX_SEED
from dbench.errors import DbenchError
from dbench.method import DOWN, SYNTHETIC_GRADIENT, UNLOCKED, UP, Recv, Send, SideModel, Stage, StepProgram
from dbench.objective import SEQUENCE_RANK, label_shape
from dbench.method_tools import SynthBatchNorm1d, SynthBatchNorm2d
from dbench.registry import METHODS

SYNTH = "synthesizer"  # the side model's name
SCALE_DECAY = 0.9  # of the running RMS of synthesizer targets: adapts within ~10 steps


@dataclass(frozen=True)
class SynthOptions:
    """Options of the synthetic-gradient models."""

    hidden: int = field(default=64, metadata={"help": "channels (conv features) or units (flat features) of each hidden layer"})
    layers: int = field(default=2, metadata={"help": "hidden layers of the synthesizer"})
    synth_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the synthesizers"})
    synth_seed: int = field(default=0, metadata={"help": "seed of the synthesizers' initial weights"})
    normalize: bool = field(default=True, metadata={
        "help": "regress targets scaled by their running RMS (dbench's variant); false: the paper's plain regression"})

    def validate(self) -> None:
        if self.hidden < 1:
            raise DbenchError(f"bad hidden {self.hidden}: must be >= 1")
        if self.layers < 0:
            raise DbenchError(f"bad layers {self.layers}: must be >= 0")
        if not (self.synth_lr > 0 and math.isfinite(self.synth_lr)):
            raise DbenchError(f"bad synth_lr {self.synth_lr}: must be a finite number > 0")
        if not 0 <= self.synth_seed <= MAX_SEED:
            raise DbenchError(f"bad synth_seed {self.synth_seed}: must be >= 0 and at most {MAX_SEED}")


class Synthesizer(nn.Module):
    """Predicts the error gradient at a module's output from that output (and, for cDNI, the labels).

    Conv features (N, C, H, W): ``layers`` resolution-preserving conv3x3-BN-ReLU
    layers, then a conv3x3 back to C channels; flat features (N, F): the same
    with linear layers. Sequence features (N, T, F), a transformer's residual
    stream: the flat synthesizer on each position's features, every position
    a sample of its own (so BatchNorm's statistics are over N·T tokens); with
    labels, each position reads its own label (for a language model: the next
    token). The last layer starts at zero, so the first synthetic
    gradient is exactly 0. With labels, the one-hot vector is appended as
    constant channels (or units). It is built in the dtype of the module's
    output (``Stage.side``). A batch with one value per channel (one sample of
    flat or 1x1 features) is normalized with the running statistics (see
    ``_SingleValueSafe``).
    """

    def __init__(self, shape: tuple[int, ...], hidden: int, layers: int, num_classes: int = 0):
        super().__init__()
        self.shape = tuple(shape)
        self.num_classes = num_classes
        conv = len(self.shape) == 3
        self.sequence = len(self.shape) == SEQUENCE_RANK
        channels = self.shape[-1] if self.sequence else self.shape[0]
        widths = [channels + num_classes] + [hidden] * layers
        body: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            if conv:
                body += [nn.Conv2d(a, b, 3, padding=1, bias=False), SynthBatchNorm2d(b), nn.ReLU()]
            else:
                body += [nn.Linear(a, b, bias=False), SynthBatchNorm1d(b), nn.ReLU()]
        last = nn.Conv2d(widths[-1], channels, 3, padding=1) if conv else nn.Linear(widths[-1], channels)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*body, last)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.sequence:  # every position on its own, as a flat sample
            b, t = h.shape[:2]
            flat = self.flat(h.reshape(b * t, -1), y.reshape(b * t) if y is not None else None)
            return flat.view(h.shape)
        return self.flat(h, y)

    def flat(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.num_classes:
            onehot = F.one_hot(y, self.num_classes).to(h.dtype)
            if h.dim() == 4:
                onehot = onehot[:, :, None, None].expand(-1, -1, *h.shape[2:])
            h = torch.cat([h, onehot], dim=1)
        return self.net(h)


@METHODS.register("dni")
class SyntheticGradients(Stage):
    """Module k < K updates at once with a predicted gradient ``δ̂_k = M_k(h_k)``.

    Forward stays sequential; the update is unlocked: module k backpropagates
    ``δ̂_k`` through its own graph, sends the resulting gradient at its input
    down (the regression target of module k-1's synthesizer: bootstrapping),
    and updates without waiting. Then it receives the gradient that module k+1
    produced at its input for this batch (the true error when k+1 is the top
    module, else k+1's synthetic gradient backpropagated through it) and
    trains ``M_k`` to regress it: ``mean((δ̂_k − target)²)``. The target
    arrives as a value (messages carry no graph), so it is detached.

    Scale: true error gradients are tiny (about 1e-6 per element for a batch
    mean loss) and their size drifts during training, while the synthesizer's
    Adam steps have a fixed size. So ``M_k`` regresses the *normalized* target
    ``target / s_k`` and ``δ̂_k = s_k · M_k(h_k)``, where ``s_k`` is a running
    RMS of the targets module k has received (an exponential average with
    factor 0.9, set by the first non-zero target, saved with the run). ``s_k`` is a
    scalar, so the prediction is still a regression of ``δ_k``; without it,
    the first Adam steps made ``δ̂`` five times larger than the true gradient
    and uncorrelated with it, and DNI at K=4 did not learn at all. This
    scaling is dbench's documented variant (option ``normalize``, on by
    default); ``normalize=false`` is the paper's plain regression exactly:
    ``δ̂_k = M_k(h_k)`` trained on ``mean((δ̂_k − target)²)``. The
    synthesizers are trained with Adam (``synth_lr``, constant), and their
    parameters, compute and memory are DNI's own.
    """

    name = "dni"
    summary = "synthetic gradients: update at once with a learned gradient predictor per module"
    family = SYNTHETIC_GRADIENT
    table_order = 3
    locking = UNLOCKED  # update unlocked; the synthesizers' cost leaves the ideal without a closed form
    Options = SynthOptions
    conditioned = False

    @classmethod
    def boundary_step(cls, output_shape: tuple[int, ...], device: torch.device, options: SynthOptions,
                      num_classes: int | None) -> Callable[[], None]:
        """One synthesizer step (forward, regression backward, Adam) at a module output of this shape."""
        classes = num_classes if cls.conditioned else 0
        # Profiling must not move the global generator: a run's numbers may not depend on its --split.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            synth = Synthesizer(tuple(output_shape[1:]), options.hidden, options.layers, classes).to(device)
            h, target = (torch.randn(output_shape).to(device) for _ in range(2))
            y = torch.randint(0, max(classes, 1), label_shape(output_shape)).to(device)
        optimizer = torch.optim.Adam(synth.parameters(), lr=options.synth_lr)

        def synth_step() -> None:
            loss = F.mse_loss(synth(h, y if classes else None), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return synth_step

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.conditioned and not self.num_classes:
            raise DbenchError(f"method {self.name!r} reads the labels: give the trainer num_classes")
        o = self.options
        classes = self.num_classes if self.conditioned else 0
        # Built at the first step, when the output shape is known (see Stage.side).
        self.declare_side(SYNTH, SideModel(
            build=lambda shape: Synthesizer(shape, o.hidden, o.layers, classes),
            optimizer=lambda params: torch.optim.Adam(params, lr=o.synth_lr),
            seed=o.synth_seed * 1000 + self.index,
            category="synthesizer",
        ))
        self.synth_loss: torch.Tensor | None = None  # last regression loss (detached), for inspection
        self.target_scale = torch.zeros((), device=self.device)  # s_k: running RMS of the targets

    @property
    def synth(self) -> Synthesizer | None:
        """This module's synthesizer, once the first step has built it."""
        return self.built_side(SYNTH)

    def synthesize(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``M_k(h)`` (or ``M_k(h, y)``) in normalized units, with a graph into the synthesizer."""
        return self.side(SYNTH, h)(h, y if self.conditioned else None)

    def predict_gradient(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """δ̂ for output ``h`` of a batch with labels ``y``."""
        return self.synthesize(h, y) * self.gain()

    def gain(self) -> torch.Tensor:
        """s_k, what the synthesizer's raw output is multiplied by: the targets' running RMS, or 1 unnormalized."""
        return self.target_scale if self.options.normalize else torch.ones_like(self.target_scale)

    def train_step(self, t, x, y) -> StepProgram:
        if self.is_last:
            return (yield from self.top_step(t, x, y))
        x = yield from self.receive_input(x, t=t)
        out = self.module(x)
        yield Send(UP, out, (t,))
        raw = self.synthesize(out.detach(), y)
        self.backward(out, (raw * self.gain()).detach())  # δ̂_k
        if not self.is_first:
            yield Send(DOWN, x.grad, (t,))  # module k-1's synthesizer target
        yield from self.apply_update()  # unlocked: no waiting for the modules above
        target = yield Recv(DOWN, expect=(t,))  # what module k+1 produced at its input for this batch
        if self.options.normalize:
            rms = target.pow(2).mean().sqrt()
            first = self.target_scale == 0
            self.target_scale = torch.where(first, rms, SCALE_DECAY * self.target_scale + (1 - SCALE_DECAY) * rms)
            # An all-zero target (the first bootstrapped ones are) leaves s_k at 0: divide by 1 then.
            unit = torch.where(self.target_scale > 0, self.target_scale, torch.ones_like(self.target_scale))
            loss = F.mse_loss(raw, target / unit)  # normalized units, see the class docstring
        else:
            loss = F.mse_loss(raw, target)  # the paper's ||δ̂ − target||², mean over elements
        self.side_optimizer(SYNTH).zero_grad(set_to_none=True)
        self.backward(loss)
        yield from self.side_update(SYNTH)  # averaged over the replicas, as every side model (ALGORITHMS.md)
        self.synth_loss = loss.detach()
        return None

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        held = super().held_tensors()  # the synthesizer with its gradients and Adam state
        if self.synth is not None:  # s_k belongs to the synthesizer (the top module builds none)
            held["synthesizer"].append(self.target_scale)
        return held

    def state_dict(self) -> dict:
        return {**super().state_dict(), "target_scale": self.target_scale}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.target_scale = state["target_scale"].to(self.device)


@METHODS.register("cdni")
class ConditionedSyntheticGradients(SyntheticGradients):
    """cDNI: DNI whose synthesizers also read the labels, one-hot, ``δ̂_k = M_k(h_k, y)``."""

    name = "cdni"
    summary = "conditional synthetic gradients: like dni, the predictor also reads the labels"
    table_order = 4
    conditioned = True
