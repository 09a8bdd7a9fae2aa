"""DFA and BDFA: direct feedback alignment (Nøkland 2016) and its binary variant (Han and Yoo 2019)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dbench.config import MAX_SEED
from dbench.errors import DbenchError
from dbench.method import ERROR, FEEDBACK_ALIGNMENT, FORWARD_LOCKED, UP, Recv, Send, Stage, StepProgram
from dbench.registry import METHODS


@dataclass(frozen=True)
class FeedbackOptions:
    """Options of DFA and BDFA."""

    scale: float = field(default=1.0, metadata={"help": "multiplies the feedback B_k (default: B_k e keeps the norm of e)"})
    feedback_seed: int = field(default=0, metadata={"help": "seed of the fixed random feedback matrices"})

    def validate(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise DbenchError(f"bad feedback scale {self.scale}: must be a finite number > 0")
        if not 0 <= self.feedback_seed <= MAX_SEED:
            raise DbenchError(f"bad feedback_seed {self.feedback_seed}: must be >= 0 and at most {MAX_SEED}")


def per_position(out: torch.Tensor, error: torch.Tensor) -> int:
    """Features of ``out`` per position of the output error: the size ``B_k`` maps each position's classes to.

    ``error`` is (batch, *positions, classes); ``out`` must be (batch, *positions, ...): a module that does
    not keep the positions (none of dbench's models has one) cannot take per-position feedback.
    """
    positions = tuple(error.shape[1:-1])
    if tuple(out.shape[1:1 + len(positions)]) != positions:
        raise DbenchError(f"DFA feedback: the output error has positions {positions} but the module's output has "
                          f"shape {tuple(out.shape[1:])}; each position's error needs that position's features")
    return out[0].numel() // max(1, math.prod(positions))


@METHODS.register("dfa")
class DirectFeedbackAlignment(Stage):
    """The output error reaches every module through a fixed random matrix.

    Forward as BP. The top module computes the loss, sends the output error
    ``e = ∂f/∂h_K`` (batch × classes) to every other module, and updates with
    its true gradient. Module k < K uses ``δ_k = e B_k``, backpropagates it
    inside the module (BP within a module, DFA across modules) and updates; no
    gradient travels down. ``B_k`` (classes × size of h_k) is drawn once, at the
    first iteration, from ``feedback_seed`` and k, and never changes: Gaussian
    with variance ``scale² / size(h_k)``, so that ``||e B_k|| ≈ scale·||e||``.

    A language model predicts at every position: its output error is
    (batch × positions × vocabulary), and ``h_k`` is (batch × positions ×
    width). Each position's error reaches that position's features through
    the same ``B_k`` (vocabulary × width): ``δ_k[:, t] = e[:, t] B_k``, the
    feedback from the vocabulary to each token's features, with ``size(h_k)``
    the width. In general the error's dimensions between the batch and the
    classes are positions that ``h_k`` shares, and ``B_k`` maps the classes to
    the features of one position.
    """

    name = "dfa"
    summary = "direct feedback alignment: output error sent to every module through fixed random matrices"
    family = FEEDBACK_ALIGNMENT
    table_order = 5
    # Forwards run in turn up to the loss; then every module has the error and backpropagates at once.
    locking = FORWARD_LOCKED
    Options = FeedbackOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.feedback: torch.Tensor | None = None  # created at the first iteration, when shapes are known

    def draw_feedback(self, classes: int, size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(classes, size, generator=generator)

    def apply_feedback(self, error: torch.Tensor) -> torch.Tensor:
        size = self.feedback.shape[1]
        return (error @ self.feedback.to(error.dtype)) * (self.options.scale / math.sqrt(size))

    def train_step(self, t, x, y) -> StepProgram:
        if self.is_last:
            return (yield from self.top_step(t, x, y, teach=ERROR))  # e to every module, no gradient down
        x = yield from self.receive_input(x, needs_grad=False, t=t)  # DFA sends nothing down
        out = self.module(x)
        yield Send(UP, out, (t,))
        error = yield Recv(ERROR, expect=(t,))  # e of this batch, from the top module
        if self.feedback is None:
            g = torch.Generator().manual_seed(self.options.feedback_seed * 1000 + self.index)
            self.feedback = self.draw_feedback(error.shape[-1], per_position(out, error), g).to(self.device)
        self.backward(out, self.apply_feedback(error).view_as(out))
        yield from self.apply_update()
        return None

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"feedback": [self.feedback] if self.feedback is not None else []}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "feedback": self.feedback}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        fb = state["feedback"]
        self.feedback = fb.to(self.device) if fb is not None else None


@METHODS.register("bdfa")
class BinaryDirectFeedbackAlignment(DirectFeedbackAlignment):
    """DFA with binary feedback: ``B_k`` has entries in {-1, +1}, stored as int8.

    The BDFA paper's exact scaling and initialization rule could not be
    checked here, so dbench's choice is stated: entries are ±1 with equal
    probability (variance 1, like DFA's Gaussian before scaling) and the same
    ``scale / sqrt(size(h_k))`` factor as DFA, so ``e B_k`` has DFA's
    magnitude. The matrix is kept as int8 (a quarter of float32's memory) and
    converted to the error's dtype when applied.
    """

    name = "bdfa"
    summary = "binary DFA: like dfa with fixed ±1 feedback matrices stored as int8"
    table_order = 6

    def draw_feedback(self, classes: int, size: int, generator: torch.Generator) -> torch.Tensor:
        bits = torch.randint(0, 2, (classes, size), generator=generator, dtype=torch.int8)
        return bits * 2 - 1
