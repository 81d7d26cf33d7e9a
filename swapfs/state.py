"""The store's state: devices, slot tables, the pool, counters, and the
operations that change a slot.

The bottom of the store.  Every path that changes what a slot holds does it
here or in one of the named hot loops of the I/O paths (swapfs/write_path.py,
listed in ``slots.HOT_LOOPS``), which do exactly what these methods do,
inline.  Migration (swapfs/migrate.py), recompression
(swapfs/recompress.py), stats collection (swapfs/store_stats.py) and the
consistency check (swapfs/invariants.py) import this module, never the
store.  The floors above: :class:`swapfs.read_path.ReadPath` (reads),
:class:`swapfs.write_path.WritePath` (writes, discard) and the facade
:class:`swapfs.store.Store`, the only module that imports them all.

**Truth and derived state.**  What a successor process would need to serve
every page is the *truth*; everything else can be rebuilt from it:

* truth: each device's slot table (handle, info and epoch columns), the
  pool's objects (their bytes, at the handles the slots name) and the
  layout of its spans, the file tiers' backing files, checksums and keys,
  the journal of the slot switch in flight, and the two clocks (``epoch``,
  ``demotions``, in the state header) the epoch column is read against;
* derived from the slot tables: the per-device counters, each table's
  cluster counts, the pool's span and class bookkeeping (which objects are
  in use is which handles slots name), the dedup index and its reference
  counts (how many slots name each object), the file tiers' allocation
  maps (which pages slots name), the swap cache (a cache), and the
  counters of moves, recompression and I/O (statistics).

The truth's memory is allocated in named regions of one
:class:`swapfs.memory.StateMemory`: private mappings, or memory files a
successor process adopts; :mod:`swapfs.recovery` rebuilds the derived state
from the truth.  The order of the writes that change a slot (content first,
the info word or the journal as the commit, old content freed last) is
docs/store.md's "Crash consistency".

Everything runs on the trio loop; no method here awaits.  Each operation
changes a slot and the counters that describe it in the same step, so the
tables and the counters agree at every moment (docs/store.md).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence

from .cache import SwapCache
from .codec import ZERO_PAGE, fill_page, make_codec
from .config import Config, DeviceConfig
from .dedup import DedupIndex
from .errors import InvariantError
from .fileset import FileTierSet, LowerTier
from .kernel import PAGE_SIZE
from .memory import StateMemory
from .slots import (
    ALT,
    CLUSTER_MASK,
    EMPTY,
    EPOCH_MASK,
    HUGE,
    KIND_MASK,
    LENGTH_MASK,
    MOVING,
    POOL,
    POOL_LEVEL,
    PROMOTED_MARK,
    SAME,
    SETTLED,
    SHADOW,
    SLOT_SHIFT,
    SlotTable,
    file_info,
    in_file,
    in_pool,
    key_device,
    key_slot,
    kind_of,
    length_of,
    level_tier,
    movable,
    slot_key,
    tier_of_kind,
    with_length,
)
from .tiers.file import RAW
from .tiers.pool import MAX_OBJECT, OBJECT_BYTES, Pool

# Default size of the swap cache, in pages.
CACHE_PAGES = 1024


class Device:
    """A virtual swap device: its slot table and counters."""

    __slots__ = ("name", "index", "size_bytes", "npages", "config", "table",
                 "stored_pages", "same_filled_pages", "pool_pages", "huge_pages",
                 "file_pages", "compressed_bytes", "pool_bytes", "reads", "writes", "discards",
                 "read_bytes", "written_bytes", "discarded_bytes", "nospace_errors")

    def __init__(self, index: int, config: DeviceConfig,
                 memory: StateMemory | None = None) -> None:
        self.name = config.name
        self.index = index
        self.size_bytes = config.size
        self.npages = config.size // PAGE_SIZE
        self.config = config
        self.table = SlotTable(self.npages, memory, f"slots.{config.name}")
        # Derived from the table (the checker recounts them).
        self.stored_pages = 0
        self.same_filled_pages = 0
        self.pool_pages = 0
        self.huge_pages = 0
        self.file_pages = 0
        self.compressed_bytes = 0
        self.pool_bytes = 0
        # Statistics.
        self.reads = 0
        self.writes = 0
        self.discards = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.discarded_bytes = 0
        self.nospace_errors = 0

    def __repr__(self) -> str:
        return f"<Device {self.name} {self.size_bytes} bytes>"


class MoveCounters:
    """Counters of migration, refaults and promotions, per level (0: the
    pool, 1 + i: file tier i) where it matters."""

    __slots__ = ("moved", "moved_payload", "recompressed", "aborted", "batches",
                 "failed_batches", "requests", "demotions", "refaults", "promotions", "wasted",
                 "file_reads", "pairs")

    def __init__(self, levels: int) -> None:
        self.moved = 0  # pages demoted (committed moves)
        self.moved_payload = 0  # their payload bytes, as stored (compressed)
        self.recompressed = 0  # copies recompressed on their way down (a tier's recompress)
        self.aborted = 0  # copies dropped because their slot changed
        self.batches = 0  # migrations that committed at least one page
        self.failed_batches = 0  # tier writes that failed
        self.requests = 0  # explicit writeback requests served
        self.demotions = [0] * levels  # by source level
        self.refaults = [0] * levels
        self.promotions = [0] * levels
        self.wasted = 0  # promoted pages demoted again before any read (policy.py)
        # page reads a file tier served (the swap cache's hits of file pages included): the
        # misses of memory, counted off the pool's path so that it costs that path nothing
        self.file_reads = 0
        # (source level, destination level) -> [pages, batches]
        self.pairs: dict[tuple[int, int], list[int]] = {}


class RecompressCounters:
    __slots__ = ("pages", "saved_bytes", "settled")

    def __init__(self) -> None:
        self.pages = 0  # pages switched to the second codec
        self.saved_bytes = 0  # pool memory (size-class bytes) those switches saved
        self.settled = 0  # pages tried that would have saved nothing


class Staged:
    """The new content of a run of slots, placed but not committed: per
    page the handle and info word it will get (info 0: not placed yet), the
    pages bound for file tiers, and the device counter deltas of the pages
    placed in memory."""

    __slots__ = ("npages", "owner", "handles", "info", "spill", "same", "pool", "huge", "cbytes",
                 "pbytes", "shared", "shared_bytes", "shared_pbytes")

    def __init__(self, capacity: int) -> None:
        self.handles = array("Q", bytes(8 * capacity))
        self.info = array("I", bytes(4 * capacity))
        self.spill: list[int] = []
        self.npages = self.owner = self.same = self.pool = self.huge = self.cbytes = self.pbytes = 0
        # Of ``pool`` and ``cbytes``: references to objects already stored (dedup).
        self.shared = self.shared_bytes = self.shared_pbytes = 0


class SlotCursor:
    """A position in the slot tables of some devices, walked round and
    round: the victim search and recompression each keep one.

    ``walk(devs, scan)`` yields ``(device, start, stop)`` chunks of slots
    from the position on, each within one cluster in use (empty clusters
    are skipped for free), at most ``scan`` slots in all and one walk round
    the devices.  The position moves past each chunk yielded; a consumer
    that stops inside a chunk calls ``stop(s)`` first (the walk resumes at
    slot ``s`` of that device next time)."""

    __slots__ = ("di", "slot")

    def __init__(self) -> None:
        self.di = 0
        self.slot = 0

    def walk(self, devs: list[Device], scan: int) -> Iterator[tuple[Device, int, int]]:
        if not devs:
            return
        di, slot = self.di, self.slot
        if di >= len(devs):
            di, slot = 0, 0
        total = sum(d.npages for d in devs)
        visited = 0
        while visited < total and scan > 0:
            dev = devs[di]
            nxt = dev.table.next_stored(slot)
            visited += nxt - slot
            slot = nxt
            if slot < dev.npages:
                # (within one round: a walk that began inside this cluster ends where it began)
                end = min((slot | CLUSTER_MASK) + 1, dev.npages, slot + scan,
                          slot + total - visited)
                self._set(devs, di, end)
                yield dev, slot, end
                visited += end - slot
                scan -= end - slot
                slot = end
            if slot >= dev.npages:
                di = (di + 1) % len(devs)
                slot = 0
            self.di, self.slot = di, slot
        self.di, self.slot = di, slot

    def stop(self, dev: Device, s: int) -> None:
        """The consumer stops inside the chunk of ``dev`` it was given:
        resume at slot ``s``."""
        self.slot = s
        if s >= dev.npages:
            self.slot = 0
            self.di += 1

    def _set(self, devs: list[Device], di: int, end: int) -> None:
        if end >= devs[di].npages:
            self.di, self.slot = (di + 1) % len(devs), 0
        else:
            self.di, self.slot = di, end


class StoreState:
    """Devices over a compressed memory pool and, below it, file tiers: the
    tables, the counters and the operations that change a slot."""

    def __init__(self, config: Config, *, cache_pages: int = CACHE_PAGES,
                 memory: StateMemory | None = None) -> None:
        self.config = config
        # Where the truth lives (private memory unless the daemon asks for
        # memory that outlives the process); see swapfs/memory.py.
        self.memory = memory = memory if memory is not None else StateMemory()
        # The slot switch in flight (see ``journal_switch``): the slot key + 1
        # (0: none), its old handle and its old info word.
        self.journal = memoryview(memory.reserve("journal", PAGE_SIZE)).cast("Q")
        self.codec = make_codec(config.pool.algorithm, config.pool.level)
        # The second codec idle pages are recompressed with (slots flagged
        # ALT; see swapfs/recompress.py), or None.
        self.recodec = (make_codec(config.pool.recompress, config.pool.level)
                        if config.pool.recompress else None)
        self.pool = Pool(config.pool.max_bytes, memory=memory)
        # Same content stored once (docs/store.md): the index of pool objects.
        self.dedup = DedupIndex(self.pool) if config.pool.dedup else None
        # A page is kept compressed only if it compresses to at most this.
        self.accept_limit = int(config.pool.accept_ratio * PAGE_SIZE)
        self.devices = [Device(i, dc, memory) for i, dc in enumerate(config.devices)]
        self._by_name = {d.name: d for d in self.devices}
        self.cache = SwapCache(cache_pages)
        # File tiers in config order: tier i is slot kind file_kind(i).
        self.files = FileTierSet(config.tiers, self.cache, memory)
        self.tiers: list[LowerTier] = self.files.tiers
        # Level 0 is the pool, level 1 + i file tier i.
        self.level_names = ["pool"] + [t.name for t in self.tiers]
        # The access clock: advanced by the writeback task (set_epoch),
        # stored per slot on every access of a page (docs/writeback.md).
        # Both clocks are kept in the state header too (a successor reads
        # the epoch column against them).
        self.header = memory.header
        self.epoch = self.header.get("epoch") & EPOCH_MASK
        # Pages demoted so far (mod 2**32 in shadows): the refault clock.
        self.demotions = self.header.get("demotions")
        self.pool_high_bytes = int(config.pool.high_watermark * self.pool.max_bytes)
        self.pool_low_bytes = int(config.pool.low_watermark * self.pool.max_bytes)
        # Refault distance up to which a page counts as hot; None: the
        # policy's own (swapfs/policy.py).
        self.promote_distance: int | None = None
        # A hot page is promoted while the pool holds less than this (room
        # left; writeback then demotes colder pages below the watermarks).
        self.promote_limit_bytes = self.pool.max_bytes
        # Called (no await) when a write leaves the pool above its high
        # watermark: the writeback task, while it runs (set_writeback_kicker).
        self.kick_writeback: Callable[[], None] | None = None
        # Counters of moves and recompression (statistics).
        self.moves = MoveCounters(len(self.level_names))
        self.recompressed = RecompressCounters()
        # Slots flagged MOVING by the migration in flight.
        self.moving = 0
        # Writes waiting for file tiers: their pool objects and file pages
        # are allocated, their slots not switched yet.
        self.staged: list[Staged] = []
        # Pages that skipped the pool (zswap's names): it was at its limit,
        # or they did not compress to accept_ratio (and went to a file tier).
        self.pool_limit_hit = 0
        self.reject_compress_poor = 0

    def device(self, name: str) -> Device:
        return self._by_name[name]

    # -- the clocks and the writeback hook -----------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Advance the access clock (the writeback task's, 1/4 s units)."""
        self.epoch = epoch & EPOCH_MASK
        self.header.set("epoch", self.epoch)

    def set_writeback_kicker(self, kick: Callable[[], None] | None) -> None:
        """Who to ask for a writeback pass when the pool passes its high
        watermark (no await), or None while no writeback task runs.  The
        same call asks for cleaning when a file tier runs low on segments."""
        self.kick_writeback = kick
        self.files.kick_cleaning = kick

    def set_pool_watermarks(self, high: float, low: float) -> bool:
        """New pool watermarks (shares of max_bytes), live; True if they
        changed, and then a writeback pass is asked for."""
        marks = int(high * self.pool.max_bytes), int(low * self.pool.max_bytes)
        if marks == (self.pool_high_bytes, self.pool_low_bytes):
            return False
        self.pool_high_bytes, self.pool_low_bytes = marks
        if self.kick_writeback is not None:
            self.kick_writeback()
        return True

    # -- reading a slot held in memory -----------------------------------------

    def load_page(self, dev: Device, slot: int) -> bytes:
        """The content of one slot held in memory, as bytes.  A hot loop (the
        read of one pool page ends here): inlines the slot encoding."""
        i = dev.table.info[slot]
        k = i & KIND_MASK
        if k == EMPTY:
            return ZERO_PAGE
        h = dev.table.handles[slot]
        if k == SAME:
            return fill_page(h)
        if k == POOL:
            codec = self.recodec if i & ALT and self.recodec is not None else self.codec
            return codec.decompress(self.pool.view(h, (i >> 4) & LENGTH_MASK))
        if k == HUGE:
            return bytes(self.pool.view(h, PAGE_SIZE))
        raise InvariantError(f"{dev.name}: slot {slot} has kind {k}, not in memory")

    # -- freeing a slot's content --------------------------------------------

    def free_slot_content(self, dev: Device, s: int, old: int, h: int) -> None:
        """Free what slot ``s`` held (info ``old``, not EMPTY, handle ``h``),
        keeping the device counters right.  Called after the slot was
        switched to its new content or emptied (the commit order of
        docs/store.md: a slot never names freed content)."""
        if old == SAME:
            dev.same_filled_pages -= 1
        elif in_file(old):
            self.files.free_page(tier_of_kind(kind_of(old)), h, length_of(old))
            dev.file_pages -= 1
        else:
            n = length_of(old)
            self.free_object(h, n)
            dev.compressed_bytes -= n
            dev.pool_bytes -= OBJECT_BYTES[n]
            if kind_of(old) == POOL:
                dev.pool_pages -= 1
            else:
                dev.huge_pages -= 1

    def journal_switch(self, dev: Device, s: int, h: int, i: int) -> None:
        """Switch slot ``s``, which holds content, to handle ``h`` and info
        ``i`` so that a process killed anywhere in between leaves it as
        before or as after: the old handle and info go to the journal first
        (its key word last), then the handle, the info, and the journal is
        cleared.  The caller frees the old content afterwards.  (The hot
        loops of the write path do the same inline.)"""
        table = dev.table
        j = self.journal
        j[1] = table.handles[s]
        j[2] = table.info[s]
        j[0] = slot_key(dev.index, s) + 1
        table.handles[s] = h
        table.info[s] = i
        j[0] = 0

    def free_object(self, h: int, n: int) -> None:
        """Drop a reference to pool object ``h`` of ``n`` bytes: the object
        is freed with its last reference (one, without dedup)."""
        dd = self.dedup
        if dd is None or n > MAX_OBJECT or dd.release(h, n):
            self.pool.free_object(h, n)

    # -- moves (swapfs/migrate.py) -------------------------------------------

    def flag_moving(self, dev: Device, s: int) -> int:
        """Flag slot ``s`` MOVING; returns its info word as flagged."""
        i = dev.table.info[s] | MOVING
        dev.table.info[s] = i
        self.moving += 1
        return i

    def unflag_moving(self, dev: Device, s: int, flagged: int) -> None:
        """The move of slot ``s`` (flagged as ``flagged``) ended: clear the
        flag if the slot still holds what was flagged."""
        if dev.table.info[s] == flagged:
            dev.table.info[s] = flagged & ~MOVING
        self.moving -= 1

    def flag_pool_moves(self, victims: Sequence[tuple[Device, int]]
                        ) -> tuple[list[Device], list[int], list[int], list[int]]:
        """``flag_moving`` of each of ``victims`` still in the pool and not
        MOVING, in one loop: ``(devices, slots, handles, info words as
        flagged)`` of the slots flagged, side by side."""
        mask, want = movable(POOL_LEVEL)
        devs: list[Device] = []
        slots: list[int] = []
        handles: list[int] = []
        flagged: list[int] = []
        for dev, s in victims:
            table = dev.table
            i = table.info[s]
            if i & mask == want:
                i |= MOVING
                table.info[s] = i
                devs.append(dev)
                slots.append(s)
                handles.append(table.handles[s])
                flagged.append(i)
        self.moving += len(slots)
        return devs, slots, handles, flagged

    def unflag_moves(self, devs: Sequence[Device], slots: Sequence[int],
                     flagged: Sequence[int]) -> None:
        """``unflag_moving`` of every slot ``flag_pool_moves`` flagged."""
        for dev, s, i in zip(devs, slots, flagged):
            info = dev.table.info
            if info[s] == i:
                info[s] = i & ~MOVING
        self.moving -= len(slots)

    def load_objects(self, devs: Sequence[Device], slots: Sequence[int],
                     handles: Sequence[int], flagged: Sequence[int], lo: int, hi: int
                     ) -> tuple[list[int], list[int], list[bytes]]:
        """The objects of the slots ``lo:hi`` of a flagged batch that still hold
        what was flagged, as stored, for a move that keeps them compressed:
        ``(their indexes, codec ids, bytes)``; a huge page is ``RAW`` and the
        page.  A hot loop (a move's copy out of the pool): inlines the slot
        encoding."""
        idx: list[int] = []
        codecs: list[int] = []
        datas: list[bytes] = []
        mem = self.pool.mem
        cid = self.codec.id
        alt = self.recodec.id if self.recodec is not None else cid
        for k in range(lo, min(hi, len(slots))):
            table = devs[k].table
            s = slots[k]
            i = flagged[k]
            h = handles[k]
            if table.info[s] != i or table.handles[s] != h:
                continue  # written, discarded or promoted since it was flagged
            k_ = i & KIND_MASK
            if k_ == POOL:
                codecs.append(alt if i & ALT else cid)
                datas.append(bytes(mem[h:h + ((i >> 4) & LENGTH_MASK)]))
            elif k_ == HUGE:
                codecs.append(RAW)
                datas.append(bytes(mem[h:h + PAGE_SIZE]))
            else:
                raise InvariantError(f"{devs[k].name}: slot {s} has kind {k_}, not in the pool")
            idx.append(k)
        return idx, codecs, datas

    def commit_move(self, dev: Device, s: int, flagged: int, handle: int, src: int, ti: int,
                    dest: int, length: int) -> bool:
        """Switch slot ``s`` to the object at ``dest`` (``length`` payload
        bytes) of file tier ``ti``, leaving a shadow, if it still holds
        exactly what was flagged (info ``flagged``, ``handle``) at level
        ``src``; free its old place.  False, with nothing changed, if anything
        replaced the slot's content meanwhile."""
        table = dev.table
        if table.info[s] != flagged or table.handles[s] != handle:
            return False
        if table.epoch[s] & PROMOTED_MARK and src == POOL_LEVEL:
            self.moves.wasted += 1  # promoted, and demoted again before any read
        self.journal_switch(dev, s, dest, file_info(ti, length) | SHADOW)
        table.epoch[s] = self.demotions & EPOCH_MASK
        if src == POOL_LEVEL:
            self.free_slot_content(dev, s, flagged, handle)  # the pool object (MOVING still set)
            dev.file_pages += 1
        else:  # pinned: freed when the move unpins
            self.files.free_page(level_tier(src), handle, length_of(flagged))
        self.demotions += 1
        self.header.set("demotions", self.demotions)
        return True

    def commit_pool_moves(self, devs: Sequence[Device], slots: Sequence[int],
                          flagged: Sequence[int], handles: Sequence[int], ti: int,
                          dests: Sequence[int], lengths: Sequence[int]) -> list[bool]:
        """``commit_move`` of a batch of pool pages to file tier ``ti``, in one loop: the
        same steps, slot by slot, each switched through the journal (a kill between two
        slots leaves the first moved and the second not).  Per slot, whether it moved.
        A hot loop: inlines the slot encoding."""
        with self.pool.batch():  # the spans emptied go back in runs, after the loop
            return self._commit_pool_moves(devs, slots, flagged, handles, ti, dests, lengths)

    def _commit_pool_moves(self, devs: Sequence[Device], slots: Sequence[int],
                           flagged: Sequence[int], handles: Sequence[int], ti: int,
                           dests: Sequence[int], lengths: Sequence[int]) -> list[bool]:
        out: list[bool] = []
        j = self.journal
        moves = self.moves
        header = self.header
        dedup = self.dedup
        pool_free = self.pool.free_object
        demotions = self.demotions
        for dev, s, i, h, dest, n in zip(devs, slots, flagged, handles, dests, lengths):
            table = dev.table
            if table.info[s] != i or table.handles[s] != h:
                out.append(False)
                continue
            epoch = table.epoch
            if epoch[s] & PROMOTED_MARK:
                moves.wasted += 1  # promoted, and demoted again before any read
            # journal_switch, inline: old handle and info first, the key word last
            j[1] = h
            j[2] = i
            key = dev.index << SLOT_SHIFT | s
            j[0] = key + 1
            table.handles[s] = dest
            table.info[s] = file_info(ti, n) | SHADOW
            j[0] = 0
            epoch[s] = demotions & EPOCH_MASK
            # free_slot_content of a pool (or huge) object, MOVING still set in ``i``
            m = (i >> 4) & LENGTH_MASK
            if dedup is None or m > MAX_OBJECT or dedup.release(h, m):
                pool_free(h, m)
            dev.compressed_bytes -= m
            dev.pool_bytes -= OBJECT_BYTES[m]
            k = i & KIND_MASK
            if k == POOL:
                dev.pool_pages -= 1
            else:
                dev.huge_pages -= 1
            dev.file_pages += 1
            demotions += 1
            self.demotions = demotions
            header.set("demotions", demotions)
            out.append(True)
        return out

    def commit_clean(self, dev: Device, s: int, flagged: int, handle: int, ti: int,
                     dest: int) -> bool:
        """Cleaning copied slot ``s``'s object of file tier ``ti`` from
        ``handle`` to ``dest`` (same bytes, same tier): point the slot at it
        if it still holds exactly what was flagged, and free the old object.
        False, with nothing changed, otherwise."""
        table = dev.table
        if table.info[s] != flagged or table.handles[s] != handle:
            return False
        self.journal_switch(dev, s, dest, flagged & ~MOVING)
        self.files.free_page(ti, handle, length_of(flagged))  # pinned: freed when unpinned
        return True

    # -- recompression (swapfs/recompress.py) -----------------------------

    def settle(self, dev: Device, s: int, i: int) -> None:
        """Slot ``s`` (info ``i``) would not save a size class recompressed."""
        dev.table.info[s] = i | SETTLED
        self.recompressed.settled += 1

    def recompressed_to(self, dev: Device, s: int, i: int, new: int, m: int) -> None:
        """Slot ``s`` (info ``i``, a POOL page) was recompressed into object
        ``new`` of ``m`` bytes: switch the slot to it, free the old object."""
        table = dev.table
        n = length_of(i)
        old = table.handles[s]
        self.journal_switch(dev, s, new, with_length(i, m) | ALT)
        self.free_object(old, n)
        dev.compressed_bytes += m - n
        saved = OBJECT_BYTES[n] - OBJECT_BYTES[m]
        dev.pool_bytes -= saved
        c = self.recompressed
        c.pages += 1
        c.saved_bytes += saved

    # -- compaction -----------------------------------------------------------

    def compact(self, budget: int | None = None) -> tuple[int, int]:
        """Compact the pool now (no await); (objects moved, bytes released)."""
        return self.pool.compact(self.relocate, budget)

    def relocate(self, owner: int, old: int, new: int) -> bool:
        """The pool copied slot ``owner``'s object from handle ``old`` to
        ``new`` (Pool.compact, in the same step: no await): point the slot at
        it.  Refused (False: the pool keeps the object where it was) if the
        slot no longer holds ``old`` (a write in flight owns it, not yet
        committed) or is being migrated (its commit compares the handle)."""
        dev = self.devices[key_device(owner)]
        s = key_slot(owner)
        table = dev.table
        i = table.info[s]
        if table.handles[s] != old or i & MOVING or not in_pool(i):
            return False
        table.handles[s] = new
        if self.dedup is not None:  # (shared objects are never moved)
            self.dedup.moved(old, new, length_of(i))
        return True

    # -- what writes in flight hold ---------------------------------------------

    def staged_in_pool(self) -> tuple[int, int]:
        """(objects, payload bytes) of the pool that writes in flight hold
        and no slot owns yet: the stats leave them out."""
        return (sum(st.pool + st.huge - st.shared for st in self.staged),
                sum(st.cbytes - st.shared_bytes for st in self.staged))

    def dedup_committed(self) -> tuple[int, int, int]:
        """(pages, payload bytes, class bytes) that slots hold by sharing
        another page's pool object; writes in flight left out."""
        dd = self.dedup
        if dd is None:
            return 0, 0, 0
        pages = dd.extra_refs - sum(st.shared for st in self.staged)
        payload = dd.saved_payload - sum(st.shared_bytes for st in self.staged)
        pbytes = dd.saved_bytes - sum(st.shared_pbytes for st in self.staged)
        return pages, payload, pbytes

    def staged_pool_objects(self) -> list[tuple[int, int, int]]:
        """(handle, length, owner) of the pool objects that writes in flight
        hold and no slot owns yet (for the consistency check)."""
        out = []
        for staged in self.staged:
            base = staged.owner
            for idx in range(staged.npages):
                i = staged.info[idx]
                if in_pool(i):
                    out.append((staged.handles[idx], length_of(i), base + idx))
        return out

    @property
    def moves_in_flight(self) -> int:
        """Slots flagged MOVING by the migration in flight."""
        return self.moving
