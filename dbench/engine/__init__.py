"""Engines drive the stages of a method: local (one process) and distributed (one process per module)."""
from dbench.engine.local import LocalEngine

__all__ = ["LocalEngine"]
