"""Messages between module processes over torch.distributed point-to-point.

Each ordered pair of processes (sender, receiver) is one FIFO stream: gloo
matches sends to receives by (peer, tag) in order, NCCL by peer in order. All
channels between a pair share that stream (one tag), so a message is a fixed
size header (channel, dtype, shape) followed by the payload, and the receiver
files what it reads into per-channel inboxes, exactly the inboxes of the local
engine. A stage asking for a channel whose inbox is empty reads its source's
stream until a message of that channel arrives; messages of other channels
(a delayed gradient sent for the next iteration, say) wait in their inbox.

Sends are asynchronous (``isend``) and never waited on while training: a
blocking send could wait for a receive that its receiver posts only after a
message the sender has yet to send (FR's and DDG's gradients are consumed an
iteration after they are sent). ``flush`` ends an epoch: every process sends
an end marker down each of its streams and reads each incoming stream up to
the marker, so nothing is left in flight and the inboxes hold every pending
message (they are checkpointed like the local engine's).
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import torch
import torch.distributed as dist

from dbench.method import CHANNELS, DOWN, ERROR, PROBE_DOWN, PROBE_UP, UP

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool)
MAX_DIMS = 6
HEADER = 2 + 1 + MAX_DIMS  # channel, dtype, ndim, dims
END = -1  # channel code of the end-of-epoch marker


class Transport:
    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world = rank, world
        self.device = torch.device(device)  # NCCL moves CUDA tensors only; gloo CPU ones (and CUDA via copies)
        self.inbox = {c: deque() for c in CHANNELS}
        self._sends: deque = deque()  # (work, tensor) kept alive until the send completes

    # Who talks to whom: activations go up, gradients down, DFA's error from the top to all.
    def source(self, channel: str) -> int:
        if channel in (UP, PROBE_UP):
            return self.rank - 1
        if channel in (DOWN, PROBE_DOWN):
            return self.rank + 1
        if channel == ERROR:
            return self.world - 1
        raise ValueError(f"unknown channel {channel!r}; channels: {CHANNELS}")

    def targets(self, channel: str) -> list[int]:
        if channel in (UP, PROBE_UP):
            return [self.rank + 1]
        if channel in (DOWN, PROBE_DOWN):
            return [self.rank - 1]
        if channel == ERROR:
            return [j for j in range(self.world) if j != self.rank]
        raise ValueError(f"unknown channel {channel!r}; channels: {CHANNELS}")

    def sources(self) -> list[int]:
        """Every process that may send to this one."""
        return sorted({j for j in (self.rank - 1, self.rank + 1, self.world - 1) if 0 <= j < self.world} - {self.rank})

    def readers(self) -> list[int]:
        """Every process that reads a stream from this one (the mirror of ``sources``)."""
        if self.rank == self.world - 1:
            return [j for j in range(self.world) if j != self.rank]
        return sorted({j for j in (self.rank - 1, self.rank + 1) if 0 <= j < self.world})

    def send(self, channel: str, tensor: torch.Tensor) -> None:
        payload = tensor.detach().to(self.device).contiguous()
        for dst in self.targets(channel):
            if not 0 <= dst < self.world:
                raise RuntimeError(f"module {self.rank} sent {channel!r} past the end of the pipeline")
            self._post(dst, _header(CHANNELS.index(channel), payload, self.device))
            self._post(dst, payload)
        self._reap()

    def ready(self, channel: str) -> bool:
        return bool(self.inbox[channel])

    def recv(self, channel: str) -> torch.Tensor:
        """The next message of ``channel``, reading the source's stream until one arrives (blocks)."""
        queue = self.inbox[channel]
        src = self.source(channel)
        while not queue:
            if self._read(src) is None:
                raise RuntimeError(f"module {self.rank} waited for {channel!r} from module {src}, which ended its epoch")
        return queue.popleft()

    def flush(self) -> None:
        """End of epoch: send end markers, read every incoming stream up to its marker, wait for all sends."""
        for dst in self.readers():
            self._post(dst, torch.tensor([END] + [0] * (HEADER - 1), dtype=torch.int64, device=self.device))
        for src in self.sources():
            while self._read(src) is not None:
                pass
        while self._sends:
            work, _ = self._sends.popleft()
            try:
                work.wait()
            except RuntimeError as e:
                raise RuntimeError(f"a message was never received (timed out or connection lost): {e}") from e

    def queued(self) -> Iterator[torch.Tensor]:
        for q in self.inbox.values():
            yield from q

    def _post(self, dst: int, tensor: torch.Tensor) -> None:
        self._sends.append((dist.isend(tensor, dst), tensor))

    def _reap(self) -> None:
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    def _read(self, src: int) -> str | None:
        """Read one message from ``src`` into its inbox; None at the end marker."""
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        self._recv(header, src)
        code, dtype, ndim, *dims = header.tolist()  # a host copy: waits for the header to arrive
        if code == END:
            return None
        payload = torch.empty(dims[:ndim], dtype=DTYPES[dtype], device=self.device)
        self._recv(payload, src)
        channel = CHANNELS[code]
        self.inbox[channel].append(payload)
        return channel


    def _recv(self, tensor: torch.Tensor, src: int) -> None:
        try:
            dist.recv(tensor, src)
        except RuntimeError as e:
            # Say which peer went silent: the one whose stream broke or timed out,
            # not this module, is usually where the failure started.
            raise RuntimeError(f"no message from module {src} (timed out or connection lost): {e}") from e


def _header(code: int, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"a message has {tensor.dim()} dimensions; at most {MAX_DIMS} are supported")
    if tensor.dtype not in DTYPES:
        raise ValueError(f"a message has dtype {tensor.dtype}; supported: {DTYPES}")
    dims = list(tensor.shape) + [0] * (MAX_DIMS - tensor.dim())
    return torch.tensor([code, DTYPES.index(tensor.dtype), tensor.dim(), *dims], dtype=torch.int64, device=device)
