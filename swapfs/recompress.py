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

from .slots import AGE_MASK, ALT, KIND_MASK, LENGTH_MASK, MOVING, POOL, SETTLED, SLOT_SHIFT
from .state import SlotCursor, StoreState
from .tiers.pool import OBJECT_BYTES, PoolFull

# Slots in use looked at per step at most: a few hundred microseconds of the
# trio loop, whether or not the pages passed are idle long enough yet.
SCAN_SLOTS = 4096


class Recompressor:
    """The cursor of one store's recompression (its counters are the
    state's, ``StoreState.recompressed``)."""

    def __init__(self, state: StoreState) -> None:
        self.state = state
        self.cursor = SlotCursor()

    @property
    def recompressed_pages(self) -> int:
        """Pages switched to the second codec."""
        return self.state.recompressed.pages

    @property
    def saved_bytes(self) -> int:
        """Pool memory (size-class bytes) those switches saved."""
        return self.state.recompressed.saved_bytes

    @property
    def settled_pages(self) -> int:
        """Pages tried that would have saved nothing."""
        return self.state.recompressed.settled

    def step(self, budget: int, min_age: int, *, scan: int = SCAN_SLOTS) -> tuple[int, int]:
        """Recompress up to ``budget`` candidates not accessed for ``min_age``
        epochs or more, from the cursor on, looking at ``scan`` slots in use
        at most (empty clusters are skipped for free); no await.  Returns
        (candidates handled, pages recompressed); fewer handled than
        ``budget`` means the step found no more: the cursor stays where it
        stopped, so the walk costs the same per step whether or not the
        pages it passes are old enough yet.

        A hot loop: inlines the slot encoding to pick candidates (the slot
        updates are the state's ``settle`` and ``recompressed_to``)."""
        state = self.state
        recodec = state.recodec
        devs = [d for d in state.devices if d.config.writeback]
        if recodec is None or budget <= 0 or not devs:
            return 0, 0
        # A candidate: (info & mask) == POOL, a compressed page, not moving,
        # not recompressed or tried yet.
        mask = KIND_MASK | MOVING | ALT | SETTLED
        decompress = state.codec.decompress
        compress = recodec.compress
        pool = state.pool
        mem = pool.mem
        dedup = state.dedup
        now = state.epoch
        cursor = self.cursor
        handled = converted = 0
        for dev, start, end in cursor.walk(devs, scan):
            table = dev.table
            info = table.info
            handles = table.handles
            epoch = table.epoch
            owner = dev.index << SLOT_SHIFT
            stop = -1
            for s in range(start, end):
                i = info[s]
                if i & mask != POOL or (now - epoch[s]) & AGE_MASK < min_age:
                    continue
                h = handles[s]
                n = (i >> 4) & LENGTH_MASK
                if dedup is not None and dedup.refs(h, n) > 1:
                    continue  # shared (dedup): other slots refer to this object
                handled += 1
                c = compress(decompress(mem[h:h + n]))
                m = len(c)
                if OBJECT_BYTES[m] >= OBJECT_BYTES[n]:
                    state.settle(dev, s, i)
                else:
                    try:
                        new = pool.alloc(c, m, owner | s)
                    except PoolFull:
                        stop = s + 1
                        break
                    state.recompressed_to(dev, s, i, new, m)
                    converted += 1
                if handled >= budget:
                    stop = s + 1
                    break
            if stop >= 0:
                cursor.stop(dev, stop)
                break
        return handled, converted
