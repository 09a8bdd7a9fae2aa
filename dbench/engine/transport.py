"""Messages between module processes over torch.distributed point-to-point.

Each ordered pair of processes (sender, receiver) is one FIFO stream: gloo
matches sends to receives by (peer, tag) in order, NCCL by peer in order. All
channels between a pair share that stream (one tag, on a process group of the
streams' own), so a message is a fixed size header (channel, dtype, shape, the
message's own tag: its iteration, and whether its payload came in its slot)
followed by the payload, and the receiver files what it reads into
per-channel inboxes, exactly the inboxes of the local engine. A stage asking
for a channel whose inbox is empty reads its source's stream until a message
of that channel arrives; messages of other channels (a delayed gradient sent
for the next iteration, say) wait in their inbox.

Receives are posted ahead. A receive posted after its send costs a rendezvous
(gloo's sender writes only once its receiver has announced the receive), and
a stage that computes between two messages would otherwise post each header,
then its payload, only when it asks, long after its sender sent them (1F1B's
steady state: 16 messages per module per step, each a round trip late). So
each stream keeps its next header's receive posted, and beside it a *slot*:
a receive of as many bytes as the stream's previous payload, which sender
and receiver both know. A payload of that size goes into the slot as it is
(no copy); one of another size (the first of a stream, an epoch's smaller
last batch) sends a filler of the slot's size, then itself, and sets the
slot's size for the messages after it. Every stream in the steady state is
then two messages, both received where they land.

Sends are asynchronous (``isend``) and never waited on while training: a
blocking send could wait for a receive that its receiver posts only after a
message the sender has yet to send (a delayed gradient is consumed an
iteration after it is sent). ``flush`` ends an epoch: every process sends
an end marker down each of its streams and reads each incoming stream up to
the marker, so nothing is left in flight (no receive stays posted) and the
inboxes hold every pending message (they are checkpointed like the local
engine's).
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import torch
import torch.distributed as dist

from dbench.method import CHANNELS, ROUTES, AllReduce, Message, Send, route

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool)
MAX_DIMS = 6
MAX_TAG = 2  # a message's tag: the iteration, and the micro-batch for schedules that split a batch
HEADER = 3 + MAX_DIMS + 1 + MAX_TAG + 1  # channel, dtype, ndim, dims, tag length, tag, payload in the slot
END = -1  # channel code of the end-of-epoch marker


class Transport:
    """Process ``rank``'s end of the streams; also the driver's port (see dbench.engine.driver)."""

    blocking = True  # a Recv with an empty inbox reads the sender's stream until the message is there

    def __init__(self, rank: int, world: int, device: torch.device, base: int = 0, group=None, streams=None):
        """Module ``rank`` of the ``world`` modules of one replica, whose module 0 is process ``base`` (replica d
        of a run with replicas: d·K); ``group``: the process group of this module's copies in every replica,
        over which ``all_reduce`` averages (None: no replicas); ``streams``: a process group of every process,
        the streams' own (None: the default group), so that the receives posted ahead match nothing but the
        streams' sends (not torch's pipeline runner's, say, in the same processes)."""
        self.rank, self.world, self.base, self.group, self.streams = rank, world, base, group, streams
        self.device = torch.device(device)  # where the stage wants its messages
        # The wire: NCCL moves CUDA tensors in place; gloo's point-to-point moves host memory only,
        # so under gloo (the CPU, or modules sharing one GPU) a CUDA message is staged through the host.
        self.wire = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.inbox: dict[str, deque[Message]] = {c: deque() for c in CHANNELS}
        self._sends: deque = deque()  # (work, tensor) kept alive until the send completes
        # Each stream's slot size in bytes (the previous payload's; 0: no slot), out to readers and in from
        # sources; both ends of a stream update it from the same messages, so they agree.
        self._slot_out: dict[int, int] = {}
        self._slot_in: dict[int, int] = {}
        # Per source: its next message's receives posted ahead (header, slot); the payloads whose headers
        # are in, in stream order, as (receives to wait for, payload, channel, tag); sources at their end marker.
        self._ahead: dict[int, tuple] = {}
        self._landing: dict[int, deque] = {}
        self._ended: set[int] = set()

    # Who talks to whom, from the channel routes of dbench.method.
    def source(self, channel: str) -> int:
        src = route(channel).source(self.rank, self.world)
        if src is None:
            raise RuntimeError(f"module {self.rank} waits on {channel!r}, which no module sends to it")
        return src

    def sources(self) -> list[int]:
        """Every process that may send to this one."""
        found = {r.source(self.rank, self.world) for r in ROUTES.values()}
        return sorted(j for j in found if j is not None)

    def readers(self) -> list[int]:
        """Every process that reads a stream from this one (the mirror of ``sources``)."""
        return sorted({j for r in ROUTES.values() for j in r.readers(self.rank, self.world)})

    def send(self, op: Send) -> None:
        payload = op.tensor.detach().to(self.wire).contiguous()
        for dst in route(op.channel).targets(op.channel, self.rank, self.world):
            self._post_message(dst, CHANNELS.index(op.channel), payload, tuple(op.tag))
        self._reap()
        self._pump()  # the stage computed since it last asked: the payloads whose headers came get their receives

    def _post_message(self, dst: int, code: int, payload: torch.Tensor | None, tag: tuple) -> None:
        """Header, slot (the payload, or a filler when it does not fit), then the payload if it did not."""
        slot = self._slot_out.get(dst, 0)
        nbytes = -1 if payload is None else payload.nbytes  # None: the end marker
        fits = nbytes == slot
        self._post(dst, _header(code, payload, tag, self.wire, fits))
        if slot:
            self._post(dst, payload if fits else torch.empty(slot, dtype=torch.uint8, device=self.wire))
        if not fits and payload is not None:
            self._post(dst, payload)
        self._slot_out[dst] = max(nbytes, 0)  # after the end marker: no slot, as the stream's start

    def all_reduce(self, op: AllReduce, meter=None) -> "Transport":
        """Average ``op.tensors`` in place over this module's copies (one all-reduce of them flattened, as
        DDP's buckets); returns when done (``self.done`` is always True: this port blocks)."""
        if self.group is None:
            raise RuntimeError(f"module {self.rank} averaged its {op.what} over replicas, but the run has none")
        if meter is not None:
            meter.communicating()  # the collective's time, waiting for the slowest copy included
        flat = torch.cat([t.detach().reshape(-1) for t in op.tensors]).to(self.wire)
        try:
            dist.all_reduce(flat, group=self.group)  # a sum: divided below, as the local engine does
        except RuntimeError as e:
            raise RuntimeError(f"module {self.rank}: the all-reduce of its {op.what} with its copies in the other "
                               f"replicas failed (a replica timed out or stopped): {e}") from e
        flat /= dist.get_world_size(self.group)
        offset = 0
        for t in op.tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        return self

    done = True  # what the driver asks of an all-reduce's answer

    def poll(self, channel: str) -> Message | None:
        self._pump()
        queue = self.inbox[channel]
        return queue.popleft() if queue else None

    def wait(self, channel: str, meter=None) -> Message:
        """The next message of ``channel``, reading the source's stream until one arrives (blocks).

        ``meter`` (the stage's, or None) is marked communicating from the moment a message's header is in
        (its sender has posted it) until its payload is, and blocked on ``channel`` again if that message
        was for another channel: the time before a header arrives is waiting for the peer, not transfer.
        """
        queue = self.inbox[channel]
        src = self.source(channel)
        while not queue:
            if self._read(src, meter) is None:
                raise RuntimeError(f"module {self.rank} waited for {channel!r} from module {src}, which ended its epoch")
            if not queue and meter is not None:
                meter.blocked(channel)
        return queue.popleft()

    def flush(self) -> None:
        """End of epoch: send end markers, read every incoming stream up to its marker, wait for all sends."""
        for dst in self.readers():
            self._post_message(dst, END, None, ())
        for src in self.sources():
            while self._read(src) is not None:
                pass
        self._ended.clear()  # every stream is quiet: the next epoch posts its receives afresh
        while self._sends:
            work, _ = self._sends.popleft()
            try:
                work.wait()
            except RuntimeError as e:
                raise RuntimeError(f"a message was never received (timed out or connection lost): {e}") from e

    def queued(self) -> Iterator[torch.Tensor]:
        for q in self.inbox.values():
            yield from (m.tensor for m in q)

    def _post(self, dst: int, tensor: torch.Tensor) -> None:
        self._sends.append((dist.isend(tensor, self.base + dst, group=self.streams), tensor))

    def _reap(self) -> None:
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    def _pump(self) -> None:
        """Without blocking: every source whose next header is in gets its payload's receive (where the
        slot did not hold it) and its next message's receives posted."""
        for src in list(self._ahead):  # the sources with a header posted ahead (a hot path: every send and poll)
            while src in self._ahead and self._ahead[src][0].is_completed():
                self._wait(self._ahead[src][0], src)  # done: raises if the receive failed
                self._take_header(src)

    def _post_ahead(self, src: int) -> None:
        """Post the receives of ``src``'s next message: its header, and its slot if the stream has one."""
        header = self._post_recv(torch.empty(HEADER, dtype=torch.int64, device=self.wire), src)
        size = self._slot_in.get(src, 0)
        slot = self._post_recv(torch.empty(size, dtype=torch.uint8, device=self.wire), src) if size else (None, None)
        self._ahead[src] = (header[0], header[1], *slot)

    def _take_header(self, src: int) -> None:
        """The header posted ahead for ``src`` is in (and waited for, once: a gloo receive's second wait waits
        for another message). File its payload as landing, post what the stream sends next."""
        _, header, slot_work, slot = self._ahead.pop(src)
        fields = header.tolist()
        if fields[0] == END:
            if slot_work is not None:
                self._wait(slot_work, src)  # the filler
            self._slot_in[src] = 0
            self._ended.add(src)  # nothing posted ahead: the stream is quiet until the next epoch
            return
        channel, dtype, shape, tag, fits = parse_header(fields)
        works = [slot_work] if slot_work is not None else []  # the slot: the payload, or a filler
        if fits:
            payload = (slot if slot is not None else torch.empty(0, dtype=torch.uint8, device=self.wire))
            payload = payload.view(dtype).view(shape)  # its storage is the payload's bytes exactly
        else:
            work, payload = self._post_recv(torch.empty(shape, dtype=dtype, device=self.wire), src)
            works.append(work)  # after the filler
            self._slot_in[src] = payload.nbytes
        self._landing.setdefault(src, deque()).append((works, payload, channel, tag))
        self._post_ahead(src)  # after this message's own receives: stream order (NCCL matches in order)

    def _read(self, src: int, meter=None) -> str | None:
        """Read one message from ``src`` into its inbox (blocking); None at the end marker.

        ``meter`` is blocked until the message's header is in (its sender has posted it), communicating
        from then until its payload is."""
        landing = self._landing.get(src)
        while not landing:
            if src in self._ended:
                return None
            if src not in self._ahead:  # the stream's first message of the epoch
                self._post_ahead(src)
            self._wait(self._ahead[src][0], src)
            self._take_header(src)
            landing = self._landing.get(src)
        if meter is not None:
            meter.communicating()
        works, payload, channel, tag = landing.popleft()
        for work in works:
            self._wait(work, src)
        self.inbox[channel].append(Message(payload.to(self.device), tag))
        return channel

    def _post_recv(self, tensor: torch.Tensor, src: int) -> tuple:
        return dist.irecv(tensor, self.base + src, group=self.streams), tensor

    def _wait(self, work, src: int) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            # Say which peer went silent: the one whose stream broke or timed out,
            # not this module, is usually where the failure started.
            raise RuntimeError(f"no message from module {src} (timed out or connection lost): {e}") from e


