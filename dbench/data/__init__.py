"""Data sets and the on-device loader.

Importing this package registers every built-in data set in
``dbench.registry.DATASETS``.
"""
from dbench.data import cifar, synthetic  # noqa: F401  (register on import)
from dbench.data.base import DataSplits, DatasetSpec, channel_stats
from dbench.data.loader import DeviceLoader

__all__ = ["DataSplits", "DatasetSpec", "DeviceLoader", "channel_stats"]
