"""The epoch loop: train, probe σ, evaluate, and record each epoch; every process of a run runs it.

Only the writer (the local engine's process, or the top module's process of
the distributed engine) writes the run directory: metrics, checkpoint and
summary after every epoch, each file replaced atomically.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import click
import torch

from dbench import objective, run_tables, summary
from dbench.build import Built
from dbench.devices import synchronize
from dbench.errors import DbenchError, RunInterrupted
from dbench.meters import SigmaResult, merge_records
from dbench.method import StepOutput
from dbench.progress import Progress
from dbench.engine.trace import TRACE
from dbench.record import CONFIG, SUMMARY, RunDir
from dbench.cpus import run_cpus
from dbench import interrupts

# How often the progress bar reads the running loss. Reading it is a
# device-to-host copy, i.e. a CUDA synchronization, so it is not done every step.
SHOW_EVERY = 20


def train(built: Built, run: RunDir, rows: list[dict], first_epoch: int, quiet: bool,
          on_epoch_end: Callable[[int], None] | None, partial: dict | None = None) -> None:
    """The epoch loop. Every process of the distributed engine runs it; only the writer writes.

    ``partial``: the state of the epoch a mid-epoch checkpoint cut (``--checkpoint-every``), to go on from.
    """
    cfg = built.plan.config
    trainer = built.trainer
    writer = trainer.is_writer
    progress = Progress(cfg.epochs, quiet or not writer)
    status = "running"
    saved = first_epoch  # finished epochs in the checkpoint on disk: what the metrics must agree with
    saved_steps = partial["step"] if partial else 0  # and steps of the next epoch in it

    def checkpoint(epoch: int, state_of_epoch: dict) -> None:
        """A checkpoint inside epoch ``epoch`` (every process calls it: the state is gathered)."""
        nonlocal saved_steps
        state = trainer.state_dict()
        if writer:
            run.save_checkpoint({"epochs_done": epoch, "trainer": state, "partial": state_of_epoch})
        saved_steps = state_of_epoch["step"]

    try:
        for epoch in range(first_epoch, cfg.epochs):
            row, probes = run_epoch(built, epoch, progress, partial if epoch == first_epoch else None,
                                    checkpoint if cfg.checkpoint_every else None)
            state = trainer.state_dict()  # distributed: gathered on the writer
            if writer:
                rows.extend(probes)
                rows.append(row)
                if built.trace is not None:
                    run.write(TRACE, built.trace)  # before the metrics: an epoch on record has its trace
                    built.trace = None
                run.write_metrics(rows)
                run.save_checkpoint({"epochs_done": epoch + 1, "trainer": state})
                saved, saved_steps = epoch + 1, 0
                if not math.isfinite(row["train_loss"]):
                    status = "diverged"
                elif epoch + 1 == cfg.epochs:
                    status = "complete"
                write_summary(run, rows, status)
                progress.end_epoch(row)
            status = trainer.broadcast(status)  # every process stops together
            if status == "diverged":
                raise DbenchError(f"training diverged (train loss {row['train_loss']}) in epoch {epoch + 1}; see {run.path}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    except KeyboardInterrupt:
        progress.close()
        if writer:
            # Stopped after the last epoch's checkpoint (between it and the end): nothing is left to train.
            _record_end(run, rows, saved, "complete" if saved == cfg.epochs else "interrupted")
        raise RunInterrupted(run.path, saved, saved_steps) from None
    except DbenchError as e:
        progress.close()
        if writer and status != "diverged":
            _record_end(run, rows, saved, "failed", str(e), cause=e)
        raise
    except Exception as e:
        progress.close()
        if writer:
            _record_end(run, rows, saved, "failed", f"{type(e).__name__}: {e}", cause=e)
        raise
    if writer and first_epoch == cfg.epochs:
        # Resumed with every epoch in the checkpoint (its first process was stopped after the last one was
        # saved): no epoch ran to write the summary, so it still says how that process ended.
        write_summary(run, rows, "complete")
    if writer and not quiet:
        click.echo(run_tables.modules_table(summary.read(run.path)))


def _record_end(run: RunDir, rows: list[dict], saved: int, status: str, error: str | None = None,
                cause: BaseException | None = None) -> None:
    """Record how the run ended, with metrics and summary cut back to the checkpoint on disk.

    The rows of an epoch whose checkpoint was never written (the write failed: a full disk, say) would
    otherwise claim an epoch that --resume has to train again. If even this write fails, both failures
    are said in one line.
    """
    kept = [r for r in rows if r["epoch"] <= saved]
    try:
        if len(kept) != len(rows):
            run.write_metrics(kept)
        write_summary(run, kept, status, error)
    except DbenchError as e:
        first = f"{cause}; " if cause is not None else ""
        raise DbenchError(f"{first}the run could not be marked {status} either: {e}") from None


@dataclass
class EpochSums:
    """What an epoch's steps add up to, and what a mid-epoch checkpoint keeps of them (``partial``).

    ``seen``: samples trained on (throughput counts these). ``scored``: the predictions (samples, or tokens)
    whose loss the top module reported (a StepOutput's batch), what the train loss and accuracy average over:
    a method whose top module scores an earlier batch than the iteration's, or none in its first iterations
    (FDG), scores fewer than it trains on; every other method scores what it trains on. ``train_s``,
    ``measured_s``, ``measured_samples``: the training seconds, and the seconds and samples after the
    warm-up that samples/s is taken over, of the epoch's parts before a resumed one.
    """

    step: int  # the epoch's next step
    loss_sum: torch.Tensor  # on the top module's device
    correct: torch.Tensor
    seen: int = 0
    scored: int = 0
    probes: list[dict] = field(default_factory=list)  # σ probe rows
    segments: list[list[dict]] = field(default_factory=list)  # the module records of the epoch's parts (writer)
    train_s: float = 0.0
    measured_s: float = 0.0
    measured_samples: int = 0

    @classmethod
    def start(cls, partial: dict | None, device: torch.device) -> "EpochSums":
        """A fresh epoch's (``partial`` None), or those a mid-epoch checkpoint kept."""
        if partial is None:
            return cls(0, torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device))
        timing = partial["timing"]
        # A mid-epoch checkpoint written before ``scored`` existed comes from a method that scores what it
        # trains on: its seen is the count.
        return cls(partial["step"], partial["loss_sum"].to(device), partial["correct"].to(device), partial["seen"],
                   partial.get("scored", partial["seen"]), list(partial["probes"]), list(partial["segments"]),
                   timing["train_s"], timing["measured_s"], timing["measured_samples"])

    def score(self, out: StepOutput, y: torch.Tensor, device: torch.device) -> None:
        """Add a step's reported loss and accuracy, per prediction (a sample of an image batch, a token of a
        language model's: dbench.objective)."""
        labels = out.labels if out.labels is not None else y  # the labels of the batch it scored
        self.loss_sum += out.loss * objective.predictions(labels)
        self.correct += objective.correct(out.logits, labels.to(device))
        self.scored += objective.predictions(labels)

    def partial(self, step: int, segment: list[dict], train_s: float, measured_s: float,
                measured_samples: int) -> dict:
        """The checkpoint's record at ``step`` (its format, read back by ``start``), with this part's module
        records and times added to the earlier parts'."""
        return {
            "step": step, "loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen,
            "scored": self.scored, "probes": self.probes, "segments": [*self.segments, segment],
            "timing": {"train_s": self.train_s + train_s, "measured_s": self.measured_s + measured_s,
                       "measured_samples": self.measured_samples + measured_samples},
        }


