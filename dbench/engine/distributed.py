"""The distributed engine: one process per module, messages over torch.distributed.

With D replicas of K modules (N = K·D processes), process d·K + k holds module
k of replica d: a 2-D DeviceMesh (replica × module) gives each module the
process group of its copies in every replica, over which the gradients of each
update are averaged (``Transport.all_reduce``); a replica's activations and
gradients stay on its own processes. Without replicas, process k (its rank)
holds module k and runs that module's ``Stage`` program,
the same generator the local engine drives; a ``Recv`` that its inbox cannot
answer blocks on the point-to-point stream from the sender (see
``transport.py``). Because a stage sees only its ordered message streams, the
numbers are those of the local engine (tested for every method at K=2 and 3).

``RankTrainer`` has the ``Trainer`` interface the runner uses. What only one
module knows goes to the *writer*, the top module's process, which computes
the loss and the logits anyway: the per-module meter records and σ sums are
gathered there, and so is the checkpoint (the local engine's format, so a run
can resume under either engine). Object gathers, barriers and broadcasts go
over a gloo group; tensors over the main group (NCCL when each module has a GPU of
its own, else gloo: see ``data_backend``).
"""
from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from torch.distributed.device_mesh import init_device_mesh

from dbench.engine.driver import Driven, NoMeter
from dbench.engine.local import check_shards, combine, shard_weight
from dbench.engine.messages import pack, unpack
from dbench.engine.modes import TrainingMode
from dbench.engine.transport import Transport
from dbench.meters import Meters, SigmaResult, StageMeter, sigma_results, true_gradient
from dbench.method import Stage, StepOutput
from dbench.objective import CrossEntropy
from dbench.optim import OptimConfig
from dbench.registry import METHODS


def data_backend(devices: Sequence[torch.device | str]) -> str:
    """The process group's backend for the run's tensors: NCCL when every module has a GPU of its own, else gloo.

    NCCL refuses two processes on one GPU ("invalid usage": ``--devices
    cuda:0,cuda:0``) and cannot reach a CPU module, and every process must name
    the same backend, so the choice is made from the whole device list, not one
    process's device. Under gloo, CUDA messages are staged through host memory
    (see transport.py) and DDP's all-reduce runs gloo's CUDA algorithm.
    """
    devices = [torch.device(d) for d in devices]
    distinct_gpus = all(d.type == "cuda" for d in devices) and len(set(devices)) == len(devices)
    return "nccl" if distinct_gpus else "gloo"


def init(rank: int, world: int, device: torch.device, timeout_s: float, backend: str | None = None) -> None:
    """Join the process group (address and port from MASTER_ADDR/MASTER_PORT, as torchrun sets them).

    ``backend`` defaults to ``data_backend([device])``: NCCL on CUDA, gloo on the CPU.
    """
    backend = backend or data_backend([device])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


