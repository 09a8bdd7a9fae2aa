"""BP: plain backpropagation across K modules, the baseline every method is compared with."""
from __future__ import annotations

from dbench.method import DOWN, EXACT_GRADIENT, LOCKED, UP, Recv, Send, Stage, StepProgram
from dbench.registry import METHODS


@METHODS.register("bp")
class BackProp(Stage):
    """Forward 1..K, loss, backward K..1 with the exact error gradient of this batch.

    Module k updates with the true gradient of batch t, after module k+1 has
    sent it ``δ_k^t``; with modules on K devices only one device works at a time.
    """

    name = "bp"
    summary = "backpropagation: every module waits for this batch's exact gradient (baseline)"
    family = EXACT_GRADIENT
    table_order = 0
    reference = True  # model-parallel BP: the papers' baseline for every speedup
    locking = LOCKED

    def train_step(self, t, x, y) -> StepProgram:
        if self.is_last:
            return (yield from self.top_step(t, x, y))
        x = yield from self.receive_input(x, t=t)
        out = self.module(x)
        yield Send(UP, out, (t,))
        grad = yield Recv(DOWN, expect=(t,))  # waits for δ_k of this same batch
        self.backward(out, grad)
        if not self.is_first:
            # Send δ_{k-1} before updating, so the module below can start its
            # backward while this one steps.
            yield Send(DOWN, x.grad, (t,))
        yield from self.apply_update()
        return None
