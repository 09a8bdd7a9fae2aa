"""Data path: dbench's device-resident loader against a torchvision DataLoader, and each one's share of a training step.

Contenders, each delivering shuffled, augmented (pad-4 random 32x32 crop,
horizontal flip), normalized batches of the training split to the device:

- dbench ``DeviceLoader``: the whole uint8 split lives on the device; each
  batch is cropped, flipped and normalized there in a few batched tensor ops.
- torchvision ``DataLoader`` with the standard CIFAR transforms
  (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
  ``Normalize``), ``shuffle=True``, ``num_workers`` from ``--workers`` (a comma
  list gives one row per setting), ``pin_memory`` on CUDA, no persistent
  workers; batches moved with ``.to(device, non_blocking=True)``.

Data: with ``--data-dir`` holding the real extracted ``cifar-10-batches-py``,
the DataLoader reads it through ``torchvision.datasets.CIFAR10`` and the
DeviceLoader through dbench's ``read_cifar``. Without it, ``--samples`` random
uint8 images of CIFAR's shape (32x32x3, seeded) stand in, served by a small
dataset whose ``__getitem__`` does what torchvision's CIFAR10 does (HWC uint8
array -> ``PIL.Image.fromarray`` -> transform). Neither path's speed depends
on the pixel values, only on the images' shape and count.

Two measurements per contender:

1. Data only: one full epoch of batches onto the device, no model (on CUDA
   the clock stops after a synchronize). For the DataLoader the epoch includes
   the start-up of its workers, as every epoch of a real run does; the
   DeviceLoader gets one untimed warm-up epoch first. Median over the rounds.
2. Training: ResNet-20 trained with BP through dbench for ``--steps`` steps
   per round, fed by the contender, and the same number of steps fed by a
   fixed list of batches already on the device ("no data path", the
   baseline). All share one model and optimizer. Rounds interleave the
   contenders so drifts of the machine hit all alike; the table gives the
   median time per step and its spread over the rounds. Each round opens
   the contender's batch stream (for the DataLoader: a fresh iterator, whose
   workers then prefetch while the model trains, as users run it), takes one
   untimed step on its first batch (worker start-up, paid once an epoch,
   shows in the data-only column instead), then times ``--steps`` steps.
   Only full batches are trained on; past the end of an epoch the stream
   goes on into the next one.

Share of training step = (step with contender - baseline step) / step with
contender; noise can make it slightly negative, and it is printed as
measured. Data-only share = data-only time per batch / (baseline step + that
time): what the data path would cost if nothing overlapped it. Target: <= 5%
of the epoch on GPU. On a CPU the figure is still informative: there the
DataLoader's workers and the model compete for the same cores.

    python benchmarks/data_path.py                                          # full run
    python benchmarks/data_path.py --workers 0,2,4 --data-dir ~/data        # real CIFAR-10, several worker counts
    python benchmarks/data_path.py --samples 5000 --steps 5 --rounds 1      # quick check
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable, Iterator

import click
import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dbench import Trainer
from dbench.cli import run_command
from dbench.devices import parse_device, synchronize
from dbench.data.base import channel_stats
from dbench.data.cifar import CIFAR10, read_cifar
from dbench.data.loader import DeviceLoader
from dbench.errors import DbenchError
from dbench.registry import MODELS

NUM_CLASSES = 10
WARMUP_STEPS = 3  # before the first round: allocations, kernel selection

Batch = tuple[Tensor, Tensor]




class GeneratedImages(Dataset):
    """HWC uint8 images in memory, served as torchvision's CIFAR10 serves its own: array -> PIL image -> transform."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: Callable):
        self.data = data
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


