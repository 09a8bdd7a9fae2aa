"""Name -> object registries for methods, models, data sets and tasks.

Everything registers itself with a decorator (``@MODELS.register("resnet20")``).
A duplicate name is an error; an unknown name is an error that lists the known
ones. Methods are discovered from the ``methods`` package shipped with dbench and
from the ``dbench.methods`` entry-point group, tasks from ``dbench.tasks`` and
the group of the same name, so that another installed package can add a method
or a task without touching this repository.

Registration does not depend on import order. The decorator also notes the
object in its defining module (``__dbench_registered__``), and a registry's
loader adopts what the modules it covers declare. So a registry that loads
after those modules were first imported (say, a fresh registry swapped in by a
test, or the real one after such a swap) still finds every object, and loading
twice registers nothing twice.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
import sys
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from dbench.errors import DbenchError

T = TypeVar("T")
DECLARED = "__dbench_registered__"  # in a module: [(kind, name, object), ...] its decorators registered


class Registry(Generic[T]):
    def __init__(self, kind: str, loader: Callable[[], Iterable[Any]] | None = None):
        """``loader`` imports what registers into this registry and returns the modules (or objects) to adopt from."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        self._loaded = loader is None

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            self._add(name, obj)
            # Note it where it is declared (the caller's module), for registries that load later.
            module = sys._getframe(1).f_globals
            module.setdefault(DECLARED, []).append((self.kind, name, obj))
            return obj

        return add

    def _add(self, name: str, obj: T) -> None:
        known = self._items.get(name)
        if known is obj:
            return  # the same declaration adopted again
        if known is not None:
            raise ValueError(f"duplicate {self.kind} name {name!r}: already registered as {known!r}")
        self._items[name] = obj

    def adopt(self, source: Any) -> None:
        """Register what a module declared (or, given an object, what its module declared)."""
        module = source if isinstance(source, ModuleType) else sys.modules.get(getattr(source, "__module__", ""), None)
        for kind, name, obj in vars(module).get(DECLARED, []) if module is not None else []:
            if kind == self.kind:
                self._add(name, obj)

    @contextlib.contextmanager
    def temporarily(self, name: str, obj: T) -> Iterator[T]:
        """``obj`` registered as ``name`` inside the block only (tests, notebooks)."""
        self._ensure_loaded()
        self._add(name, obj)
        try:
            yield obj
        finally:
            del self._items[name]

    def _ensure_loaded(self) -> None:
        # Loading is lazy so that importing dbench never imports every method,
        # and so that method modules can import dbench freely. The flag is set
        # only once everything loaded: a loader that failed is tried again, and
        # fails again with the same error, rather than leaving a half registry.
        if self._loaded:
            return
        assert self._loader is not None
        for source in self._loader():
            self.adopt(source)
        self._loaded = True

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


def _package_modules(package: str) -> list[ModuleType]:
    root = importlib.import_module(package)
    return [root] + [importlib.import_module(f"{package}.{info.name}") for info in pkgutil.iter_modules(root.__path__)]


def _with_plugins(package: str, group: str, kind: str) -> list[Any]:
    """The modules of ``package`` (the built-in ones), then what the entry points of ``group`` name: each a
    module (or object) from another installed package whose import registers its objects."""
    sources: list[Any] = _package_modules(package)
    for ep in entry_points(group=group):
        try:
            sources.append(ep.load())
        except Exception as e:
            package_name = ep.dist.name if getattr(ep, "dist", None) is not None else ep.value
            raise DbenchError(f"{kind} plug-in {ep.name!r} from package {package_name!r} failed to load "
                              f"({type(e).__name__}: {e}); fix or uninstall that package") from e
    return sources


def _load_methods() -> list[Any]:
    return _with_plugins("methods", "dbench.methods", "method")


def _load_models() -> list[ModuleType]:
    return _package_modules("dbench.models")


def _load_datasets() -> list[ModuleType]:
    return _package_modules("dbench.data")


def _load_tasks() -> list[Any]:
    return _with_plugins("dbench.tasks", "dbench.tasks", "task")


METHODS: Registry = Registry("method", _load_methods)
MODELS: Registry = Registry("model", _load_models)
DATASETS: Registry = Registry("dataset", _load_datasets)
TASKS: Registry = Registry("task", _load_tasks)
