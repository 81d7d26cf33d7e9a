"""Colder means denser: recompressing idle pool pages with a denser codec.

With ``pool.recompress = "zstd"`` (and ``pool.algorithm = "lz4"``), pages
written quickly with lz4 and then left alone for ``pool.recompress_after``
are compressed again with zstd: the lz4 -> zstd -> file tier cascade.  The
writeback task drives it (swapfs/writeback.py) in steps of a few dozen
pages; each step runs without an await, so a page is decompressed,
recompressed and switched to its new object within one trio step, and no
write, discard, migration or compaction can come between reading the slot
and updating it.  Slots being migrated (MOVING) are skipped.

A recompressed slot is flagged ALT: reads decompress it with the second
codec.  A page whose recompressed size would not save a size class is kept
as it is and flagged SETTLED, so it is not tried again.  A rewrite clears
both flags.  Devices with ``writeback = false`` (latency first) are left
alone: zstd decompresses slower than lz4.  With dedup, an object other slots
also refer to is skipped (it is tried again once only one does), and
the old object of a recompressed page leaves the dedup index; the new one is
not indexed (its bytes are the second codec's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .slots import ALT, CLUSTER_MASK, EPOCH_MASK, KIND_MASK, LENGTH_MASK, MOVING, POOL, SETTLED, SLOT_SHIFT
from .tiers.pool import HEADER, OBJECT_BYTES, SHARED_TAG, PoolFull

if TYPE_CHECKING:
    from .store import Store

# A slot is a candidate when (info & _MASK) == POOL: a compressed page, not
# moving, not recompressed or tried yet.
_MASK = KIND_MASK | MOVING | ALT | SETTLED
_LENGTH_BITS = LENGTH_MASK << 4
# Slots in use looked at per step at most: a few hundred microseconds of the
# trio loop, whether or not the pages passed are idle long enough yet.
SCAN_SLOTS = 4096
_REFS = SHARED_TAG - 1  # a shared object's header: SHARED_TAG | references


class Recompressor:
    """The cursor and counters of one store's recompression."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cursor = (0, 0)  # (index into the devices recompressed, slot)
        self.recompressed_pages = 0  # pages switched to the second codec
        self.saved_bytes = 0  # pool memory (size-class bytes) those switches saved
        self.settled_pages = 0  # pages tried that would have saved nothing

    def step(self, budget: int, min_age: int, *, scan: int = SCAN_SLOTS) -> tuple[int, int]:
        """Recompress up to ``budget`` candidates not accessed for ``min_age``
        epochs or more, from the cursor on, looking at ``scan`` slots in use
        at most (empty clusters are skipped for free); no await.  Returns
        (candidates handled, pages recompressed); fewer handled than
        ``budget`` means the step found no more: the cursor stays where it
        stopped, so the walk costs the same per step whether or not the
        pages it passes are old enough yet."""
        store = self.store
        recodec = store.recodec
        devs = [d for d in store.devices if d.config.writeback]
        if recodec is None or budget <= 0 or not devs:
            return 0, 0
        decompress = store.codec.decompress
        compress = recodec.compress
        pool = store.pool
        mem = pool.mem
        words = pool.words
        free_object = store.free_object  # (drops an unshared object's dedup entry)
        now = store.epoch
        di, slot = self._cursor
        if di >= len(devs):
            di, slot = 0, 0
        total = sum(d.npages for d in devs)
        handled = converted = visited = 0
        full = False
        while handled < budget and visited < total and scan > 0 and not full:
            dev = devs[di]
            table = dev.table
            nxt = table.next_stored(slot)
            visited += nxt - slot
            slot = nxt
            if slot < dev.npages:
                info = table.info
                handles = table.handles
                epoch = table.epoch
                owner = dev.index << SLOT_SHIFT
                end = min((slot | CLUSTER_MASK) + 1, dev.npages, slot + scan)
                for s in range(slot, end):
                    i = info[s]
                    if i & _MASK != POOL or (now - epoch[s]) & EPOCH_MASK < min_age:
                        continue
                    h = handles[s]
                    w = words[(h - HEADER) >> 3]
                    if w & SHARED_TAG and w & _REFS > 1:
                        continue  # shared (dedup): other slots refer to this object
                    handled += 1
                    n = (i >> 4) & LENGTH_MASK
                    c = compress(decompress(mem[h:h + n]))
                    m = len(c)
                    if OBJECT_BYTES[m] >= OBJECT_BYTES[n]:
                        info[s] = i | SETTLED
                        self.settled_pages += 1
                    else:
                        try:
                            new = pool.alloc(c, m, owner | s)
                        except PoolFull:
                            full = True
                            end = s + 1
                            break
                        free_object(h, n)
                        handles[s] = new
                        info[s] = (i & ~_LENGTH_BITS) | m << 4 | ALT
                        dev.compressed_bytes += m - n
                        dev.pool_bytes += OBJECT_BYTES[m] - OBJECT_BYTES[n]
                        self.saved_bytes += OBJECT_BYTES[n] - OBJECT_BYTES[m]
                        converted += 1
                    if handled >= budget:
                        end = s + 1
                        break
                visited += end - slot
                scan -= end - slot
                slot = end
            if slot >= dev.npages:
                di = (di + 1) % len(devs)
                slot = 0
        self._cursor = (di, slot)
        self.recompressed_pages += converted
        return handled, converted
