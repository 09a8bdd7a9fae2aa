"""Meters: time per module (compute vs waiting), memory per module and device, and the σ probe.

``Meters`` is what a trainer carries when it measures: one ``StageMeter`` per
module, installed on the stage and driven by the engine, plus the per-device
CUDA allocator peaks. ``start_epoch``/``stop_epoch`` bracket an epoch and
return one record per module.
"""
from __future__ import annotations

import torch

from typing import Iterable, Iterator

from dbench.meters.clock import DATA, IDLE, STATES
from dbench.meters.memory import cuda_peaks
from dbench.meters.stage_meter import StageMeter
from dbench.meters.sigma import SigmaResult, true_gradient
from dbench.meters.sigma import results as sigma_results

__all__ = ["Meters", "StageMeter", "SigmaResult", "true_gradient", "sigma_results", "STATES", "merge_records"]


def merge_records(segments: list[list[dict]]) -> list[dict]:
    """One epoch's module records from the records of its segments (an epoch cut by mid-epoch checkpoints).

    Seconds add up; the peaks are the largest of the segments' (with the breakdown of the largest).
    """
    merged = [dict(r, accounted_bytes=dict(r["accounted_bytes"])) for r in segments[0]]
    for records in segments[1:]:
        for into, r in zip(merged, records, strict=True):
            for state in STATES:
                # .get: a segment checkpointed before a state existed (comm, data) has no figure for it
                into[f"{state}_s"] = into.get(f"{state}_s", 0.0) + r.get(f"{state}_s", 0.0)
            if r["accounted_peak_bytes"] > into["accounted_peak_bytes"]:
                into["accounted_peak_bytes"], into["accounted_bytes"] = r["accounted_peak_bytes"], dict(r["accounted_bytes"])
            for key in [k for k in r if k.startswith("cuda_")]:
                into[key] = max(into[key], r[key])
    return merged


class Meters:
    """``sigma_stages``: how many of the meters (the first ones) σ is measured on: replica 0's modules when a
    run has replicas (every replica holds the same weights and applies the same averaged gradient)."""

    def __init__(self, stage_meters: list[StageMeter], sigma_stages: int | None = None):
        self.stages = stage_meters
        self.sigma_stages = len(stage_meters) if sigma_stages is None else sigma_stages

    @property
    def cuda_devices(self) -> list[torch.device]:
        return sorted({m.stage.device for m in self.stages if m.stage.device.type == "cuda"}, key=str)

    def start_epoch(self) -> None:
        """Call right after synchronizing every device (the clocks start here)."""
        for d in self.cuda_devices:
            torch.cuda.reset_peak_memory_stats(d)
        for m in self.stages:
            m.reset_peak()
            m.clock.start()

    def stop_epoch(self) -> list[dict]:
        """One record per module; call right after synchronizing every device."""
        peaks = {d: cuda_peaks(d) for d in self.cuda_devices}
        records = []
        for m in self.stages:
            seconds = m.clock.stop()
            record = {
                "module": m.stage.index,
                # With replicas, one record per device: module k of replica d.
                **({"replica": m.stage.replica} if m.stage.replicas > 1 else {}),
                "device": str(m.stage.device),
                **{f"{state}_s": seconds[state] for state in STATES},
                "accounted_peak_bytes": m.peak_total,
                "accounted_bytes": dict(m.peak),
            }
            if m.stage.device in peaks:
                # Per device: modules sharing a device report the same figures.
                record.update({f"cuda_{name}": value for name, value in peaks[m.stage.device].items()})
            records.append(record)
        return records

    def loading(self, batches: Iterable) -> Iterator:
        """``batches``, with the time each takes to come out of the loader marked as data on every module's
        clock in this process (its loader feeds them all; on CUDA the marks are events, so the loader's
        kernels are what is timed)."""
        batches = iter(batches)
        while True:
            for m in self.stages:
                m.clock.mark(DATA)
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                for m in self.stages:
                    m.clock.mark(IDLE)
            yield batch

    def arm_sigma(self, true_grads: list[list[torch.Tensor]]) -> None:
        for m, grads in zip(self.stages[:self.sigma_stages], true_grads, strict=True):
            m.sigma.arm(grads)

    def take_sigma(self) -> tuple[list[SigmaResult], SigmaResult]:
        """Per-module σ of the iteration just run, and the whole network's (host syncs: once per probe)."""
        taken = [m.sigma.take() for m in self.stages[:self.sigma_stages]]
        if any(t is None for t in taken):
            raise RuntimeError("take_sigma without arm_sigma before the step")
        return sigma_results(taken)
