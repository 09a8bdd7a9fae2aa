"""One run end to end: config → data, model, partition, trainer → epochs → run directory."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import torch
import torch.nn.functional as F

from dbench import environment, run_tables
from dbench.config import RunConfig
from dbench.data.base import DataSplits
from dbench.data.loader import DeviceLoader
from dbench.devices import resolve_devices, synchronize
from dbench.errors import DbenchError
from dbench.method import parse_options
from dbench.models.base import describe
from dbench.optim import LRSchedule
from dbench.partition import Ranges, check_k, parse_split, partition, split_modules
from dbench.progress import Progress
from dbench.record import CHECKPOINT, CONFIG, ENVIRONMENT, SUMMARY, RunDir
from dbench.meters import STATES, SigmaResult
from dbench.registry import DATASETS, METHODS, MODELS
from dbench.engine import launch
from dbench.engine.distributed import RankTrainer
from dbench.trainer import Trainer

# How often the progress bar reads the running loss. Reading it is a
# device-to-host copy, i.e. a CUDA synchronization, so it is not done every step.
SHOW_EVERY = 20
# Steps at the start of each epoch left out of samples/s: first calls allocate,
# autotune and fill caches, and an epoch starts after evaluation changed modes.
WARMUP_STEPS = 5
PROBE_SEED = 12345  # picks the σ probe's fixed images (the same for every run of a data set)


class RunInterrupted(Exception):
    def __init__(self, path: Path, epochs_done: int):
        super().__init__(f"interrupted: {path} holds {epochs_done} finished epoch(s); continue with: dbench run --resume {path}")
        self.path = path


@dataclass
class Setup:
    config: RunConfig
    splits: DataSplits
    train: DeviceLoader
    test: DeviceLoader
    ranges: Ranges
    trainer: Any  # a Trainer (local engine) or this process's RankTrainer (distributed), None before training
    devices: list[torch.device]
    engine: str  # "local" or "distributed" (resolved)
    rank: int | None  # this process's module under the distributed engine
    schedule: LRSchedule
    options: Any
    device_note: str | None
    num_params: int
    sigma_every: int  # steps between σ probes, 0: none
    probe: list  # the σ probe's fixed batches

    @property
    def warmup_steps(self) -> int:
        return min(WARMUP_STEPS, len(self.train) // 2)

    def config_record(self) -> dict:
        return {
            "run": self.config.to_dict(),
            "method_options": dataclasses.asdict(self.options),
            # the method's facts, so reports need neither the method installed nor its name
            "method_facts": METHODS.get(self.config.method).facts(self.config.gpus, self.options),
            "milestones": self.config.resolved_milestones(),
            "partition": [list(r) for r in self.ranges],
            "engine": self.engine,
            "devices": [str(d) for d in self.devices],
            "num_blocks": self.ranges[-1][1],
            "num_params": self.num_params,
            "steps_per_epoch": len(self.train),
            "warmup_steps": self.warmup_steps,
            "sigma_every": self.sigma_every,
            "sigma_probe_samples": sum(len(y) for _, y in self.probe),
            "num_classes": self.splits.num_classes,
            "train_samples": self.train.num_samples,
            "test_samples": self.test.num_samples,
        }


def prepare(cfg: RunConfig, ranges: Ranges | None = None, *, build: bool = True, rank: int | None = None) -> Setup:
    """Validate everything and build the trainer; raises DbenchError before anything is written.

    ``build=False``: everything but the trainer (what the launcher of the
    distributed engine records). ``rank``: build only that module's trainer,
    in a process that has joined the process group.
    """
    cfg.validate()
    stage_cls = METHODS.get(cfg.method)
    options = parse_options(stage_cls, cfg.method_options)
    build_model = MODELS.get(cfg.model)
    spec = DATASETS.get(cfg.dataset)
    split = parse_split(cfg.split)
    check_k(cfg.gpus, describe(cfg.model)["blocks"], cfg.model)
    if isinstance(split, list) and len(split) + 1 != cfg.gpus:
        raise DbenchError(
            f"bad --split {cfg.split}: {len(split)} cut points make {len(split) + 1} modules, but --gpus is {cfg.gpus}"
        )
    devices, note = resolve_devices(cfg.gpus, cfg.devices)
    engine = cfg.resolved_engine(devices)
    if not spec.needs_data_dir and (cfg.data_dir or cfg.download):
        raise DbenchError(f"--data-dir/--download do not apply to data set {cfg.dataset!r} (it is generated)")
    splits = spec.load(Path(cfg.data_dir).expanduser() if cfg.data_dir else None, cfg.download)

    # Data live on the first module's device (labels are copied to each stage);
    # a module's own process keeps them on its device and reads only labels unless it is the first.
    home = devices[0] if rank is None else devices[rank]
    loader_args = dict(batch_size=cfg.batch_size, device=home, mean=splits.mean, std=splits.std, seed=cfg.seed)
    train = DeviceLoader(splits.train_x, splits.train_y, train=True, **loader_args)
    test = DeviceLoader(splits.test_x, splits.test_y, train=False, **loader_args)

    torch.manual_seed(cfg.seed)
    model = build_model(num_classes=splits.num_classes)
    blocks = model.blocks
    if ranges is None:
        sample = next(iter(train.epoch(0)))[0] if split == "time" else None
        boundary = None
        if stage_cls.boundary_cost is not None:
            boundary = functools.partial(stage_cls.boundary_cost, device=devices[0], options=options,
                                         num_classes=splits.num_classes)
        with profiling_threads(engine, devices):
            ranges = partition(blocks, cfg.gpus, split, sample=sample, device=devices[0], model=cfg.model,
                               step_cost=stage_cls.step_cost, boundary_cost=boundary)
    modules = split_modules(blocks, ranges)
    trainer = None
    if build and rank is None:
        trainer = Trainer(
            modules, cfg.method, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay, devices=devices, options=options,
            num_classes=splits.num_classes, measure=True,
        )
    elif build:
        trainer = RankTrainer(
            modules[rank], cfg.method, rank, cfg.gpus, devices[rank], optim=cfg.optim, options=options,
            num_classes=splits.num_classes, timeout_s=cfg.comm_timeout,
        )
    sigma_every = cfg.sigma_interval(len(train))
    return Setup(
        config=cfg, splits=splits, train=train, test=test, ranges=ranges, trainer=trainer,
        devices=devices, engine=engine, rank=rank,
        schedule=cfg.schedule(len(train)), options=options, device_note=note,
        num_params=sum(p.numel() for p in model.parameters()),
        sigma_every=sigma_every,
        probe=train.fixed_batches(cfg.sigma_batches, PROBE_SEED) if sigma_every else [],
    )


@contextlib.contextmanager
def profiling_threads(engine: str, devices: list[torch.device]) -> Iterator[None]:
    """Profile blocks (``--split time``) with the torch threads each module will train with.

    Our launcher gives each CPU worker a share of the cores, while this process
    has them all; small layers scale worse with threads than big ones, so a
    profile taken with all cores would balance the wrong costs. (Under
    torchrun this process already is a worker with its own thread count.)
    """
    threads = launch.worker_threads(devices) if engine == "distributed" and not launch.under_torchrun() else None
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_run_dir(cfg: RunConfig, root: Path = Path("results")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{cfg.method}-{cfg.model}-{cfg.dataset}-k{cfg.gpus}-s{cfg.seed}-{stamp}"
    path, n = root / base, 1
    while path.exists():
        n += 1
        path = root / f"{base}-{n}"
    return path


def start(cfg: RunConfig, out: Path | None = None, *, quiet: bool = False,
          on_epoch_end: Callable[[int], None] | None = None) -> Path:
    """A new run; returns its directory."""
    if launch.under_torchrun():
        return launch.torchrun_process(cfg, out, None, quiet)
    run = RunDir(create_run_dir(cfg, out))
    with run.exclusive():
        _continue(run, quiet, on_epoch_end)
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
        if RunDir.open(path).read(SUMMARY).get("status") != "complete":
            resume(path, quiet=quiet)
    else:
        start(cfg, path, quiet=quiet)
    return RunDir.open(path).read(SUMMARY)


def create_run_dir(cfg: RunConfig, out: Path | None = None) -> Path:
    """Validate ``cfg`` and create its run directory with config, environment and a "running" summary."""
    if out is not None and out.exists():
        raise DbenchError(f"run directory {out} already exists: pass --resume {out} to continue it, or another --out")
    setup = prepare(cfg, build=False)
    _note(setup)
    run = RunDir.create(
        out or default_run_dir(cfg),
        {
            CONFIG: setup.config_record(),
            ENVIRONMENT: environment.collect(setup.devices),
            SUMMARY: summarize(cfg, [], "running"),
        },
    )
    return run.path


def resume(path: Path, *, quiet: bool = False, on_epoch_end: Callable[[int], None] | None = None) -> Path:
    """Continue a run from its last finished epoch; same numbers as if it had never stopped."""
    if launch.under_torchrun():
        return launch.torchrun_process(None, None, path, quiet)
    run = RunDir.open(path)
    with run.exclusive():
        cfg = RunConfig.from_dict(run.read(CONFIG)["run"], source=str(path / CONFIG))
        if run.read(SUMMARY).get("status") == "complete":
            raise DbenchError(f"run {path} is already complete ({cfg.epochs} epochs); nothing to resume")
        if not quiet:
            print(f"resuming {path} after epoch {_epochs_done(run)} of {cfg.epochs}")
        _continue(run, quiet, on_epoch_end)
    return run.path


def _epochs_done(run: RunDir) -> int:
    checkpoint = run.path / CHECKPOINT
    if not checkpoint.exists():
        return 0
    # mmap: read the one number without loading every tensor of the checkpoint.
    return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["epochs_done"]


def _keep_checkpointed_rows(run: RunDir, done: int) -> list[dict]:
    """Drop metric rows past the checkpoint (an epoch that did not finish saving); returns the rest."""
    rows = [r for r in run.metrics() if r["epoch"] <= done]  # epoch and probe rows
    run.write_metrics(rows)
    return rows


def _continue(run: RunDir, quiet: bool, on_epoch_end: Callable[[int], None] | None) -> None:
    """Train from the run's checkpoint (or the start) in this process or in one process per module."""
    record = run.read(CONFIG)
    if record.get("engine", "local") == "distributed":
        if on_epoch_end is not None:
            raise ValueError("on_epoch_end is not available with the distributed engine")
        launch.launch(run, quiet)
        return
    train_here(run, quiet, on_epoch_end)


