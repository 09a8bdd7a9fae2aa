"""Projection: what a run would take on its N devices, replayed from the trace of its local-engine run.

ALGORITHMS.md ("Projection") is the model, and only it:

- stage p (module k of replica d, p = d·K + k) has a clock c_p, continuous
  over the epoch; a traced compute (or data) segment of d seconds advances it
  by d;
- a Send of b bytes from p to q on a link of latency α and bandwidth β arrives
  at a = max(c_p + α, free_pq) + b/β, free_pq being when the link finished its
  previous message (one FIFO link per ordered pair, as the distributed engine
  has one stream per pair); the sender's clock advances by its posting cost
  (the profile's, which is α unless a probe measured it);
- a Recv of a message arriving at a sets c_q = max(c_q + r, a), r being the
  receiver's cost of taking a message that has already arrived (the
  profile's: measured by a probe, 0 for a published profile, whose latency
  covers it): the difference is waiting;
- an all-reduce of b bytes over the D copies of a module (ring) starts when the
  last copy reaches it and takes 2(D−1)·(α + b/(D·β));
- the epoch's projected training time is the largest clock at its end.

Laid out anew (``relayout``): a run traced at K modules × D replicas
projected on D' ≥ D replicas of the same K modules, each replica keeping the
traced per-device batch B/D (so the global batch is D'·B/D and an epoch has
⌈S·D/D'⌉ steps of the S traced): every replica replays replica 0's events,
and each update's all-reduce (recorded where replicas would average even on a
run without them) spans the D' copies. Another K is another cut, with other
segments: it needs a trace of its own.

What it leaves out, and says so wherever it prints: contention between
devices for memory bandwidth or a shared host (each segment was timed alone),
a transport's per-message overheads beyond α and r (headers, host staging),
the engine's per-step host work outside the stages' programs (the loop, the
loss accumulated on the writer), and compute/communication overlap inside a
segment. ``benchmarks/projection.py`` measures the error this leaves against
the distributed engine wherever both can run.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from dbench import summary as summary_of
from dbench.errors import DbenchError
from dbench.files import CONFIG, SUMMARY, Unreadable, read_object
from dbench.routes import route


@dataclass(frozen=True)
class Link:
    """A link between two devices: latency (s), bandwidth (bytes/s), the sender's posting cost (s) and the
    receiver's cost of taking a message that has already arrived (s)."""

    name: str
    latency_s: float
    bandwidth_Bps: float
    post_s: float | None = None  # None: the latency
    source: str = ""
    recv_s: float = 0.0

    @property
    def posting(self) -> float:
        return self.latency_s if self.post_s is None else self.post_s

    def describe(self) -> str:
        return (f"{self.name}: latency {self.latency_s * 1e6:.1f} µs, bandwidth {self.bandwidth_Bps / 1e9:.2f} GB/s, "
                f"posting {self.posting * 1e6:.1f} µs, receiving {self.recv_s * 1e6:.1f} µs"
                + (f" ({self.source})" if self.source else ""))


GB = 1e9
# Published figures, one direction of one link between two devices. Latencies are the order of a small
# message's one-way time through the vendor's stack as its documents report it; bandwidths are the link's
# nominal rate per direction (what a large transfer approaches).
PROFILES = {
    # NVIDIA H100 SXM datasheet: NVLink 4, 900 GB/s total per GPU = 450 GB/s each way; latency ~2 µs (NCCL p2p).
    "nvlink4": Link("nvlink4", 2e-6, 450 * GB, source="NVIDIA H100 datasheet: 900 GB/s bidirectional per GPU"),
    # PCI-SIG: PCIe 4.0 x16, 16 GT/s × 16 lanes, 128b/130b: 31.5 GB/s per direction.
    "pcie4": Link("pcie4", 5e-6, 31.5 * GB, source="PCI-SIG PCIe 4.0 x16: 31.5 GB/s per direction"),
    # PCI-SIG: PCIe 5.0 x16, 32 GT/s: 63 GB/s per direction.
    "pcie5": Link("pcie5", 5e-6, 63 * GB, source="PCI-SIG PCIe 5.0 x16: 63 GB/s per direction"),
    # NVIDIA ConnectX-7 / Quantum-2 InfiniBand NDR: 400 Gb/s per port = 50 GB/s; ~1.5 µs end to end.
    "ib-ndr": Link("ib-ndr", 1.5e-6, 50 * GB, source="NVIDIA InfiniBand NDR: 400 Gb/s per port"),
    # IEEE 802.3 100GbE: 12.5 GB/s; RoCE/TCP small-message latency ~10 µs.
    "100gbe": Link("100gbe", 10e-6, 12.5 * GB, source="IEEE 802.3 100 Gb/s Ethernet"),
    # IEEE 802.3 25GbE: 3.125 GB/s; ~15 µs.
    "25gbe": Link("25gbe", 15e-6, 3.125 * GB, source="IEEE 802.3 25 Gb/s Ethernet"),
}


