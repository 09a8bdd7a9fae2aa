"""Messages carry a tag (the iteration they belong to) that engines, transport and checkpoints keep."""
from __future__ import annotations

import io

import pytest
import torch

from conftest import batches, group, tiny_blocks
from dbench import Trainer
from dbench.method import DOWN, UP, Recv, Send, Stage, StepOutput
from dbench.registry import METHODS

THREE = [(0, 2), (2, 4), (4, 5)]


class OffByOne(Stage):
    """Sends its activation tagged with the wrong iteration: the stage above must refuse it."""

    name = "off-by-one"

    def train_step(self, t, x, y):
        if self.is_last:
            x = yield Recv(UP, expect=(t,))
            out = self.module(x)
            loss = self.loss_fn(out, y)
            return StepOutput(loss=loss.detach(), logits=out.detach())
        yield Send(UP, self.module(x), (t + 1,))
        return None


def test_a_stage_refuses_a_message_of_another_iteration():
    with METHODS.temporarily("off-by-one", OffByOne):
        trainer = Trainer(group(tiny_blocks(), [(0, 2), (2, 5)]), "off-by-one")
        x, y = batches(1)[0]
        with pytest.raises(RuntimeError, match=r"stage 1 expected a message tagged \(0,\) on 'up' but received one "
                                               r"tagged \(1,\)"):
            trainer.step(x, y)


def test_tags_of_messages_in_flight_survive_a_checkpoint():
    """DDG at K=3: after two steps the delayed gradients wait in the inboxes, tagged with their batch."""
    trainer = Trainer(group(tiny_blocks(), THREE), "ddg")
    data = batches(4)
    for x, y in data[:2]:
        trainer.step(x, y)
    buffer = io.BytesIO()  # through bytes, as a checkpoint file: nothing shared with the live trainer
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    # Module 0 (delay 2) waits for the gradient module 1 sent at iteration 1: the batch of iteration 0.
    assert [m["tag"] for m in state["engine"]["pending"][0][DOWN]] == [[0]]
    # Module 1 (delay 1) waits for the top's gradient of iteration 1.
    assert [m["tag"] for m in state["engine"]["pending"][1][DOWN]] == [[1]]
    fresh = Trainer(group(tiny_blocks(), THREE), "ddg")
    fresh.load_state_dict(state)
    assert [m.tag for m in fresh.engine.inboxes[0][DOWN]] == [(0,)]
    for x, y in data[2:]:  # the tags are checked on receipt: a lost or shifted tag would fail here
        assert torch.equal(fresh.step(x, y), trainer.step(x, y))


@pytest.mark.parametrize("tag", [(), (7,), (12, 3)])
@pytest.mark.parametrize("fits", [False, True])
def test_the_transport_header_carries_channel_shape_dtype_and_tag(tag, fits):
    from dbench.engine.transport import CHANNELS, _header, parse_header

    tensor = torch.zeros(4, 3, 2, dtype=torch.float16)
    header = _header(CHANNELS.index(DOWN), tensor, tag, torch.device("cpu"), fits)
    assert parse_header(header.tolist()) == (DOWN, torch.float16, [4, 3, 2], tag, fits)
    with pytest.raises(ValueError, match="at most 2 integers"):
        _header(0, tensor, (1, 2, 3), torch.device("cpu"), fits)
