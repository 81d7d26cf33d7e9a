"""The slot table: per device, compact columns indexed by slot (page number).

Three columns, no Python object per slot, 16 bytes per slot in use:

* ``handles`` (64 bits): where the page lives.  EMPTY: 0.  SAME: the
  8-byte fill word.  POOL and HUGE: the pool handle.  FILE kinds: the
  object's place in the tier (its byte offset in the data area).
* ``info`` (32 bits): ``length << 4 | kind``, plus flags.  Kind is the
  low 4 bits (EMPTY, SAME, POOL, HUGE; FILE0 + n, 8..15, for file tier n).
  Length (bits 4..16) is the stored payload in bytes: the compressed length
  for POOL, 4096 for HUGE, the object's payload length for FILE kinds
  (4096 for a raw page), 0 otherwise.  Bit 17 is MOVING: writeback is
  copying this slot's page; any write, discard or promotion replaces the
  whole info word and so clears it, which is how the mover learns that the
  slot changed under it.  Bit 18 is SHADOW (file kinds only): the page was
  demoted and ``epoch`` holds its shadow.  Bit 19 is ALT (POOL only): the
  object was recompressed with the pool's second codec (``pool.recompress``).
  Bit 20 is SETTLED (POOL only): recompressing was tried and would not have
  saved a size class.  A rewrite clears both.  Bits 21..31 are free.  An
  EMPTY slot has info 0 and handle 0.
* ``epoch`` (32 bits): without SHADOW, the last-access epoch (the store's
  clock, 1/4 s units, see docs/writeback.md); with SHADOW, the store's
  demotion counter when the page was demoted (mod 2**32).  Two marks ride
  on the last-access epoch for the tiering policy (swapfs/policy.py): a
  page written and not read since carries UNREAD_MARK (bit 30: writes store
  the epoch with it, reads without), a pool page promoted on a
  refault and not read since PROMOTED_MARK (bit 31).  Ages are taken
  modulo 2**30 (AGE_MASK), which reads an epoch the same with or without
  them (the access clock stays below 2**30: 8 years in 1/4 s units).

Memory follows what is stored, not the capacity.  Each column is a typed
memoryview over a region reserved for the whole device (the regions
``slots.<device>.handles``, ``.info`` and ``.epoch`` of the store's
``swapfs.memory.StateMemory``, the one allocator of its truth): the kernel
backs a page of it only when it is first written, and the daemon's ``mlockall(MCL_ONFAULT)`` locks only pages so
backed.  Slots are grouped in clusters of CLUSTER_SLOTS (1024: 8 KiB of
handles, 4 KiB of info and of epochs, each page-aligned); per cluster the
table counts the slots in use (``cluster_used``) and flags non-empty
clusters (``nonempty``, one byte each).  When a cluster's last slot is
freed, its pages are handed back (``StateMemory.release``:
``MADV_DONTNEED_LOCKED``, or a hole punched in a shared region's memory
file).  After adopting a predecessor's memory, recovery
(swapfs/recovery.py) recounts the clusters.  An
unused cluster costs 3 bytes; a 1 TiB device mounts at once.  Scans skip
empty clusters with one ``bytearray.find``, so their cost follows the
clusters in use.

The store keeps ``cluster_used`` right: a slot leaves EMPTY only in its
commit and becomes EMPTY only in its free (see swapfs/state.py).

This module owns the encoding: every decode of an info word, every
conversion between levels, kinds and tier indexes goes through the helpers
below.  The hot loops named in HOT_LOOPS inline the same expressions for
speed (a call costs a tenth of a microsecond a page); each says so where
it does, and tests/store/test_slots.py checks that what they inline agrees
with the helpers for every kind, length and flag, and that nothing else
inlines it.
"""

from __future__ import annotations

import logging
import mmap
import sys
from array import array
from collections.abc import Iterator

from .errors import InvariantError
from .memory import StateMemory

log = logging.getLogger(__name__)

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
ALT = 1 << 19  # POOL: the object is in the pool's second codec (recompressed)
SETTLED = 1 << 20  # POOL: recompressing it would not save a size class
FLAGS = MOVING | SHADOW | ALT | SETTLED
HUGE_INFO = 4096 << KIND_BITS | HUGE  # a huge page's info word (a raw page in the pool)
# POOL and HUGE differ in bit 0 only: ``info & _IN_POOL_MASK == POOL`` is
# either of them.
_IN_POOL_MASK = KIND_MASK & ~1

