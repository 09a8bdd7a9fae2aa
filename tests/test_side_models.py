"""Side models (synthesizers, auxiliary heads) are first class in Stage: built lazily on the module's
device and dtype, from their own seed, with their own optimizer, saved with the stage, metered apart."""
from __future__ import annotations

import io

import torch
from torch import nn

from dbench import Trainer
from dbench.method import UP, Recv, Send, SideModel, Stage, StepOutput
from dbench.registry import METHODS


class WithHead(Stage):
    """Each module below the top trains a linear head on its output (a local loss), the top as BP's top."""

    name = "with-head"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.declare_side("head", SideModel(build=lambda shape: nn.Linear(shape[0], 3),
                                            optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
                                            seed=100 + self.index, category="aux_head"))

    def train_step(self, t, x, y):
        if self.is_last:
            x = yield Recv(UP, expect=(t,))
            out = self.module(x)
            loss = self.loss_fn(out, y)
            self.backward(loss)
            yield from self.apply_update()
            return StepOutput(loss=loss.detach(), logits=out.detach())
        out = self.module(x)
        yield Send(UP, out, (t,))
        head = self.side("head", out)
        loss = self.loss_fn(head(out), y)
        self.backward(loss)
        yield from self.apply_update()
        self.side_optimizer("head").step()
        self.side_optimizer("head").zero_grad(set_to_none=True)
        return None


def modules(dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Linear(5, 4).to(dtype), nn.Linear(4, 3).to(dtype)]


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]


def test_built_at_first_use_on_the_inputs_dtype_from_its_own_seed():
    with METHODS.temporarily("with-head", WithHead):
        trainer = Trainer(modules(torch.float64), "with-head")
        assert trainer.stages[0].built_side("head") is None  # declared, not built yet
        torch.manual_seed(123)
        before = torch.get_rng_state()
        trainer.step(*data(torch.float64)[0])
        head = trainer.stages[0].built_side("head")
        assert head.weight.dtype == torch.float64 and head.weight.device.type == "cpu"
        assert torch.equal(torch.get_rng_state(), before)  # its initial weights did not draw from the global generator
        torch.manual_seed(100)
        expected = nn.Linear(4, 3).weight.to(torch.float64)
        first_update = trainer.stages[0].side_optimizer("head")
        assert first_update.state  # its own optimizer stepped (momentum buffers exist)
        assert not torch.equal(head.weight, expected)  # trained one step from ...
        fresh = Trainer(modules(torch.float64), "with-head")
        fresh.stages[0].side("head", torch.zeros(1, 4, dtype=torch.float64))
        assert torch.equal(fresh.stages[0].built_side("head").weight, expected)  # ... its seeded initial weights


def test_saved_with_the_stage_and_resumed_exactly():
    with METHODS.temporarily("with-head", WithHead):
        batches = data()
        whole = Trainer(modules(), "with-head")
        part = Trainer(modules(), "with-head")
        for x, y in batches[:2]:
            whole.step(x, y)
            part.step(x, y)
        buffer = io.BytesIO()
        torch.save(part.state_dict(), buffer)
        buffer.seek(0)
        resumed = Trainer(modules(), "with-head")
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        x, y = batches[2]
        assert torch.equal(whole.step(x, y), resumed.step(x, y))
        for a, b in zip(whole.stages[0].built_side("head").parameters(), resumed.stages[0].built_side("head").parameters()):
            assert torch.equal(a, b)


def test_counted_in_memory_under_its_own_category():
    with METHODS.temporarily("with-head", WithHead):
        trainer = Trainer(modules(), "with-head", measure=True)
        trainer.meters.start_epoch()
        for x, y in data():
            trainer.step(x, y)
        records = trainer.meters.stop_epoch()
        # weight 4x3 + bias 3 floats and its SGD momentum, plus its gradients if the module's peak moment
        # (the breakdown is the one at the largest total) fell where they were alive
        params = (4 * 3 + 3) * 4
        assert records[0]["accounted_bytes"]["aux_head"] in (2 * params, 3 * params)
        assert records[1]["accounted_bytes"]["aux_head"] == 0  # declared by the top too, never built there
