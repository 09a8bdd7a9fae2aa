"""A method from outside dbench is reported like a built-in one: the report reads the facts runs record, no names."""
from __future__ import annotations

import pandas as pd
import pytest

from dbench import registry
from dbench import run as runner
from dbench.config import RunConfig
from dbench.method import LOCAL_LOSS, UNLOCKED
from dbench.report import build_report
from dbench.report.figures import order_categories
from methods.bp import BackProp

K = 2


class PlugStage(BackProp):
    """BP's training step under other facts: whatever the report shows for it comes from the facts."""

    name = "plugmethod"
    summary = "a plug-in method for the report's tests"
    family = LOCAL_LOSS
    table_order = 50  # after the built-in methods' 0..6, before unknown ones (100)
    reference = False
    locking = UNLOCKED

    @staticmethod
    def step_cost(forward: float, backward: float, index: int, num_stages: int) -> float:
        return forward + backward + forward / 2  # say, a local head that costs half the module's forward


# By hand, from ALGORITHMS.md's cost model: at K=2 a module's forward costs 1/2 and its backward 1, so
# its step costs 1/2 + 1 + 1/4 = 7/4. Unlocked, the period is the slowest module's 7/4; BP's is 3.
IDEAL = 3 / (7 / 4)  # 12/7 ≈ 1.71


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    with registry.METHODS.temporarily(PlugStage.name, PlugStage):
        for method in ("bp", PlugStage.name):
            cfg = RunConfig(method=method, model="mlp", gpus=K, epochs=1, batch_size=512, sigma_every=5)
            runner.start(cfg, root / method, quiet=True)
    # gone from the registry again: the report must make do with what the runs recorded
    assert PlugStage.name not in registry.METHODS
    return build_report([root], tmp_path_factory.mktemp("report"))


def methods_of(shown: pd.DataFrame) -> set[str]:
    """The methods a shown table holds: its "method" column, or its columns (generalization: one per method)."""
    return set(shown["method"]) if "method" in shown.columns else set(shown.columns)


def test_the_plugin_method_is_in_every_section(report):
    assert [s.key for s in report.sections] == ["verdict", "convergence", "memory", "generalization", "sigma", "speed"]
    for section in report.sections:
        assert section.items, f"section {section.key} is empty"
        assert any(PlugStage.name in item.runs for item in section.items), section.key
        for item in section.items:
            if hasattr(item, "shown"):  # a table
                assert methods_of(item.shown) >= {"bp", PlugStage.name}, (section.key, item.title)
    tabled = {s.key for s in report.sections if any(hasattr(i, "shown") for i in s.items)}
    assert tabled == {"verdict", "memory", "generalization", "sigma", "speed"}  # convergence has figures only
    convergence = next(s for s in report.sections if s.key == "convergence")
    assert all(PlugStage.name in f.runs for f in convergence.items)


def test_speed_table_shows_the_ideal_from_the_facts(report):
    csv = pd.read_csv(report.out / "speed" / "speed.csv")
    assert list(csv["method"]) == ["bp", PlugStage.name]  # table order 0, then 50
    by_method = csv.set_index("method")
    assert by_method.loc[PlugStage.name, "ideal_speedup"] == pytest.approx(IDEAL)
    assert by_method.loc["bp", "ideal_speedup"] == 1.0
    assert set(csv["baseline"]) == {"bp"}  # the method whose facts say reference
    assert pd.isna(by_method.loc[PlugStage.name, "speedup_epoch_time"])  # local engine: not a parallel measurement
    speed = next(s for s in report.sections if s.key == "speed")
    shown = next(i for i in speed.items if hasattr(i, "shown")).shown.set_index("method")
    assert shown.loc[PlugStage.name, "ideal"] == f"{IDEAL:.2f}" == "1.71"


def test_runs_table_carries_the_facts(report):
    runs = pd.read_csv(report.out / "runs.csv").set_index("method")
    assert runs.loc[PlugStage.name, "family"] == LOCAL_LOSS
    assert runs.loc[PlugStage.name, "table_order"] == 50
    assert not runs.loc[PlugStage.name, "reference"] and runs.loc["bp", "reference"]


def test_memory_categories_list_the_frameworks_first_then_the_methods_own():
    found = ["synthesizer", "messages", "parameters", "stored_inputs", "activations", "optimizer", "gradients", "a_new"]
    assert order_categories(found) == ["parameters", "gradients", "optimizer", "activations", "messages",
                                       "a_new", "stored_inputs", "synthesizer"]
