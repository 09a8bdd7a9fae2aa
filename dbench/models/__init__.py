"""Model zoo. Importing this package registers every model in ``dbench.registry.MODELS``."""
from dbench.models import gpt, resnet, resnet_cifar, revnet, small, wrn  # noqa: F401  (register on import)
from dbench.models.base import BlockModel, count_params, describe

__all__ = ["BlockModel", "count_params", "describe"]
