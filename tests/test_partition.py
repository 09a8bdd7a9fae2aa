"""Partitions are contiguous, cover every block once, and balance what they claim to."""
from __future__ import annotations

import itertools
import random
import time

import pytest
import torch
from torch import nn

from dbench.errors import DbenchError
from dbench.partition import by_count, from_cuts, min_max, parse_split, partition


def assert_valid(ranges, n, k):
    assert len(ranges) == k
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c
    assert all(a < b for a, b in ranges)


@pytest.mark.parametrize("n,k", [(11, 1), (11, 2), (11, 4), (56, 4), (5, 5), (35, 3)])
def test_by_count(n, k):
    ranges = by_count(n, k)
    assert_valid(ranges, n, k)
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first modules take the remainder


def brute_force(costs, k):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_min_max_is_optimal(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    k = rng.randint(1, n)
    costs = [rng.choice([0.0, rng.random() * 10]) for _ in range(n)]
    ranges = min_max(costs, k)
    assert_valid(ranges, n, k)
    assert max(sum(costs[a:b]) for a, b in ranges) == pytest.approx(brute_force(costs, k))


class Sleepy(nn.Module):
    """A fake block whose forward takes a known time."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        time.sleep(self.seconds)
        return x * self.scale


def test_time_split_isolates_the_slow_block():
    blocks = [Sleepy(0.002), Sleepy(0.002), Sleepy(0.002), Sleepy(0.002), Sleepy(0.03)]
    ranges = partition(blocks, 2, "time", sample=torch.ones(2, 3), device=torch.device("cpu"))
    assert ranges == [(0, 4), (4, 5)]
    assert by_count(5, 2) == [(0, 3), (3, 5)]  # what equal counts would have done


def test_params_split_balances_parameters():
    widths = [(4, 64), (64, 64), (64, 64), (64, 4), (4, 4), (4, 4)]  # 320, 4160, 4160, 260, 20, 20 parameters
    blocks = [nn.Linear(a, b) for a, b in widths]
    ranges = partition(blocks, 2, "params")
    assert ranges == [(0, 2), (2, 6)]  # 4480 | 4460
    assert by_count(6, 2) == [(0, 3), (3, 6)]  # 8640 | 300


def test_explicit_cuts_and_errors():
    assert from_cuts([4, 8], 11, 3) == [(0, 4), (4, 8), (8, 11)]
    assert parse_split("4,8") == [4, 8]
    assert parse_split("time") == "time"
    with pytest.raises(DbenchError, match="bad --split 'fast'"):
        parse_split("fast")
    with pytest.raises(DbenchError, match="need 2 cut points"):
        from_cuts([4], 11, 3)
    with pytest.raises(DbenchError, match="increase strictly"):
        from_cuts([8, 4], 11, 3)
    with pytest.raises(DbenchError, match="increase strictly"):
        from_cuts([0, 4], 11, 3)
    with pytest.raises(DbenchError, match=r"\(5 blocks\) into 6 modules"):
        partition([nn.Identity()] * 5, 6, "blocks")