def link(name_or_path: str) -> Link:
    """A named profile, or a profile stored by ``dbench probe-link`` (a JSON file)."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise DbenchError(f"unknown link profile {name_or_path!r}: name one of {', '.join(PROFILES)}, or a file "
                          f"`dbench probe-link` wrote")
    try:
        data = read_object(path)
        return Link(data["name"], float(data["latency_s"]), float(data["bandwidth_Bps"]),
                    None if data.get("post_s") is None else float(data["post_s"]), data.get("source", str(path)),
                    float(data.get("recv_s") or 0.0))
    except Unreadable as e:
        raise DbenchError(f"{e}: not a link profile `dbench probe-link` wrote") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DbenchError(f"{path} is not a link profile (name, latency_s, bandwidth_Bps): {e}") from None


@dataclass
class _Clock:
    c: float = 0.0
    compute: float = 0.0
    data: float = 0.0
    comm: float = 0.0
    wait: float = 0.0
    i: int = 0  # the next event


@dataclass
class Projection:
    """The replay's result: the epoch's seconds and each device's breakdown."""

    seconds: float
    devices: list[dict] = field(default_factory=list)  # per stage: module, replica, compute/data/comm/wait seconds
    steps: int = 0

    @property
    def per_step(self) -> float:
        return self.seconds / self.steps if self.steps else math.nan


