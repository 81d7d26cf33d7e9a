"""The slot table: per device, compact arrays indexed by slot (page number).

Three ``array.array`` columns, no Python object per slot, 16 bytes per slot:

* ``handles`` ('Q', 8 bytes): where the page lives.  EMPTY: 0.  SAME: the
  8-byte fill word.  POOL and HUGE: the pool handle.  FILE kinds: the page
  number in the tier's backing file.
* ``info`` ('I', 4 bytes): ``length << 4 | kind``, plus flags.  Kind is the
  low 4 bits (EMPTY, SAME, POOL, HUGE; FILE0 + n, 8..15, for file tier n).
  Length (bits 4..16) is the stored payload in bytes: the compressed length
  for POOL, 4096 for HUGE, 0 otherwise.  Bit 17 is MOVING: writeback is
  copying this slot's page; any write, discard or promotion replaces the
  whole info word and so clears it, which is how the mover learns that the
  slot changed under it.  Bit 18 is SHADOW (file kinds only): the page was
  demoted and ``epoch`` holds its shadow.  Bits 19..31 are free.  An EMPTY
  slot has info 0 and handle 0.
* ``epoch`` ('I', 4 bytes): without SHADOW, the last-access epoch (the
  store's clock, 1/4 s units, see docs/writeback.md); with SHADOW, the
  store's demotion counter when the page was demoted (mod 2**32).

The hot loops of the store test kinds with the masks below inline; code
off the hot path uses the named predicates.
"""

from __future__ import annotations

import sys
from array import array
from typing import Iterator

EMPTY = 0
SAME = 1
POOL = 2
HUGE = 3
FILE0 = 8  # FILE0 + n: file tier n
MAX_FILE_TIERS = 8  # file kinds FILE0 .. 15

KIND_BITS = 4
KIND_MASK = (1 << KIND_BITS) - 1
LENGTH_MASK = (1 << 13) - 1  # lengths up to 4096 (13 bits)
KIND_NAMES = {EMPTY: "empty", SAME: "same", POOL: "pool", HUGE: "huge"}
MOVING = 1 << 17  # writeback is copying the page (cleared by any rewrite)
SHADOW = 1 << 18  # file kinds: the epoch column holds the demotion shadow
FLAGS = MOVING | SHADOW
# POOL and HUGE differ in bit 0 only: ``info & _IN_POOL_MASK == POOL`` is
# either of them.
_IN_POOL_MASK = KIND_MASK & ~1

BYTES_PER_SLOT = 8 + 4 + 4
# The epoch column holds 32 bits; the clocks it is compared with wrap the same.
EPOCH_MASK = 0xFFFFFFFF

# Slots compared at once when a scan skips empty stretches.
SCAN_CHUNK = 4096
_ZERO_INFO_CHUNK = bytes(4 * SCAN_CHUNK)


def kind_of(info: int) -> int:
    return info & KIND_MASK


def length_of(info: int) -> int:
    """The stored payload length of a pool (or huge) slot."""
    return (info >> KIND_BITS) & LENGTH_MASK


def in_pool(info: int) -> bool:
    """The page is a pool object (compressed or huge)."""
    return info & _IN_POOL_MASK == POOL


def file_tier_of(info: int) -> int | None:
    """The index of the file tier holding the page, or None."""
    k = info & KIND_MASK
    return k - FILE0 if k >= FILE0 else None


def movable(level: int) -> tuple[int, int]:
    """``(mask, value)``: ``info & mask == value`` exactly when a slot holds
    a page at ``level`` (0: the pool, 1 + n: file tier n) and no move of it
    is in flight.  For the victim scans' inner loops."""
    if level == 0:
        return MOVING | _IN_POOL_MASK, POOL
    return MOVING | KIND_MASK, FILE0 + level - 1


class SlotTable:
    """The handle, info and epoch columns of one device."""

    __slots__ = ("npages", "handles", "info", "epoch")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.handles = array("Q", [0]) * npages
        self.info = array("I", [0]) * npages
        self.epoch = array("I", [0]) * npages
        assert self.handles.itemsize == 8 and self.info.itemsize == 4

    def all_empty(self, first: int, end: int) -> bool:
        """Slots ``first .. end`` (at most SCAN_CHUNK) are all EMPTY: one memcmp."""
        with memoryview(self.info) as view, view.cast("B") as info_bytes:
            return info_bytes[first * 4:end * 4] == _ZERO_INFO_CHUNK[:(end - first) * 4]

    def stored_chunks(self, first: int, end: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` chunks of at most SCAN_CHUNK slots covering
        ``first .. end``, leaving out those whose slots are all EMPTY."""
        for c0 in range(first, end, SCAN_CHUNK):
            c1 = min(c0 + SCAN_CHUNK, end)
            if not self.all_empty(c0, c1):
                yield c0, c1

    def metadata_bytes(self) -> int:
        """Bytes the table holds, array headers included."""
        return (sys.getsizeof(self.handles) + sys.getsizeof(self.info)
                + sys.getsizeof(self.epoch))
