"""dbench: a benchmark and comparison suite for decoupled backpropagation."""
from dbench.errors import DbenchError

__all__ = ["DbenchError", "Trainer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Trainer imports torch; reading results, building reports and `dbench --help` must not pay for that.
    if name == "Trainer":
        from dbench.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'dbench' has no attribute {name!r}")
