"""Datasets (offline built-ins, local files, hub names) and seeded partitioners."""

from florana.data.partition import partition, partition_stats
from florana.data.sources import Examples, load_examples

__all__ = ["Examples", "load_examples", "partition", "partition_stats"]
