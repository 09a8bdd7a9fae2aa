"""One run end to end: config → data, model, partition, trainer → epochs → run directory."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dbench import environment
from dbench.config import RunConfig
from dbench.data.base import DataSplits
from dbench.data.loader import DeviceLoader
from dbench.devices import resolve_devices
from dbench.errors import DbenchError
from dbench.method import parse_options
from dbench.models.base import describe
from dbench.optim import LRSchedule
from dbench.partition import Ranges, check_k, parse_split, partition, split_modules
from dbench.progress import Progress
from dbench.record import CONFIG, ENVIRONMENT, SUMMARY, RunDir
from dbench.registry import DATASETS, METHODS, MODELS
from dbench.trainer import Trainer

# How often the progress bar reads the running loss. Reading it is a
# device-to-host copy, i.e. a CUDA synchronization, so it is not done every step.
SHOW_EVERY = 20


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
    trainer: Trainer
    schedule: LRSchedule
    options: Any
    device_note: str | None
    num_params: int

    def config_record(self) -> dict:
        return {
            "run": self.config.to_dict(),
            "method_options": dataclasses.asdict(self.options),
            "milestones": self.config.resolved_milestones(),
            "partition": [list(r) for r in self.ranges],
            "devices": [str(d) for d in self.trainer.devices],
            "num_blocks": self.ranges[-1][1],
            "num_params": self.num_params,
            "steps_per_epoch": len(self.train),
            "num_classes": self.splits.num_classes,
            "train_samples": self.train.num_samples,
            "test_samples": self.test.num_samples,
        }


def prepare(cfg: RunConfig, ranges: Ranges | None = None) -> Setup:
    """Validate everything and build the trainer; raises DbenchError before anything is written."""
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
    if not spec.needs_data_dir and (cfg.data_dir or cfg.download):
        raise DbenchError(f"--data-dir/--download do not apply to data set {cfg.dataset!r} (it is generated)")
    splits = spec.load(Path(cfg.data_dir).expanduser() if cfg.data_dir else None, cfg.download)

    # Data live on the first module's device; labels are copied to each stage.
    loader_args = dict(batch_size=cfg.batch_size, device=devices[0], mean=splits.mean, std=splits.std, seed=cfg.seed)
    train = DeviceLoader(splits.train_x, splits.train_y, train=True, **loader_args)
    test = DeviceLoader(splits.test_x, splits.test_y, train=False, **loader_args)

    torch.manual_seed(cfg.seed)
    model = build_model(num_classes=splits.num_classes)
    blocks = model.blocks
    if ranges is None:
        sample = next(iter(train.epoch(0)))[0] if split == "time" else None
        ranges = partition(blocks, cfg.gpus, split, sample=sample, device=devices[0], model=cfg.model)
    trainer = Trainer(
        split_modules(blocks, ranges),
        cfg.method,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        devices=devices,
        options=options,
        num_classes=splits.num_classes,
    )
    return Setup(
        config=cfg, splits=splits, train=train, test=test, ranges=ranges, trainer=trainer,
        schedule=cfg.schedule(len(train)), options=options, device_note=note,
        num_params=sum(p.numel() for p in model.parameters()),
    )


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
    if out is not None and out.exists():
        raise DbenchError(f"run directory {out} already exists: pass --resume {out} to continue it, or another --out")
    setup = prepare(cfg)
    _note(setup)
    run = RunDir.create(
        out or default_run_dir(cfg),
        {
            CONFIG: setup.config_record(),
            ENVIRONMENT: environment.collect(setup.trainer.devices),
            SUMMARY: summarize(cfg, [], "running"),
        },
    )
    with run.exclusive():
        _train(setup, run, [], 0, quiet, on_epoch_end)
    return run.path


def resume(path: Path, *, quiet: bool = False, on_epoch_end: Callable[[int], None] | None = None) -> Path:
    """Continue a run from its last finished epoch; same numbers as if it had never stopped."""
    run = RunDir.open(path)
    with run.exclusive():
        return _resume(run, quiet, on_epoch_end)


def _resume(run: RunDir, quiet: bool, on_epoch_end: Callable[[int], None] | None) -> Path:
    path = run.path
    record = run.read(CONFIG)
    cfg = RunConfig.from_dict(record["run"], source=str(path / CONFIG))
    status = run.read(SUMMARY).get("status")
    if status == "complete":
        raise DbenchError(f"run {path} is already complete ({cfg.epochs} epochs); nothing to resume")
    setup = prepare(cfg, ranges=[tuple(r) for r in record["partition"]])
    _note(setup)
    checkpoint = run.load_checkpoint()
    done = 0
    if checkpoint is not None:
        setup.trainer.load_state_dict(checkpoint["trainer"])
        done = checkpoint["epochs_done"]
    # Rows past the checkpoint come from an epoch that did not finish saving.
    rows = [r for r in run.metrics() if r["epoch"] <= done]
    run.write_metrics(rows)
    if not quiet:
        print(f"resuming {path} after epoch {done} of {cfg.epochs}")
    _train(setup, run, rows, done, quiet, on_epoch_end)
    return run.path


def _note(setup: Setup) -> None:
    if setup.device_note:
        # Said once and never silenced: the user asked for devices and gets the CPU.
        print(setup.device_note)


def _train(setup: Setup, run: RunDir, rows: list[dict], first_epoch: int, quiet: bool,
           on_epoch_end: Callable[[int], None] | None) -> None:
    cfg = setup.config
    progress = Progress(cfg.epochs, quiet)
    status = "running"
    try:
        for epoch in range(first_epoch, cfg.epochs):
            row = run_epoch(setup, epoch, progress)
            rows.append(row)
            run.write_metrics(rows)
            run.save_checkpoint({"epochs_done": epoch + 1, "trainer": setup.trainer.state_dict()})
            if not math.isfinite(row["train_loss"]):
                status = "diverged"
            elif epoch + 1 == cfg.epochs:
                status = "complete"
            run.write(SUMMARY, summarize(cfg, rows, status))
            progress.end_epoch(row)
            if status == "diverged":
                raise DbenchError(f"training diverged (train loss {row['train_loss']}) in epoch {epoch + 1}; see {run.path}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    except KeyboardInterrupt:
        progress.close()
        run.write(SUMMARY, summarize(cfg, rows, "interrupted"))
        raise RunInterrupted(run.path, len(rows)) from None
    except DbenchError:
        progress.close()
        if status != "diverged":
            run.write(SUMMARY, summarize(cfg, rows, "failed"))
        raise
    except Exception as e:
        progress.close()
        run.write(SUMMARY, summarize(cfg, rows, "failed", error=f"{type(e).__name__}: {e}"))
        raise


def run_epoch(setup: Setup, epoch: int, progress: Progress) -> dict:
    trainer, loader = setup.trainer, setup.train
    top = trainer.devices[-1]
    loss_sum = torch.zeros((), device=top)
    correct = torch.zeros((), dtype=torch.long, device=top)
    seen = 0
    lr = setup.schedule.lr_at(trainer.iteration)
    progress.start_epoch(epoch, len(loader))
    _sync(trainer.devices)  # start the clock on idle devices
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader.epoch(epoch)):
        lr = setup.schedule.lr_at(trainer.iteration)
        trainer.set_lr(lr)
        out = trainer.step_output(x, y)
        y_top = y.to(top)
        loss_sum += out.loss * len(y)
        correct += (out.logits.argmax(dim=1) == y_top).sum()
        seen += len(y)
        progress.advance(1)
        if (i + 1) % SHOW_EVERY == 0:
            # .item() waits for the device: one sync every SHOW_EVERY steps.
            progress.show(loss_sum.item() / seen, seen / (time.perf_counter() - start))
    # .item() below synchronizes the top device; sync all so the clock covers every stage's work.
    _sync(trainer.devices)
    train_seconds = time.perf_counter() - start
    test_loss, test_acc, eval_seconds = evaluate(setup)
    return {
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
        "samples_per_s": seen / train_seconds,
    }


def evaluate(setup: Setup) -> tuple[float, float, float]:
    trainer = setup.trainer
    top = trainer.devices[-1]
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=top)
    correct = torch.zeros((), dtype=torch.long, device=top)
    for x, y in setup.test.epoch(0):
        logits = trainer.predict(x)
        y = y.to(top)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    n = setup.test.num_samples
    loss, acc = loss_sum.item() / n, correct.item() / n  # sync: waits for the last batch
    return loss, acc, time.perf_counter() - start


def summarize(cfg: RunConfig, rows: list[dict], status: str, error: str | None = None) -> dict:
    summary: dict[str, Any] = {"status": status, "epochs_done": len(rows), "epochs": cfg.epochs}
    if error:
        summary["error"] = error
    if rows:
        best = max(rows, key=lambda r: r["test_acc"])  # first epoch among equals
        last = rows[-1]
        summary.update(
            best_test_acc=best["test_acc"],
            best_test_error=1 - best["test_acc"],
            best_epoch=best["epoch"],
            final_test_acc=last["test_acc"],
            final_test_loss=last["test_loss"],
            final_train_loss=last["train_loss"],
            final_train_acc=last["train_acc"],
            train_seconds=sum(r["train_seconds"] for r in rows),
            seconds=sum(r["epoch_seconds"] for r in rows),
        )
    return summary


def _sync(devices: list[torch.device]) -> None:
    for d in set(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)