class RankTrainer:
    """The ``Trainer`` of one module's process."""

    def __init__(self, module: nn.Module, method: str, rank: int, world: int, device: torch.device, *,
                 optim: OptimConfig, options: Any, num_classes: int | None, timeout_s: float, replicas: int = 1):
        stage_cls: type[Stage] = METHODS.get(method)
        if world % replicas:
            raise ValueError(f"{world} processes do not make {replicas} replicas of the same modules")
        self.rank, self.world, self.replicas = rank, world, replicas
        K = world // replicas
        self.k, self.replica = rank % K, rank // K
        self.stage = stage_cls(self.k, K, module, device, optim, CrossEntropy(), options, num_classes)
        self.stage.place(self.replica, replicas)
        self.stages = [self.stage]
        # Control messages (gathers of Python objects, barriers) on gloo, whatever the data backend.
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.copies = None  # the process group of this module's copies in every replica
        if replicas > 1:
            # Every process builds the whole mesh (each of its groups is a collective of all processes).
            kind = self.stage.device.type if dist.get_backend() == "nccl" else "cpu"
            mesh = init_device_mesh(kind, (replicas, K), mesh_dim_names=("replica", "module"))
            self.copies = mesh.get_group("replica")  # along the replica axis: module k of every replica
            self.stage.pipeline_group = mesh.get_group("module")  # along the module axis: this replica's modules
            self.stage.join(self.copies)
        # The modules' streams get a communicator of their own (the data backend's): their receives are posted
        # ahead of time (see Transport._read) and must match nothing but the streams' sends.
        self.transport = Transport(self.k, K, self.stage.device, base=self.replica * K, group=self.copies,
                                   streams=dist.new_group(timeout=timedelta(seconds=timeout_s)))
        self.meters = Meters([StageMeter(self.stage, self.transport.queued)])
        self.mode = TrainingMode(self.stage.module)
        self.iteration = 0
        self._buffers_stale = False  # the replicas' running statistics drift apart until synchronized

    @property
    def writer(self) -> int:
        return self.world - 1

    @property
    def is_writer(self) -> bool:
        return self.rank == self.writer

    @property
    def devices(self) -> list[torch.device]:
        return [self.stage.device]

    @property
    def modules(self) -> list[nn.Module]:
        return [self.stage.module]

    @property
    def K(self) -> int:
        return self.world // self.replicas

    def _run(self, program) -> Any:
        """Drive this stage's program to its end; a message not yet here blocks on the transport."""
        driven = Driven(self.k, program, self.transport, self.meters.stages[0])
        driven.advance()  # the transport blocks, so this returns with the program finished
        self.stage.check_updates()
        return driven.output

    def step_output(self, x: torch.Tensor | None, y: torch.Tensor) -> StepOutput | None:
        """One iteration of this module; the writer gets the batch's StepOutput (None in an iteration where
        it scored no batch), the others None. With replicas, this replica trains on its shard of the batch
        (every process reads the whole batch's labels, a first module its images too)."""
        self.mode.ensure()
        device = self.stage.device
        first = self.stage.is_first
        if self.replicas > 1:
            batch = len(y)
            check_shards(batch, self.replicas)
            y = y.tensor_split(self.replicas)[self.replica]
            x = x.tensor_split(self.replicas)[self.replica] if first else None
            self.stage.shard_weight = shard_weight(len(y), batch, self.replicas)
            self._buffers_stale = True
        out = self._run(self.stage.train_step(self.iteration, x.to(device) if first else None, y.to(device)))
        self.iteration += 1
        if self.replicas == 1:
            return out
        # The batch's output on the writer: every replica's top module sends its share (an object gather).
        shares = self.gather(_to_device(out, torch.device("cpu")) if self.stage.is_last else None)
        if not self.is_writer:
            return None
        return _to_device(combine([shares[d * self.K + self.K - 1] for d in range(self.replicas)]), device)

    def set_lr(self, lr: float) -> None:
        self.stage.set_lr(lr)

    def probe_sigma(self, probe: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The true gradient on replica 0's modules (every replica holds the same weights); the others idle."""
        if self.replica != 0:
            return
        self.stage.module.train()
        device = self.stage.device
        meter = self.meters.stages[0]
        meter.probing = True
        try:
            truth = self._run(true_gradient(self.stage, [x.to(device) for x, _ in probe] if self.stage.is_first
                                            else None, [y.to(device) for _, y in probe]))
        finally:
            meter.probing = False
        meter.sigma.arm(truth)

    def take_sigma(self) -> tuple[list[SigmaResult], SigmaResult] | None:
        """On the writer, σ per module and of the network; None elsewhere (a gather: every process calls it)."""
        taken = self.gather(self.meters.stages[0].sigma.take())
        if not self.is_writer:
            return None
        return sigma_results(taken[:self.K])  # replica 0's modules

    @torch.no_grad()
    def predict(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Logits on the top module's process (None elsewhere): the stage's ``predict_step`` in every process."""
        self.sync_buffers()
        if self.replica != self.replicas - 1:
            return None  # the writer's replica predicts, with replica 0's running statistics
        self.stage.module.eval()
        driven = Driven(self.k, self.stage.predict_step(x.to(self.stage.device) if self.stage.is_first else None),
                        self.transport, NoMeter())
        driven.advance()  # the transport blocks, so this returns with the program finished
        return driven.output

    def sync_buffers(self) -> None:
        """Every replica takes replica 0's buffers (BatchNorm's running statistics), before evaluating and
        saving (ALGORITHMS.md). A collective over this module's copies: every process calls it."""
        if not self._buffers_stale:
            return
        source = dist.get_global_rank(self.copies, 0)  # module k of replica 0
        for buffer in self.stage.module.buffers():
            wire = buffer.to(self.transport.wire)
            dist.broadcast(wire, src=source, group=self.copies)
            buffer.copy_(wire)
        self._buffers_stale = False

    def gather(self, obj: Any) -> list | None:
        """Every process's ``obj`` in rank order on the writer, None elsewhere."""
        result = [None] * self.world if self.is_writer else None
        with _collective(self.rank, "gather"):
            dist.gather_object(obj, result, dst=self.writer, group=self.control)
        return result

    def broadcast(self, obj: Any) -> Any:
        """The writer's ``obj`` on every process."""
        box = [obj]
        with _collective(self.rank, "broadcast"):
            dist.broadcast_object_list(box, src=self.writer, group=self.control)
        return box[0]

    def barrier(self) -> None:
        with _collective(self.rank, "barrier"):
            dist.barrier(group=self.control)

    def flush(self) -> None:
        """End of epoch: nothing left in flight (see Transport.flush)."""
        self.transport.flush()

    def state_dict(self) -> dict | None:
        """On the writer, the whole trainer's state in the local engine's format; None elsewhere."""
        self.sync_buffers()  # saved as evaluated: every replica with replica 0's running statistics
        self.flush()
        own = {
            "stage": _to_cpu(self.stage.state_dict()),
            "pending": {c: [pack(m) for m in q] for c, q in self.transport.inbox.items()},
        }
        parts = self.gather(own)
        if not self.is_writer:
            return None
        return {
            "iteration": self.iteration,
            "engine": {"stages": [p["stage"] for p in parts], "pending": [p["pending"] for p in parts]},
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        with self.meters.stages[0].tracking():  # DDG rebuilds its graphs: their memory counts
            self.stage.load_state_dict(state["engine"]["stages"][self.rank])
        pending = state["engine"]["pending"][self.rank]
        for channel, queue in self.transport.inbox.items():
            queue.clear()
            queue.extend(unpack(m, self.stage.device) for m in pending.get(channel, []))


@contextlib.contextmanager
def _collective(rank: int, what: str):
    """Say what a failed collective was: gloo's own message names neither the operation nor the cause."""
    try:
        yield
    except RuntimeError as e:
        raise RuntimeError(f"{what} with the other modules failed (a module timed out or stopped): {e}") from e


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _to_device(out: StepOutput | None, device: torch.device) -> StepOutput | None:
    if out is None:
        return None
    return StepOutput(loss=out.loss.to(device), logits=out.logits.to(device),
                      labels=None if out.labels is None else out.labels.to(device))