def replay(trace: dict, profile: Link) -> Projection:
    """The trace's epoch on its K·D devices, on a virtual clock per device (the model in the module docstring).

    Deterministic: the same trace and profile give the same numbers. A trace whose messages cannot all be
    matched (a stage waits for one no stage sends) is an error naming the stage.
    """
    K, D = int(trace["modules"]), int(trace["replicas"])
    stages = trace["stages"]
    if len(stages) != K * D:
        raise DbenchError(f"the trace holds {len(stages)} stages, not K·D = {K}·{D}")
    clocks = [_Clock() for _ in stages]
    queues: dict[tuple[int, int, str], deque] = {}  # (sender, receiver, channel) -> arrival times
    free: dict[tuple[int, int], float] = {}  # (sender, receiver) -> when the link is free
    joins: dict[int, dict[int, int]] = {}  # module -> {stage: bytes} that reached its all-reduce
    alpha, beta, post, receive = profile.latency_s, profile.bandwidth_Bps, profile.posting, profile.recv_s

    def advance(p: int) -> bool:
        """Run stage p's events until it must wait; True if it moved."""
        clock, events = clocks[p], stages[p]
        k, base = p % K, (p // K) * K
        moved = False
        while clock.i < len(events):
            e = events[clock.i]
            op = e["op"]
            if op == "compute":
                clock.c += e["s"]
                clock.compute += e["s"]
            elif op == "data":
                clock.c += e["s"]
                clock.data += e["s"]
            elif op == "send":
                for j in route(e["channel"]).targets(e["channel"], k, K):
                    q = base + j
                    start = max(clock.c + alpha, free.get((p, q), 0.0))
                    arrive = start + e["bytes"] / beta
                    free[(p, q)] = arrive
                    queues.setdefault((p, q, e["channel"]), deque()).append(arrive)
                clock.c += post
                clock.comm += post
            elif op == "recv":
                src = route(e["channel"]).source(k, K)
                if src is None:
                    raise DbenchError(f"trace: stage {p} receives on {e['channel']!r}, which no stage sends to it")
                queue = queues.get((base + src, p, e["channel"]))
                if not queue:
                    return moved  # not sent yet: another stage must run first
                arrive = queue.popleft()
                clock.c += receive
                clock.comm += receive
                if arrive > clock.c:
                    clock.wait += arrive - clock.c
                    clock.c = arrive
            elif op == "allreduce":
                joined = joins.setdefault(k, {})
                joined[p] = e["bytes"]
                if len(joined) < D:
                    return moved  # the other copies have not reached it: they run first
                members = sorted(joined)
                start = max(clocks[m].c for m in members)
                took = 2 * (D - 1) * (alpha + max(joined.values()) / (D * beta))
                for m in members:
                    clocks[m].wait += start - clocks[m].c
                    clocks[m].comm += took
                    clocks[m].c = start + took
                    if m != p:
                        clocks[m].i += 1  # their all-reduce is done too
                del joins[k]
            elif op != "end":
                raise DbenchError(f"trace: unknown event {op!r} at stage {p}")
            clock.i += 1
            moved = True
        return moved

    while not all(c.i >= len(s) for c, s in zip(clocks, stages)):
        moved = False
        for p in range(len(stages)):
            # A stage parked in an all-reduce that the last copy completed has already moved past it.
            moved |= advance(p)
        if not moved:
            stuck = [f"stage {p} at {stages[p][c.i]['op']} {stages[p][c.i].get('channel', '')}".strip()
                     for p, c in enumerate(clocks) if c.i < len(stages[p])]
            raise DbenchError(f"trace cannot be replayed: every stage waits ({'; '.join(stuck)})")
    seconds = max(c.c for c in clocks)
    devices = [{"module": p % K, "replica": p // K, "compute_s": c.compute, "data_s": c.data, "comm_s": c.comm,
                "wait_s": c.wait, "idle_s": seconds - c.c} for p, c in enumerate(clocks)]
    return Projection(seconds=seconds, devices=devices, steps=int(trace.get("steps", 0)))


def relayout(trace: dict, replicas: int) -> dict:
    """The trace laid out on ``replicas`` copies of its K modules (the module docstring): every copy replays
    replica 0's events over the first ⌈S·D/D'⌉ steps, each replica keeping the traced per-device batch."""
    K, D, S = int(trace["modules"]), int(trace["replicas"]), int(trace.get("steps", 0))
    if replicas == D:
        return trace
    if replicas < D:
        raise DbenchError(f"cannot project {replicas} replica(s) from a trace of {D}: each replica keeps the traced "
                          f"per-device batch, so an epoch on fewer would take more steps than the trace holds; "
                          f"trace the run with --replicas {replicas}")
    if not any(e["op"] == "allreduce" for events in trace["stages"] for e in events):
        raise DbenchError("the trace marks no update (it was recorded before traces marked where replicas would "
                          "average): record the run again with --trace to lay it out on replicas")
    steps = math.ceil(S * D / replicas)
    first = [_first_steps(events, steps) for events in trace["stages"][:K]]
    return {**trace, "replicas": replicas, "steps": steps, "stages": [list(e) for _ in range(replicas) for e in first]}


def _first_steps(events: list[dict], steps: int) -> list[dict]:
    """A stage's events up to the end of its ``steps``-th step."""
    ends = 0
    for i, e in enumerate(events):
        if e["op"] == "end":
            ends += 1
            if ends == steps:
                return events[:i + 1]
    return events


def replicas_for(modules: int, replicas: int, devices: int | None, asked: int | None, path: Path) -> int:
    """D' for a run traced at ``modules`` × ``replicas``: ``asked`` (--replicas), or ``devices`` / K (--devices);
    the traced D if neither. A layout that is not K × D' for the traced K is an error naming both."""
    if devices is None and asked is None:
        return replicas
    if devices is not None and devices % modules:
        raise DbenchError(f"{path}: traced at K={modules} modules, so --devices {devices} is not K × D' for any D' "
                          f"(another K is another cut: trace a run at --gpus {devices} for it)")
    want = asked if asked is not None else devices // modules
    if devices is not None and asked is not None and modules * asked != devices:
        raise DbenchError(f"{path}: traced at K={modules} modules; --devices {devices} --replicas {asked} would be "
                          f"K={devices // asked} (another cut: trace a run at --gpus {devices // asked} for it)")
    return want


# --- projecting runs -------------------------------------------------------------------------------------------

EXACT = "exact gradient"
GIB = 2**30


@dataclass
class Projected:
    """One run's projection, with what the table shows beside it."""

    path: Path
    label: str
    group: tuple  # (model, data set, N devices, batch): what is compared with what
    exact: bool
    projection: Projection
    peak_bytes: list[int]  # per device, accounted (or CUDA allocated where the run has it)
    local_seconds: float | None  # the traced epoch's own (serial) seconds on the local engine; None if laid out anew
    relaid: str = ""  # the traced layout ("K×D") where the projection lays the run out anew, else ""


def load(path: Path, profile: Link, devices: int | None = None, replicas: int | None = None) -> Projected:
    """The projection of the run at ``path`` (its trace.json) on ``profile``; DbenchError if it has none.

    ``devices`` (N) or ``replicas`` (D'): lay the run out on D' replicas of its traced K modules (``relayout``).
    """
    trace_path = path / "trace.json"
    if not trace_path.is_file():
        raise DbenchError(f"{path} holds no trace.json: record one with `dbench run --engine local --trace ...`")
    try:
        trace, config, summary = (read_object(path / name) for name in ("trace.json", CONFIG, SUMMARY))
    except Unreadable as e:
        raise DbenchError(f"{path}: cannot read its trace, config or summary: {e}") from None
    run = config["run"]
    k, d = int(trace["modules"]), int(trace["replicas"])
    want = replicas_for(k, d, devices, replicas, path)
    batch = int(run["batch_size"])
    if want != d and batch % d:
        raise DbenchError(f"{path}: batch {batch} does not split evenly over its {d} traced replicas, so no per-device "
                          f"batch carries over to {want}: trace it with a batch divisible by {d}")
    facts = config.get("method_facts") or {}
    label = summary_of.method_label(config) + summary_of.layout_label(k, want, facts.get("parallelism"))
    modules = summary.get("modules") or []
    key = "cuda_peak_allocated_bytes" if modules and "cuda_peak_allocated_bytes" in modules[0] else "accounted_peak_bytes"
    peaks = [int(m.get(key) or 0) for m in modules]
    if want != d:
        peaks = peaks[:k] * want  # each copy holds what replica 0 held: the per-device batch is the traced one
    return Projected(path=path, label=label + ("*" if want != d else ""),
                     group=(run["model"], run["dataset"], k * want, batch * want // d),
                     exact=facts.get("family") == EXACT, projection=replay(relayout(trace, want), profile),
                     peak_bytes=peaks, local_seconds=trace.get("train_seconds") if want == d else None,
                     relaid=f"{k}×{d}" if want != d else "")


def text(runs: list[Projected], profile: Link, device_memory_gib: float | None = None) -> str:
    """The projection table: per group (model, data set, N devices, batch), each run's projected seconds per
    epoch, its speedup over the fastest exact layout projected the same way, the largest device's peak memory
    (and whether it fits), and each device's compute / communication / wait / data shares."""
    lines = [f"PROJECTED (not measured): every figure below replays a local-engine trace on a virtual clock "
             f"(ALGORITHMS.md, \"Projection\"). Link: {profile.describe()}.",
             "Left out: contention between devices, transport overheads beyond the link's latency and taking "
             "cost, the engine's per-step host work outside the modules' programs; benchmarks/RESULTS.md states the measured error."]
    relaid = [r for r in runs if r.relaid]
    if relaid:
        lines.append("* laid out anew from a trace at another layout (traced K×D: "
                     + ", ".join(sorted({f"{r.label} from {r.relaid}" for r in relaid})) + "): each replica keeps the "
                     "traced per-device batch, so the global batch is the one shown; the training at that batch "
                     "is not the traced one, and only its time is projected.")
    lines.append("")
    groups: dict[tuple, list[Projected]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    for (model, dataset, n, batch), members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        fitting = [m for m in members if fits(m, device_memory_gib)]
        exact = [m for m in fitting if m.exact]
        fastest = min(exact, key=lambda m: m.projection.seconds) if exact else None
        lines.append(f"{model} · {dataset} · N={n} devices · batch {batch}"
                     + (f" · fastest exact (projected): {fastest.label}" if fastest else " · no exact layout fits"
                        if device_memory_gib else ""))
        lines.append(f"{'method':<14} {'projected s/epoch':>17} {'× fastest exact':>15} {'MiB largest':>11} "
                     f"{'fits':>5} {'local engine s':>14}")
        for m in sorted(members, key=lambda m: m.projection.seconds):
            over = f"{fastest.projection.seconds / m.projection.seconds:.2f}" if fastest else "–"
            largest = max(m.peak_bytes) / 2**20 if m.peak_bytes else math.nan
            fit = "–" if device_memory_gib is None else ("yes" if fits(m, device_memory_gib) else "NO")
            local = f"{m.local_seconds:.2f}" if m.local_seconds is not None else "–"
            lines.append(f"{m.label:<14} {m.projection.seconds:>17.3f} {over:>15} {largest:>11.2f} {fit:>5} {local:>14}")
        unfit = [m.label for m in members if not fits(m, device_memory_gib)]
        if unfit:
            lines.append(f"{', '.join(unfit)} do(es) not fit {device_memory_gib:g} GiB per device here; of the "
                         f"layouts that fit, {min(fitting, key=lambda m: m.projection.seconds).label if fitting else 'none'} "
                         f"is fastest (projected).")
        lines.append("")
        lines.append("per device (projected shares of the epoch): compute · data · comm · wait · idle")
        for m in members:
            for dev in m.projection.devices:
                total = m.projection.seconds or 1.0
                shares = " · ".join(f"{100 * dev[f'{s}_s'] / total:5.1f}%" for s in ("compute", "data", "comm", "wait",
                                                                                    "idle"))
                lines.append(f"  {m.label:<14} module {dev['module']} replica {dev['replica']}: {shares}")
        lines.append("")
    return "\n".join(lines)


def fits(m: Projected, device_memory_gib: float | None) -> bool:
    """Whether every device of the run holds its peak within ``device_memory_gib`` (None: no limit given)."""
    return device_memory_gib is None or not m.peak_bytes or max(m.peak_bytes) <= device_memory_gib * GIB
