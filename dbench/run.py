"""One run's life: plan it, create its directory, train it here or in one process per module, resume it.

The path of a run: ``RunConfig`` → ``plan.make`` (validate, place, cut: once)
→ run directory (config.json is the plan) → ``build`` in each process →
``loop.train`` (engine, meters) → metrics, checkpoint and ``summary`` after
every epoch → ``results``/``report``/``check`` read them back.
"""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from dbench import allocator, environment, loop, placement, plan as planning, summary
from dbench.build import build
from dbench.config import RunConfig
from dbench.data.base import Splits
from dbench.engine import launch
from dbench.errors import DbenchError, RunInterrupted
from dbench.plan import Plan
from dbench.record import CONFIG, ENVIRONMENT, METRICS, SUMMARY, RunDir

__all__ = ["start", "resume", "completed", "create_run_dir", "train_here", "mark", "interrupted", "RunInterrupted"]


def default_run_dir(cfg: RunConfig, root: Path = Path("results")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{cfg.method}-{cfg.model}-{cfg.dataset}-{cfg.layout_name()}-s{cfg.seed}-{stamp}"
    path, n = root / base, 1
    while path.exists():
        n += 1
        path = root / f"{base}-{n}"
    return path


def start(cfg: RunConfig, out: Path | None = None, *, quiet: bool = False,
          on_epoch_end: Callable[[int], None] | None = None) -> Path:
    """A new run; returns its directory."""
    if placement.under_torchrun():
        return _torchrun_process(cfg, out, None, quiet)
    path, splits = create_run_dir(cfg, out, say=None if quiet else print)
    run = RunDir(path)
    with run.exclusive():
        _continue(run, quiet, on_epoch_end, splits)
    return run.path


def completed(cfg: RunConfig, path: Path, *, quiet: bool = True) -> dict:
    """The summary of run ``cfg`` at ``path``, complete: started if missing, resumed if unfinished, else read.

    For scripts that keep their runs under fixed names (the benchmarks): a
    directory that holds another configuration is an error, never reused.
    """
    if path.exists():
        recorded = RunDir.open(path).read(CONFIG)["run"]
        if recorded != json.loads(json.dumps(cfg.to_dict())):
            raise DbenchError(f"{path} holds a run with other settings than the ones asked for: remove it or "
                              f"choose another folder")
        if summary.read(path).get("status") != "complete":
            resume(path, quiet=quiet)
    else:
        start(cfg, path, quiet=quiet)
    return summary.read(path)


def create_run_dir(cfg: RunConfig, out: Path | None = None, devices: list[torch.device] | None = None,
                   say: Callable[[str], None] | None = None) -> tuple[Path, Splits]:
    """Plan ``cfg`` and create its run directory with the plan, the environment and a "running" summary.

    Returns the directory and the data set the plan loaded, for a process that trains here next.
    """
    out = out or default_run_dir(cfg)
    with RunDir.claim(out):  # before the set-up: a second run with this --out is refused at once
        if out.exists():
            raise DbenchError(f"run directory {out} already exists: pass --resume {out} to continue it, "
                              "or another --out")
        plan, splits = planning.make(cfg, devices, say if placement.speaks() else None)
        if placement.speaks():
            # Said once and never silenced: the user asked for devices and gets the CPU; the default cut.
            for note in (plan.device_note, plan.split_note):
                if note:
                    print(note)
        record = plan.record()
        env = environment.collect([torch.device(d) for d in plan.devices])
        if plan.engine == "distributed" and not placement.under_torchrun():
            # What our launcher gives each module's process, not what this one has: its torch threads, and
            # the CPUs it is pinned to (dbench.cpus; None where none is pinned).
            env["torch_threads"] = placement.worker_threads(plan.devices) or env["torch_threads"]
            env["module_cpus"] = placement.worker_cpus(plan.devices)
        else:
            env["module_cpus"] = None
        run = RunDir.create(
            out,
            {
                CONFIG: record,
                ENVIRONMENT: env,
                SUMMARY: summary.compute([], "running", cfg.epochs, task=record.get("task")),
            },
        )
    return run.path, splits


def resume(path: Path, *, quiet: bool = False, on_epoch_end: Callable[[int], None] | None = None) -> Path:
    """Continue a run from its last finished epoch; same numbers as if it had never stopped."""
    if placement.under_torchrun():
        return _torchrun_process(None, None, path, quiet)
    run = RunDir.open(path)
    run.check_writable()
    with run.exclusive():
        cfg = read_plan(run).config  # the whole plan's shape checked before any work
        status = summary.read(path).get("status")
        if status == "complete":
            raise DbenchError(f"run {path} is already complete ({cfg.epochs} epochs); nothing to resume")
        if status == "diverged":
            # A result, not an interruption: training it again would overwrite the record of the divergence
            # (and, from the same checkpoint, the same seed, diverge again).
            raise DbenchError(f"run {path} diverged (its train loss became non-finite): that is its result, so it "
                              f"is not resumed; start a new run (a lower --lr, say) with another --out")
        if status not in summary.RESUMABLE:
            raise DbenchError(f"{path / 'summary.json'} has status {status!r}, not one of {', '.join(summary.RESUMABLE)} (a "
                              f"run that stopped): restore the file from a backup, or start the run again")
        # A damaged checkpoint or metrics file fails here, in one line, before any set-up.
        epochs, steps = run.checkpointed()
        _checkpointed_rows(run, epochs)
        if not quiet:
            print(f"resuming {path} after epoch {epochs} of {cfg.epochs}" + (f", step {steps}" if steps else ""))
        _continue(run, quiet, on_epoch_end)
    return run.path


def read_plan(run: RunDir) -> Plan:
    return plan_of(run.read(CONFIG), run.path / CONFIG)


def plan_of(record, path: Path) -> Plan:
    """The plan config.json holds; a file of the wrong shape is one line naming it and what is wrong."""
    fix = "restore it from a backup (a run cannot be resumed without the plan it was started with)"
    if not isinstance(record, dict):
        raise DbenchError(f"{path} holds a {type(record).__name__}, not the run's plan (a JSON object): {fix}")
    for key, kind in PLAN_SHAPE.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise DbenchError(f"{path}: {key!r} is " + ("missing" if key not in record else
                              f"a {type(record[key]).__name__}, not a {kind.__name__}") + f": {fix}")
    defaults = RunConfig()
    for key, value in record["run"].items():
        default = getattr(defaults, key, None)
        if default is None or value is None:
            continue  # an unknown key is RunConfig.from_dict's to name; an optional setting may be null
        want = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, want):
            raise DbenchError(f"{path}: run setting {key!r} is {value!r}, not a {type(default).__name__}: {fix}")
    return Plan.from_record(record, source=str(path))


