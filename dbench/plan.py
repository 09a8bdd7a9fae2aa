"""The plan of a run: every decision taken once, before anything is written, and saved as config.json.

``make(cfg)`` validates the settings, resolves the devices and the engine
(``check(cfg)``: what the settings alone decide, which a suite runs on all its runs first),
loads the data set (to know its classes and sizes) and cuts the model into K
modules (profiling it for ``--split time``). Every process of a run then
*builds* from the same plan (``dbench.build``): the distributed engine's
workers and torchrun's ranks read it from config.json and never validate,
resolve or profile again, so all of them train exactly the cut the plan chose.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dbench.config import RunConfig
from dbench.data.base import Splits
from dbench.data.loader import DeviceLoader
from dbench.devices import resolve_devices
from dbench import placement
from dbench import task as tasks
from dbench.errors import DbenchError
from dbench.files import Unreadable, read_object
from dbench.method import DATA_PARALLEL, Stage, parse_options
from dbench.models.base import describe
from dbench.balance import Balance, balance_measured, imbalance, method_step_seconds
from dbench.partition import (AUTO, FROM, Ranges, boundary_costs, check_k, count_work, median_seconds, parse_split,
                              partition, resolve_auto, time_costs)
from dbench.registry import DATASETS, METHODS, MODELS

# Steps at the start of each epoch left out of samples/s: first calls allocate,
# autotune and fill caches, and an epoch starts after evaluation changed modes.
WARMUP_STEPS = 5


@dataclass(frozen=True)
class Plan:
    """What a run trains, where, and how it is cut; ``record()`` is config.json."""

    config: RunConfig
    options: Any  # the method's Options
    devices: list[str]  # one per device: module k of replica d on devices[d·K + k]
    engine: str  # "local" or "distributed" (resolved)
    ranges: Ranges  # block range of each module
    num_params: int
    num_classes: int
    steps_per_epoch: int
    sigma_every: int  # steps between σ probes, 0: none
    sigma_probe_samples: int
    train_samples: int
    test_samples: int
    device_note: str | None = None  # said once to the user (e.g. no CUDA: modules on the CPU); not recorded
    split_note: str | None = None  # what --split auto chose, and why; not recorded (the partition is)
    balance: dict | None = None  # --split time: predicted and measured seconds per step of each module
    task: dict = dataclasses.field(default_factory=lambda: {"kind": tasks.default().kind})  # what the metrics mean
    replicas: int = 1  # D: copies of the K modules, each on a shard of every batch

    @property
    def modules(self) -> int:
        """K, the devices of one replica: the ranges, V to a device (V = 1 but for the looped schedules)."""
        return len(self.ranges) // self.method.modules_per_device(self.options)

    def facts(self) -> dict:
        """The method's facts for this layout. With D replicas of K modules the ideal speedup over
        model-parallel BP on the same N devices is the method's at K times D (each replica runs the method at K
        on B/D samples; BP's K or N locked modules take the same time per batch: ddp, at K = 1, gets N), and
        even BP's hybrid is an exact layout among the others, not the papers' reference (model-parallel BP,
        D = 1)."""
        facts = self.method.facts(self.modules, self.options)
        if self.replicas > 1:
            ideal = facts["ideal_speedup"]
            facts = {**facts, "reference": False, "ideal_speedup": None if ideal is None else ideal * self.replicas}
        return facts

    def layout(self) -> dict:
        """config.json's "layout": N devices as K modules × D replicas, and which device holds what."""
        v = self.method.modules_per_device(self.options)
        placement = "module k of replica d on device d*K + k" if v == 1 else (
            f"the model cut into V*K = {len(self.ranges)} modules; device d*K + k holds modules "
            + "; ".join(f"{k}: {self.method.placement(k, self.modules, self.options)}" for k in range(self.modules)))
        return {"devices": len(self.devices), "modules": self.modules, "replicas": self.replicas,
                "modules_per_device": v, "placement": placement,
                "shards": "each batch split in D shards by torch.tensor_split; replica d trains on shard d",
                "sigma": "measured on replica 0's modules (the same weights and averaged gradient in every replica)"}

    @property
    def context(self) -> int | None:
        """Tokens per sequence of a text data set (its task records it); None for images."""
        return self.task.get("context")

    @property
    def method(self) -> type[Stage]:
        return METHODS.get(self.config.method)

    @property
    def warmup_steps(self) -> int:
        return min(WARMUP_STEPS, self.steps_per_epoch // 2)

    def record(self) -> dict:
        return {
            "run": self.config.to_dict(),
            "method_options": dataclasses.asdict(self.options),
            # the method's facts, so reports need neither the method installed nor its name
            "method_facts": self.facts(),
            "layout": self.layout(),
            "milestones": self.config.resolved_milestones(),
            "partition": [list(r) for r in self.ranges],
            "engine": self.engine,
            "devices": list(self.devices),
            "num_blocks": self.ranges[-1][1],
            "num_params": self.num_params,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_steps": self.warmup_steps,
            "sigma_every": self.sigma_every,
            "sigma_probe_samples": self.sigma_probe_samples,
            "num_classes": self.num_classes,
            "train_samples": self.train_samples,
            "test_samples": self.test_samples,
            # what the loss and accuracy mean (a classifier's, or a language model's per token), for the reports
            "task": self.task,
            **({"balance": self.balance} if self.balance is not None else {}),
        }

    @classmethod
    def from_record(cls, record: dict, source: str) -> "Plan":
        """The plan a run directory holds, as its creator made it (nothing is validated or profiled again)."""
        cfg = RunConfig.from_dict(record["run"], source=source)
        options = METHODS.get(cfg.method).Options(**record["method_options"])
        ranges = [tuple(r) for r in record["partition"]]
        replicas = record.get("layout", {}).get("replicas")
        if replicas is None:  # recorded before layouts: ddp's ranges were one whole model per device
            replicas = len(ranges) if METHODS.get(cfg.method).parallelism == DATA_PARALLEL else 1
            ranges = ranges[:len(ranges) // replicas]
        return cls(
            config=cfg, options=options, devices=list(record["devices"]), engine=record["engine"],
            ranges=ranges, replicas=replicas, num_params=record["num_params"],
            num_classes=record["num_classes"], steps_per_epoch=record["steps_per_epoch"],
            sigma_every=record["sigma_every"], sigma_probe_samples=record["sigma_probe_samples"],
            train_samples=record["train_samples"], test_samples=record["test_samples"],
            balance=record.get("balance"),
            task=record.get("task", {"kind": tasks.default().kind}),  # runs recorded before tasks: the default task
        )


@dataclass(frozen=True)
class Checked:
    """What ``check`` decided from the settings alone, for ``make`` to go on from."""

    stage_cls: type[Stage]
    options: Any  # the method's Options
    split: str | list[int]  # --split auto already resolved to its rule
    modules: int  # K, devices per replica
    pieces: int  # V·K: the modules the model is cut into (K unless the method holds V to a device)
    replicas: int  # D, copies of the K modules (N = K·D devices)
    devices: list[torch.device]
    device_note: str | None
    engine: str
    split_note: str | None  # what --split auto chose, and why
    context: int | None  # tokens per sequence: --context, or the model's own for a text data set; None for images


def check(cfg: RunConfig, devices: list[torch.device] | None = None) -> Checked:
    """Every refusal of ``make`` that the settings alone decide; raises DbenchError, writes nothing.

    Cheap (no data set loaded, the model built on the meta device only), so a
    suite checks all its runs with it before the first one trains. What it
    cannot see is the data set's files: ``make`` finds a missing one when it loads it.
    """
    cfg.validate()
    stage_cls = METHODS.get(cfg.method)
    options = parse_options(stage_cls, cfg.method_options)
    build_model = MODELS.get(cfg.model)  # an unknown model fails here, a data-parallel method's too
    spec = DATASETS.get(cfg.dataset)
    described = _described(cfg.model, build_model)
    context = check_inputs(cfg, described, spec)
    split = parse_split(cfg.split)
    replicas = layout_replicas(cfg, stage_cls)
    k = cfg.gpus // replicas
    v = stage_cls.modules_per_device(options)
    pieces = k * v  # the modules the model is cut into: V to a device
    if isinstance(split, str) and split.startswith(FROM):
        split = recorded_cut(Path(split[len(FROM):]).expanduser(), cfg.model, pieces)
    where = f" ({replicas} replicas of {k} module(s) on {cfg.gpus} devices)" if replicas > 1 else ""
    if k == 1 and replicas > 1 and split != AUTO:
        raise DbenchError(f"--split {cfg.split} does not apply to {cfg.method} with --gpus {cfg.gpus} and "
                          f"{replicas} replicas: every device holds the whole model")
    if v > 1 and pieces > described["blocks"]:
        raise DbenchError(f"cannot cut {cfg.model} ({described['blocks']} blocks) into V*K = {v}*{k} = {pieces} "
                          f"modules for {cfg.method}: V*K must be at most {described['blocks']}")
    check_k(k, described["blocks"], cfg.model)
    if isinstance(split, list) and len(split) + 1 != pieces:
        raise DbenchError(f"bad --split {cfg.split}: {len(split)} cut points make {len(split) + 1} modules, but "
                          + (f"{cfg.method} cuts the model into V*K = {pieces}" if v > 1 else
                             f"--gpus is {cfg.gpus}" if replicas == 1 else f"K is {k}{where}"))
    if cfg.batch_size < replicas:
        # Before the devices are resolved: D replicas are D·K devices and processes, and a D past any batch
        # (--gpus 10**22) would be allocated as a device list before being refused.
        raise DbenchError(f"bad --batch-size {cfg.batch_size} for {replicas} replicas{where}: every replica needs a "
                          f"shard of at least one sample (batch size >= D = {replicas})")
    note = None
    if devices is None:
        devices, note = resolve_devices(cfg.gpus, cfg.devices)
    engine = cfg.resolved_engine(devices, k, stage_cls.engines)
    if engine not in stage_cls.engines:
        raise DbenchError(f"method {cfg.method} does not run on the {engine} engine; it runs on: "
                          f"{', '.join(stage_cls.engines)} (--engine)")
    if split == "time" and "local" not in stage_cls.engines:
        raise DbenchError(f"--split time times {cfg.method}'s step one module at a time in one process, which "
                          f"{cfg.method} cannot run; use --split counted (the default), blocks, params, cut points or "
                          f"from:RUN_DIR")
    if not stage_cls.measures_sigma and cfg.sigma_every:
        raise DbenchError(f"bad --sigma-every {cfg.sigma_every} for {cfg.method}: its layout has no σ probe "
                          f"(devices hold modules that are not neighbours); leave --sigma-every out or pass 0")
    if cfg.trace and engine != "local":
        raise DbenchError(f"--trace records the local engine's run (one module at a time, each segment timed "
                          f"alone), not the {engine} engine's: add --engine local")
    # The smallest shard of a full batch: what each replica's method splits (micro-batches, say).
    stage_cls.check_run(options, k, cfg.batch_size // replicas, devices)
    stage_cls.check_model(options, described)
    if not spec.needs_data_dir and (cfg.data_dir or cfg.download):
        raise DbenchError(f"--data-dir/--download do not apply to data set {cfg.dataset!r} (it is generated)")
    # Cheap checks of what the loader will read, so that a suite refuses a missing folder before its first
    # run writes anything (the files inside are read, and checked, when the plan loads the data set).
    if spec.needs_data_dir and not cfg.download:
        if not cfg.data_dir:
            raise DbenchError(f"data set {cfg.dataset!r} needs --data-dir (the folder or file that holds it)"
                              + (" or --download" if spec.can_download else ""))
        if not Path(cfg.data_dir).expanduser().exists():
            raise DbenchError(f"missing data directory {cfg.data_dir}: pass --data-dir naming the folder (or file) "
                              f"that holds {cfg.dataset}" + (", or --download" if spec.can_download else ""))
        if spec.present is not None:
            spec.present(Path(cfg.data_dir), cfg.download)
    if cfg.download and not spec.can_download:
        raise DbenchError(f"--download does not apply to data set {cfg.dataset!r}: it reads your own files from "
                          f"--data-dir")
    split, split_note = resolve_auto(split, engine, pieces)
    return Checked(stage_cls=stage_cls, options=options, split=split, modules=k, pieces=pieces, replicas=replicas,
                   devices=devices,
                   device_note=note, engine=engine, split_note=split_note, context=context)


def layout_replicas(cfg: RunConfig, stage_cls: type[Stage]) -> int:
    """D: ``--replicas``, by default 1; a method whose layout is whole-model replicas (ddp) has one per device."""
    if stage_cls.parallelism == DATA_PARALLEL:
        if cfg.replicas not in (None, cfg.gpus):
            raise DbenchError(f"bad --replicas {cfg.replicas} for {cfg.method}: its layout is one whole model per "
                              f"device (K = 1), so its replicas are its {cfg.gpus} devices (leave --replicas out, or "
                              f"use --method bp --replicas {cfg.replicas} for {cfg.gpus // cfg.replicas} modules "
                              f"per replica)")
        return cfg.gpus
    return cfg.replicas or 1



def recorded_cut(run_dir: Path, model: str, k: int) -> list[int]:
    """The cut points of the run recorded in ``run_dir`` (``--split from:RUN_DIR``), for ``model`` at K = ``k``.

    The run must be of the same model (the same blocks) and K; its cut is reused as it was recorded,
    whatever rule chose it, so that a study can fix one cut for every method and machine.
    """
    path = run_dir / "config.json"
    try:
        record = read_object(path)
    except Unreadable as e:
        if e.reason == "is missing":
            raise DbenchError(f"bad --split from:{run_dir}: {path} does not exist (name a run folder dbench "
                              f"wrote)") from None
        raise DbenchError(f"bad --split from:{run_dir}: cannot read {path}: it {e.reason}") from None
    run, ranges = record.get("run"), record.get("partition")
    if not isinstance(run, dict) or not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) for r in ranges):
        raise DbenchError(f"bad --split from:{run_dir}: {path} holds no run settings and partition (not a run "
                          f"folder dbench wrote)")
    if run.get("model") != model:
        raise DbenchError(f"bad --split from:{run_dir}: that run cut model {run.get('model')!r}, not {model!r} "
                          f"(a cut is a list of block indices of one model)")
    if len(ranges) != k:
        raise DbenchError(f"bad --split from:{run_dir}: that run cut {model} into {len(ranges)} modules, but this run "
                          f"has K = {k}")
    return [b for _, b in ranges[:-1]]


@functools.lru_cache(maxsize=None)
def _described(model: str, build_model: Any) -> dict:
    """``describe(model)``, built once per model: a suite checks dozens of runs of the same model.

    Keyed by the builder too, so a model registered anew under the same name is described anew.
    """
    return describe(model)


def check_inputs(cfg: RunConfig, model: dict, spec: Any) -> int | None:
    """Refuse a model that cannot read the data set's samples, or a --context it cannot take; return the
    sequence length the run trains on (None for images)."""
    if model["inputs"] != spec.kind:
        fitting = [name for name, s in DATASETS.items() if s.kind == model["inputs"]]
        raise DbenchError(f"model {cfg.model!r} reads {model['inputs']} data but data set {cfg.dataset!r} holds "
                          f"{spec.kind} data: pick a {model['inputs']} data set "
                          f"({', '.join(fitting) or 'none registered'}) or a model for {spec.kind}")
    limit = model["context"]
    if limit is None:
        if cfg.context is not None:
            raise DbenchError(f"--context does not apply to model {cfg.model!r}: it reads {model['inputs']}, "
                              f"not sequences of tokens")
        return None
    if cfg.context is not None and cfg.context > limit:
        raise DbenchError(f"bad --context {cfg.context}: model {cfg.model!r} reads sequences of at most {limit} "
                          f"tokens (1 <= context <= {limit})")
    return cfg.context if cfg.context is not None else limit


def make(cfg: RunConfig, devices: list[torch.device] | None = None,
         say: Callable[[str], None] | None = None) -> tuple[Plan, Splits]:
    """Validate ``cfg`` (``check``) and decide everything; raises DbenchError before anything is written.

    Returns the plan and the loaded data set (which a process that goes on to
    build from this plan may reuse rather than load again). ``devices``: the
    placement decided elsewhere (torchrun: each rank's own device), else
    ``--gpus``/``--devices`` are resolved here.
    """
    checked = check(cfg, devices)
    stage_cls, options, split, replicas = checked.stage_cls, checked.options, checked.split, checked.replicas
    k, pieces = checked.modules, checked.pieces
    devices, note, engine, split_note = checked.devices, checked.device_note, checked.engine, checked.split_note
    build_model = MODELS.get(cfg.model)
    spec = DATASETS.get(cfg.dataset)
    say = say or (lambda line: None)
    # The set-up's long steps say what they do: on a big model or data set they take minutes.
    say(f"set-up: loading {cfg.dataset}")
    splits = spec.load(Path(cfg.data_dir).expanduser() if cfg.data_dir else None, cfg.download)
    train = loader(cfg, splits, devices[0], train=True, context=checked.context)  # refuses a context too long
    samples = train.num_samples
    if cfg.batch_size > samples:
        raise DbenchError(f"bad --batch-size {cfg.batch_size}: a batch holds at most the {samples} training samples "
                          f"of {cfg.dataset} (1 <= batch size <= {samples})")
    last = samples % cfg.batch_size
    if 0 < last < replicas:
        raise DbenchError(f"bad --batch-size {cfg.batch_size} for {replicas} replicas: an epoch's last batch holds "
                          f"{last} of the {samples} training samples, fewer than the replicas (every replica needs "
                          f"a shard of at least one sample; pick a batch size that leaves none or >= {replicas})")
    # The smallest shard of each batch size the epoch has: what each replica's method splits.
    stage_cls.check_epoch(options, k, {cfg.batch_size // replicas} | ({last // replicas} if last else set()))

    torch.manual_seed(cfg.seed)
    model = build_model(num_classes=splits.num_classes)
    balance = None
    if split == "time":
        say(f"set-up: profiling the {len(model.blocks)} blocks of {cfg.model}, then timing {cfg.method} on the "
            f"candidate cuts, for a cut balanced by time")
        began = time.perf_counter()
        with profiling_threads(engine, devices):
            # Replica 0's devices; it is profiled on its shard of a batch, what each replica trains on.
            x, y = next(iter(train.epoch(0)))
            shard = (x.tensor_split(replicas)[0], y.tensor_split(replicas)[0])
            balance = time_cut(cfg, stage_cls, options, model.blocks, shard, devices[:k], splits.num_classes, say, k)
        ranges = balance.ranges
        timed = (f"--split time: predicted balance {imbalance(balance.predicted):.2f}, measured "
                 f"{imbalance(balance.measured):.2f} (slowest module's step over the mean module's, {cfg.method} "
                 f"timed on {balance.candidates} candidate cut(s); profiling took {time.perf_counter() - began:.1f} s"
                 + ("; --split blocks for equal block counts)" if split_note else ")"))
        split_note = f"{split_note}; {timed}" if split_note else timed
    elif split == "counted":
        # Replica 0's shard of a batch (its shape only): what each replica's modules compute on.
        x, _ = next(iter(train.epoch(0)))
        ranges = partition(model.blocks, pieces, split, sample=x.tensor_split(replicas)[0], model=cfg.model,
                           step_cost=stage_cls.step_cost, boundary_cost=boundary_work(stage_cls, options,
                                                                                       splits.num_classes))
    else:
        ranges = partition(model.blocks, pieces, split, model=cfg.model)
    sigma_every = cfg.sigma_interval(len(train)) if stage_cls.measures_sigma else 0
    if sigma_every and cfg.sigma_batches > len(train):
        raise DbenchError(f"bad --sigma-batches {cfg.sigma_batches}: the σ probe's set is drawn from the {len(train)} "
                          f"batches of the training set (1 <= sigma batches <= {len(train)})")
    plan = Plan(
        config=cfg, options=options, devices=[str(d) for d in devices], engine=engine, ranges=ranges,
        num_params=sum(p.numel() for p in model.parameters()), num_classes=splits.num_classes,
        steps_per_epoch=len(train), sigma_every=sigma_every,
        sigma_probe_samples=min(cfg.sigma_batches * cfg.batch_size, train.num_samples) if sigma_every else 0,
        train_samples=train.num_samples,
        test_samples=loader(cfg, splits, torch.device("cpu"), train=False, context=checked.context).num_samples,
        device_note=note, split_note=split_note, balance=balance.record() if balance is not None else None,
        task=splits.task(checked.context), replicas=replicas,
    )
    return plan, splits


def time_cut(cfg: RunConfig, stage_cls: type[Stage], options: Any, blocks: list, batch: tuple,
             devices: list[torch.device], num_classes: int, say: Callable[[str], None] = lambda line: None,
             modules: int | None = None) -> Balance:
    """``--split time``: the profile's balanced cut for the method's step, checked by timing the method on it.

    Blocks are profiled one at a time on the first module's device; the method is timed with each
    module on its own device. ``say`` hears a line after the profile and after each timed cut: on a
    large model each takes a while.
    """
    began = time.perf_counter()
    times = time_costs(blocks, batch[0], devices[0])
    say(f"set-up: {len(blocks)} blocks profiled in {time.perf_counter() - began:.1f} s")
    boundaries = None
    if stage_cls.boundary_step is not None:
        def cost(shape: tuple[int, ...]) -> float:
            return median_seconds(stage_cls.boundary_step(shape, devices[0], options, num_classes), devices[0])
        boundaries = boundary_costs(times, cost)
    optim = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                 optimizer=cfg.optimizer)

    def measure(ranges: Ranges) -> list[float]:
        began = time.perf_counter()
        seconds = method_step_seconds(blocks, ranges, cfg.method, options, devices, batch, num_classes, optim)
        cuts = ",".join(str(b) for _, b in ranges[:-1])
        say(f"set-up: {cfg.method} timed on the cut after block(s) {cuts}: slowest module {max(seconds):.3f} s "
            f"per step ({time.perf_counter() - began:.1f} s)")
        return seconds

    return balance_measured(times, modules or cfg.gpus, stage_cls.step_cost, boundaries, measure)


def boundary_work(stage_cls: type[Stage], options: Any, num_classes: int) -> Callable | None:
    """The method's work at a module's output (``Stage.boundary_step``) as the counted cost model counts it
    (``partition.count_work``), on the meta device (shapes only: the same count on every machine); None for
    a method with none."""
    if stage_cls.boundary_step is None:
        return None
    meta = torch.device("meta")
    return lambda shape: count_work(stage_cls.boundary_step(shape, meta, options, num_classes))


def loader(cfg: RunConfig, splits: Splits, device: torch.device, *, train: bool,
           context: int | None) -> DeviceLoader:
    """The training or test loader of ``cfg`` on ``device`` (the one definition both plan and build use);
    ``context``: tokens per sequence of a text data set (the plan's), None for images."""
    return splits.loader(train=train, batch_size=cfg.batch_size, device=device, seed=cfg.seed, context=context)


@contextlib.contextmanager
def profiling_threads(engine: str, devices: list[torch.device]) -> Iterator[None]:
    """Profile blocks (``--split time``) with the torch threads each module will train with.

    Our launcher gives each CPU worker a share of the cores, while this process
    has them all; small layers scale worse with threads than big ones, so a
    profile taken with all cores would balance the wrong costs. (Under
    torchrun this process already is a worker with its own thread count.)
    """
    threads = placement.worker_threads(devices) if engine == "distributed" and not placement.under_torchrun() else None
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