def _workers(ctx, param, value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise click.BadParameter(f"expected non-negative integers separated by commas, e.g. 0,2, got {value!r}")
    return list(dict.fromkeys(counts))  # keep the order, drop repeats


def _load_real(data_dir: Path, make_transform: Callable) -> tuple[Tensor, Tensor, tuple, tuple, Dataset, str]:
    """The real CIFAR-10 training split: dbench's tensors for the DeviceLoader, torchvision's data set for the
    DataLoader, each read and checked by its own library."""
    data_dir = data_dir.expanduser()
    expected = f"expected a folder holding the extracted CIFAR-10 python archive ({CIFAR10.folder}/)"
    fetch = f"this script does not download; `dbench run --dataset cifar10 --data-dir {data_dir} --download` does"
    if not data_dir.is_dir():
        what = "not a directory" if data_dir.exists() else "no such directory"
        raise click.ClickException(f"--data-dir {data_dir}: {what}; {expected}")
    if not (data_dir / CIFAR10.folder).is_dir():
        raise click.ClickException(f"--data-dir {data_dir}: no {CIFAR10.folder}/ in it; {expected} ({fetch})")
    try:
        splits = read_cifar(CIFAR10, data_dir)
    except DbenchError as e:
        raise click.ClickException(f"--data-dir {data_dir} is not an intact CIFAR-10 archive: {e} ({fetch})") from e
    try:
        dataset = torchvision.datasets.CIFAR10(str(data_dir), train=True,
                                               transform=make_transform(splits.mean, splits.std))
    except RuntimeError as e:  # torchvision's own integrity check
        raise click.ClickException(f"--data-dir {data_dir}: torchvision's CIFAR10 refuses it: {e}") from e
    what = f"real CIFAR-10 training split ({len(dataset)} images) from {data_dir}"
    return splits.train_x, splits.train_y, splits.mean, splits.std, dataset, what


def _generate(samples: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(samples, 32, 32, 3), dtype=np.uint8)  # HWC, as CIFAR10.data
    labels = rng.integers(0, NUM_CLASSES, size=samples).tolist()
    return images, labels


@click.command()
@click.option("--model", default="resnet20", show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--workers", default=str(os.cpu_count() or 1), show_default=True, callback=_workers,
              help="DataLoader num_workers; a comma list (e.g. 0,2) measures each, one row apiece.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder holding the real cifar-10-batches-py/; without it, generated images of CIFAR's shape.")
@click.option("--samples", type=int, default=50000, show_default=True,
              help="Number of generated images (ignored with --data-dir).")
@click.option("--rounds", type=int, default=3, show_default=True)
@click.option("--steps", type=int, default=40, show_default=True, help="Training steps per round and contender.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
def main(model: str, batch_size: int, workers: list[int], data_dir: Path | None, samples: int, rounds: int,
         steps: int, device: str) -> None:
    for name, value in (("--batch-size", batch_size), ("--rounds", rounds), ("--steps", steps), ("--samples", samples)):
        if value < 1:
            raise click.BadParameter(f"must be a positive integer, got {value}", param_hint=name)
    device = parse_device(device)
    torch.manual_seed(0)
    try:
        blocks = MODELS.get(model)(num_classes=NUM_CLASSES).blocks
    except DbenchError as e:
        raise click.BadParameter(str(e), param_hint="--model") from e

    # Mean and std are only for Normalize; they come from the data, as dbench computes them.
    def standard_transform(mean, std):
        return transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    if data_dir is not None:
        x, y, mean, std, dataset, data_what = _load_real(data_dir, standard_transform)
    else:
        images, labels = _generate(samples)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NCHW for the DeviceLoader
        y = torch.tensor(labels, dtype=torch.int64)
        mean, std = channel_stats(x)
        dataset = GeneratedImages(images, labels, standard_transform(mean, std))
        data_what = (f"{samples} generated random images of CIFAR's shape (32x32x3 uint8, seeded); "
                     f"neither path's speed depends on pixel values")
    if len(x) < batch_size:
        raise click.BadParameter(f"the data set has {len(x)} images, fewer than one batch of {batch_size}",
                                 param_hint="--batch-size")

    device_loader = DeviceLoader(x, y, batch_size, device, mean=mean, std=std, train=True, seed=0)

    def data_loader(num_workers: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                          pin_memory=device.type == "cuda", persistent_workers=False,
                          generator=torch.Generator().manual_seed(0))

    # Each contender is (workers column, epoch): epoch() yields one epoch's batches on the device, the
    # partial last batch included; stream() below chains epochs into the training rounds' supply.
    epochs_used = [0]  # every pass over the DeviceLoader gets a new epoch number, so new draws

    def device_epoch() -> Iterator[Batch]:
        epochs_used[0] += 1
        yield from device_loader.epoch(epochs_used[0])

    def loader_epoch(loader: DataLoader) -> Callable[[], Iterator[Batch]]:
        def epoch() -> Iterator[Batch]:
            for xb, yb in loader:
                yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        return epoch

    contenders: dict[str, tuple[str, Callable[[], Iterator[Batch]]]] = {"dbench DeviceLoader": ("–", device_epoch)}
    for n in workers:
        name = f"torchvision DataLoader, {n} worker{'' if n == 1 else 's'}"
        contenders[name] = (str(n), loader_epoch(data_loader(n)))

    def stream(epoch: Callable[[], Iterator[Batch]]) -> Iterator[Batch]:
        while True:  # past the end of an epoch, on into the next one (a new epoch: new workers for a DataLoader)
            for xb, yb in epoch():
                if len(yb) == batch_size:
                    yield xb, yb

    trainer = Trainer([nn.Sequential(*blocks)], "bp", devices=[device], lr=0.1, momentum=0.9, weight_decay=5e-4)
    # The baseline's batches: made once, already on the device, augmented and normalized like the rest.
    made = stream(device_epoch)
    fixed = [tuple(t.clone() for t in next(made)) for _ in range(steps)]
    made.close()

    for xb, yb in fixed[:WARMUP_STEPS]:
        trainer.step(xb, yb)
    for _ in device_epoch():  # the DeviceLoader's untimed warm-up epoch
        pass
    synchronize(device)

    epoch_s: dict[str, list[float]] = {name: [] for name in contenders}
    batches_per_epoch: dict[str, int] = {}
    step_s: dict[str, list[float]] = {name: [] for name in ["no data path", *contenders]}

    def train(batches: Iterator[Batch]) -> float:
        xb, yb = next(batches)  # untimed: start-up (a DataLoader's workers) and one step on the first batch
        trainer.step(xb, yb)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            xb, yb = next(batches)
            trainer.step(xb, yb)
        synchronize(device)
        return (time.perf_counter() - start) / steps

    for _ in range(rounds):
        for name, (_, epoch) in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            count = 0
            for _batch in epoch():
                count += 1
            synchronize(device)
            epoch_s[name].append(time.perf_counter() - start)
            batches_per_epoch[name] = count
        step_s["no data path"].append(train(iter(fixed + fixed[:1])))
        for name, (_, epoch) in contenders.items():
            batches = stream(epoch)
            step_s[name].append(train(batches))
            batches.close()  # drops a DataLoader's iterator, which stops its workers before the next contender

    def spread(values: list[float]) -> str:
        return f"{min(values):.4f}–{max(values):.4f}"

    base = statistics.median(step_s["no data path"])
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    else:
        where = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    click.echo(f"### Data path, {model}, batch {batch_size}, {device.type} ({date.today().isoformat()})\n")
    rounds_text = f"{rounds} interleaved round{'' if rounds == 1 else 's'}"
    click.echo(f"Machine: {where}, {torch.get_num_threads()} threads; {platform.platform()}; "
               f"torch {torch.__version__}; torchvision {torchvision.__version__}. Data: {data_what}. "
               f"{rounds_text} of {steps} training steps per contender, after {WARMUP_STEPS} warm-up steps; "
               f"medians over rounds, step times with their spread (min–max). Data-only epochs include the "
               f"DataLoader's worker start-up; training rounds do not.\n")
    click.echo("| data path | workers | data only: s/epoch | images/s | ms/batch | step s (training with it) "
               "| step s (no data path) | share of training step | data-only share |")
    click.echo("|---|---|---|---|---|---|---|---|---|")
    shares = {}
    for name, (n, _) in contenders.items():
        epoch_med = statistics.median(epoch_s[name])
        per_batch = epoch_med / batches_per_epoch[name]
        step_med = statistics.median(step_s[name])
        shares[name] = 100 * (step_med - base) / step_med
        click.echo(f"| {name} | {n} | {epoch_med:.2f} | {len(x) / epoch_med:,.0f} | {1000 * per_batch:.2f} | "
                   f"{step_med:.4f} ({spread(step_s[name])}) | {base:.4f} ({spread(step_s['no data path'])}) | "
                   f"{shares[name]:.1f}% | {100 * per_batch / (base + per_batch):.1f}% |")
    click.echo()
    ours = shares["dbench DeviceLoader"]
    if device.type == "cuda":
        verdict = "within" if ours <= 5 else "over"
        click.echo(f"dbench's DeviceLoader takes {ours:.1f}% of the training step: {verdict} the target of ≤ 5% of "
                   f"the epoch on GPU.")
    else:
        click.echo(f"dbench's DeviceLoader takes {ours:.1f}% of the training step. The target (≤ 5% of the epoch) is "
                   f"for GPU and this is a CPU measurement; it is still informative, since on the CPU the "
                   f"DataLoader's workers and the model compete for the same cores.")


if __name__ == "__main__":
    run_command(main)
