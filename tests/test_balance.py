"""The `time` cut, checked by timing the method on candidate cuts (dbench.balance)."""
from __future__ import annotations

import pytest
import torch

from conftest import batches, tiny_blocks
from test_partition import brute_force  # the best contiguous cut, by trying every one
from dbench.balance import balance_measured, imbalance, method_step_seconds
from dbench.config import RunConfig
from dbench.partition import BlockTime, balance_time, forward_backward


def measure_with(true_costs):
    """A stand-in for timing the method: each module costs the sum of its blocks' true costs."""
    calls = []

    def measure(ranges):
        calls.append(list(ranges))
        return [float(sum(true_costs[a:b])) for a, b in ranges]

    return measure, calls


def flat_profile(n):
    return [BlockTime(1.0, 2.0, (1,)) for _ in range(n)]  # the profile: every block costs 3


def test_a_module_heavier_than_profiled_gets_fewer_blocks():
    # The profile sees 8 equal blocks; timing shows the first two cost three times what it predicted.
    true = [9.0, 9.0, 3, 3, 3, 3, 3, 3]
    measure, calls = measure_with(true)
    chosen = balance_measured(flat_profile(8), 2, forward_backward, None, measure)
    assert calls[0] == balance_time(flat_profile(8), 2) == [(0, 4), (4, 8)]  # the profile's own cut comes first
    assert max(chosen.measured) == brute_force(true, 2) == 18  # [0, 2) against [2, 8)
    assert chosen.ranges == [(0, 2), (2, 8)] and chosen.candidates == len(calls) >= 2
    assert chosen.predicted == [6.0, 18.0]  # what the profile said of the chosen cut
    assert imbalance(chosen.measured) == pytest.approx(1.0)


def test_timing_never_chooses_a_cut_slower_than_the_profile_s():
    # Re-cuts follow the measured ratios, which may mislead; the candidate measured fastest is kept.
    for true in ([1, 50, 1, 1, 1, 1], [5, 1, 1, 1, 1, 9], [3, 3, 3, 3, 3, 3], [1, 2, 3, 4, 5, 6]):
        for k in (2, 3):
            measure, calls = measure_with(true)
            chosen = balance_measured(flat_profile(len(true)), k, forward_backward, None, measure)
            first = max(sum(true[a:b]) for a, b in calls[0])
            assert max(chosen.measured) <= first
            assert max(chosen.measured) >= brute_force(true, k)
            assert chosen.measured == [float(sum(true[a:b])) for a, b in chosen.ranges]


def test_the_method_is_timed_on_copies_without_moving_the_generator():
    blocks = tiny_blocks()
    before = [p.clone() for b in blocks for p in b.state_dict().values()]
    x, y = batches(1)[0]
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    seconds = method_step_seconds(blocks, [(0, 2), (2, 5)], "fr", None, ["cpu", "cpu"], (x, y), 10,
                                  dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4))
    assert torch.equal(torch.rand(3), expected)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert all(torch.equal(a, b) for a, b in zip(before, [p for b in blocks for p in b.state_dict().values()]))


def test_a_time_cut_records_predicted_and_measured_balance():
    from dbench import plan as planning

    plan, _ = planning.make(RunConfig(model="mlp", method="fr", gpus=2, split="time", engine="local"))
    balance = plan.record()["balance"]
    assert len(balance["predicted_s"]) == len(balance["measured_s"]) == 2 and balance["candidates"] >= 1
    assert balance["measured_balance"] == pytest.approx(imbalance(balance["measured_s"]))
    assert "predicted balance" in plan.split_note and "measured" in plan.split_note
    assert planning.Plan.from_record(plan.record(), "test").balance == balance
    blocks, _ = planning.make(RunConfig(model="mlp", method="fr", gpus=2, split="blocks"))
    assert "balance" not in blocks.record()
