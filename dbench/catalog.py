"""What ``dbench list`` shows and what the CLI checks names against, without importing torch.

``import torch`` takes 1.5-2.5 s, and the models' parameter counts need the models built. So the
built-in methods, models and data sets are described once, in two files: ``methods/catalog.json``
for the methods (their facts live with them: the framework names no method) and
``dbench/catalog.json`` for the models and data sets. ``dbench list`` and the CLI's first checks of
``--method``/``--model``/``--dataset`` read those. ``python -m dbench.catalog`` writes both from the
live registries, and a test fails when they no longer match them (tests/test_catalog.py), so they
cannot go stale unnoticed.

A method installed by another package (the ``dbench.methods`` entry-point group) is not in the
file: when one is installed, :func:`current` describes everything from the live registries,
importing torch, and is exact either way.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

from dbench.errors import DbenchError

PLUGIN_GROUP = "dbench.methods"
# Each part of the catalog, and the file beside the code it describes. The methods package is found, not
# imported: importing it registers nothing by itself, but finding it is all this needs.
FILES = {
    "methods": Path(importlib.util.find_spec("methods").submodule_search_locations[0]) / "catalog.json",
    "models": Path(__file__).with_name("catalog.json"),
    "datasets": Path(__file__).with_name("catalog.json"),
}


def build() -> dict:
    """The catalog from the live registries (imports torch, every method and every model)."""
    from dbench.models.base import describe
    from dbench.registry import DATASETS, METHODS, MODELS

    methods = {}
    for name, cls in METHODS.items():
        methods[name] = {
            "summary": cls.summary,
            "family": cls.family,
            "table_order": cls.table_order,
            "ideal_speedup": {str(k): cls.ideal_speedup(k) for k in (2, 4)},
            "options": [{"name": f.name, "default": repr(f.default), "help": f.metadata.get("help", "")}
                        for f in dataclasses.fields(cls.Options)],
        }
    models = {}
    for name, _ in MODELS.items():
        info = describe(name)
        models[name] = {key: info[key] for key in ("params", "blocks", "inputs", "context")}
    datasets = {name: {"kind": spec.kind, "num_classes": spec.num_classes, "description": spec.description}
                for name, spec in DATASETS.items()}
    return {"methods": methods, "models": models, "datasets": datasets}


def plugins() -> list[str]:
    """Names of the method plug-ins installed (entry points: read from package metadata, nothing imported)."""
    return sorted(ep.name for ep in entry_points(group=PLUGIN_GROUP))


def stored() -> dict:
    files = {path: json.loads(path.read_text(encoding="utf-8")) for path in set(FILES.values())}
    return {part: files[path][part] for part, path in FILES.items()}


def current() -> dict:
    """The catalog: the stored one, or the live registries' when a method plug-in is installed."""
    return build() if plugins() else stored()


def check_names(method: str, model: str, dataset: str) -> None:
    """One line naming the unknown name and the known ones, as the registries word it, before torch loads."""
    catalog = current()
    for kind, name, known in (("method", method, catalog["methods"]), ("model", model, catalog["models"]),
                              ("dataset", dataset, catalog["datasets"])):
        if name not in known:
            raise DbenchError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(known))}")


def write() -> list[Path]:
    """Write each file of the catalog from the live registries; the paths written."""
    catalog = build()
    paths = sorted(set(FILES.values()))
    for path in paths:
        parts = {part: catalog[part] for part, where in FILES.items() if where == path}
        path.write_text(json.dumps(parts, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return paths


if __name__ == "__main__":
    if plugins():
        sys.exit(f"method plug-ins are installed ({', '.join(plugins())}): the stored catalog describes the "
                 f"built-in methods only; write it from an environment without them")
    print("wrote " + ", ".join(str(path) for path in write()))