def train_here(run: RunDir, quiet: bool, on_epoch_end: Callable[[int], None] | None = None,
               rank: int | None = None) -> None:
    """Build this process's trainer from the run directory and train it to the end.

    ``rank``: this process holds that module only (the distributed engine);
    the process group must be joined already.
    """
    record = run.read(CONFIG)
    cfg = RunConfig.from_dict(record["run"], source=str(run.path / CONFIG))
    setup = prepare(cfg, ranges=[tuple(r) for r in record["partition"]], rank=rank)
    checkpoint = run.load_checkpoint()
    done = 0
    if checkpoint is not None:
        setup.trainer.load_state_dict(checkpoint["trainer"])
        done = checkpoint["epochs_done"]
    rows: list[dict] = []
    if setup.trainer.is_writer:
        rows = _keep_checkpointed_rows(run, done)
    _train(setup, run, rows, done, quiet, on_epoch_end)


def _note(setup: Setup) -> None:
    if setup.device_note and launch.speaks():
        # Said once and never silenced: the user asked for devices and gets the CPU.
        print(setup.device_note)


def _train(setup: Setup, run: RunDir, rows: list[dict], first_epoch: int, quiet: bool,
           on_epoch_end: Callable[[int], None] | None) -> None:
    """The epoch loop. Every process of the distributed engine runs it; only the writer writes."""
    cfg = setup.config
    trainer = setup.trainer
    writer = trainer.is_writer
    progress = Progress(cfg.epochs, quiet or not writer)
    status = "running"
    try:
        for epoch in range(first_epoch, cfg.epochs):
            row, probes = run_epoch(setup, epoch, progress)
            state = trainer.state_dict()  # distributed: gathered on the writer
            if writer:
                rows.extend(probes)
                rows.append(row)
                run.write_metrics(rows)
                run.save_checkpoint({"epochs_done": epoch + 1, "trainer": state})
                if not math.isfinite(row["train_loss"]):
                    status = "diverged"
                elif epoch + 1 == cfg.epochs:
                    status = "complete"
                _write_summary(run, cfg, rows, status)
                progress.end_epoch(row)
            status = trainer.broadcast(status)  # every process stops together
            if status == "diverged":
                raise DbenchError(f"training diverged (train loss {row['train_loss']}) in epoch {epoch + 1}; see {run.path}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    except KeyboardInterrupt:
        progress.close()
        if writer:
            _write_summary(run, cfg, rows, "interrupted")
        raise RunInterrupted(run.path, len(epoch_rows(rows))) from None
    except DbenchError:
        progress.close()
        if writer and status != "diverged":
            _write_summary(run, cfg, rows, "failed")
        raise
    except Exception as e:
        progress.close()
        if writer:
            _write_summary(run, cfg, rows, "failed", error=f"{type(e).__name__}: {e}")
        raise
    if writer and not quiet:
        click.echo(run_tables.modules_table(run.read(SUMMARY)))


def mark(run: RunDir, status: str, error: str | None = None) -> None:
    """Set a run's status from outside its training (the launcher, after its workers ended)."""
    cfg = RunConfig.from_dict(run.read(CONFIG)["run"], source=str(run.path / CONFIG))
    # The metrics, the checkpoint and the summary must tell the same story.
    rows = _keep_checkpointed_rows(run, _epochs_done(run))
    _write_summary(run, cfg, rows, status, error)


def _write_summary(run: RunDir, cfg: RunConfig, rows: list[dict], status: str, error: str | None = None) -> None:
    summary = summarize(cfg, rows, status, error)
    run.write(SUMMARY, summary)
    run.write_text(run_tables.SUMMARY_MD, run_tables.markdown(run.read(CONFIG), summary))


def epoch_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "epoch"]


