"""The slot table: per device, compact arrays indexed by slot (page number).

Three ``array.array`` columns, no Python object per slot, 16 bytes per slot:

* ``handles`` ('Q', 8 bytes): where the page lives.  EMPTY: 0.  SAME: the
  8-byte fill word.  POOL and HUGE: the pool handle
  (``arena_id << 16 | object_index``).  FILE kinds: the page number in the
  tier's backing file.
* ``info`` ('I', 4 bytes): ``length << 4 | kind``.  Kind is the low 4 bits
  (EMPTY, SAME, POOL, HUGE; 8..15 for file tiers 0..7); length
  (bits 4..16) is the stored payload in bytes: the compressed length for
  POOL, 4096 for HUGE, 0 otherwise.  Bits 17..31 hold flags:
  MOVING (bit 17): writeback is copying this slot's page; any write,
  discard or promotion replaces the whole info word and so clears it, which
  is how the mover learns that the slot changed under it.  SHADOW (bit 18,
  file kinds only): the page was demoted and ``epoch`` holds its shadow.
  An EMPTY slot has info 0 and handle 0.
* ``epoch`` ('I', 4 bytes): without SHADOW, the last-access epoch (the
  store's clock, 1/4 s units, see docs/writeback.md); with SHADOW, the
  store's demotion counter when the page was demoted (mod 2**32).
"""

from __future__ import annotations

import sys
from array import array

EMPTY = 0
SAME = 1
POOL = 2
HUGE = 3
FILE0 = 8  # FILE0 + n: file tier n

KIND_BITS = 4
KIND_MASK = (1 << KIND_BITS) - 1
LENGTH_MASK = (1 << 13) - 1  # lengths up to 4096 (13 bits)
KIND_NAMES = {EMPTY: "empty", SAME: "same", POOL: "pool", HUGE: "huge"}
LENGTH_SHIFT = KIND_BITS
MOVING = 1 << 17  # writeback is copying the page (cleared by any rewrite)
SHADOW = 1 << 18  # file kinds: the epoch column holds the demotion shadow
FLAGS = MOVING | SHADOW

BYTES_PER_SLOT = 8 + 4 + 4


def make_info(kind: int, length: int = 0) -> int:
    return length << KIND_BITS | kind


def info_kind(info: int) -> int:
    return info & KIND_MASK


def info_length(info: int) -> int:  # noqa: E302
    return (info >> KIND_BITS) & LENGTH_MASK


class SlotTable:
    """The handle, info and epoch columns of one device."""

    __slots__ = ("npages", "handles", "info", "epoch")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.handles = array("Q", [0]) * npages
        self.info = array("I", [0]) * npages
        self.epoch = array("I", [0]) * npages
        assert self.handles.itemsize == 8 and self.info.itemsize == 4

    def metadata_bytes(self) -> int:
        """Bytes the table holds, array headers included."""
        return (sys.getsizeof(self.handles) + sys.getsizeof(self.info)
                + sys.getsizeof(self.epoch))
