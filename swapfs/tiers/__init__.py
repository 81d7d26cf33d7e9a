"""Tiers: places pages live, as bytes at locations, in priority order.

* :mod:`swapfs.tiers.pool`: the compressed memory pool (size-classed
  objects), always the top tier;
* :mod:`swapfs.tiers.file`: a backing file in clusters of pages, checksummed
  and encrypted at rest; any number of them (up to eight) below the pool,
  used by priority.

They know nothing of slots or devices: the store (swapfs/store.py and
swapfs/fileset.py) decides what goes where.
"""

from swapfs.tiers.pool import Pool, PoolFull

__all__ = ["Pool", "PoolFull"]
