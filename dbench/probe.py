"""``dbench probe-link``: latency, bandwidth and posting cost between two processes of this machine.

Measured through dbench's own transport (``dbench.engine.transport``: a
header then the payload, per message, received ahead where the stream's
previous message had the same size), so that a projection of dbench's
distributed engine charges what its messages really cost here: two processes
ping-pong a message up and back down, for sizes from 8 bytes to ``max_bytes``,
``repeats`` times each after a warm-up. The one-way time of the smallest
message is the latency; the bandwidth is the slope of the one-way time over
the bytes between the smallest and the largest message; the posting cost is
the sender's median time to hand a message of the largest size to the
transport; the receiving cost is the receiver's median time per message to
take a burst of small messages that have already arrived (what a stage pays
per message even when it never waits). gloo between CPU processes (each pinned to its own CPU, one torch
thread, as the distributed engine pins modules); NCCL between two GPUs where
there are two.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = (8, 1 << 10, 1 << 16, 1 << 20, 1 << 23)
BURST = 20  # small messages per burst in the receiving cost's measurement


def _worker(rank: int, port: int, device: str, sizes: list[int], repeats: int, cpus, queue) -> None:
    from dbench.cpus import pin
    from dbench.engine.distributed import data_backend, init
    from dbench.engine.transport import Transport
    from dbench.method import DOWN, UP, Send

    if cpus is not None:
        pin(cpus[rank])  # before any thread starts, as the launcher pins a module's process
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    devices = ["cpu", "cpu"] if device == "cpu" else ["cuda:0", "cuda:1"]
    dev = torch.device(devices[rank])
    init(rank, 2, dev, 120, data_backend(devices))
    transport = Transport(rank, 2, dev, streams=dist.new_group())  # as the engine: streams of their own
    one_way, posting = {}, []
    for size in sizes:
        payload = torch.zeros(max(1, size // 4), dtype=torch.float32, device=dev)
        times = []
        for i in range(repeats + 2):  # two warm-up round trips
            dist.barrier()
            if rank == 0:
                began = time.perf_counter()
                transport.send(Send(UP, payload))
                posted = time.perf_counter() - began
                transport.wait(DOWN)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                took = time.perf_counter() - began
                if i >= 2:
                    times.append(took / 2)
                    if size == sizes[-1]:
                        posting.append(posted)
            else:
                got = transport.wait(UP).tensor
                transport.send(Send(DOWN, got))
        one_way[size] = statistics.median(times) if rank == 0 else None
    # The receiver's cost of a message already there: module 0 posts a burst of small messages, module 1
    # takes them once they have surely arrived (after a pause), timing each take.
    taking = []
    for _ in range(5):
        dist.barrier()
        if rank == 0:
            for _ in range(BURST):
                transport.send(Send(UP, torch.zeros(2, device=dev)))
        else:
            time.sleep(0.2)
            began = time.perf_counter()
            for _ in range(BURST):
                transport.wait(UP)
            taking.append((time.perf_counter() - began) / BURST)
    receive = torch.tensor([statistics.median(taking) if rank == 1 else 0.0], dtype=torch.float64)
    dist.broadcast(receive, src=1)
    transport.flush()
    if rank == 0:
        queue.put((one_way, statistics.median(posting), float(receive.item())))
    dist.destroy_process_group()


def probe(device: str = "cpu", max_bytes: int = SIZES[-1], repeats: int = 20) -> dict:
    """The link profile between two processes (a dict for ``dbench.projection.link``)."""
    from dbench.cpus import module_shares
    from dbench.engine.launch import free_port

    sizes = sorted({s for s in SIZES if s <= max_bytes} | {max_bytes})
    cpus = module_shares(2) if device == "cpu" else None
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(free_port(), device, sizes, repeats, cpus, queue), nprocs=2,
                       start_method="spawn")
    one_way, posting, receiving = queue.get()
    small, large = sizes[0], sizes[-1]
    latency = one_way[small]
    bandwidth = (large - small) / max(one_way[large] - latency, 1e-12)
    backend = "gloo" if device == "cpu" else "nccl"
    return {
        "name": f"probe-{backend}-{device}",
        "latency_s": latency,
        "bandwidth_Bps": bandwidth,
        "post_s": posting,
        "recv_s": receiving,
        "source": (f"dbench probe-link on {platform.node()} ({platform.processor() or platform.machine()}), torch "
                   f"{torch.__version__}, {backend} through dbench's transport, CPUs {cpus}, {repeats} round trips "
                   f"per size"),
        "one_way_s": {str(k): v for k, v in one_way.items()},
    }


def save(profile: dict, out: Path) -> None:
    from dbench.files import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, profile)