def run_epoch(built: Built, epoch: int, progress: Progress, partial: dict | None = None,
              checkpoint: Callable[[int, dict], None] | None = None) -> tuple[dict, list[dict]]:
    """Train one epoch and evaluate; returns the epoch's row and its σ probe rows.

    ``partial`` (from a mid-epoch checkpoint) holds what the epoch's first steps added up to; the epoch
    goes on from its next step. ``checkpoint`` is called every ``--checkpoint-every`` steps with that state.
    """
    trainer, loader = built.trainer, built.train
    meters = trainer.meters
    top = trainer.devices[-1]
    every = built.plan.config.checkpoint_every
    sums = EpochSums.start(partial, top)
    first, seen_at_start = sums.step, sums.seen
    # Throughput counts from the end of the warm-up; a resumed epoch warms up again from where it resumed.
    warmup, warm_seen, warm_start = built.plan.warmup_steps, 0, None
    paused = 0.0  # wall-clock of σ probes' extra passes and checkpoints, after warm-up: not training
    stopped = 0.0  # wall-clock of checkpoints: not training either
    images = built.images  # the other modules' processes read the labels only
    lr = built.schedule.lr_at(trainer.iteration)
    progress.start_epoch(epoch, len(loader))
    progress.advance(first)
    synchronize(*trainer.devices)  # start the clocks on idle devices
    trainer.barrier()  # distributed: every module's clock starts together
    tracing = built.plan.config.trace and epoch == 0 and first == 0  # the first epoch, whole (--trace)
    if tracing:
        trainer.start_trace()
    start = time.perf_counter()
    meters.start_epoch()
    batches = meters.loading(loader.epoch(epoch, images=images, start=first))
    if tracing:
        batches = _timed(batches, trainer.trace_data)
    for i, (x, y) in enumerate(batches, start=first):
        if i == first + warmup:
            synchronize(*trainer.devices)  # throughput counts from here: the warm-up's work must be done
            warm_start, warm_seen = time.perf_counter(), sums.seen
        lr = built.schedule.lr_at(trainer.iteration)
        trainer.set_lr(lr)
        probing = built.plan.sigma_every > 0 and (i + 1) % built.plan.sigma_every == 0
        if probing:
            synchronize(*trainer.devices)  # time the probe alone, to take it out of samples/s
            t0 = time.perf_counter()
            trainer.probe_sigma(built.probe)
            synchronize(*trainer.devices)
            if warm_start is not None:
                paused += time.perf_counter() - t0
        iteration = trainer.iteration
        interrupts.check()  # a stop that landed where Python drops exceptions (dbench/interrupts.py)
        out = trainer.step_output(x, y)  # distributed: None except in the top module's process
        if probing:
            sigma = trainer.take_sigma()  # .item(): a sync per probe (and a gather, distributed)
            if sigma is not None:
                sums.probes.append(_probe_row(epoch, i, iteration, *sigma))
        if out is not None:  # None: another module's process, or no batch scored in this iteration
            sums.score(out, y, top)
        sums.seen += len(y)
        progress.advance(1)
        if trainer.is_writer and (i + 1) % SHOW_EVERY == 0 and sums.scored:
            # .item() waits for the device: one sync every SHOW_EVERY steps.
            progress.show(sums.loss_sum.item() / sums.scored, sums.seen / (time.perf_counter() - start))
        if checkpoint is not None and every and (i + 1) % every == 0 and i + 1 < len(loader):
            # Every process reaches this step boundary (the same i): the state is gathered at it.
            synchronize(*trainer.devices)
            trainer.barrier()
            t0 = time.perf_counter()
            parts = trainer.gather(meters.stop_epoch())
            segment = [record for part in parts for record in part] if parts is not None else []
            measured = t0 - warm_start - paused if warm_start is not None else 0.0
            checkpoint(epoch, sums.partial(i + 1, segment, t0 - start - stopped, measured,
                                           sums.seen - warm_seen if warm_start is not None else 0))
            synchronize(*trainer.devices)
            trainer.barrier()
            meters.start_epoch()  # the clocks and peaks go on as a new segment of this epoch
            sums.segments.append(segment)
            took = time.perf_counter() - t0
            stopped += took
            if warm_start is not None:
                paused += took
    # .item() below synchronizes the top device; sync all so the clocks cover every stage's work.
    synchronize(*trainer.devices)
    trainer.barrier()  # distributed: a module that finished early is idle until the last one is done
    end = time.perf_counter()
    parts = trainer.gather(meters.stop_epoch())  # every module's record, on the writer
    modules = [record for part in parts for record in part] if parts is not None else []
    if tracing:
        trace = trainer.take_trace()
        trace["epoch"], trace["train_seconds"] = epoch + 1, end - start
        built.trace = trace  # written with the epoch's files (dbench.loop.train)
    if modules and sums.segments:
        modules = merge_records([*sums.segments, modules])
    train_seconds = sums.train_s + end - start - stopped
    warmed_up = warm_start is not None
    if not warmed_up:  # an epoch (or its resumed part) shorter than the warm-up: measure it all
        warm_start, warm_seen, paused = start, seen_at_start, stopped
    measured_s = sums.measured_s + end - warm_start - paused
    measured_samples = sums.measured_samples + sums.seen - warm_seen
    if trainer.is_writer and not sums.scored:
        # Only a method whose top module scores a later batch than it trains on, in a first epoch shorter
        # than that lag, gets here: there is no train loss to record (and a NaN would read as divergence).
        raise DbenchError(f"epoch {epoch + 1} scored no batch: method {built.plan.config.method!r} reports its "
                          f"first loss after more steps than the epoch has ({len(loader)}); give the epoch more steps")
    test_loss, test_acc, eval_seconds = evaluate(built)
    row = {
        "kind": "epoch",
        "epoch": epoch + 1,
        "lr": lr,
        # Over the scored samples; in another module's process (nothing scored) the row is not written.
        "train_loss": sums.loss_sum.item() / sums.scored if sums.scored else math.nan,
        "train_acc": sums.correct.item() / sums.scored if sums.scored else math.nan,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "epoch_seconds": train_seconds + eval_seconds,
        "warmup_steps": warmup if warmed_up else 0,
        "samples_per_s": measured_samples / measured_s if measured_s > 0 and measured_samples > 0 else None,
        "probes": len(sums.probes),
        # How busy the machine was (1-minute load average, the run's own processes included, and the cores
        # it has): speed compared between runs means little when one of them shared the machine.
        "load_avg_1m": os.getloadavg()[0],
        "cpu_count": run_cpus(),
        "modules": modules,
    }
    return row, sums.probes