BYTES_PER_SLOT = 8 + 4 + 4
# The epoch column holds 32 bits; the clocks it is compared with wrap the same.
EPOCH_MASK = 0xFFFFFFFF
# Over a page's last-access epoch: written and not read since; and (pool
# pages) promoted on a refault and not read since (the policy's "wasted
# promotion" if it is demoted so).  Ages are taken with AGE_MASK:
# ``(now - epoch) & AGE_MASK`` is the age with or without the marks.
UNREAD_MARK = 1 << 30
PROMOTED_MARK = 1 << 31
AGE_MASK = UNREAD_MARK - 1

# A slot as one integer, device index << SLOT_SHIFT | slot: the owner word of
# its pool object, and the key of a tracked (partly written) slot.
SLOT_SHIFT = 40
SLOT_MASK = (1 << SLOT_SHIFT) - 1

# Slots per cluster: the unit of table memory and of empty-stretch skipping.
CLUSTER_SHIFT = 10
CLUSTER_SLOTS = 1 << CLUSTER_SHIFT
CLUSTER_MASK = CLUSTER_SLOTS - 1

# The functions that inline the info word's encoding (the expressions of
# the helpers below) for speed, as "module.qualified_name".
HOT_LOOPS = frozenset({
    "read_path.ReadPath.read", "read_path.ReadPath._read_pages",
    "write_path.WritePath._store_page", "write_path.WritePath._stage",
    "write_path.WritePath._commit", "recompress.Recompressor.step",
    "state.StoreState.load_page", "state.StoreState.load_objects",
    "state.StoreState._commit_pool_moves", "recovery._scan_device",
})


# Every bit the encoding defines.
VALID_BITS = FLAGS | LENGTH_MASK << KIND_BITS | KIND_MASK


def unknown_bits(info: int) -> int:
    """The bits of ``info`` that no part of the encoding defines (0 if valid)."""
    return info & ~VALID_BITS


def kind_of(info: int) -> int:
    return info & KIND_MASK


def length_of(info: int) -> int:
    """The stored payload length of a pool (or huge) slot (0 otherwise)."""
    return (info >> KIND_BITS) & LENGTH_MASK


def with_length(info: int, n: int) -> int:
    """``info`` with its payload length replaced by ``n`` (flags kept)."""
    return (info & ~(LENGTH_MASK << KIND_BITS)) | n << KIND_BITS


def pool_info(n: int) -> int:
    """The info word of a compressed page of ``n`` bytes in the pool."""
    return n << KIND_BITS | POOL


def file_info(ti: int, n: int) -> int:
    """The info word of an object of ``n`` payload bytes in file tier ``ti``."""
    return n << KIND_BITS | FILE0 + ti


def in_pool(info: int) -> bool:
    """The page is a pool object (compressed or huge)."""
    return info & _IN_POOL_MASK == POOL


def in_file(info: int) -> bool:
    """The page is in a file tier."""
    return info & KIND_MASK >= FILE0


def file_tier_of(info: int) -> int | None:
    """The index of the file tier holding the page, or None."""
    k = info & KIND_MASK
    return k - FILE0 if k >= FILE0 else None


def file_kind(ti: int) -> int:
    """The slot kind of a page of file tier ``ti``."""
    return FILE0 + ti


def tier_of_kind(kind: int) -> int:
    """The file tier of a file kind (``kind >= FILE0``)."""
    return kind - FILE0


# Levels name where a page can be, top down: 0 is the pool, 1 + n file tier n.
POOL_LEVEL = 0


def tier_level(ti: int) -> int:
    """The level of file tier ``ti``."""
    return 1 + ti


def level_tier(level: int) -> int:
    """The file tier at ``level`` (``level > 0``)."""
    return level - 1


def level_of(info: int) -> int:
    """The level holding a slot's page (in the pool or a file tier)."""
    k = info & KIND_MASK
    return k - FILE0 + 1 if k >= FILE0 else POOL_LEVEL


def slot_key(dev_index: int, slot: int) -> int:
    """A slot as one integer: its pool objects' owner word, the key of a
    tracked slot."""
    return dev_index << SLOT_SHIFT | slot


def key_device(key: int) -> int:
    return key >> SLOT_SHIFT


def key_slot(key: int) -> int:
    return key & SLOT_MASK


def movable(level: int) -> tuple[int, int]:
    """``(mask, value)``: ``info & mask == value`` exactly when a slot holds
    a page at ``level`` (0: the pool, 1 + n: file tier n) and no move of it
    is in flight.  For the victim scans' inner loops."""
    if level == POOL_LEVEL:
        return MOVING | _IN_POOL_MASK, POOL
    return MOVING | KIND_MASK, file_kind(level_tier(level))


