"""CUDA checks, skipped where no GPU is present."""
from __future__ import annotations

import pytest
import torch

from conftest import batches, group, tiny_blocks
from dbench import Trainer

pytestmark = pytest.mark.gpu


def test_bp_on_cuda_matches_cpu(monkeypatch):
    # TF32 convolutions would differ from the CPU by ~1e-3; compare in full fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    splits = [(0, 2), (2, 5)]
    n = torch.cuda.device_count()
    devices = [torch.device("cuda", i % n) for i in range(2)]
    cpu = Trainer(group(tiny_blocks(), splits), "bp", lr=0.05, momentum=0.9)
    gpu = Trainer(group(tiny_blocks(), splits), "bp", lr=0.05, momentum=0.9, devices=devices)
    for x, y in batches(5):
        a, b = cpu.step(x, y), gpu.step(x, y)
        assert b.device == devices[-1]
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    for m_cpu, m_gpu in zip(cpu.modules, gpu.modules):
        for p_cpu, p_gpu in zip(m_cpu.parameters(), m_gpu.parameters()):
            torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["bp", "fr", "ddg"])
def test_accounted_memory_agrees_with_the_allocator(method):
    """On one GPU the accounting explains the allocator's peak: 0.7 <= accounted / measured <= 1.02.

    Measured is the peak of allocated bytes above what was allocated before the
    trainer existed (the batch is allocated first). The accounting cannot see
    the transient buffers of a forward and backward (intermediate gradients,
    convolution workspaces), hence the lower bound; it must never claim more
    than the allocator held, hence the upper one. Modules 0..K-1 all on cuda:0
    for FR and DDG would mix their peaks, so each runs as K=2 on two devices
    where there are two, else as K=1 (where every method is BP).
    """
    import copy

    from dbench.partition import partition, split_modules
    from dbench.registry import MODELS

    n = torch.cuda.device_count()
    k = 2 if n >= 2 else 1
    devices = [torch.device("cuda", i) for i in range(k)]
    torch.manual_seed(0)
    blocks = MODELS.get("resnet8")(num_classes=10).blocks
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 3, 32, 32, generator=g).to(devices[0]), torch.randint(0, 10, (64,), generator=g).to(devices[0]))
            for _ in range(4)]
    torch.cuda.synchronize()
    base = {d: torch.cuda.memory_allocated(d) for d in devices}
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    t = Trainer(split_modules(copy.deepcopy(blocks), partition(blocks, k, "blocks")), method, devices=devices, measure=True)
    t.meters.start_epoch()
    for x, y in data:
        t.step(x, y)
    torch.cuda.synchronize()
    for record in t.meters.stop_epoch():
        d = torch.device(record["device"])
        measured = torch.cuda.max_memory_allocated(d) - base[d]
        ratio = record["accounted_peak_bytes"] / measured
        assert 0.7 <= ratio <= 1.02, (record["module"], record["accounted_bytes"], measured)
        assert record["cuda_peak_allocated_bytes"] >= measured
