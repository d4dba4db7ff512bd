"""Datasets (offline built-ins, local files, hub names) and seeded partitioners."""

from florana.data.partition import partition, partition_stats
from florana.data.sources import Examples, load_examples, relabel

__all__ = ["Examples", "load_examples", "relabel", "partition", "partition_stats"]