class SlotTable:
    """The handle, info and epoch columns of one device, and its cluster counts."""

    __slots__ = ("npages", "nclusters", "handles", "info", "epoch", "cluster_used", "nonempty",
                 "_maps", "_memory", "release_errors")

    def __init__(self, npages: int, memory: StateMemory | None = None, name: str = "slots") -> None:
        """The table of ``npages`` slots, its columns the regions
        ``<name>.handles``, ``<name>.info`` and ``<name>.epoch`` of
        ``memory`` (adopted ones keep what they hold: the caller then
        calls :meth:`recount`)."""
        self.npages = npages
        self.nclusters = -(-npages // CLUSTER_SLOTS)
        span = self.nclusters * CLUSTER_SLOTS
        memory = memory if memory is not None else StateMemory()
        self._memory = memory
        self._maps = (memory.reserve(f"{name}.handles", span * 8),
                      memory.reserve(f"{name}.info", span * 4),
                      memory.reserve(f"{name}.epoch", span * 4))
        self.release_errors = 0  # clusters whose memory could not be given back
        self.handles = memoryview(self._maps[0]).cast("Q")[:npages]
        self.info = memoryview(self._maps[1]).cast("I")[:npages]
        self.epoch = memoryview(self._maps[2]).cast("I")[:npages]
        # Slots in use per cluster, and 1 per cluster that has any.
        self.cluster_used = array("H", bytes(2 * self.nclusters))
        self.nonempty = bytearray(self.nclusters)

    def filled(self, s: int) -> None:
        """Slot ``s`` left EMPTY."""
        c = s >> CLUSTER_SHIFT
        used = self.cluster_used
        if not used[c]:
            self.nonempty[c] = 1
        used[c] += 1

    def emptied(self, s: int) -> None:
        """Slot ``s`` became EMPTY; a cluster left without slots in use
        gives its memory back."""
        c = s >> CLUSTER_SHIFT
        used = self.cluster_used
        u = used[c] - 1
        used[c] = u
        if not u:
            self.nonempty[c] = 0
            self.release_cluster(c)

    def columns(self) -> tuple[mmap.mmap, mmap.mmap, mmap.mmap]:
        """The mappings of the handle, info and epoch columns."""
        return self._maps

    def release_cluster(self, c: int) -> None:
        """Give the memory of cluster ``c`` (no slot in use) back."""
        try:
            for m, width in zip(self._maps, (8, 4, 4)):
                self._memory.release(m, c * CLUSTER_SLOTS * width, CLUSTER_SLOTS * width)
        except OSError as e:  # the memory stays held (and zero): nothing is lost
            self.release_errors += 1
            if self.release_errors == 1:
                log.warning("slot table: cannot give a free cluster's memory back: %s", e)

    @property
    def clusters_in_use(self) -> int:
        return self.nclusters - self.nonempty.count(0)

    def next_stored(self, slot: int) -> int:
        """The first slot at or after ``slot`` in a cluster in use, or npages."""
        if slot >= self.npages:
            return self.npages
        c = slot >> CLUSTER_SHIFT
        if self.nonempty[c]:
            return slot
        c = self.nonempty.find(1, c)
        return self.npages if c < 0 else c << CLUSTER_SHIFT

    def stored_chunks(self, first: int, end: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` chunks covering the slots of ``first .. end``
        that lie in clusters in use (at most one cluster each)."""
        s = self.next_stored(first)
        while s < end:
            stop = min((s | CLUSTER_MASK) + 1, end)
            yield s, stop
            s = self.next_stored(stop)

    def metadata_bytes(self) -> int:
        """Bytes the table holds: the clusters in use, and the per-cluster counts."""
        return (self.clusters_in_use * CLUSTER_SLOTS * BYTES_PER_SLOT
                + sys.getsizeof(self.cluster_used) + sys.getsizeof(self.nonempty))

    def check(self) -> None:
        """InvariantError unless the cluster counts match the info column.
        Clusters flagged empty are read only on devices of up to 2**20
        slots (reading a large device's empty clusters maps them)."""
        info = self.info
        view = memoryview(self.info).cast("B")
        zero = bytes(4 * CLUSTER_SLOTS)
        for c in range(self.nclusters):
            lo = c << CLUSTER_SHIFT
            hi = min(lo + CLUSTER_SLOTS, self.npages)
            if self.nonempty[c]:
                n = sum(1 for s in range(lo, hi) if info[s])
            elif self.npages <= 1 << 20 and view[lo * 4:hi * 4] != zero[:(hi - lo) * 4]:
                n = -1
            else:
                n = 0
            if n != self.cluster_used[c] or bool(n) != bool(self.nonempty[c]):
                raise InvariantError(f"slot table: cluster {c} counts {self.cluster_used[c]} "
                                     f"slots in use (flag {self.nonempty[c]}), holds "
                                     f"{'pages' if n < 0 else n}")
