"""The Python API: a trainer built from already-split modules, driven step by step.

    import torch
    from torch import nn
    from dbench import Trainer

    modules = [nn.Sequential(nn.Flatten(), nn.Linear(3072, 256), nn.ReLU()), nn.Linear(256, 10)]
    trainer = Trainer(modules, method="bp", lr=0.05, momentum=0.9)
    loss = trainer.step(x, y)          # loss of the batch the top module computed
    logits = trainer.predict(x_test)

The command line builds exactly this object; nothing it does is out of reach here.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from dbench.engine import LocalEngine
from dbench.engine.trace import Recorder
from dbench.errors import DbenchError
from dbench.meters import Meters, SigmaResult, StageMeter
from dbench.method import DATA_PARALLEL, Stage, StepOutput, parse_options
from dbench.objective import CrossEntropy
from dbench.optim import OptimConfig
from dbench.registry import METHODS


class Trainer:
    """Train ``modules`` (module k on ``devices[k]``) with a registered method.

    ``options`` are the method's options, either its ``Options`` dataclass or a
    ``{name: text}`` dict as given on the command line. ``num_classes`` is
    needed by methods that read the labels as input (cDNI). ``measure``
    attaches the meters (``self.meters``: time, memory, σ per module).

    ``replicas`` (D): train D copies of the K modules, each on its shard of
    every batch, with every update's gradient averaged over the copies of its
    module (ALGORITHMS.md, "At scale"); the copies start from ``modules``'
    weights. ``devices`` then names the device of each of the D·K modules
    (module k of replica d at d·K + k), or K devices that every replica uses.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        method: str = "bp",
        *,
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        loss: nn.Module | None = None,
        devices: Sequence[torch.device | str] | None = None,
        options: Any = None,
        num_classes: int | None = None,
        measure: bool = False,
        replicas: int = 1,
    ):
        if not modules:
            raise DbenchError("a trainer needs at least one module")
        if not isinstance(replicas, int) or replicas < 1:
            raise DbenchError(f"bad replicas {replicas!r}: must be an integer >= 1")
        devices = list(devices) if devices is not None else ["cpu"] * len(modules)
        if len(devices) == len(modules) and replicas > 1:
            devices = devices * replicas
        if len(devices) != len(modules) * replicas:
            raise DbenchError(f"got {len(devices)} devices for {len(modules)} modules × {replicas} replicas: give one "
                              f"device per module, or one per module of every replica")
        optim = OptimConfig(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, name=optimizer)
        optim.validate()
        stage_cls: type[Stage] = METHODS.get(method)
        if stage_cls.parallelism == DATA_PARALLEL and len(modules) != 1:
            raise DbenchError(f"method {method!r} trains whole-model replicas: give it the model as one module "
                              f"(got {len(modules)}) and the number of devices as replicas")
        if options is None or isinstance(options, dict):
            options = parse_options(stage_cls, {k: str(v) for k, v in (options or {}).items()})
        loss_fn = loss if loss is not None else CrossEntropy()
        self.method = method
        # Replica 0 trains the modules given; every other replica a copy of them (the same initial weights).
        copies = [list(modules)] + [[copy.deepcopy(m) for m in modules] for _ in range(replicas - 1)]
        K = len(modules)
        self.stages = [
            stage_cls(p % K, K, copies[p // K][p % K], torch.device(d), optim, loss_fn, options, num_classes)
            for p, d in enumerate(devices)
        ]
        self.engine = LocalEngine(self.stages, replicas)
        self.meters: Meters | None = None
        if measure:
            self.meters = Meters([StageMeter(s, partial(self.engine.queued, k)) for k, s in enumerate(self.stages)],
                                 sigma_stages=K)
            self.engine.attach_meters(self.meters.stages)
        self.iteration = 0

    @property
    def devices(self) -> list[torch.device]:
        return [s.device for s in self.stages]

    @property
    def modules(self) -> list[nn.Module]:
        """Replica 0's modules (every replica holds the same weights)."""
        return [s.module for s in self.engine.first_replica]

    @property
    def replicas(self) -> int:
        return self.engine.replicas

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One training iteration; returns the (detached, 0-dim) loss of the batch it computed.

        None in an iteration where the top module computed no loss: a method
        whose batches reach the top module late (FDG) in its first iterations.
        That loss may belong to an earlier batch than ``(x, y)``: see
        ``step_output``.
        """
        out = self.step_output(x, y)
        return out.loss if out is not None else None

    def step_output(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput | None:
        """One training iteration; what the top module reports (its ``labels`` name the batch when it is
        not ``(x, y)``), or None when it scored no batch in this iteration."""
        self.engine.train()  # every step: a user's module.eval() between steps must not stick
        out = self.engine.train_step(self.iteration, x, y)
        self.iteration += 1
        return out

    def probe_sigma(self, probe: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Take the true gradient on the ``probe`` batches at the current weights; the next step measures σ.

        Needs ``measure=True``. Changes no training state (see dbench.meters.sigma).
        """
        if self.meters is None:
            raise DbenchError("measuring σ needs a trainer built with measure=True")
        if not probe:
            raise DbenchError("measuring σ needs at least one probe batch")
        self.engine.train()  # the true gradient of the training loss: BatchNorm on batch statistics
        self.meters.arm_sigma(self.engine.true_gradients(list(probe)))

    def take_sigma(self) -> tuple[list[SigmaResult], SigmaResult]:
        """σ per module and for the whole network, of the step that followed ``probe_sigma``."""
        if self.meters is None:
            raise DbenchError("measuring σ needs a trainer built with measure=True")
        return self.meters.take_sigma()

    def sigma_step(
        self, x: torch.Tensor, y: torch.Tensor, probe: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[StepOutput | None, list[SigmaResult], SigmaResult]:
        """``probe_sigma``, then the training step ``step_output(x, y)``, then ``take_sigma``."""
        self.probe_sigma(probe)
        out = self.step_output(x, y)
        modules, network = self.take_sigma()
        return out, modules, network

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in eval mode (BatchNorm uses running statistics)."""
        self.engine.eval()
        return self.engine.predict(x)

    def set_lr(self, lr: float) -> None:
        self.engine.set_lr(lr)

    def start_trace(self) -> None:
        """Record a trace of the training steps from here on (dbench.engine.trace; ``take_trace`` ends it)."""
        self.engine.recorder = Recorder(self.devices, self.engine.num_stages, self.engine.replicas)

    def trace_data(self, seconds: float) -> None:
        """The loader took ``seconds`` for the next step's batch (recorded in the trace, if one is on)."""
        if self.engine.recorder is not None:
            self.engine.recorder.data(seconds)

    def take_trace(self) -> dict | None:
        recorder, self.engine.recorder = self.engine.recorder, None
        return recorder.record() if recorder is not None else None

    # What the runner asks of every engine's trainer; one process holds everything here.
    is_writer = True

    def gather(self, obj: Any) -> list:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.engine.load_state_dict(state["engine"])
