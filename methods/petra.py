"""PETRA: parallel end-to-end training with reversible architectures (Rivaud, Fournier, Pumir, Belilovsky,
Eickenberg, Oyallon, ICLR 2025)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from dbench.errors import DbenchError
from dbench.method import DELAYED_GRADIENT, DOWN, UNLOCKED, UP, Recv, Send, Stage, StepOutput, StepProgram
from dbench.method_tools import QueuedLabels, frozen_running_stats
from dbench.registry import METHODS


@dataclass(frozen=True)
class PETRAOptions:
    """Options of PETRA. PETRA proper keeps neither buffer."""

    accumulation: int = field(default=1, metadata={
        "help": "A, backwards per update: every A backwards a module steps once with the mean of their "
                "gradients (the released code's README: 2 on CIFAR-10, 4 on ImageNet)"})
    input_buffer: bool = field(default=False, metadata={
        "help": "store every block's input for its backward instead of reconstructing the reversible blocks' "
                "from their outputs (the README's DSP)"})
    param_buffer: bool = field(default=False, metadata={
        "help": "store the weights of every forward in flight: the reconstruction and the recompute run at "
                "the forward's weights, not the current ones (the gradient is then the delayed one, exact)"})

    def validate(self) -> None:
        # bool is an int to Python: refuse it explicitly, True would read as A = 1.
        if isinstance(self.accumulation, bool) or not isinstance(self.accumulation, int) or self.accumulation < 1:
            raise DbenchError(f"bad accumulation {self.accumulation!r}: must be an integer >= 1")
        for name in ("input_buffer", "param_buffer"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise DbenchError(f"bad {name} {value!r}: must be true or false")


@dataclass
class _Flight:
    """One forward of a module below the top, kept until its batch's backward reaches the module."""

    batch: int  # the index of the batch (the iteration the first module read it)
    inputs: dict[int, torch.Tensor]  # block index -> the block's input, for the blocks that keep theirs
    # With the parameter buffer, the module's parameters as the forward used them (in ``module.parameters()``
    # order); forwards between two updates share one copy. None without it.
    weights: list[torch.Tensor] | None
    version: int  # how many updates the module had made before this forward


class _Method(nn.Module):
    """A block's method (``inverse``, ``reconstruct``) as a module's forward, so that ``functional_call`` can run
    it at other weights."""

    def __init__(self, block: nn.Module, method: str):
        super().__init__()
        self.block = block
        self.method = method

    def forward(self, arg: torch.Tensor):
        return call(self.block, self.method, arg)


def call(block: nn.Module, method: str, arg: torch.Tensor):
    """``block.method(arg)``; the forward through ``block(arg)``, so that the block's hooks run as usual."""
    return block(arg) if method == "forward" else getattr(block, method)(arg)


def is_reversible(block: nn.Module) -> bool:
    """A block whose input can be computed from its output: it has an ``inverse`` (dbench.models.revnet's
    ``Reversible``; any block of another model that defines one)."""
    return callable(getattr(block, "inverse", None))


