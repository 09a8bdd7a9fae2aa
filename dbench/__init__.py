"""dbench: a benchmark and comparison suite for decoupled backpropagation."""
from dbench.errors import DbenchError
from dbench.trainer import Trainer

__all__ = ["DbenchError", "Trainer"]
__version__ = "0.1.0"