def probe_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "probe"]


def run_epoch(setup: Setup, epoch: int, progress: Progress) -> tuple[dict, list[dict]]:
    """Train one epoch and evaluate; returns the epoch's row and its σ probe rows."""
    trainer, loader = setup.trainer, setup.train
    meters = trainer.meters
    top = trainer.devices[-1]
    loss_sum = torch.zeros((), device=top)
    correct = torch.zeros((), dtype=torch.long, device=top)
    seen = 0
    warmup, warm_seen, warm_start = setup.warmup_steps, 0, None
    probe_seconds = 0.0  # wall-clock of the σ probes' extra passes, after warm-up
    probes: list[dict] = []
    images = setup.rank in (None, 0)  # the other modules' processes read the labels only
    lr = setup.schedule.lr_at(trainer.iteration)
    progress.start_epoch(epoch, len(loader))
    synchronize(*trainer.devices)  # start the clocks on idle devices
    trainer.barrier()  # distributed: every module's clock starts together
    start = time.perf_counter()
    meters.start_epoch()
    for i, (x, y) in enumerate(loader.epoch(epoch, images=images)):
        if i == warmup:
            synchronize(*trainer.devices)  # throughput counts from here: the warm-up's work must be done
            warm_start, warm_seen = time.perf_counter(), seen
        lr = setup.schedule.lr_at(trainer.iteration)
        trainer.set_lr(lr)
        probing = setup.sigma_every > 0 and (i + 1) % setup.sigma_every == 0
        if probing:
            synchronize(*trainer.devices)  # time the probe alone, to take it out of samples/s
            t0 = time.perf_counter()
            trainer.probe_sigma(setup.probe)
            synchronize(*trainer.devices)
            if warm_start is not None:
                probe_seconds += time.perf_counter() - t0
        iteration = trainer.iteration
        out = trainer.step_output(x, y)  # distributed: None except in the top module's process
        if probing:
            sigma = trainer.take_sigma()  # .item(): a sync per probe (and a gather, distributed)
            if sigma is not None:
                probes.append(_probe_row(epoch, i, iteration, *sigma))
        if out is not None:
            loss_sum += out.loss * len(y)
            correct += (out.logits.argmax(dim=1) == y.to(top)).sum()
        seen += len(y)
        progress.advance(1)
        if trainer.is_writer and (i + 1) % SHOW_EVERY == 0:
            # .item() waits for the device: one sync every SHOW_EVERY steps.
            progress.show(loss_sum.item() / seen, seen / (time.perf_counter() - start))
    # .item() below synchronizes the top device; sync all so the clocks cover every stage's work.
    synchronize(*trainer.devices)
    trainer.barrier()  # distributed: a module that finished early is idle until the last one is done
    end = time.perf_counter()
    parts = trainer.gather(meters.stop_epoch())  # every module's record, on the writer
    modules = [record for part in parts for record in part] if parts is not None else []
    train_seconds = end - start
    if warm_start is None:  # an epoch of one step: nothing left after warm-up
        warm_start, warm_seen = start, 0
    measured = end - warm_start - probe_seconds
    test_loss, test_acc, eval_seconds = evaluate(setup)
    row = {
        "kind": "epoch",
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": loss_sum.item() / seen,
        "train_acc": correct.item() / seen,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "epoch_seconds": train_seconds + eval_seconds,
        "warmup_steps": warmup if warm_seen else 0,
        "samples_per_s": (seen - warm_seen) / measured if measured > 0 and seen > warm_seen else None,
        "probes": len(probes),
        "modules": modules,
    }
    return row, probes


