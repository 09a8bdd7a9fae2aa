"""Registries: duplicates and unknown names are errors; methods also come from entry points."""
from __future__ import annotations

import pytest
import torch

from dbench import registry
from dbench.devices import resolve_devices
from dbench.errors import DbenchError
from dbench.registry import Registry


def test_duplicate_and_unknown_names():
    reg = Registry("widget")
    reg.register("a")(1)
    reg.register("b")(2)
    with pytest.raises(ValueError, match="duplicate widget name 'a'"):
        reg.register("a")(3)
    with pytest.raises(DbenchError, match="unknown widget 'c'; known widgets: a, b"):
        reg.get("c")
    assert reg.names() == ["a", "b"] and "a" in reg


def test_methods_are_discovered_from_entry_points(monkeypatch):
    """A method in another installed package registers through the dbench.methods group."""

    class FakeEntryPoint:
        def load(self):
            from methods.bp import BackProp

            registry.METHODS.register("external-bp")(BackProp)

    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()] if group == "dbench.methods" else [])
    fresh = Registry("method", registry._load_methods)
    monkeypatch.setattr(registry, "METHODS", fresh)
    assert "external-bp" in fresh.names()


def test_devices_without_cuda_fall_back_to_cpu_and_say_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices, note = resolve_devices(3)
    assert devices == [torch.device("cpu")] * 3
    assert note == "no CUDA device found: running the 3 module(s) on the CPU"


def test_too_few_gpus_is_an_error_unless_devices_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DbenchError, match="--gpus 4 needs 4 CUDA devices but 2 are visible.*cuda:0,cuda:1,cuda:0,cuda:1"):
        resolve_devices(4)
    devices, note = resolve_devices(4, ["cuda:0", "cuda:0", "cuda:1", "cuda:1"])
    assert [d.index for d in devices] == [0, 0, 1, 1] and note is None
    with pytest.raises(DbenchError, match="bad device 'cuda:5': only 2 CUDA devices"):
        resolve_devices(1, ["cuda:5"])


def test_registration_does_not_depend_on_import_order(monkeypatch):
    """A registry loaded after its modules were imported under another registry still finds every method."""
    import subprocess
    import sys

    # In a fresh interpreter: import the built-in methods while a swapped-in registry is live
    # (as a test that swaps registry.METHODS does), put the real one back, then load it.
    code = (
        "from dbench import registry\n"
        "real = registry.METHODS\n"
        "registry.METHODS = registry.Registry('method', registry._load_methods)\n"
        "assert 'bp' in registry.METHODS\n"
        "registry.METHODS = real\n"
        "assert 'bp' in real and 'fr' in real, real.names()\n"
        "assert real.names() == registry.METHODS.names()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_failing_plugin_is_one_error_naming_its_package_and_loading_is_retried(monkeypatch):
    class Dist:
        name = "broken-dbench-plugin"

    class BrokenEntryPoint:
        name, value, dist = "broken", "broken_plugin.method", Dist()

        def load(self):
            raise ImportError("No module named 'broken_plugin'")

    monkeypatch.setattr(registry, "entry_points", lambda group: [BrokenEntryPoint()])
    fresh = Registry("method", registry._load_methods)
    for _ in range(2):  # not marked loaded after a failure: the same error again, not a half registry
        with pytest.raises(DbenchError, match="plug-in 'broken' from package 'broken-dbench-plugin' failed to load"):
            fresh.get("bp")
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    assert "bp" in fresh and "fr" in fresh


def test_temporarily_registered_method_is_gone_afterwards():
    from methods.bp import BackProp

    with registry.METHODS.temporarily("bp-again", BackProp):
        assert registry.METHODS.get("bp-again") is BackProp
    assert "bp-again" not in registry.METHODS


def test_options_parse_by_declared_type():
    """A float option accepts 0.5 even when its default is written 1; ``int | None`` accepts none."""
    from dataclasses import dataclass

    from dbench.method import Stage, parse_options

    @dataclass(frozen=True)
    class Options:
        scale: float = 1
        width: int | None = None
        flag: bool = False
        label: str = "a"

    class PlugStage(Stage):
        name = "plug"

    PlugStage.Options = Options
    assert parse_options(PlugStage, {"scale": "0.5", "width": "3", "flag": "on", "label": "b"}) == \
        Options(scale=0.5, width=3, flag=True, label="b")
    assert parse_options(PlugStage, {"width": "none"}).width is None
    with pytest.raises(DbenchError, match="bad value '1.5' for option 'width' of 'plug': expected int or none"):
        parse_options(PlugStage, {"width": "1.5"})
    with pytest.raises(DbenchError, match="bad value 'x' for option 'scale' of 'plug': expected float"):
        parse_options(PlugStage, {"scale": "x"})

    @dataclass(frozen=True)
    class ListOptions:
        sizes: list = None

    PlugStage.Options = ListOptions
    with pytest.raises(DbenchError, match="declares option 'sizes'"):
        parse_options(PlugStage, {"sizes": "1"})
