"""The swap cache: a bounded set of uncompressed pages of the file tiers.

Keyed by *file location* (:func:`file_key`: ``tier_index << 56 | handle``,
the handle being the object's byte offset in the tier), not by slot: an
object never changes while it is live (the store appends only to fresh
places), so an entry stays valid until that object is freed, and the
file-tier set drops it at that moment
(``FileTierSet.free_page``).  No slot
write or discard has to look at the cache: the pool paths never touch it.

What it holds: pages whose move is in flight (the destination copy, inserted
before the tier write starts, dropped if the move aborts; the source copy of
a move between file tiers), pages just moved down, and recently read file
pages, so that a repeated read skips the disk.

Preallocated and bounded: one bytearray of ``capacity`` pages, an
``array('Q')`` of keys and a bytearray of reference bits per entry, and one
dict from key to entry index (at most ``capacity`` items).  Replacement is
CLOCK (second chance).  Everything runs on the trio loop and never awaits.
"""

from __future__ import annotations

import sys
from array import array
from typing import TYPE_CHECKING

from .errors import InvariantError
from .kernel import PAGE_SIZE as PAGE

if TYPE_CHECKING:
    from typing_extensions import Buffer

# A file location as one integer: the cache's keys and the file-tier set's pins.
KEY_SHIFT = 56
KEY_PAGE_MASK = (1 << KEY_SHIFT) - 1


def file_key(tier_index: int, handle: int) -> int:
    return tier_index << KEY_SHIFT | handle


class SwapCache:
    __slots__ = ("capacity", "_buf", "_view", "_keys", "_ref", "_index", "_free", "_hand",
                 "hits", "misses", "inserts", "evictions")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(int(capacity), 0)
        self._buf = bytearray(self.capacity * PAGE)
        self._view = memoryview(self._buf)
        self._keys = array("Q", bytes(8 * self.capacity))
        self._ref = bytearray(self.capacity)
        self._index: dict[int, int] = {}
        self._free = array("I", range(self.capacity - 1, -1, -1))
        self._hand = 0
        self.hits = 0
        self.misses = 0
        self.inserts = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: int) -> bool:
        return key in self._index

    def get(self, key: int) -> memoryview | None:
        """The cached page (a view valid until the next put), or None.

        Does not count hits or misses: the caller knows whether a lookup is
        a read that could have gone to disk."""
        e = self._index.get(key)
        if e is None:
            return None
        self._ref[e] = 1
        return self._view[e * PAGE:(e + 1) * PAGE]

    def put(self, key: int, data: Buffer) -> None:
        """Cache one page (4096 bytes) under ``key``, replacing any entry."""
        if not self.capacity:
            return
        e = self._index.get(key)
        if e is None:
            e = self._free.pop() if self._free else self._evict()
            self._index[key] = e
            self._keys[e] = key
            self.inserts += 1
        self._view[e * PAGE:(e + 1) * PAGE] = data
        self._ref[e] = 0

    def _evict(self) -> int:
        ref = self._ref
        hand = self._hand
        cap = self.capacity
        while ref[hand]:
            ref[hand] = 0
            hand = hand + 1 if hand + 1 < cap else 0
        self._hand = hand + 1 if hand + 1 < cap else 0
        del self._index[self._keys[hand]]
        self.evictions += 1
        return hand

    def invalidate(self, key: int) -> None:
        e = self._index.pop(key, None)
        if e is not None:
            self._ref[e] = 0
            self._free.append(e)

    def keys(self) -> list[int]:
        return list(self._index)

    def metadata_bytes(self) -> int:
        return (sys.getsizeof(self._keys) + sys.getsizeof(self._ref) + sys.getsizeof(self._index)
                + sys.getsizeof(self._free))

    def check_invariants(self) -> None:
        if len(self._index) + len(self._free) != self.capacity:
            raise InvariantError(f"cache: {len(self._index)} entries + {len(self._free)} free "
                                 f"!= capacity {self.capacity}")
        seen = set(self._free)
        if len(seen) != len(self._free):
            raise InvariantError("cache: an entry is free twice")
        for key, e in self._index.items():
            if e in seen:
                raise InvariantError(f"cache: entry {e} is both free and used")
            seen.add(e)
            if self._keys[e] != key:
                raise InvariantError(f"cache: entry {e} holds key {self._keys[e]:#x}, "
                                     f"indexed as {key:#x}")