def _probe_row(epoch: int, i: int, iteration: int, modules: list[SigmaResult], network: SigmaResult) -> dict:
    return {
        "kind": "probe",
        "epoch": epoch + 1,
        "step": i + 1,
        "iteration": iteration,
        "sigma": network.sigma,
        "sigma_corrected": network.sigma_corrected,
        "cosine": network.cosine,
        # (<∇,g>, ||∇||², <∇_A,∇_B>, ||g||²) per module: what σ is computed from, for pooling over probes
        "sums": [list(r.sums) for r in modules],
        "modules": [
            {
                "module": r.module,
                "sigma": r.sigma,
                "sigma_corrected": r.sigma_corrected,
                "cosine": r.cosine,
                "true_grad_norm": r.true_grad_norm,
                "method_grad_norm": r.method_grad_norm,
            }
            for r in modules
        ],
    }


def evaluate(setup: Setup) -> tuple[float, float, float]:
    trainer = setup.trainer
    top = trainer.devices[-1]
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=top)
    correct = torch.zeros((), dtype=torch.long, device=top)
    for x, y in setup.test.epoch(0, images=setup.rank in (None, 0)):
        logits = trainer.predict(x)  # distributed: None except in the top module's process
        if logits is None:
            continue
        y = y.to(top)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    n = setup.test.num_samples
    loss, acc = loss_sum.item() / n, correct.item() / n  # sync: waits for the last batch
    return loss, acc, time.perf_counter() - start


