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
