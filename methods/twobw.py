"""PipeDream-2BW (Narayanan, Phanishayee, Shi, Chen, Zaharia, ICML 2021): 1F1B without flushes, two weight versions."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from dbench.errors import DbenchError
from dbench.method import DELAYED_GRADIENT, DOWN, UNLOCKED, UP, Recv, Send, Stage, StepOutput, StepProgram
from dbench.method_tools import MicrobatchOptions, forward_with
from dbench.registry import METHODS


@dataclass(frozen=True)
class TwoBWOptions(MicrobatchOptions):
    """Options of PipeDream-2BW."""

    microbatches: int | None = field(default=None, metadata={
        "help": "M, micro-batches per batch (K <= M <= batch size: the paper's m >= d) [default: 4K]"})


def check_microbatches(m: int, num_stages: int) -> None:
    """The paper's m >= d: every batch in at least K micro-batches (see ``TwoBW``: what fewer would break)."""
    if m < num_stages:
        raise DbenchError(f"bad microbatches {m}: 2bw needs at least K = {num_stages} micro-batches per batch "
                          f"(K <= M <= batch size, the paper's m >= d)")


@dataclass
class _InFlight:
    """One micro-batch's forward, kept until its backward."""

    batch: int  # t, the batch it belongs to
    micro: int  # i, its place in the batch
    last: bool  # the batch's last micro-batch: its backward completes the batch's gradient
    x: torch.Tensor  # the module's input (tracked below the top, to send its gradient down)
    out: torch.Tensor  # the output, with its autograd graph
    loss: torch.Tensor | None  # the top module: the micro-batch's weighted loss