# What Plan.from_record reads of config.json, with its type (the run settings are checked by RunConfig).
PLAN_SHAPE = {"run": dict, "method_options": dict, "partition": list, "devices": list, "engine": str,
              "num_params": int, "num_classes": int, "steps_per_epoch": int, "sigma_every": int,
              "sigma_probe_samples": int, "train_samples": int, "test_samples": int}


def interrupted(run: RunDir) -> RunInterrupted:
    """The error that says where a stopped run can be resumed from (its checkpoint)."""
    return RunInterrupted(run.path, *run.checkpointed())


def _checkpointed_rows(run: RunDir, done: int) -> list[dict]:
    """The metric rows of the ``done`` epochs in the checkpoint (later ones: an epoch that did not finish
    saving). They must be those of epochs 1..done: rows lost from metrics.jsonl could not be re-made."""
    rows = [r for r in run.metrics() if r["epoch"] <= done]  # epoch and probe rows
    epochs = [r["epoch"] for r in rows if r.get("kind") == "epoch"]
    if epochs != list(range(1, done + 1)):
        raise DbenchError(f"{run.path / METRICS} holds the rows of epochs {_span(epochs)} but the checkpoint "
                          f"has {done} finished epoch(s): the file lost rows (restore it from a backup, or "
                          "start the run again)")
    return rows


def _keep_checkpointed_rows(run: RunDir, done: int) -> list[dict]:
    """Cut metrics.jsonl back to the checkpoint; returns the rows kept."""
    rows = _checkpointed_rows(run, done)
    run.write_metrics(rows)
    return rows


def _span(epochs: list[int]) -> str:
    return "none" if not epochs else ", ".join(map(str, epochs)) if len(epochs) <= 4 else f"{epochs[0]}..{epochs[-1]} ({len(epochs)} rows)"


def _continue(run: RunDir, quiet: bool, on_epoch_end: Callable[[int], None] | None,
              splits: Splits | None = None) -> None:
    """Train from the run's checkpoint (or the start) in this process or in one process per module."""
    if run.read(CONFIG).get("engine", "local") == "distributed":
        if on_epoch_end is not None:
            raise ValueError("on_epoch_end is not available with the distributed engine")
        devices = run.read(CONFIG)["devices"]
        launch.launch(launch.Job(run.path, devices, train_rank, mark_path, interrupted_path), quiet)
        return
    train_here(run, quiet, on_epoch_end, splits=splits)