def _timed(batches, tell: Callable[[float], None]):
    """``batches``, telling ``tell`` how long each took to come out of the loader."""
    batches = iter(batches)
    while True:
        began = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        tell(time.perf_counter() - began)
        yield batch


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


def evaluate(built: Built) -> tuple[float, float, float]:
    trainer = built.trainer
    top = trainer.devices[-1]
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=top)
    correct = torch.zeros((), dtype=torch.long, device=top)
    n = 0  # predictions: samples, or tokens
    for x, y in built.test.epoch(0, images=built.images):
        logits = trainer.predict(x)  # distributed: None except in the top module's process
        if logits is None:
            continue
        y = y.to(top)
        loss_sum += objective.cross_entropy(logits, y, reduction="sum")
        correct += objective.correct(logits, y)
        n += objective.predictions(y)
    if not n:  # another module's process of the distributed engine: it predicts nothing
        return math.nan, math.nan, time.perf_counter() - start
    loss, acc = loss_sum.item() / n, correct.item() / n  # sync: waits for the last batch
    return loss, acc, time.perf_counter() - start


def write_summary(run: RunDir, rows: list[dict], status: str, error: str | None = None) -> None:
    """summary.json and summary.md from the run's rows (see dbench.summary)."""
    config = run.read(CONFIG)
    result = summary.compute(rows, status, config["run"]["epochs"], error, task=config.get("task"))
    run.write(SUMMARY, result)
    run.write_text(run_tables.SUMMARY_MD, run_tables.markdown(config, result))
