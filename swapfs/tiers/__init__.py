"""Tiers: places pages live, as bytes at locations, in priority order.

* :mod:`swapfs.tiers.pool`: the compressed memory pool (size-classed
  objects), always the top tier;
* :mod:`swapfs.tiers.file`: a backing file in clusters of pages, checksummed
  and encrypted at rest, signed and locked by one mount; any number of them
  (up to eight) below the pool, used by priority;
* :mod:`swapfs.tiers.checks`: what check-config and mount check of tier
  paths and files before anything is opened.

They know nothing of slots or devices: the store (swapfs/store.py and
swapfs/fileset.py) decides what goes where.
"""

from swapfs.tiers.pool import Pool, PoolFull

__all__ = ["Pool", "PoolFull"]
