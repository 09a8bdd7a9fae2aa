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
