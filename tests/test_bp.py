"""BP split into K modules computes exactly what the unsplit model computes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import batches, group, tiny_blocks
from dbench import Trainer

SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def reference_losses(blocks, data, nesterov=False):
    """A plain PyTorch loop on the unsplit model, written independently of dbench."""
    model = nn.Sequential(*copy.deepcopy(blocks))
    opt = torch.optim.SGD(model.parameters(), nesterov=nesterov, foreach=False, **SGD)
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


SPLITS = {
    1: [(0, 5)],
    2: [(0, 2), (2, 5)],
    3: [(0, 1), (1, 3), (3, 5)],
    5: [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)],
}


@pytest.mark.parametrize("k", sorted(SPLITS))
@pytest.mark.parametrize("nesterov", [False, True])
def test_bp_split_equals_unsplit(k, nesterov):
    blocks = tiny_blocks()
    data = batches(6)
    expected, model = reference_losses(blocks, data, nesterov)
    trainer = Trainer(group(blocks, SPLITS[k]), "bp", nesterov=nesterov, **SGD)
    got = [trainer.step(x, y).item() for x, y in data]
    assert got == expected  # bit for bit: same ops, same order
    ref = model.state_dict()
    mine = {}
    for (a, _), module in zip(SPLITS[k], trainer.modules):
        for name, value in module.state_dict().items():
            index, rest = name.split(".", 1)
            mine[f"{a + int(index)}.{rest}"] = value
    assert mine.keys() == ref.keys()
    for name in ref:
        assert torch.equal(mine[name], ref[name]), name


def test_predict_uses_running_statistics():
    blocks = tiny_blocks()
    trainer = Trainer(group(blocks, SPLITS[2]), "bp", **SGD)
    for x, y in batches(3):
        trainer.step(x, y)
    x = batches(1, seed=9)[0][0]
    model = nn.Sequential(*[b for m in trainer.modules for b in m]).eval()
    with torch.no_grad():
        assert torch.equal(trainer.predict(x), model(x))
    assert all(not m.training for m in trainer.modules)


def test_trainer_rejects_bad_input():
    from dbench import DbenchError

    with pytest.raises(DbenchError, match="unknown method 'nope'.*bp"):
        Trainer(group(tiny_blocks(), SPLITS[2]), "nope")
    with pytest.raises(DbenchError, match="learning rate -1"):
        Trainer(group(tiny_blocks(), SPLITS[2]), "bp", lr=-1)
    with pytest.raises(DbenchError, match="2 modules"):
        Trainer(group(tiny_blocks(), SPLITS[2]), "bp", devices=["cpu"])
    with pytest.raises(DbenchError, match="does not apply to method 'bp'"):
        Trainer(group(tiny_blocks(), SPLITS[2]), "bp", options={"width": 3})