def summarize(cfg: RunConfig, rows: list[dict], status: str, error: str | None = None) -> dict:
    epochs = epoch_rows(rows)
    summary: dict[str, Any] = {"status": status, "epochs_done": len(epochs), "epochs": cfg.epochs}
    if error:
        summary["error"] = error
    if epochs:
        best = max(epochs, key=lambda r: r["test_acc"])  # first epoch among equals
        last = epochs[-1]
        rates = [r["samples_per_s"] for r in epochs if r.get("samples_per_s")]
        summary.update(
            best_test_acc=best["test_acc"],
            best_test_error=1 - best["test_acc"],
            best_epoch=best["epoch"],
            final_test_acc=last["test_acc"],
            final_test_loss=last["test_loss"],
            final_train_loss=last["train_loss"],
            final_train_acc=last["train_acc"],
            train_seconds=sum(r["train_seconds"] for r in epochs),
            seconds=sum(r["epoch_seconds"] for r in epochs),
            samples_per_s=sum(rates) / len(rates) if rates else None,
        )
        if all("modules" in r for r in epochs):
            summary["modules"] = _module_summary(epochs, probe_rows(rows))
        probes = probe_rows(rows)
        network = [p["sigma"] for p in probes if p["sigma"] is not None]
        summary["mean_sigma"] = sum(network) / len(network) if network else None
        summary["sigma_corrected"] = pooled_corrected_sigma(
            [[sum(col) for col in zip(*p["sums"])] for p in probes]
        )
    return summary


def pooled_corrected_sigma(sums: list[list[float]]) -> float | None:
    """Σ<∇,g> / Σ<∇_A,∇_B> over probes: the noise-corrected σ of a run (see dbench.meters.sigma)."""
    usable = [s for s in sums if math.isfinite(s[2])]
    cross = sum(s[2] for s in usable)
    return sum(s[0] for s in usable) / cross if usable and cross > 0 else None


def _module_summary(epochs: list[dict], probes: list[dict]) -> list[dict]:
    """Per module over the whole run: time totals, peak memory (with its breakdown) and mean σ."""
    out = []
    for k, first in enumerate(epochs[0]["modules"]):
        per_epoch = [r["modules"][k] for r in epochs]
        peak = max(per_epoch, key=lambda m: m["accounted_peak_bytes"])
        record = {"module": k, "device": first["device"]}
        for state in STATES:
            record[f"{state}_s"] = sum(m[f"{state}_s"] for m in per_epoch)
        record["accounted_peak_bytes"] = peak["accounted_peak_bytes"]
        record["accounted_bytes"] = peak["accounted_bytes"]
        for name in ("cuda_peak_active_bytes", "cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes"):
            if name in first:
                record[name] = max(m[name] for m in per_epoch)
        updated = [p for p in probes if p["modules"][k]["sigma"] is not None]
        sigmas = [p["modules"][k]["sigma"] for p in updated]
        cosines = [p["modules"][k]["cosine"] for p in updated if p["modules"][k]["cosine"] is not None]
        record["mean_sigma"] = sum(sigmas) / len(sigmas) if sigmas else None
        record["sigma_corrected"] = pooled_corrected_sigma([p["sums"][k] for p in updated])
        record["mean_cosine"] = sum(cosines) / len(cosines) if cosines else None
        record["sigma_probes"] = len(sigmas)
        out.append(record)
    return out


