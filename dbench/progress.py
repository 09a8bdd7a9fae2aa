"""What a run shows while it trains: a live bar (loss, samples/s) or, with --quiet, plain lines."""
from __future__ import annotations

import sys

import click
from tqdm import tqdm


def epoch_line(row: dict, epochs: int) -> str:
    rate = "–" if row.get("samples_per_s") is None else f"{row['samples_per_s']:.0f}"
    return (
        f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  "
        f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
        f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  "
        f"{row['epoch_seconds']:.1f} s ({rate} samples/s)"
    )


class Progress:
    def __init__(self, epochs: int, quiet: bool):
        self.epochs = epochs
        self.quiet = quiet
        self.bar: tqdm | None = None

    def start_epoch(self, epoch: int, batches: int) -> None:
        if not self.quiet:
            self.bar = tqdm(
                total=batches, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
            )

    def advance(self, batches: int) -> None:
        if self.bar is not None:
            self.bar.update(batches)

    def show(self, loss: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.0f}", refresh=False)

    def end_epoch(self, row: dict) -> None:
        self.close()
        click.echo(epoch_line(row, self.epochs))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
