"""RunConfig: every setting of one run, typed, validated, and saved with the run."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dbench.errors import DbenchError
from dbench.optim import OPTIMIZERS, SCHEDULES, LRSchedule, OptimConfig

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


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            flag: str | None = None, metavar: str | None = None, choices: tuple[str, ...] | None = None,
            text: str | None = None, shown_default: str | None = None) -> Any:
    """A RunConfig field and its command-line option, declared once: ``dbench run``'s options are generated
    from these fields (dbench.cli), bench.toml's values are checked against their types (dbench.suites),
    and ``RunConfig.validate`` checks every value whichever of the two gave it.

    ``flag``: the option's name when not ``--field-name``; ``text``: how the command line writes a value
    that is not a plain number, string or flag ("key=value": repeatable KEY=VALUE pairs; "int list",
    "str list": comma-separated); ``shown_default``: the default as help shows it where the field's own is
    None or computed (None: the field's default, shown as it is)."""
    return field(default=default, default_factory=default_factory, metadata={
        "help": help, "flag": flag, "metavar": metavar, "choices": choices, "text": text,
        "shown_default": shown_default})


@dataclass
class RunConfig:
    """Defaults here are the defaults of ``dbench run`` (one place to read them, and its options' help).

    The default run trains the small ``cnn`` on the built-in ``synthetic`` data
    with BP on one device: about a minute on a 2-core CPU.
    """

    method: str = setting("bp", help="Training method (see `dbench list`).")
    method_options: dict[str, str] = setting(
        default_factory=dict, flag="--opt", metavar="KEY=VALUE", text="key=value",
        help="A method option, repeatable (see `dbench list`).")
    model: str = setting("cnn", help="Model (see `dbench list`).")
    dataset: str = setting("synthetic", help="Data set (see `dbench list`).")
    data_dir: str | None = setting(None, help="Folder holding the data set's files.")
    download: bool = setting(False, help="Fetch the data set into --data-dir (needs internet).")
    context: int | None = setting(  # tokens per sequence of a text data set; None: the model's context
        None, metavar="TOKENS", shown_default="the model's context",
        help="Text data: tokens (bytes) per training sequence, at most the model's context.")
    gpus: int = setting(1, help="N: number of devices, K = N/D modules per replica; module k of replica d on "
                                "device d*K+k.")
    # D replicas of the K modules, each on a shard of every batch (ALGORITHMS.md, "At scale"). None: 1, or
    # one per device for a method whose layout is whole-model replicas (ddp).
    replicas: int | None = setting(
        None, metavar="D", shown_default="1; ddp: one per device",
        help="D copies of the K modules, each on a shard of every batch, gradients averaged over the copies "
             "of each module.")
    devices: list[str] | None = setting(
        None, metavar="LIST", text="str list",
        help="Explicit device per module, e.g. cuda:0,cuda:0 (the only way to share a device).")
    engine: str = setting(
        "auto", choices=ENGINES,
        help="local: every module in this process; distributed: one process per module (and replica) "
             "(torch.distributed: NCCL when each module has a GPU of its own, else gloo); auto: distributed when "
             "the N devices are distinct GPUs or each holds a whole replica, else local.")
    comm_timeout: float = setting(300.0, metavar="SECONDS",
                                  help="Distributed engine: how long a module process waits on a message before "
                                       "it fails.")
    split: str = setting(  # dbench.partition.resolve_auto: by FLOPs (from the model alone, the same everywhere)
        "auto",
        help="How to cut the model: blocks, params, counted, time (balanced by this machine's measured time: an "
             "explicit, recorded choice), from:RUN_DIR (a recorded run's cut), or cut points like 4,8; auto: "
             "counted (FLOPs and elements written, from the model alone: the same cut on every machine and "
             "engine).")
    epochs: int = setting(8, help="Passes over the training set.")
    batch_size: int = setting(128, help="Samples per step, the whole batch (replicas train on shards of it, "
                                        "pipelines on micro-batches of it).")
    lr: float = setting(0.05, help="Initial learning rate.")
    lr_schedule: str = setting("cosine", choices=SCHEDULES,
                               help="The learning rate over the epochs: step (× --lr-gamma at each of "
                                    "--milestones), cosine (to 0 at the last step), or constant.")
    milestones: list[int] = setting(
        default_factory=list, metavar="E1,E2", text="int list", shown_default="50%,75% of epochs",
        help="Epochs where the step schedule multiplies the lr by --lr-gamma.")
    lr_gamma: float = setting(0.1, help="What the step schedule multiplies the lr by at each milestone.")
    momentum: float = setting(0.9, help="SGD's momentum (adamw: its first beta).")
    nesterov: bool = setting(False, help="Nesterov momentum.")
    weight_decay: float = setting(5e-4, help="Weight decay (sgd: L2 added to the gradient; adamw: decoupled).")
    optimizer: str = setting("sgd", choices=OPTIMIZERS,
                             help="sgd (the papers'), or adamw (transformers: betas (--momentum, 0.95), "
                                  "decoupled weight decay).")
    seed: int = setting(0, help="Seed of the initial weights, the data's order and augmentation and the methods' "
                                "own draws: the same seed gives the same numbers.")
    sigma_every: int | None = setting(  # None: PROBES_PER_EPOCH probes an epoch; 0: no σ probe
        None, metavar="N", shown_default=f"{PROBES_PER_EPOCH} probes an epoch",
        help="Measure σ every N steps; 0 turns the probe off.")
    sigma_batches: int = setting(2, help="Batches in the σ probe's fixed set (the true gradient is taken on them).")
    checkpoint_every: int = setting(
        0, metavar="STEPS", shown_default="0, at the end of each epoch only",
        help="Also checkpoint every STEPS steps inside an epoch, so a stop loses at most that much (resumed to "
             "the same numbers).")
    # Record the first epoch's trace (every stage's compute segments and messages, dbench.engine.trace) for
    # `dbench project`: the local engine only.
    trace: bool = setting(False, help="Local engine: record the first epoch's trace (each module's compute "
                                      "segments and messages) in trace.json, for `dbench project`.")

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
