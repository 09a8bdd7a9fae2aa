"""A method's facts live on its class: the ideal speedups follow ALGORITHMS.md's cost model."""
from __future__ import annotations

import pytest

from dbench.method import EXACT_GRADIENT, LOCKED, UNLOCKED, Stage
from dbench.registry import METHODS

# ALGORITHMS.md, per method: the ideal speedup over model-parallel BP at K balanced modules.
SPEC = {
    "bp": lambda k: 1.0,
    "fr": lambda k: 3 * k / 4,
    "ddg": lambda k: float(k),
    "fdg": lambda k: float(k),  # no module waits for another within an iteration: period 3F/K
    "2bw": lambda k: float(k),  # 1F1B without flushes: no bubble in steady state, period 3F/K
    "petra": lambda k: 3 * k / 4,  # forward, recompute, backward below the top: period 4F/K (fused), as FR
    "dfa": lambda k: 3 * k / (k + 2),
    "bdfa": lambda k: 3 * k / (k + 2),
    "dni": lambda k: None,  # (3F + cost of the synthesizers)/K: known only by profiling
    "cdni": lambda k: None,
    "dgl": lambda k: None,  # (F + 2F + the auxiliary head)/K: the head's cost is known only by profiling
}


@pytest.mark.parametrize("method", sorted(SPEC))
def test_ideal_speedup_follows_the_cost_model(method):
    cls = METHODS.get(method)
    assert cls.ideal_speedup(1) == 1.0  # every method is BP at K=1
    for k in range(2, 7):
        want = SPEC[method](k)
        assert cls.ideal_speedup(k) == (pytest.approx(want) if want is not None else None)


def test_families_and_order_cover_every_builtin_method():
    facts = {name: cls.facts(2) for name, cls in METHODS.items() if name in SPEC}
    assert [n for n, _ in sorted(facts.items(), key=lambda kv: kv[1]["table_order"])] == \
        ["bp", "2bw", "fr", "ddg", "fdg", "petra", "dni", "cdni", "dfa", "bdfa", "dgl"]
    assert [n for n, f in facts.items() if f["reference"]] == ["bp"]
    assert facts["bp"]["family"] == EXACT_GRADIENT and all(f["family"] for f in facts.values())


def test_a_plugin_method_gets_its_ideal_from_its_own_step_cost():
    class TwoForwards(Stage):
        name = "two-forwards"
        locking = UNLOCKED

        @staticmethod
        def step_cost(forward, backward, index, num_stages):
            return 2 * forward + backward

    class Locked(TwoForwards):
        locking = LOCKED

    # unlocked: period (2 + 2)/K against BP's 3
    assert TwoForwards.ideal_speedup(4) == pytest.approx(3 / (4 / 4))
    # locked: the modules' costs add up, 4 against 3
    assert Locked.ideal_speedup(4) == pytest.approx(3 / 4)
