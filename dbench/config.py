"""RunConfig: every setting of one run, typed, validated, and saved with the run."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dbench.errors import DbenchError
from dbench.optim import SCHEDULES, LRSchedule, OptimConfig

ENGINES = ("auto", "local", "distributed")
PROBES_PER_EPOCH = 4  # the default σ probe frequency
# Seeds (--seed, and methods' seed options) are 32-bit, the common range of random generators; a
# method derives a seed per module from its option (seed·1000 + k), which then stays in torch's 64 bits.
MAX_SEED = 2**32 - 1
# Counts that end up in torch as 64-bit integers (iteration tags, tensor sizes).
MAX_INT = 2**63 - 1
# Longest --comm-timeout: torch.distributed takes it as a datetime.timedelta, which holds about 2.7 million
# years; anything longer than this (about 31.7 years) is as good as no timeout.
MAX_COMM_TIMEOUT = 1e9


@dataclass
class RunConfig:
    """Defaults here are the defaults of ``dbench run`` (one place to read them).

    The default run trains the small ``cnn`` on the built-in ``synthetic`` data
    with BP on one device: about a minute on a 2-core CPU.
    """

    method: str = "bp"
    method_options: dict[str, str] = field(default_factory=dict)
    model: str = "cnn"
    dataset: str = "synthetic"
    data_dir: str | None = None
    download: bool = False
    context: int | None = None  # tokens per sequence of a text data set; None: the model's context
    gpus: int = 1  # N devices: K = N / replicas modules per replica
    # D replicas of the K modules, each on a shard of every batch (ALGORITHMS.md, "At scale"). None: 1, or
    # one per device for a method whose layout is whole-model replicas (ddp).
    replicas: int | None = None
    devices: list[str] | None = None
    engine: str = "auto"
    comm_timeout: float = 300.0  # seconds a module process waits on a message before it gives up
    split: str = "auto"  # dbench.partition.resolve_auto: by FLOPs (from the model alone, the same everywhere)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    lr_schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    seed: int = 0
    sigma_every: int | None = None  # None: PROBES_PER_EPOCH probes an epoch; 0: no σ probe
    sigma_batches: int = 2
    checkpoint_every: int = 0  # steps between checkpoints inside an epoch (0: at the end of each epoch only)
    # Record the first epoch's trace (every stage's compute segments and messages, dbench.engine.trace) for
    # `dbench project`: the local engine only.
    trace: bool = False

    def resolved_engine(self, devices: list, modules: int | None = None,
                        engines: tuple[str, ...] = ("local", "distributed")) -> str:
        """``auto``: one process per device when the N > 1 devices are distinct CUDA devices, or when every
        device holds a whole replica (``modules`` K = 1: no pipeline, so every process computes at once, as
        DDP always runs), or when the method runs on no other engine (``engines``: those it runs on); else
        the local engine (on a CPU, a pipeline's processes would share the same cores one module at a time)."""
        if self.engine != "auto":
            return self.engine
        if "local" not in engines:
            return engines[0]
        distinct_gpus = all(d.type == "cuda" for d in devices) and len(set(devices)) == len(devices)
        return "distributed" if len(devices) > 1 and (distinct_gpus or modules == 1) else "local"

    def layout_name(self) -> str:
        """``k<N>`` (N devices) in run folder names, and ``d<D>`` after it when ``--replicas`` D > 1 is given."""
        return f"k{self.gpus}" + (f"d{self.replicas}" if self.replicas and self.replicas > 1 else "")

    def sigma_interval(self, steps_per_epoch: int) -> int:
        """Steps between two σ probes (0: never)."""
        if self.sigma_every is None:
            return max(1, steps_per_epoch // PROBES_PER_EPOCH)  # floor: all PROBES_PER_EPOCH fit in the epoch
        return self.sigma_every

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay,
                           name=self.optimizer)

    def resolved_milestones(self) -> list[int]:
        """Step schedule without explicit milestones: ÷gamma at 50% and 75% of the epochs."""
        if self.lr_schedule != "step" or self.milestones:
            return list(self.milestones)
        return sorted({m for m in (self.epochs // 2, (3 * self.epochs) // 4) if 0 < m < self.epochs})

    def schedule(self, steps_per_epoch: int) -> LRSchedule:
        return LRSchedule(
            kind=self.lr_schedule,
            lr=self.lr,
            epochs=self.epochs,
            steps_per_epoch=steps_per_epoch,
            milestones=tuple(self.resolved_milestones()),
            gamma=self.lr_gamma,
        )

    def validate(self) -> None:
        _positive_int("--epochs", self.epochs)
        _positive_int("--batch-size", self.batch_size, at_most=None)  # at most the training set: see plan.make
        _positive_int("--gpus", self.gpus)
        if self.replicas is not None:
            _positive_int("--replicas", self.replicas)
            if self.gpus % self.replicas:
                divisors = [d for d in range(1, self.gpus + 1) if self.gpus % d == 0] if self.gpus <= 4096 else [1]
                raise DbenchError(f"bad --replicas {self.replicas}: it must divide --gpus {self.gpus} (K = N/D modules "
                                  f"per replica); accepted: {', '.join(map(str, divisors))}")
        if self.context is not None:
            _positive_int("--context", self.context)  # at most the model's context: see plan.check
        if not 0 <= self.seed <= MAX_SEED:
            raise DbenchError(f"bad --seed {self.seed}: must be an integer >= 0 and at most {MAX_SEED}")
        if self.sigma_every is not None and not 0 <= self.sigma_every <= MAX_INT:
            raise DbenchError(f"bad --sigma-every {self.sigma_every}: must be >= 0 and at most {MAX_INT} "
                              "(0 turns the σ probe off)")
        _positive_int("--sigma-batches", self.sigma_batches)
        if self.checkpoint_every < 0:
            raise DbenchError(f"bad --checkpoint-every {self.checkpoint_every}: must be a number of steps >= 1, "
                              "or 0 for a checkpoint at the end of each epoch only")
        if not 0 < self.comm_timeout <= MAX_COMM_TIMEOUT:  # NaN fails this too
            raise DbenchError(f"bad --comm-timeout {self.comm_timeout}: must be a number of seconds > 0 "
                              f"and at most {MAX_COMM_TIMEOUT:.0e}")
        if self.engine not in ENGINES:
            raise DbenchError(f"unknown engine {self.engine!r}; known: {', '.join(ENGINES)}")
        if self.lr_schedule not in SCHEDULES:
            raise DbenchError(f"unknown lr schedule {self.lr_schedule!r}; known: {', '.join(SCHEDULES)}")
        self.optim.validate()
        if self.lr_schedule == "step" and not self.resolved_milestones():
            raise DbenchError(
                f"--lr-schedule step over {self.epochs} epoch(s) has no milestone to drop the lr at: "
                "pass --milestones, more --epochs, or another schedule"
            )
        self.schedule(steps_per_epoch=1).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DbenchError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _positive_int(flag: str, value: int, at_most: int | None = MAX_INT) -> None:
    # Bounded above too: a number past torch's 64-bit integers fails deep inside torch ("Overflow").
    if value < 1 or (at_most is not None and value > at_most):
        bound = "" if at_most is None else f" and at most {at_most}"
        raise DbenchError(f"bad {flag} {value}: must be an integer >= 1{bound}")
