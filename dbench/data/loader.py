"""A data loader that keeps a whole split on the device.

CIFAR-sized data sets fit easily in device memory as uint8 (50,000 images are
150 MB), so instead of a worker pool that decodes and augments per image on the
CPU, the split is copied to the device once and each batch is cropped, flipped
and normalized there with a few batched tensor ops.

All random draws (the permutation, crop offsets and flips) come from a CPU
``torch.Generator`` seeded from ``(seed, epoch)`` alone. That makes epoch ``e``
the same whether or not epochs ``0..e-1`` ran (so a resumed run sees the same
data as an uninterrupted one) and the same on every device type.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import torch
from torch import Tensor

from dbench.errors import DbenchError

PAD = 4  # zero padding on each side before the random 32x32 crop (standard CIFAR)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, epoch)``.

    The pair is hashed rather than combined arithmetically (say ``seed + epoch``)
    so that nearby seeds never share epochs: with ``seed + epoch``, run seed 1
    epoch 0 would replay run seed 0 epoch 1.
    """
    digest = hashlib.sha256(f"dbench-data:{seed}:{epoch}".encode()).digest()
    # 63 bits keeps the value inside the range every torch version accepts.
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_augmentation(generator: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Draw crop offsets and flips for ``n`` images: ``(dy, dx, flip)`` on the CPU.

    ``dy``/``dx`` are int64 in ``[0, 2*PAD]``: the top-left corner of the crop in
    the padded image. ``flip`` is bool, True with probability 0.5.
    """
    offsets = torch.randint(0, 2 * PAD + 1, (2, n), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return offsets[0], offsets[1], flip


def augment(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
    """Pad by ``PAD`` with zeros, crop 32x32 at ``(dy, dx)``, then flip horizontally where ``flip``.

    ``x`` is uint8 (B, C, H, W); ``dy``, ``dx``, ``flip`` have shape (B,) and live
    on the same device as ``x``. The result is uint8 (B, C, H, W). One gather,
    no per-image Python loop.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    device = x.device
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    rows = dy[:, None] + ar_h  # (B, H): source row in the padded image
    # Flipping the crop reverses which source column lands in output column j.
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (B, W)
    batch_idx = torch.arange(b, device=device)[:, None, None, None]
    chan_idx = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """The whole split lives on `device` as uint8; each batch is augmented and normalized there, in one batched op."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        device: torch.device,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int,
    ):
        if batch_size < 1:
            raise DbenchError(f"batch size must be a positive integer, got {batch_size}")
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"expected {x.shape[0]} labels, got shape {tuple(y.shape)}")
        if len(mean) != x.shape[1] or len(std) != x.shape[1] or min(std) <= 0:
            raise ValueError(f"mean and std need one entry per channel and std > 0, got {mean}, {std}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        # (x/255 - mean)/std folded into one multiply-add: x * scale + shift.
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).view(1, -1, 1, 1).to(self.device)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)  # ceil: the last partial batch is kept

    @property
    def num_samples(self) -> int:
        return self.x.shape[0]

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 images on the device -> float32 ``(x/255 - mean)/std``."""
        return torch.addcmul(self._shift, x.to(torch.float32), self._scale)

    def epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The random draws of one training epoch, on the CPU: ``(order, dy, dx, flip)``.

        ``order`` is a permutation of the sample indices; ``dy[i]``, ``dx[i]``,
        ``flip[i]`` are the augmentation of the i-th image *in that order*.
        Exposed so tests can replay an epoch with a reference implementation.
        """
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(self.num_samples, generator=g)
        dy, dx, flip = draw_augmentation(g, self.num_samples)
        return order, dy, dx, flip

    def fixed_batches(self, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        """``count`` batches of distinct samples, drawn once from ``seed``: the σ probe's set.

        A training loader augments them with one fixed draw, so the probe's
        gradient is of the same objective the training batches estimate (the
        loss over augmented images); the same images at every probe of a run.
        """
        n = min(self.num_samples, count * self.batch_size)
        g = torch.Generator().manual_seed(seed)
        picked = torch.randperm(self.num_samples, generator=g)[:n]
        images = self.x[picked.to(self.device)]
        if self.train:
            dy, dx, flip = (t.to(self.device) for t in draw_augmentation(g, n))
            images = augment(images, dy, dx, flip)
        x, y = self.normalize(images), self.y[picked.to(self.device)]
        return list(zip(x.split(self.batch_size), y.split(self.batch_size)))

    def epoch(self, epoch: int, images: bool = True, start: int = 0) -> Iterator[tuple[Tensor | None, Tensor]]:
        """The batches of one epoch, from batch ``start`` on (a run resumed inside an epoch: the epoch's
        draws are made whole, so batch i is the same whatever came before). ``images=False`` yields
        ``(None, labels)`` of the same batches, for the processes of modules above the first, which
        need the labels only."""
        if not images:
            order = self.epoch_plan(epoch)[0] if self.train else torch.arange(self.num_samples)
            for idx in order.to(self.device).split(self.batch_size)[start:]:
                yield None, self.y[idx]
            return
        if not self.train:
            if start:
                raise ValueError("an evaluation pass always starts at its first batch")
            yield from self._eval_batches()
            return
        # The whole epoch's draws are small (a few int64 per image); move them
        # once instead of once per batch.
        order, dy, dx, flip = (t.to(self.device) for t in self.epoch_plan(epoch))
        for first in range(start * self.batch_size, self.num_samples, self.batch_size):
            sl = slice(first, first + self.batch_size)
            idx = order[sl]
            images = augment(self.x[idx], dy[sl], dx[sl], flip[sl])
            yield self.normalize(images), self.y[idx]

    def _eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, self.num_samples, self.batch_size):
            sl = slice(start, start + self.batch_size)
            yield self.normalize(self.x[sl]), self.y[sl]
