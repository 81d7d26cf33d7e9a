"""Tiers: places pages live, in priority order.

Only the compressed memory pool exists so far (:mod:`swapfs.tiers.pool`).
"""

from swapfs.tiers.pool import Pool, PoolFull

__all__ = ["Pool", "PoolFull"]
