"""The per-module rule every method writes once and every engine drives: ``Stage``, and the side models
a stage may train beside its module (see ``dbench.method`` for the whole plug-in surface)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dbench.families import FORWARD_LOCKED, LOCKED, LOCKINGS, MODEL_PARALLEL, UNLOCKED
from dbench.optim import OptimConfig
from dbench.partition import forward_backward
from dbench.protocol import AllReduce, Recv, Send, StepOutput, StepProgram
from dbench.routes import DOWN, ERROR, PROBE_UP, UP


@dataclass(frozen=True)
class SideModel:
    """A model a method trains beside its module: a synthetic-gradient model, an auxiliary head.

    Declared once (``Stage.declare_side``) and built by the stage at first use,
    when the shape of what it reads is known: ``build(shape)`` gets that shape
    without the batch dimension. Its initial weights come from ``seed`` alone
    (never the global generator, so a run's numbers do not depend on what drew
    from it before). It lives on the module's device in the dtype of what it
    reads, has its own optimizer (``optimizer(parameters)``), is saved with the
    stage, and is counted in memory under ``category``.
    """

    build: Any  # (shape) -> nn.Module
    optimizer: Any  # (parameters) -> torch.optim.Optimizer
    seed: int
    category: str


@dataclass
class _BuiltSide:
    module: nn.Module
    optimizer: torch.optim.Optimizer
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class NoOptions:
    """This method takes no options."""


class Stage:
    """Module ``index`` of ``num_stages``: its weights, optimizer and method state.

    Subclasses set ``summary`` (one line for ``dbench list``), optionally
    ``Options`` (a frozen dataclass whose fields, defaults and docstring are the
    method's documented options) and implement :meth:`train_step`.

    The facts the reports read are class attributes, so a method from another
    package is reported like a built-in one: ``family``, ``table_order`` (its
    place in tables and legends), ``reference`` (the baseline that speedups are
    measured against: model-parallel BP) and the cost model behind
    :meth:`ideal_speedup` (``step_cost`` and ``locking``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    family: ClassVar[str] = ""
    table_order: ClassVar[float] = 100.0  # built-in methods 0..99, in ALGORITHMS.md's order; others after
    reference: ClassVar[bool] = False
    locking: ClassVar[str] = UNLOCKED
    parallelism: ClassVar[str] = MODEL_PARALLEL
    # Seconds of one training step of module ``index`` of ``num_stages``, given
    # its forward and backward seconds: what the ``time`` partition balances.
    # One forward and one backward, unless a method overrides it.
    step_cost = staticmethod(forward_backward)
    # None, or a classmethod ``(output_shape, device, options, num_classes) ->
    # step`` giving one step (a callable) of the work a module below the top
    # does per training step at its output beyond forward and backward (DNI's
    # synthesizer, DGL's head). It depends on where a cut falls, so the
    # ``counted`` and ``time`` partitions count or time it at each candidate cut.
    boundary_step: ClassVar[Any] = None
    # The engines that can run the method: the local engine drives every stage's program in one process; a
    # method whose stages run another runner's point-to-point (torch.distributed.pipelining's) needs a
    # process per device.
    engines: ClassVar[tuple[str, ...]] = ("local", "distributed")
    # Whether the σ probe (dbench.meters.sigma, a plain-BP pass through the modules in order on the PROBE
    # channels) can run on the method's layout; a method that cannot says so and its runs record no σ.
    measures_sigma: ClassVar[bool] = True

    @classmethod
    def ideal_speedup(cls, num_stages: int, options: Any = None) -> float | None:
        """Speedup over model-parallel BP with ``num_stages`` balanced modules, from ALGORITHMS.md's cost model.

        The whole model's forward costs 1 and its backward 2, split evenly over
        the modules; communication is free. Each module's cost per step is
        ``step_cost``; the period of one iteration follows from ``locking``:
        the sum of the modules' costs when locked (BP: 3), the whole forward
        plus the slowest module's backward when only the forward is locked,
        the slowest module's cost when unlocked. None where the cost model has
        no closed form: a cost at the module boundary (``boundary_step``) is
        known only by counting or profiling it. At K=1 every method is BP.
        """
        k = num_stages
        if k == 1:
            return 1.0
        if cls.boundary_step is not None:
            return None
        costs = [cls.step_cost(1 / k, 2 / k, j, k) for j in range(k)]
        if cls.locking == LOCKED:
            period = sum(costs)
        elif cls.locking == FORWARD_LOCKED:
            period = 1 + max(c - 1 / k for c in costs)
        elif cls.locking == UNLOCKED:
            period = max(costs)
        else:
            raise ValueError(f"method {cls.name!r}: unknown locking {cls.locking!r}; known: {', '.join(LOCKINGS)}")
        return 3.0 / period

    @classmethod
    def modules_per_device(cls, options: Any = None) -> int:
        """V: how many of the model's modules each device holds (the model is cut into V·K modules)."""
        return 1

    @classmethod
    def placement(cls, index: int, num_stages: int, options: Any = None) -> list[int]:
        """Which of the V·K modules device ``index`` of ``num_stages`` holds, in the order its stage gets them
        (``module``: the one module, or an ``nn.ModuleList`` of them when V > 1)."""
        return [index]

    @classmethod
    def graph_lifetime(cls, num_stages: int) -> int:
        """The most iterations one of this method's autograd graphs lives (built at iteration t, freed by
        t + this), what the memory meter's accounting window counts on (dbench.meters.StageMeter). K + 1 covers
        every method that keeps a graph until its delayed gradient arrives one iteration per module above
        (DDG's module k keeps K − k + 1); a method that keeps them longer says so here."""
        return num_stages + 1

    @classmethod
    def check_run(cls, options: Any, num_stages: int, batch_size: int, devices: list) -> None:
        """Raise a one-line DbenchError if the method cannot run with these options, K, batch size and devices.

        Called when a run is planned, before anything is written.
        """

    @classmethod
    def check_epoch(cls, options: Any, num_stages: int, sizes: set[int]) -> None:
        """Raise a one-line DbenchError if the method cannot train on batches of these sizes: every size a
        replica's shard of the epoch's batches has (an epoch's last batch may be smaller than the others).
        Called when a run is planned, once the data set's size is known."""

    @classmethod
    def check_model(cls, options: Any, model: dict) -> None:
        """Raise a one-line DbenchError if the method cannot train this model with these options.

        ``model`` is ``dbench.models.base.describe``'s record (name, params, blocks, inputs: "image" or
        "text", context). Called when a run is planned, before anything is written.
        """

    @classmethod
    def facts(cls, num_stages: int, options: Any = None) -> dict:
        """What a run records about its method, for reports that must not need the method installed.

        ``default_options`` lets a report tell a variant from the method as it
        comes: a run's label names the options that differ from these.
        """
        return {"family": cls.family, "table_order": cls.table_order, "reference": cls.reference,
                "locking": cls.locking, "parallelism": cls.parallelism,
                "ideal_speedup": cls.ideal_speedup(num_stages, options),
                "default_options": dataclasses.asdict(cls.Options())}

    def __init__(
        self,
        index: int,
        num_stages: int,
        module: nn.Module,
        device: torch.device,
        optim: OptimConfig,
        loss_fn: nn.Module,
        options: Any = None,
        num_classes: int | None = None,
    ):
        self.index = index
        self.num_classes = num_classes  # what the labels range over (cDNI's conditioning)
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.loss_fn = loss_fn
        self.options = options if options is not None else self.Options()
        self.optimizer = optim.make(self.module.parameters())
        self.side_models: dict[str, SideModel] = {}
        self._built_sides: dict[str, _BuiltSide] = {}
        # Set by dbench.meters when a run measures: told before every backward
        # (memory peaks there) and before every update (σ reads the gradient there).
        self.observer: Any = None
        # The layout (ALGORITHMS.md, "At scale"): this module is module ``index`` of replica ``replica`` of
        # ``replicas``; set by the engine (``place``). Each replica trains on its shard of every batch.
        self.replica, self.replicas = 0, 1
        # D·n_d/B of the current iteration's batch (n_d samples of this replica's shard, B of the batch): what
        # this replica's losses are multiplied by, so that the mean over replicas of every gradient derived
        # from them is the full batch's mean gradient. Set by the engine before every step; 1 without replicas.
        self.shard_weight = 1.0
        # Set by a trace (dbench.engine.trace) on a run without replicas: told where the replicas would average
        # (``average``) with the tensors they would, so that the projection can lay the run out on replicas.
        self.on_average: Any = None
        self._updates_open = 0  # apply_update()/side_update() called but not yet run through (see check_updates)
        # Under the distributed engine, the process group of this replica's K modules (None: the default
        # group, every process, when there are no replicas); what a method running its own point-to-point
        # (torch's pipelining runner) talks over. Set by the engine.
        self.pipeline_group: Any = None

    def place(self, replica: int, replicas: int) -> None:
        """Make this stage the copy of its module in replica ``replica`` of ``replicas`` (the engine calls it)."""
        if not 0 <= replica < replicas:
            raise ValueError(f"replica {replica} of {replicas}: must be 0 <= replica < replicas")
        self.replica, self.replicas = replica, replicas

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def train_step(self, t: int, x: torch.Tensor | None, y: torch.Tensor) -> StepProgram:
        """One training iteration ``t`` of this module.

        ``x`` is the input batch for the first stage and None for the others;
        ``y`` (the labels) is given to every stage on its device. The top stage
        returns a :class:`StepOutput`, or None in an iteration where it scored
        no batch (a method whose batches reach the top module late, in its
        first iterations); the others return None.
        """
        raise NotImplementedError

    def receive_input(self, x: torch.Tensor | None, needs_grad: bool = True, t: int | None = None) -> StepProgram:
        """The module's input: the batch for the first module, else what the module below sent.

        ``needs_grad``: track it, to send the error gradient at the input down.
        ``t``: the iteration whose activation this must be (checked against the message's tag).
        Use as ``x = yield from self.receive_input(x)``.
        """
        if self.is_first:
            return x
        x = yield Recv(UP, expect=None if t is None else (t,))
        if needs_grad:
            x.requires_grad_()
        return x

    def top_step(self, t: int, x: torch.Tensor | None, y: torch.Tensor, teach: str | None = DOWN,
                 weight: float | None = None) -> StepProgram:
        """The top module: forward, loss, true backward, update; and what it teaches the modules below.

        ``teach``: DOWN sends the error gradient at its input to the module
        below (BP and the methods that pass gradients down), ERROR sends the
        output error ``∂f/∂h_K`` to every other module (feedback alignment),
        None sends nothing. Whatever it sends leaves before the update, and
        the output error even before the backward, so the modules below can
        start at once. Messages are tagged with ``t``. ``weight``: the shard
        weight of the batch scored (default: this iteration's, ``shard_weight``).
        """
        below = not self.is_first
        x = yield from self.receive_input(x, needs_grad=teach == DOWN, t=t)
        out = self.module(x)
        if teach == ERROR and below and not out.requires_grad:
            # A top module without trainable parameters (its input carries no graph either): the output
            # error ∂f/∂h_K is still what the modules below learn from, so the loss must reach its output.
            out = out.detach().requires_grad_()
        loss = self.weighted(self.loss_fn(out, y), weight)
        if teach == ERROR and below:
            # The error first (the graph kept), so every module below can start; then the whole backward from
            # the loss, which also frees the loss's own node (a backward from ``out`` would leave it alive).
            (error,) = torch.autograd.grad(loss, out, retain_graph=True)
            yield Send(ERROR, error, (t,))
        self.backward(loss)
        if teach == DOWN and below:
            yield Send(DOWN, x.grad, (t,))
        yield from self.apply_update()
        return StepOutput(loss=self.share(loss), logits=out.detach())

    def weighted(self, loss: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """``loss`` (a mean over this replica's shard) times the shard weight D·n_d/B (``weight``, or this
        iteration's): the replicas' mean of its gradients is then the full batch's. Unchanged without replicas.

        The weight goes on the loss rather than on the averaged gradient, so that every gradient derived from
        the loss (sent down, delayed, replayed, fed back as DFA's error) carries the weight of the batch it came
        from, whichever iteration applies it.
        """
        if self.replicas == 1:
            return loss
        return loss * (self.shard_weight if weight is None else weight)

    def share(self, weighted: torch.Tensor) -> torch.Tensor:
        """This replica's share of the batch's mean loss, from its ``weighted`` loss (the engine sums the shares)."""
        return weighted.detach() if self.replicas == 1 else weighted.detach() / self.replicas

    @property
    def has_trainable_parameters(self) -> bool:
        return any(p.requires_grad for p in self.module.parameters())

    def backward(self, tensor: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """``tensor.backward(grad)``, telling the meters first. Methods call this, not ``.backward``.

        A module without trainable parameters (nn.Flatten, a pooling stage) whose
        input carries no graph (the first module; or a method that sends nothing
        down, as DFA) has no gradient to compute: its output then needs none, and
        the backward is empty. Anywhere else an output without a graph is a
        method's mistake, and torch's error says so.
        """
        self.before_backward()
        if not tensor.requires_grad and not self.has_trainable_parameters:
            return
        tensor.backward(grad)

    def before_backward(self) -> None:
        """A backward is about to start: every activation its graph saved is still alive (the memory peak)."""
        if self.observer is not None:
            self.observer.before_backward()

    def apply_update(self) -> StepProgram:
        """Hand ``p.grad`` to the optimizer; this gradient is the method's ``g_k^t``.

        Use as ``yield from self.apply_update()``: with replicas the gradient is
        first averaged over the copies of this module (an ``AllReduce`` the
        engine answers), so σ and the optimizer see the averaged one. Calling it
        without ``yield from`` would skip the update; the engines check that
        every update begun in a step was run through (``check_updates``).
        """
        self._updates_open += 1
        return self._update()

    def _update(self) -> StepProgram:
        yield from self.average(self.optimizer)
        if self.observer is not None:
            self.observer.before_update()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._updates_open -= 1

    def side_update(self, name: str) -> StepProgram:
        """Step side model ``name``'s optimizer (its gradients averaged over the replicas first), then zero
        them. Use as ``yield from self.side_update(name)``."""
        self._updates_open += 1
        return self._side_update(name)

    def _side_update(self, name: str) -> StepProgram:
        optimizer = self.side_optimizer(name)
        yield from self.average(optimizer, what=f"{name} gradients")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._updates_open -= 1

    def average(self, optimizer: torch.optim.Optimizer, what: str = "gradients") -> StepProgram:
        """Average the gradients ``optimizer`` is about to apply over the replicas (nothing without replicas)."""
        if self.replicas == 1 and self.on_average is None:
            return
        grads = tuple(p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
        if not grads:
            return
        if self.replicas > 1:
            yield AllReduce(grads, what)
        elif self.on_average is not None:
            self.on_average(AllReduce(grads, what))

    def join(self, group: Any) -> None:
        """The distributed engine made ``group``, the process group of this module's copies in every replica.

        A method that needs it (DDP's SyncBatchNorm) takes it here; the others ignore it.
        """

    def check_updates(self) -> None:
        """Raise if an update was begun in this step but never run (``apply_update()`` without ``yield from``)."""
        if self._updates_open:
            self._updates_open = 0
            raise RuntimeError(f"method {self.name!r}, module {self.index}: an update was called but not run; "
                               f"write `yield from self.apply_update()` (and `yield from self.side_update(name)`)")

    def declare_side(self, name: str, side: SideModel) -> None:
        """Declare a side model (in ``__init__``); :meth:`side` builds it at first use."""
        if name in self.side_models:
            raise ValueError(f"side model {name!r} declared twice")
        self.side_models[name] = side

    def side(self, name: str, like: torch.Tensor) -> nn.Module:
        """Side model ``name``, built for inputs shaped like ``like`` (on its device and dtype) the first time."""
        built = self._built_sides.get(name)
        if built is None:
            built = self._build_side(name, tuple(like.shape[1:]), like.dtype)
        return built.module

    def built_side(self, name: str) -> nn.Module | None:
        """Side model ``name`` if it has been built, else None."""
        built = self._built_sides.get(name)
        return built.module if built is not None else None

    def side_optimizer(self, name: str) -> torch.optim.Optimizer:
        return self._built_sides[name].optimizer

    def _build_side(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> _BuiltSide:
        spec = self.side_models[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            module = spec.build(shape)
        module = module.to(device=self.device, dtype=dtype)
        built = _BuiltSide(module, spec.optimizer(module.parameters()), shape, dtype)
        self._built_sides[name] = built
        return built

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The method's own state by memory category (stored inputs, weight snapshots, side models, ...).

        What the memory meter reports beside parameters, gradients, optimizer
        state, queued messages and activations saved for backward. A tensor
        named here is not counted again as an activation. Side models are
        counted here, each with its gradients and optimizer state; a method
        with more state extends this dict.
        """
        held: dict[str, list[torch.Tensor]] = {spec.category: [] for spec in self.side_models.values()}
        for name, built in self._built_sides.items():
            params = list(built.module.parameters())
            optimizer_state = [t for s in built.optimizer.state.values() for t in s.values()
                               if isinstance(t, torch.Tensor)]
            held[self.side_models[name].category] += [*params, *built.module.buffers(),
                                                      *(p.grad for p in params if p.grad is not None),
                                                      *optimizer_state]
        return held

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)

    def predict_step(self, x: torch.Tensor | None) -> StepProgram:
        """Evaluation's forward of this module, as a program (the distributed engine drives it): the batch on
        the first module, else the input from below on PROBE_UP; returns the logits on the top module, None
        elsewhere. PROBE_UP, not UP: a method may leave training activations queued on UP across iterations
        (FDG's forward reaches the next module an iteration later), and those must neither be read here nor
        mixed in. A method whose devices hold several modules overrides it."""
        h = x if self.is_first else (yield Recv(PROBE_UP))
        out = self.predict(h)
        if self.is_last:
            return out
        yield Send(PROBE_UP, out)
        return None

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly; methods with state extend it."""
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self._built_sides:
            state["side_models"] = {
                name: {"shape": list(b.shape), "dtype": str(b.dtype),
                       "module": b.module.state_dict(), "optimizer": b.optimizer.state_dict()}
                for name, b in self._built_sides.items()
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._built_sides.clear()
        for name, saved in state.get("side_models", {}).items():
            if name not in self.side_models:
                raise ValueError(f"the checkpoint holds side model {name!r}, which method {self.name!r} does not declare")
            dtype = getattr(torch, saved["dtype"].removeprefix("torch."))
            built = self._build_side(name, tuple(saved["shape"]), dtype)
            built.module.load_state_dict(saved["module"])
            built.optimizer.load_state_dict(saved["optimizer"])
