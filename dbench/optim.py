"""Optimizer settings and the learning-rate schedule, shared by every method."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from dbench.errors import DbenchError

if TYPE_CHECKING:  # torch is imported where an optimizer is made: the CLI reads settings from here
    import torch

SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
ADAMW_BETA2 = 0.95  # GPT-2/nanoGPT's choice for transformers; β1 is --momentum


@dataclass(frozen=True)
class OptimConfig:
    """One optimizer per module with these settings: SGD as the papers use it, or AdamW (transformers).

    ``adamw``: torch's AdamW with betas ``(momentum, 0.95)``: the momentum is
    Adam's first-moment decay β1 (both are the decay of an exponential average
    of gradients), and weight decay is decoupled (AdamW's), where SGD's is an
    L2 term added to the gradient. Nesterov applies to SGD only.
    """

    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    name: str = "sgd"

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise DbenchError(f"unknown optimizer {self.name!r}; known: {', '.join(OPTIMIZERS)}")
        if self.nesterov and self.name != "sgd":
            raise DbenchError(f"--nesterov applies to sgd only, not --optimizer {self.name}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DbenchError(f"bad learning rate {self.lr}: must be a finite number > 0")
        if not 0 <= self.momentum < 1:
            raise DbenchError(f"bad momentum {self.momentum}: must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise DbenchError("--nesterov needs a momentum > 0 (got momentum 0)")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise DbenchError(f"bad weight decay {self.weight_decay}: must be a finite number >= 0")

    def make(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        import torch

        if self.name == "adamw":
            # The same explicit single group as SGD's below, for the same reason; foreach as torch chooses.
            return torch.optim.AdamW([{"params": list(params)}], lr=self.lr, betas=(self.momentum, ADAMW_BETA2),
                                     weight_decay=self.weight_decay)

        # foreach: torch's own choice, as a plain training loop gets it: a
        # per-tensor loop on the CPU, the multi-tensor update on CUDA (a quarter
        # of a ResNet step there was the per-tensor loop's kernel launches).
        # Either way each element gets the same arithmetic whatever list it is
        # in, so K modules give the unsplit model's numbers bit for bit (tested
        # on the CPU, and on CUDA in test_gpu.py).
        # One explicit parameter group: torch makes exactly this group from a
        # list of parameters, but refuses an empty list, and a module without
        # parameters (nn.Flatten, a pooling stage) is a valid module whose
        # optimizer has nothing to update. An empty group steps, saves and loads.
        return torch.optim.SGD(
            [{"params": list(params)}],
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
        )


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the global iteration.

    ``step``: multiply by ``gamma`` at each milestone epoch (the papers' ÷10 at
    150 and 225 of 300). ``cosine``: half a cosine from ``lr`` to 0 over the run,
    evaluated every iteration. ``constant``: ``lr`` throughout.
    """

    kind: str
    lr: float
    epochs: int
    steps_per_epoch: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def validate(self) -> None:
        if self.kind not in SCHEDULES:
            raise DbenchError(f"unknown lr schedule {self.kind!r}; known: {', '.join(SCHEDULES)}")
        if self.kind == "step":
            ms = list(self.milestones)
            if not ms:
                raise DbenchError("--lr-schedule step needs milestones (e.g. --milestones 150,225)")
            if ms != sorted(set(ms)) or ms[0] <= 0 or ms[-1] >= self.epochs:
                raise DbenchError(
                    f"bad milestones {','.join(map(str, ms))}: need increasing epochs strictly between 0 and {self.epochs}"
                )
        elif self.milestones:
            raise DbenchError(f"milestones apply only to --lr-schedule step, not {self.kind!r}")
        # Checked whatever the schedule, as every setting is: a run records it, and a bad value (NaN) there
        # would be a silent one.
        if not 0 < self.gamma < 1:
            raise DbenchError(f"bad lr gamma {self.gamma}: must be in (0, 1)")

    def lr_at(self, iteration: int) -> float:
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            epoch = iteration // self.steps_per_epoch
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        total = self.epochs * self.steps_per_epoch
        return 0.5 * self.lr * (1 + math.cos(math.pi * iteration / total))
