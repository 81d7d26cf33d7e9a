"""Errors of the store and its tiers.

Every error the store and its tiers raise derives from StoreError: the
store's own below, and the tiers' (``PoolFull`` in swapfs/tiers/pool.py;
``TierFull``, ``TierIOError``, ``ChecksumError``, ``TierRefused`` in
swapfs/tiers/file/errors.py),
which the store turns into these before they reach the FUSE adapter.  The
adapter maps them to errnos in one place (``swapfs.fs.store_errno``).
Two more name bugs rather than conditions: ``Misuse`` (a caller broke a
contract) and ``InvariantError`` (a consistency check failed; checks raise
it, never a bare ``assert``, which ``python -O`` removes).  Messages are
for logs and the CLI.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises."""


class OutOfRange(StoreError):
    """I/O past the end of a device."""


class NoSpace(StoreError):
    """The pool and every lower tier are full."""


class Corruption(StoreError):
    """A stored page failed its checksum."""


class BackingIOError(StoreError):
    """A backing file failed."""


class Misuse(StoreError, ValueError):
    """The store or a tier was called in a way its contract forbids (a second
    migration while one runs, freeing a page not in use, a run out of range,
    opening a tier twice): a bug of the caller, never a state of the data.
    Also a ValueError, as such misuse was before it had a name."""


class InvariantError(StoreError, AssertionError):
    """A consistency check found the store's tables disagreeing (the
    checker's, swapfs/invariants.py, and each table's own ``check``).  Also
    an AssertionError, so test tools report it as a failed assertion."""
