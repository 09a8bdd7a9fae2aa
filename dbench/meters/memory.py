"""How many bytes each module holds, by category: accounted from the tensors themselves.

Categories, in the order a storage is attributed (a storage shared by two
categories is counted once, in the first):

    parameters   the module's weights and buffers (BatchNorm statistics)
    gradients    ``.grad`` of the weights, between a backward and the update
    optimizer    optimizer state (momentum buffers)
    <method>     what the method keeps (``Stage.held_tensors``): FR's stored
                 inputs, DDG's weight snapshots, DNI's synthesizers (with their
                 gradients and Adam state), DFA's feedback matrices
    messages     activations and gradients that arrived and wait to be used
                 (FR's and DDG's delayed gradients spend an iteration here)
    activations  storages that live autograd graphs saved for backward, seen
                 through saved-tensor hooks (DDG's K-k+1 graphs land here)

Sizes are storage sizes (``untyped_storage().nbytes()``), which is what the
allocator holds even for a view. The meter samples the accounting at every
transition of the stage and right before every backward and every update (a
backward is where activations peak, an update where gradients do), and keeps
the breakdown of the sample with the largest total. It does so in a window of
iterations at each epoch's start, once steady (``StageMeter``), not at every
iteration. On the CPU this is the
"accounted" peak; on CUDA it is reported next to the allocator's measured peak,
which also holds what the accounting does not see (the data set, temporaries
of a forward, workspaces).
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch

FIXED = ("parameters", "gradients", "optimizer")


class SavedTensors:
    """Bytes of the storages that live autograd graphs keep for backward.

    Inside :meth:`hooks`, every tensor a forward saves is wrapped; the wrapper
    lives exactly as long as the graph holds it, so its storage is counted from
    the forward until the backward frees it (or the graph is dropped). Each
    wrapper also remembers the iteration of ``clock`` (anything with an
    ``iteration``) it was saved in, so that graphs' ages can be checked.
    """

    def __init__(self, clock):
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, saved references]
        self.clock = clock
        self.born: dict[int, int] = {}  # iteration -> saved tensors from it still alive

    def check_lifetime(self, iteration: int, lifetime: int, stage) -> None:
        """Raise if a graph built more than ``lifetime`` iterations ago is still alive (see StageMeter)."""
        if self.born and iteration - min(self.born) > lifetime:
            raise RuntimeError(
                f"method {stage.name!r}, module {stage.index}: a graph built at iteration {min(self.born)} is still "
                f"alive at iteration {iteration}, longer than the {lifetime} iterations the memory meter's "
                f"accounting window assumes: account at every iteration (window=EVERY_ITERATION) for this method"
            )

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> "_Saved":
        return _Saved(tensor, self)

    def drop(self, key: int, born: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
        left = self.born[born] - 1
        if left:
            self.born[born] = left
        else:
            del self.born[born]


class _Saved:
    __slots__ = ("tensor", "version", "key", "owner", "born")

    def __init__(self, tensor: torch.Tensor, owner: SavedTensors):
        self.tensor = tensor
        # Autograd checks that a saved tensor was not modified in place before
        # its backward; with a hook in between that check is ours to make.
        self.version = tensor._version
        # The storage's address, computed from the tensor's rather than read from its storage: building
        # the storage's Python object for each of the thousands of tensors a deep network saves per step
        # was most of this hook's cost. Its size is read only for a storage not already counted (weights
        # are saved again at every layer's forward, and views share their base's storage).
        self.key = key = tensor.data_ptr() - tensor.storage_offset() * tensor.element_size()
        self.owner = owner
        self.born = born = owner.clock.iteration
        owner.born[born] = owner.born.get(born, 0) + 1
        entry = owner.live.get(key)
        if entry is None:
            owner.live[key] = [tensor.untyped_storage().nbytes(), 1]
        else:
            entry[1] += 1

    def __del__(self):
        self.owner.drop(self.key, self.born)


def _unpack(saved: _Saved) -> torch.Tensor:
    if saved.tensor._version != saved.version:
        raise RuntimeError(
            "a tensor saved for backward was modified in place after it was saved "
            f"(version {saved.version} -> {saved.tensor._version}): the gradient would be wrong"
        )
    return saved.tensor


class FixedTensors:
    """A module's parameters and buffers, whose storages stay the same while it trains.

    Updates are in place (the optimizer's step, BatchNorm's running statistics), so
    the storages' addresses and sizes are read once, not at every sample: walking
    ``module.parameters()`` and ``buffers()`` through every submodule at each of a
    step's samples cost more than the accounting itself (milliseconds per step on
    a deep ResNet, where a GPU step takes tens). The meter takes them anew at every
    epoch's start (``StageMeter.reset_peak``), which also catches a module changed
    between epochs.
    """

    def __init__(self, module: torch.nn.Module):
        self.params = list(module.parameters())
        self.keys: set[int] = set()
        self.nbytes = 0
        for t in itertools.chain(self.params, module.buffers()):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.keys:
                continue
            self.keys.add(key)
            self.nbytes += storage.nbytes()


def account(stage, saved: SavedTensors, queued: Iterable[torch.Tensor], fixed: FixedTensors) -> dict[str, int]:
    """Bytes held by ``stage`` right now, by category (see the module docstring).

    ``fixed``: the module's parameters and buffers, as taken at the epoch's start.
    """
    claimed: set[int] = set(fixed.keys)

    def bytes_of(tensors: Iterable[torch.Tensor | None]) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in claimed:  # empty, or already counted
                continue
            claimed.add(key)
            total += storage.nbytes()
        return total

    optimizer = stage.optimizer
    held = {
        "parameters": fixed.nbytes,
        "gradients": bytes_of(p.grad for p in fixed.params),
        "optimizer": bytes_of(
            t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ),
    }
    for category, tensors in stage.held_tensors().items():
        held[category] = bytes_of(tensors)
    held["messages"] = bytes_of(queued)
    held["activations"] = sum(nbytes for key, (nbytes, _) in saved.live.items() if key not in claimed)
    return held


def cuda_peaks(device: torch.device) -> dict[str, int]:
    """The caching allocator's peaks on ``device`` since the last reset, in bytes."""
    stats = torch.cuda.memory_stats(device)
    return {
        "peak_active_bytes": stats.get("active_bytes.all.peak", 0),
        "peak_allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
        "peak_reserved_bytes": stats.get("reserved_bytes.all.peak", 0),
    }
