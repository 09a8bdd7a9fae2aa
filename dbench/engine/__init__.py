"""Engines drive the stages of a method: local (one process) and, later, distributed."""
from dbench.engine.local import LocalEngine

__all__ = ["LocalEngine"]