@METHODS.register("petra")
class PETRA(Stage):
    """FDG's schedule with no stored graph: the backward reconstructs the reversible blocks' inputs.

    Step s (docs/ALGORITHMS.md, "PETRA"). Module k (0-based, of K) runs the
    forward of batch s-k, without a graph, on what module k-1 sent at s-1, and
    sends its output up. The top module K-1 runs forward, loss and backward of
    batch s-(K-1) together (exact) and sends down the pair (its input, the
    gradient there). Module k < K-1 runs the backward of batch s-2(K-1)+k with
    the pair module k+1 sent at s-1: block by block from its top block down,
    each block takes its input as the stored one (a block that is not
    reversible, or every block with the input buffer) or reconstructs it from
    its output with ``inverse`` (at the current weights, or with the parameter
    buffer at the weights of that batch's forward), recomputes its forward at
    that input with a graph, backpropagates the gradient, adds its weight
    gradient to the module's accumulator and hands (input, gradient at the
    input) to the block below; the module sends the bottom block's pair down.
    A block with ``reconstruct`` (dbench.models.revnet's ``Reversible``) does
    the reconstruction and the recompute in one evaluation of its residual
    function, as RevNet's own backward does (the same numbers, bit for bit,
    as ``inverse`` then the forward, which a block with only ``inverse``
    gets).
    Every A backwards (option ``accumulation``) the module updates with the
    mean of their gradients, through the run's optimizer. Module k's first
    backward comes at step 2(K-1)-k and its first update A-1 steps later.

    The forward and the backward of a step both use the weights at the start
    of the step, θ_k^s: the update comes last. Below the top the backward runs
    before the forward (the section writes forward, backward, update; the
    numbers are the same, since neither reads what the other writes: the
    forward's BatchNorm statistics are not used by the backward, which
    normalizes with batch statistics), so that the oldest batch's stored
    tensors are freed before the newest's are stored: module k holds 2(K-1-k)
    batches at its peak, not 2(K-1-k)+1.

    What module k < K-1 stores per batch in flight: the inputs of its blocks
    that are not reversible (the stem, the downsampling blocks; every block
    with the input buffer), and with the parameter buffer a copy of its
    weights, shared by the forwards made between two updates (the weights
    change once every A steps). The top module stores nothing but the queued
    labels of the K-1 batches still climbing. On a model without reversible
    blocks every block keeps its input: PETRA is then the input-buffer variant
    (which on gpt-nano diverges where the others learn: tests/test_lm.py).

    BatchNorm's running statistics move once per batch, in the forward; the
    reconstruction and the recompute normalize with batch statistics and
    leave them alone (``frozen_running_stats``, as FR's replay). K = 1 is BP
    (with A > 1, BP with gradient accumulation). Nothing drains at an epoch's
    end: the batches in flight continue into the next epoch, as in FDG.
    Messages are tagged with their batch's index and checked on receipt; with
    the input buffer no block reconstructs, so only the gradient goes down.
    """

    name = "petra"
    summary = ("reversible blocks' inputs reconstructed in a delayed backward: FDG's schedule without stored "
               "activations, gradients at the current weights")
    Options = PETRAOptions
    family = DELAYED_GRADIENT
    table_order = 2.75  # after FDG (2.5), before DNI (3)
    locking = UNLOCKED

    @staticmethod
    def step_cost(forward: float, backward: float, index: int, num_stages: int) -> float:
        # Below the top: the forward, the recompute with a graph and the backward, 4 units of F/K (the
        # section's fused cost: a block with ``reconstruct`` rebuilds its input within its recompute; one that
        # has only ``inverse`` costs one more evaluation of its residual function). The top: forward, backward.
        forwards = 1 if index == num_stages - 1 else 2
        return forwards * forward + backward

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.options.validate()  # also when the Options come built, not parsed
        # The module's blocks: the children of a cut (an nn.Sequential of the model's flat blocks), or the
        # module itself as one block.
        self.blocks = list(self.module) if isinstance(self.module, nn.Sequential) else [self.module]
        self.keeps_input = [self.options.input_buffer or not is_reversible(b) for b in self.blocks]
        self.params = list(self.module.parameters())
        position = {id(p): i for i, p in enumerate(self.params)}
        # Per block, (name in the block, position in self.params) of each of its parameters (tied ones under
        # every name they have): how a block runs at the stored weights.
        self.block_params = [[(n, position[id(p)]) for n, p in b.named_parameters(remove_duplicate=False)]
                             for b in self.blocks]
        self.flights: deque[_Flight] = deque()
        self.labels = QueuedLabels(self.name)  # the top module's, of the batches not yet scored
        self.backwards = 0  # backwards accumulated since the last update
        self.updates = 0  # updates made: the version of the weights

    # --- the step ---------------------------------------------------------------------------------------

    def train_step(self, t, x, y) -> StepProgram:
        if self.is_last:
            return (yield from self._top(t, x, y))
        late = t - 2 * (self.num_stages - 1) + self.index  # the batch whose pair module k+1 sent at t-1
        backward = late >= 0
        if backward:
            yield from self._backward(t, late)
        batch = t - self.index  # the batch this module forwards now; none yet in its first k steps
        if batch >= 0:
            x = yield from self.receive_input(x, needs_grad=False, t=batch)
            inputs, out = self._forward(x)
            self.flights.append(_Flight(batch, inputs, self._weights_now(), self.updates))
            yield Send(UP, out, (batch,))
        if backward:
            yield from self._count_backward()
        return None

    def _top(self, t, x, y) -> StepProgram:
        """The top module scores batch t-(K-1), whose labels arrived K-1 iterations ago."""
        due = self.labels.arrive(t, y, self.shard_weight, self.num_stages - 1)
        if due is None:
            return None  # nothing has reached the top module yet
        batch, labels, weight = due
        x = yield from self.receive_input(x, t=batch)
        out = self.module(x)
        loss = self.weighted(self.loss_fn(out, labels), weight)
        self.backward(loss)
        if not self.is_first:
            yield from self._send_down(x, x.grad, batch)
        yield from self._count_backward()
        return StepOutput(loss=self.share(loss), logits=out.detach(), labels=labels)

    def _send_down(self, x: torch.Tensor, grad: torch.Tensor, batch: int) -> StepProgram:
        """The pair (input, gradient at the input) to the module below. With the input buffer no module
        reconstructs, so the input is not sent: only the gradient."""
        if not self.options.input_buffer:
            yield Send(DOWN, x, (batch,))
        yield Send(DOWN, grad, (batch,))

    def _count_backward(self) -> StepProgram:
        """One more backward in the accumulator; the A-th makes the update with their mean."""
        self.backwards += 1
        if self.backwards < self.options.accumulation:
            return
        if self.options.accumulation > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(self.options.accumulation)
        yield from self.apply_update()
        self.backwards = 0
        self.updates += 1

    # --- forward and backward below the top -------------------------------------------------------------

    def _forward(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The forward without a graph (BatchNorm counts the batch here, once); returns the inputs the blocks
        keep and the output."""
        inputs = {}
        with torch.no_grad():
            h = x
            for j, block in enumerate(self.blocks):
                if self.keeps_input[j]:
                    inputs[j] = h
                h = block(h)
        return inputs, h

    def _weights_now(self) -> list[torch.Tensor] | None:
        """With the parameter buffer, a copy of the current weights for the forward just made; the copy of the
        previous forward when no update came between them."""
        if not self.options.param_buffer:
            return None
        if self.flights and self.flights[-1].version == self.updates and self.flights[-1].weights is not None:
            return self.flights[-1].weights
        return [p.detach().clone() for p in self.params]

    def _backward(self, t: int, batch: int) -> StepProgram:
        y = None if self.options.input_buffer else (yield Recv(DOWN, expect=(batch,)))
        grad = yield Recv(DOWN, expect=(batch,))
        flight = self.flights[0]  # dropped only after its backward: what it holds counts until then
        if flight.batch != batch:
            raise RuntimeError(f"petra module {self.index} at iteration {t}: the oldest stored forward is of "
                               f"batch {flight.batch}, the gradient of batch {batch}")
        x, grad = self._backward_blocks(flight, y, grad)
        self.flights.popleft()
        del flight
        if not self.is_first:
            yield from self._send_down(x, grad, batch)

    def _backward_blocks(self, flight: _Flight, y: torch.Tensor | None,
                         grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block by block from the top: input (stored or reconstructed), recompute, backward. Adds the weight
        gradients to the accumulator (``p.grad``); returns the bottom block's input and the gradient there."""
        # With the parameter buffer, the stored weights as leaves of this backward's graphs (one set for the
        # whole module, so that a weight two blocks share gathers both gradients).
        weights = None
        if flight.weights is not None:
            weights = [w.detach().requires_grad_(p.requires_grad) for w, p in zip(flight.weights, self.params)]
        for j in reversed(range(len(self.blocks))):
            block = self.blocks[j]
            x = flight.inputs.get(j)
            # The recompute normalizes with the batch's statistics, which the forward already counted.
            with frozen_running_stats(block):
                if x is None and callable(getattr(block, "reconstruct", None)):
                    # The block rebuilds its input and recomputes its output in one evaluation of its
                    # residual function (the section's fused cost), as the input's halves.
                    leaves, out = self._call(j, "reconstruct", y, weights)
                else:
                    if x is None:
                        x = self._call(j, "inverse", y, weights, graph=False)
                    needs_grad = j > 0 or not self.is_first  # module 0's input is the data: no gradient there
                    leaves = (x.detach().requires_grad_(needs_grad),)
                    out = self._call(j, "forward", leaves[0], weights)
            if out.requires_grad:  # else a block without weights at the data: nothing to differentiate
                self.backward(out, grad)
            grads = [leaf.grad for leaf in leaves]
            grad = None if grads[0] is None else grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
            y = leaves[0].detach() if len(leaves) == 1 else torch.cat([leaf.detach() for leaf in leaves], dim=1)
        if weights is not None:
            for p, w in zip(self.params, weights):
                if w.grad is not None:
                    if p.grad is None:
                        p.grad = w.grad
                    else:
                        p.grad.add_(w.grad)
        return y, grad

    def _call(self, j: int, method: str, arg: torch.Tensor, weights: list[torch.Tensor] | None,
              graph: bool = True):
        """Block j's ``method`` (forward, inverse, reconstruct) on ``arg``, at the current weights or, with the
        parameter buffer, at the stored ones; without a graph where ``graph`` is false."""
        block = self.blocks[j]
        with torch.set_grad_enabled(graph):
            if weights is None:
                return call(block, method, arg)
            return functional_call(_Method(block, method), {f"block.{n}": w for n, w in self._at(j, weights).items()},
                                   (arg,))

    def _at(self, j: int, weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block j's parameters by name, taken from ``weights`` (in ``self.params`` order)."""
        return {name: weights[i] for name, i in self.block_params[j]}

    # --- memory and checkpoints -------------------------------------------------------------------------

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        # No graph outlives its step: what PETRA keeps is the stored inputs and, with the parameter buffer,
        # the weight copies (each counted once, however many forwards share it). The top module's queued
        # labels are PETRA's too.
        copies = {id(f.weights): f.weights for f in self.flights if f.weights is not None}
        held = {"stored_inputs": [x for f in self.flights for x in f.inputs.values()],
                "weight_snapshots": [w for weights in copies.values() for w in weights]}
        if self.is_last and self.num_stages > 1:
            held["stored_labels"] = self.labels.tensors()
        return held

    def state_dict(self) -> dict:
        # Each weight copy once, the flights pointing at theirs, so that a resumed run shares them as before.
        copies: list[list[torch.Tensor]] = []
        where: dict[int, int] = {}
        flights = []
        for f in self.flights:
            index = None
            if f.weights is not None:
                if id(f.weights) not in where:
                    where[id(f.weights)] = len(copies)
                    copies.append(f.weights)
                index = where[id(f.weights)]
            flights.append({"batch": f.batch, "version": f.version, "weights": index,
                            "inputs": [[j, x] for j, x in sorted(f.inputs.items())]})
        return {**super().state_dict(), "flights": flights, "weight_copies": copies,
                # the gradient accumulated since the last update (None where a weight has none yet)
                "accumulated": [p.grad for p in self.params], "backwards": self.backwards,
                "updates": self.updates, "labels": self.labels.state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        copies = [[w.to(self.device) for w in weights] for weights in state["weight_copies"]]
        self.flights = deque(
            _Flight(int(f["batch"]), {int(j): x.to(self.device) for j, x in f["inputs"]},
                    None if f["weights"] is None else copies[f["weights"]], int(f["version"]))
            for f in state["flights"])
        for p, g in zip(self.params, state["accumulated"], strict=True):
            p.grad = None if g is None else g.to(self.device)
        self.backwards, self.updates = int(state["backwards"]), int(state["updates"])
        self.labels.load(state["labels"], self.device)
