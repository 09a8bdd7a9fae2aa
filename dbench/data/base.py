"""The data-set interface: a spec that knows how to load, and the loaded splits.

An image data set is held in memory as uint8 images of shape (N, 3, 32, 32)
with int64 labels (:class:`DataSplits`); augmentation and normalization happen
later, on the device, in :class:`dbench.data.loader.DeviceLoader`. A text data
set is a pair of uint8 byte strings (:class:`dbench.data.text.TextSplits`).

Both kinds of splits answer the planner the same way, the ``Splits`` protocol:
``kind`` ("image" or "text"), ``check_context(context)`` (a one-line
DbenchError when ``--context`` does not fit the data), ``loader(train=,
batch_size=, device=, seed=, context=)`` and ``task(context)`` (the task as
recorded in config.json); this module names no kind of splits but its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import torch

from dbench.data.loader import DeviceLoader
from dbench.errors import DbenchError
from dbench.tasks.classification import CLASSIFICATION

IMAGE_SHAPE = (3, 32, 32)


class Splits(Protocol):
    """A loaded data set, as the planner and the runner use it (image or text, or a kind yet to come)."""

    name: str
    kind: ClassVar[str]

    def check_context(self, context: int | None) -> None: ...

    def task(self, context: int | None) -> dict: ...

    def loader(self, *, train: bool, batch_size: int, device: torch.device, seed: int,
               context: int | None = None): ...


@dataclass(frozen=True)
class DataSplits:
    name: str
    num_classes: int
    train_x: torch.Tensor  # uint8, (N, 3, 32, 32), CPU, contiguous
    train_y: torch.Tensor  # int64, (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, float, float]  # per channel, of train_x/255, computed from the data
    std: tuple[float, float, float]

    kind: ClassVar[str] = "image"  # what the samples are; a model declares the same word

    def __post_init__(self) -> None:
        # A loader that produced a wrongly shaped split is a bug in dbench, not
        # a user error, so these are assertions-as-exceptions (ValueError).
        for split in ("train", "test"):
            x = getattr(self, f"{split}_x")
            y = getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
                raise ValueError(f"{self.name} {split}_x must be uint8 (N, 3, 32, 32), got {x.dtype} {tuple(x.shape)}")
            if x.device.type != "cpu" or not x.is_contiguous():
                raise ValueError(f"{self.name} {split}_x must be a contiguous CPU tensor")
            if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
                raise ValueError(f"{self.name} {split}_y must be int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{self.name} {split}_y has labels outside [0, {self.num_classes})")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"{self.name} mean and std must have 3 entries (one per channel)")

    def check_context(self, context: int | None) -> None:
        """Images have no context length: ``--context`` is a user error here."""
        if context is not None:
            raise DbenchError(f"--context applies to text data sets; {self.name} holds images")

    def task(self, context: int | None) -> dict:
        """What a model trained on these splits does, for config.json."""
        return {"kind": CLASSIFICATION.kind}

    def loader(self, *, train: bool, batch_size: int, device: torch.device, seed: int,
               context: int | None = None) -> DeviceLoader:
        """The training or test loader of these splits on ``device`` (``context`` must be None: see check_context)."""
        self.check_context(context)
        x, y = (self.train_x, self.train_y) if train else (self.test_x, self.test_y)
        return DeviceLoader(x, y, train=train, batch_size=batch_size, device=device, mean=self.mean,
                            std=self.std, seed=seed)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    description: str  # one line, for `dbench list`
    needs_data_dir: bool  # False for synthetic
    load: Callable[[Path | None, bool], Splits]  # load(data_dir, download)
    kind: str = "image"  # what the samples are: "image" or "text"; a model declares the same word
    can_download: bool = True  # False: --download does not apply (the data come from --data-dir only)
    # present(data_dir, download): a cheap check that the files are there (not their content), which a suite
    # runs for every run before the first starts; None: only that --data-dir exists is checked
    present: Callable[[Path | None, bool], None] | None = None


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std of ``x / 255`` for uint8 images (N, 3, H, W).

    Computed from a 256-bin histogram per channel, which is exact and avoids
    materializing a float copy of the whole training set (1.2 GB for CIFAR in float64).
    """
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for c in range(3):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return (means[0], means[1], means[2]), (stds[0], stds[1], stds[2])