def train_here(run: RunDir, quiet: bool, on_epoch_end: Callable[[int], None] | None = None,
               rank: int | None = None, splits: Splits | None = None) -> None:
    """Build this process's share of the run from its plan and train it to the end.

    ``rank``: this process holds that module only (the distributed engine);
    the process group must be joined already.
    """
    allocator.keep_freed_memory()  # before the set-up allocates: see dbench.allocator
    plan = read_plan(run)
    writer = rank is None or rank == plan.config.gpus - 1  # the local engine's process, or the top module's
    if writer:
        run.remove_stale_temporaries()  # a process killed mid-write left them; this one holds the run now
    try:
        built = build(plan, rank, splits)
    except KeyboardInterrupt:
        # Stopped during set-up (data, model): the run exists, so it must not stay "running".
        if writer:
            mark(run, "interrupted")
        raise interrupted(run) from None
    checkpoint = run.load_checkpoint()
    done, partial = 0, None
    if checkpoint is not None:
        built.trainer.load_state_dict(checkpoint["trainer"])
        done, partial = checkpoint["epochs_done"], checkpoint.get("partial")  # partial: cut inside an epoch
    rows: list[dict] = []
    if built.trainer.is_writer:
        rows = _keep_checkpointed_rows(run, done)
    loop.train(built, run, rows, done, quiet, on_epoch_end, partial)


def mark(run: RunDir, status: str, error: str | None = None) -> None:
    """Set a run's status from outside its training (the launcher, after its workers ended).

    A run stopped after its last epoch's checkpoint was saved is complete, whatever stopped it then.
    """
    # The metrics, the checkpoint and the summary must tell the same story.
    done = run.checkpointed()[0]
    rows = _keep_checkpointed_rows(run, done)
    if status == "interrupted" and done == RunConfig.from_dict(run.read(CONFIG)["run"]).epochs:
        status, error = "complete", None
    loop.write_summary(run, rows, status, error)


def mark_path(path: Path, status: str, error: str | None = None) -> None:
    """``mark`` by the run's directory (``launch.Job.mark``: a worker or the launcher records the status)."""
    mark(RunDir(Path(path)), status, error)


def interrupted_path(path: Path) -> RunInterrupted:
    """``interrupted`` by the run's directory (``launch.Job.interrupted``)."""
    return interrupted(RunDir(Path(path)))


def train_rank(path: Path, rank: int, world: int, quiet: bool) -> None:
    """One module's process of a launched run (``launch.Job.train``): join the group, train, leave."""
    import torch.distributed as dist

    from dbench.engine.distributed import data_backend, init

    run = RunDir(path)
    record = run.read(CONFIG)
    device = torch.device(record["devices"][rank])
    init(rank, world, device, record["run"]["comm_timeout"], data_backend(record["devices"]))
    try:
        train_here(run, quiet, rank=rank)
    finally:
        dist.destroy_process_group()


def _torchrun_process(cfg, out: Path | None, resume: Path | None, quiet: bool) -> Path:
    """``dbench run`` as one of torchrun's processes: this process is module RANK of WORLD_SIZE.

    Device: ``cuda:LOCAL_RANK`` where CUDA is present, else the CPU. The top
    module's process creates the run directory (from its node) and writes it;
    the others learn its path from it. torchrun itself stops every process
    when one fails; if torchrun's agent dies, the workers stop by themselves
    (``launch.watch_launcher``) and the run is marked interrupted.
    """
    import torch.distributed as dist

    from dbench.engine.distributed import init

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # torchrun's agent is this process's parent: if it dies (SIGKILL), nobody supervises the run any more,
    # so the workers stop as they do when dbench's own launcher dies (the same watchdog).
    run_path: list = [resume]
    threading.Thread(target=launch.watch_launcher, args=(launch.parent_exits(os.getppid()), rank, world, run_path,
                                                         mark_path),
                     daemon=True, name="torchrun-agent-watchdog").start()
    if resume is None and cfg.gpus != world:
        raise DbenchError(f"--gpus {cfg.gpus} does not match torchrun's {world} processes: one process per module")
    if resume is None and cfg.engine == "local":
        raise DbenchError("--engine local under torchrun: torchrun starts one process per module; use --engine distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    timeout = cfg.comm_timeout if resume is None else RunConfig.from_dict(
        RunDir.open(resume).read(CONFIG)["run"]).comm_timeout
    init(rank, world, device, timeout)
    try:
        control = dist.new_group(backend="gloo")
        names = [None] * world
        dist.all_gather_object(names, str(device), group=control)
        writer = world - 1
        if resume is not None:
            path = resume
        else:
            # The writer plans the run (validates, profiles: once) and creates its directory; every
            # other rank builds from that plan. A bad setting fails on every rank with the same line.
            cfg.engine, cfg.devices = "distributed", names
            box: list = [None]
            if rank == writer:
                try:
                    box = [("path", str(create_run_dir(cfg, out)[0]))]
                except DbenchError as e:
                    box = [("error", str(e))]
            dist.broadcast_object_list(box, src=writer, group=control)
            kind, value = box[0]
            if kind == "error":
                raise DbenchError(value)
            path = Path(value)
        run_path[0] = path
        train_here(RunDir(path), quiet, rank=rank)
    finally:
        dist.destroy_process_group()
    return path
