"""Data sets and the on-device loader.

Importing this package registers every built-in data set in
``dbench.registry.DATASETS``.
"""
from dbench.data import cifar, synthetic, text  # noqa: F401  (register on import)
from dbench.data.base import DataSplits, DatasetSpec, channel_stats
from dbench.data.loader import DeviceLoader
from dbench.data.text import TextLoader, TextSplits

__all__ = ["DataSplits", "DatasetSpec", "DeviceLoader", "TextLoader", "TextSplits", "channel_stats"]