def _header(code: int, tensor: torch.Tensor | None, tag: tuple, device: torch.device, fits: bool) -> torch.Tensor:
    if tensor is None:  # the end marker
        return torch.tensor([code] + [0] * (HEADER - 1), dtype=torch.int64, device=device)
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"a message has {tensor.dim()} dimensions; at most {MAX_DIMS} are supported")
    if tensor.dtype not in DTYPES:
        raise ValueError(f"a message has dtype {tensor.dtype}; supported: {DTYPES}")
    if len(tag) > MAX_TAG or not all(isinstance(v, int) for v in tag):
        raise ValueError(f"a message's tag {tag!r} must be at most {MAX_TAG} integers")
    dims = list(tensor.shape) + [0] * (MAX_DIMS - tensor.dim())
    tags = list(tag) + [0] * (MAX_TAG - len(tag))
    return torch.tensor([code, DTYPES.index(tensor.dtype), tensor.dim(), *dims, len(tag), *tags, int(fits)],
                        dtype=torch.int64, device=device)


def parse_header(fields: list[int]) -> tuple[str, torch.dtype, list[int], tuple, bool]:
    """``(channel, dtype, shape, tag, in the slot)`` of a message from its header (the inverse of ``_header``)."""
    code, dtype, ndim, *rest = fields
    dims, (ntag, *tag) = rest[:MAX_DIMS], rest[MAX_DIMS:]
    return CHANNELS[code], DTYPES[dtype], dims[:ndim], tuple(tag[:ntag]), bool(tag[MAX_TAG])