@METHODS.register("2bw")
class TwoBW(Stage):
    """Every micro-batch of batch t runs forward and backward at ``W(t−1)``; ``W(t+1) = opt(W(t), g(t))``.

    The batch is cut into M micro-batches as GPipe cuts it (``torch.tensor_split``, each micro-batch's loss
    weighted by its share of the batch). Module k (0-based, of K) runs 1F1B without flushes over the
    sequence of micro-batches u = 0, 1, 2, … of every batch in turn: ``w_k = K−1−k`` warm-up forwards,
    then pairs (F(u + w_k), B(u)), forward first. In iteration t it runs the forwards of batch t's
    micro-batches, each followed by the backward of the micro-batch ``w_k`` places earlier, so module
    k ends iteration t with the last ``w_k`` micro-batches of batch t in flight (their inputs and graphs
    kept, as DDG keeps its stored forwards) and backpropagates them in iteration t+1. After the backward
    of a batch's last micro-batch the module updates: the gradient of batch t, accumulated over its
    micro-batches at ``W(t−1)``, is applied to the newest weights ``W(t)`` by the run's own optimizer
    (momentum, weight decay act on ``W(t)``; one optimizer state, continuous), at the learning rate the
    schedule gave batch t. So the top module updates batch t in iteration t and the modules below in
    iteration t+1. ``W(−1) := W(0)``: batches 0 and 1 both run at ``W(0)``, and no update is skipped.
    At K = 1 this is gradient accumulation with a one-batch delay, not BP.

    Two weight versions, two buffers per parameter: the forwards run on them through ``functional_call``;
    the optimizer's parameter points (``p.data``) at the buffer of the newest version. Batch t's
    forwards use the buffer of ``W(t−1)``, which is never written while they are in flight: batch t's
    first ``w_k`` forwards run before the update of batch t−1 and the rest after it, and that update
    writes the other buffer, whose version ``W(t−2)`` no graph uses any more (batch t−1's backwards are
    all done). So the update of batch b copies ``W(b)`` into the free buffer, points the parameter at it
    and steps there; the other buffer keeps ``W(b)`` for batch b+1. This needs M ≥ K−1 on every batch
    (otherwise forwards of batch t would come before ``W(t−1)`` exists); dbench refuses M < K, the paper's
    condition, and an epoch's batch (or replica shard) of fewer than K samples, which could not be split
    into K micro-batches (a batch smaller than M is split into as many micro-batches as it has samples,
    as GPipe splits it). The gradient accumulator is the parameter's ``.grad`` (the buffer's, shared).

    BatchNorm normalizes each micro-batch on its own; its running statistics (not versioned) move once
    per micro-batch forward, in the order the forwards run. Evaluation uses the newest weights. Nothing
    drains: at an epoch's end modules k < K−1 still hold batch t's last ``w_k`` micro-batches and have
    not yet applied its update (as with DDG), and at the end of a run those are never applied.

    Memory: two copies of the weights (the second is ``weight_stash``), one gradient and one optimizer
    state; the activations of at most ``w_k + 1`` micro-batches (``K − k``), as 1F1B.
    """

    name = "2bw"
    summary = "PipeDream-2BW: 1F1B pipeline without flushes, every micro-batch of batch t at the weights W(t-1)"
    Options = TwoBWOptions
    family = DELAYED_GRADIENT
    table_order = 0.9  # after the exact pipelines (1f1b 0.75, torch's schedules 0.8x), before FR (1) and DDG (2)
    locking = UNLOCKED

    @classmethod
    def ideal_speedup(cls, num_stages: int, options: TwoBWOptions | None = None) -> float | None:
        """K over model-parallel BP: in steady state no module waits for another (period 3F/K), there is no
        bubble. The pipeline fills once, at the run's start, and is never drained, so over a run this is
        the limit of K·N·M/(N·M + K − 1) for N batches (ALGORITHMS.md)."""
        return float(num_stages)

    @classmethod
    def check_run(cls, options: TwoBWOptions, num_stages: int, batch_size: int, devices: list) -> None:
        m = options.microbatch_count(num_stages)
        check_microbatches(m, num_stages)
        if m > batch_size:
            raise DbenchError(f"bad microbatches {m}: a batch of {batch_size} splits into at most {batch_size} "
                              f"micro-batches (K <= M <= batch size)")

    @classmethod
    def check_epoch(cls, options: TwoBWOptions, num_stages: int, sizes: set[int]) -> None:
        for size in sorted(sizes):
            if size < num_stages:
                raise DbenchError(f"bad --batch-size for 2bw: a batch (or replica shard) of {size} samples splits "
                                  f"into {size} micro-batches, fewer than K = {num_stages}; pick a batch size that "
                                  f"leaves the epoch's last batch (and each replica's shard) at least K samples")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.options.validate()  # also when the Options come built, not parsed
        self.microbatches = self.options.microbatch_count(self.num_stages)
        check_microbatches(self.microbatches, self.num_stages)
        self.warmup = self.num_stages - 1 - self.index  # w_k
        named = list(self.module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # versions[j]: the buffers of W(v) for every v ≡ j (mod 2). Clones, not p.detach() (which would share
        # p's version counter): each is its own leaf. W(0) in 0, and W(−1) := W(0) in 1.
        self.versions = [[p.detach().clone().requires_grad_(p.requires_grad) for p in self.params]
                         for _ in range(2)]
        self.point_parameters_at(0)
        self.updates = 0  # batches whose update this module has applied: the newest version is W(updates)
        self.in_flight: deque[_InFlight] = deque()
        self.batch_lrs: dict[int, list[float]] = {}  # batch -> the lr of each group when it was read

    def point_parameters_at(self, j: int) -> None:
        """The optimizer's parameters (and evaluation) read the buffers of ``versions[j]``."""
        for p, w in zip(self.params, self.versions[j]):
            p.data = w

    def weights_of(self, batch: int) -> dict[str, torch.Tensor]:
        """What batch ``batch``'s forwards and backwards run on: W(batch−1)."""
        return dict(zip(self.names, self.versions[(batch - 1) % 2]))

    def train_step(self, t, x, y) -> StepProgram:
        m = min(self.microbatches, len(y))  # an epoch's smaller last batch: as many as it has samples
        if m < self.num_stages:
            raise DbenchError(f"2bw got a batch of {len(y)} samples at iteration {t}: it needs at least K = "
                              f"{self.num_stages} micro-batches per batch, so batches of at least K samples")
        self.batch_lrs[t] = [group["lr"] for group in self.optimizer.param_groups]
        ys = y.tensor_split(m)
        xs = x.tensor_split(m) if self.is_first else [None] * m
        losses, logits = [], []
        for i in range(m):
            if not self.is_first:
                h = (yield Recv(UP, expect=(t, i))).requires_grad_()
            elif i >= m - self.warmup:
                # Kept into the next iteration: a copy, since a view of the batch would keep all of it alive.
                h = xs[i].clone()
            else:
                h = xs[i]
            out = functional_call(self.module, self.weights_of(t), (h,))  # BN: the live buffers, updated once
            loss = None
            if self.is_last:
                # the micro-batch's share of the mean (of its replica's shard, weighted as every replica loss)
                loss = self.weighted(self.loss_fn(out, ys[i]) * (len(ys[i]) / len(y)))
                losses.append(loss.detach())
                logits.append(out.detach())
            else:
                yield Send(UP, out, (t, i))
            self.in_flight.append(_InFlight(t, i, i == m - 1, h, out, loss))
            if len(self.in_flight) > self.warmup:
                yield from self.backward_oldest()
        if self.is_last:
            return StepOutput(loss=self.share(torch.stack(losses).sum()), logits=torch.cat(logits))
        return None

    def backward_oldest(self) -> StepProgram:
        """B(u) for the oldest micro-batch in flight; after a batch's last one, that batch's update."""
        old = self.in_flight[0]  # dropped only after its backward: what it holds counts until then
        if self.is_last:
            self.backward(old.loss)
        else:
            grad = yield Recv(DOWN, expect=(old.batch, old.micro))
            self.backward(old.out, grad)
        self.in_flight.popleft()
        # The gradient accumulates in the leaves of W(batch−1); the parameter's .grad is that same tensor, so
        # the accumulator is counted (and saved) as the module's gradient, and the optimizer reads it.
        for p, w in zip(self.params, self.weights_of(old.batch).values()):
            if w.grad is not None:
                p.grad = w.grad
        if not self.is_first:
            yield Send(DOWN, old.x.grad, (old.batch, old.micro))
        batch, last = old.batch, old.last
        del old  # its input goes before the update
        if last:
            yield from self.update(batch)

    def update(self, batch: int) -> StepProgram:
        """W(batch+1) = opt(W(batch), g(batch)), written into the buffer that held W(batch−1)."""
        if batch != self.updates:
            raise RuntimeError(f"2bw module {self.index}: the update of batch {batch} came after {self.updates} "
                               f"updates; the schedule is off")
        newest, free = self.versions[batch % 2], self.versions[(batch + 1) % 2]
        with torch.no_grad():  # no graph uses W(batch−1) any more: batch's backwards are all done
            for f, w in zip(free, newest):
                f.copy_(w)
        for f in free:
            f.grad = None  # the accumulated gradient stays in p.grad, which the optimizer reads
        self.point_parameters_at((batch + 1) % 2)
        current = [group["lr"] for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self.batch_lrs.pop(batch)):
            group["lr"] = lr  # η_t, the schedule's value at batch t, also when applied in iteration t+1
        yield from self.apply_update()
        for group, lr in zip(self.optimizer.param_groups, current):
            group["lr"] = lr
        self.updates += 1

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        # Both buffers: the memory meter counts as parameters the storages the parameters had at the epoch's
        # start (one of the two: the parameters alternate between them) and the other one here, so the two
        # versions count once each whichever buffer holds the newest. The in-flight inputs and graphs are
        # activations, as DDG's.
        return {**super().held_tensors(), "weight_stash": [w for version in self.versions for w in version]}

    def state_dict(self) -> dict:
        # The module's state holds the newest version W(updates); the other one, the gradient accumulated so far
        # (of batch ``updates``, at W(updates−1)), the in-flight micro-batches' inputs (their graphs are built
        # again from them) and the lr of each batch not yet applied continue it exactly.
        older = self.versions[(self.updates - 1) % 2]
        return {**super().state_dict(), "updates": self.updates,
                "older": {n: w.detach() for n, w in zip(self.names, older)},
                "gradient": {n: p.grad for n, p in zip(self.names, self.params) if p.grad is not None},
                "in_flight": [{"batch": f.batch, "micro": f.micro, "last": f.last, "x": f.x.detach()}
                              for f in self.in_flight],
                "lrs": [[batch, lrs] for batch, lrs in self.batch_lrs.items()]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.updates = u = int(state["updates"])
        newest = [p.detach().clone().requires_grad_(p.requires_grad) for p in self.params]
        older = [state["older"][n].to(self.device).clone().requires_grad_(p.requires_grad)
                 for n, p in zip(self.names, self.params)]
        self.versions = [newest, older] if u % 2 == 0 else [older, newest]
        self.point_parameters_at(u % 2)
        for n, p, w in zip(self.names, self.params, older):  # batch ``updates`` accumulates at W(updates−1)
            grad = state["gradient"].get(n)
            w.grad = p.grad = None if grad is None else grad.to(self.device).clone()
        self.batch_lrs = {int(batch): [float(lr) for lr in lrs] for batch, lrs in state["lrs"]}
        # A graph cannot be saved; its input and weights can, and give the same graph. BatchNorm in training
        # mode normalizes with the micro-batch's own statistics, so the running statistics it is given do not
        # enter the graph: it gets copies of the current ones, which it updates and drops (the micro-batch was
        # counted once, when it first ran).
        buffers = dict(self.module.named_buffers())
        was_training = self.module.training
        self.module.train()
        try:
            self.in_flight = deque()
            for r in state["in_flight"]:
                x = r["x"].to(self.device)
                if not self.is_first:
                    x.requires_grad_()
                out, _ = forward_with(self.module, x, self.weights_of(int(r["batch"])), buffers)
                self.in_flight.append(_InFlight(int(r["batch"]), int(r["micro"]), bool(r["last"]), x, out, None))
        finally:
            self.module.train(was_training)
