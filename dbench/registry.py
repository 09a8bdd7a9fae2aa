"""Name -> object registries for methods, models and data sets.

Everything registers itself with a decorator (``@MODELS.register("resnet20")``).
A duplicate name is an error; an unknown name is an error that lists the known
ones. Methods are discovered from the ``methods`` package shipped with dbench and
from the ``dbench.methods`` entry-point group, so that another installed package
can add a method without touching this repository.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from dbench.errors import DbenchError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        self._loaded = loader is None

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"duplicate {self.kind} name {name!r}: already registered as {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return add

    def _ensure_loaded(self) -> None:
        # Loading is lazy so that importing dbench never imports every method,
        # and so that method modules can import dbench freely.
        if not self._loaded:
            self._loaded = True
            assert self._loader is not None
            self._loader()

    def get(self, name: str) -> T:
        self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            raise DbenchError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._ensure_loaded()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._items


def _load_methods() -> None:
    import methods  # the built-in methods, one module each

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"methods.{info.name}")
    # Methods from other installed packages: each entry point names a module
    # (or object) whose import registers the method.
    for ep in entry_points(group="dbench.methods"):
        ep.load()


def _load_models() -> None:
    import dbench.models  # noqa: F401  (registers on import)


def _load_datasets() -> None:
    import dbench.data  # noqa: F401  (registers on import)


METHODS: Registry = Registry("method", _load_methods)
MODELS: Registry = Registry("model", _load_models)
DATASETS: Registry = Registry("dataset", _load_datasets)
