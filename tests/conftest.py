"""Shared fixtures: tiny models and generated batches, all on the CPU."""
from __future__ import annotations

import contextlib
import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn


def tiny_blocks(seed: int = 0, batchnorm: bool = True) -> list[nn.Module]:
    """Five blocks of a small CNN on 3x8x8 inputs: enough structure for every split."""
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), norm(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), norm(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), norm(16), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
    ]


def tiny_revnet_blocks(seed: int = 0) -> list[nn.Module]:
    """Five blocks of a small RevNet on 3x8x8 inputs (dbench.models.revnet's pieces): stem, two reversible
    blocks, a downsampling block, head. Cut [(0, 3), (3, 5)] a module's top block is reversible; cut
    [(0, 2), (2, 4), (4, 5)] a reconstructed input travels down to a reversible block of the module below."""
    from dbench.models.revnet import Downsampling, Reversible, basic_residual, head, stem

    torch.manual_seed(seed)
    return [stem(4, imagenet=False), Reversible(basic_residual(4, 4)), Reversible(basic_residual(4, 4)),
            Downsampling(4, 8, stride=2), head(8, 10)]


def batches(n: int, batch: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def group(blocks: list[nn.Module], ranges: list[tuple[int, int]]) -> list[nn.Module]:
    blocks = copy.deepcopy(blocks)
    return [nn.Sequential(*blocks[a:b]) for a, b in ranges]


# The optimizer of the hand-unrolled references (test_delayed, test_fdg, test_petra), as the trainers under test.
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def sgd(module: nn.Module) -> torch.optim.Optimizer:
    """A reference's own optimizer: torch's SGD with dbench's single-tensor update (bit-identical numbers)."""
    return torch.optim.SGD(module.parameters(), foreach=False, **SGD)


def bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers()}


def restore_bn(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put saved BatchNorm buffers back. Rebind instead of copy_: a replay's or recompute's graph saved the
    buffers it read, and an in-place write would trip autograd's version check."""
    for prefix, sub in module.named_modules():
        for name, _ in list(sub.named_buffers(recurse=False)):
            setattr(sub, name, saved[f"{prefix}.{name}" if prefix else name])


def record_grads(trainer):
    """Capture what each stage hands its optimizer, keyed by (iteration, module)."""
    seen = {}
    for k, stage in enumerate(trainer.stages):
        original = stage.apply_update

        def capture(k=k, stage=stage, original=original):
            seen[(trainer.iteration, k)] = [p.grad.clone() for p in stage.module.parameters()]
            return original()  # the update's program, which the method runs with ``yield from``

        stage.apply_update = capture
    return seen


@pytest.fixture
def blocks() -> list[nn.Module]:
    return tiny_blocks()


@pytest.fixture(autouse=True, scope="session")
def generated_data_cached_for_the_session(tmp_path_factory):
    """One cache folder for the generated data sets for the whole session, inherited by every dbench process
    the tests start: the synthetic images are generated once, not once per process (dbench.data.synthetic);
    and the tests never write into the user's own cache."""
    before = os.environ.get("DBENCH_CACHE")
    os.environ["DBENCH_CACHE"] = str(tmp_path_factory.mktemp("dbench-cache"))
    yield
    if before is None:
        os.environ.pop("DBENCH_CACHE", None)
    else:
        os.environ["DBENCH_CACHE"] = before


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Every test not marked ``gpu`` runs on the CPU, as on CI's machine, also where a GPU is present.

    Their expected numbers (goldens, equalities with the CPU reference) and
    their ``--gpus K`` (which on a machine with CUDA asks for K GPUs) assume the
    CPU. Hidden from this process and from the processes it starts.
    """
    if "gpu" in request.keywords or not torch.cuda.is_available():
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def run_cli(args, monkeypatch, capsys, cwd=None) -> tuple[int, str, str]:
    """``dbench ARGS`` in this process (no interpreter to start), from ``cwd`` if given: (exit code, stdout, stderr)."""
    import sys

    from dbench import cli

    if cwd is not None:
        monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["dbench", *args])
    try:
        cli.entry()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def timing_confirms_profile(monkeypatch):
    """``--split time`` without timing the method: each cut measures what the block profile predicts for it,
    so the profile's cut stands (for tests of the profile's part of the choice, on fake profiles)."""
    from dbench import balance
    from dbench import plan as planning
    from dbench.partition import step_costs

    def confirmed(times, k, step_cost, boundaries, measure):
        return balance.balance_measured(times, k, step_cost, boundaries,
                                        lambda ranges: step_costs(times, ranges, step_cost, boundaries))

    monkeypatch.setattr(planning, "balance_measured", confirmed)


@contextlib.contextmanager
def interrupted_at_step(monkeypatch, step: int):
    """Inside, a run is stopped as by Ctrl-C (KeyboardInterrupt) when its progress reaches ``step`` steps,
    counted over the whole run; the runner's progress counts as usual again after the block."""
    from dbench import loop

    advance = loop.Progress.advance
    done = {"steps": 0}

    def stop(self, n):
        done["steps"] += n
        if done["steps"] == step:
            raise KeyboardInterrupt
        advance(self, n)

    monkeypatch.setattr(loop.Progress, "advance", stop)
    try:
        yield
    finally:
        monkeypatch.setattr(loop.Progress, "advance", advance)


def module_processes(launcher: int, marker: str = "forkserver") -> list[int]:
    """The module processes of a launcher, in the order they started (rank order).

    dbench's launcher forks them from its fork server (its child whose command line names ``forkserver``;
    the workers share that command line); torchrun's agent starts them itself (``marker``: "dbench").
    """
    table = subprocess.run(["ps", "-e", "-ww", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [(int(pid), int(ppid), args) for pid, ppid, args in (line.split(None, 2) for line in table.splitlines()
                                                                if len(line.split(None, 2)) == 3)]
    if marker == "forkserver":
        servers = {pid for pid, ppid, args in rows if ppid == launcher and "forkserver" in args}
        return sorted(pid for pid, ppid, _ in rows if ppid in servers)
    return sorted(pid for pid, ppid, args in rows if ppid == launcher and marker in args)
