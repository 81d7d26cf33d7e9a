"""The store: devices and the read, write and discard paths.

Usable without FUSE: the FUSE adapter (swapfs/fs.py) translates requests to
``Store.read``, ``Store.write`` and ``Store.discard`` and maps the errors of
swapfs.errors to errnos.

The store owns the devices (a slot table and counters each), the
compressed pool, the swap cache and the file tiers (a
:class:`swapfs.fileset.FileTierSet`); moving pages between tiers is
:mod:`swapfs.migrate` (the mechanism) and :mod:`swapfs.writeback` (the
policy, run by the daemon); stats are assembled by
:mod:`swapfs.store_stats`, the consistency check is :mod:`swapfs.invariants`.

Everything runs in the trio loop.  The methods are ``async def`` because
file tiers await worker threads, but the pool path never awaits: a request
served from the pool goes from start to end in one step, so the FUSE layer
answers it inline.  Which state relies on that is written down in
docs/store.md and docs/writeback.md.

Per page, the hot loops bind everything they need to locals and create no
objects beyond the compressor's output and a memoryview slice.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from . import invariants, store_stats
from .cache import SwapCache, file_key
from .codec import ZERO_PAGE, fill_page, make_codec, same_fill_word
from .config import PAGE_SIZE, Config, DeviceConfig
from .errors import BackingIOError, Corruption, NoSpace, OutOfRange
from .fileset import FileTierSet, run_pages
from .migrate import Migrator
from .slots import EMPTY, EPOCH_MASK, FILE0, HUGE, KIND_MASK, LENGTH_MASK, POOL, SAME, SHADOW, SlotTable
from .stats import Stats
from .tiers.file import ChecksumError, FileTier, TierFull, TierIOError
from .tiers.pool import INDEX_BITS, INDEX_MASK, Pool, PoolFull

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_MASK = PAGE_SIZE - 1
_LAST_WORD = PAGE_SIZE // 8 - 1
_HUGE_INFO = PAGE_SIZE << 4 | HUGE
# At most one NoSpace warning per this many seconds (the count is in stats).
_NOSPACE_LOG_INTERVAL = 10.0
# Default size of the swap cache, in pages.
CACHE_PAGES = 1024

assert PAGE_SIZE == 1 << PAGE_SHIFT


class Device:
    """A virtual swap device: its slot table and counters."""

    __slots__ = ("name", "index", "size_bytes", "npages", "config", "table",
                 "stored_pages", "same_filled_pages", "pool_pages", "huge_pages",
                 "file_pages", "compressed_bytes", "pool_bytes", "reads", "writes", "discards",
                 "read_bytes", "written_bytes", "discarded_bytes", "nospace_errors")

    def __init__(self, index: int, config: DeviceConfig) -> None:
        self.name = config.name
        self.index = index
        self.size_bytes = config.size
        self.npages = config.size // PAGE_SIZE
        self.config = config
        self.table = SlotTable(self.npages)
        self.stored_pages = 0
        self.same_filled_pages = 0
        self.pool_pages = 0
        self.huge_pages = 0
        self.file_pages = 0
        self.compressed_bytes = 0
        self.pool_bytes = 0
        self.reads = 0
        self.writes = 0
        self.discards = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.discarded_bytes = 0
        self.nospace_errors = 0

    def __repr__(self) -> str:
        return f"<Device {self.name} {self.size_bytes} bytes>"


class Store:
    """Devices over a compressed memory pool and, below it, file tiers."""

    def __init__(self, config: Config, *, arena_bytes: int | None = None,
                 cache_pages: int = CACHE_PAGES) -> None:
        self.config = config
        self.codec = make_codec(config.pool.algorithm, config.pool.level)
        self.pool = (Pool(config.pool.max_bytes, arena_bytes) if arena_bytes
                     else Pool(config.pool.max_bytes))
        # A page is kept compressed only if it compresses to at most this.
        self.accept_limit = int(config.pool.accept_ratio * PAGE_SIZE)
        self.devices = [Device(i, dc) for i, dc in enumerate(config.devices)]
        self._by_name = {d.name: d for d in self.devices}
        self._last_nospace_log = -_NOSPACE_LOG_INTERVAL
        self.cache = SwapCache(cache_pages)
        # File tiers in config order: tier i is slot kind FILE0 + i.
        self.files = FileTierSet(config.tiers, self.cache)
        self.tiers: list[FileTier] = self.files.tiers
        # Level 0 is the pool, level 1 + i file tier i.
        self.level_names = ["pool"] + [t.name for t in self.tiers]
        # The access clock: advanced by the writeback task, stored per slot
        # on every access of a page in memory or on file (docs/writeback.md).
        self.epoch = 0
        # Pages demoted so far (mod 2**32 in shadows): the refault clock.
        self.demotions = 0
        self.pool_high_bytes = int(config.pool.high_watermark * self.pool.max_bytes)
        self.pool_low_bytes = int(config.pool.low_watermark * self.pool.max_bytes)
        # Called (no await) when a write leaves the pool above its high
        # watermark: the writeback task, when one runs, sets it.
        self.kick_writeback: Callable[[], None] | None = None
        # Refault distance up to which a page counts as hot; None: the pages
        # the pool holds now (a page that would have stayed had the pool been
        # that much larger, as the kernel's workingset refault test).
        self.promote_distance: int | None = None
        # A hot page is promoted while the pool holds less than this (room
        # left; writeback then demotes colder pages below the watermarks).
        self.promote_limit_bytes = self.pool.max_bytes
        self._migrator = Migrator(self)
        self.moves = self._migrator.counters

    def device(self, name: str) -> Device:
        return self._by_name[name]

    def device_stored_pages(self, dev: Device) -> int:
        """Slots of ``dev`` holding a page (same-filled ones included)."""
        return dev.stored_pages

    async def aclose(self) -> None:
        self.files.close()

    # -- migration, stats, checks (their own modules) ------------------------

    async def migrate(self, victims: list[tuple[Device, int]], src: int) -> int:
        """Move the pages of ``victims`` from level ``src`` (0: the pool,
        1 + i: file tier i) down; see :mod:`swapfs.migrate`."""
        return await self._migrator.migrate(victims, src)

    @property
    def moves_in_flight(self) -> int:
        """Slots flagged MOVING by the migration in flight."""
        return self._migrator.moving

    def stats(self) -> Stats:
        return store_stats.collect(self)

    def check_invariants(self, *, quiescent: bool = True) -> None:
        """Walk every table; AssertionError naming the first discrepancy
        (see :func:`swapfs.invariants.check_store`)."""
        invariants.check_store(self, quiescent=quiescent)

    # -- write ------------------------------------------------------------

    async def write(self, dev: Device, offset: int, data: object) -> int:
        """Store ``data`` at ``offset``; return its length.

        OutOfRange (nothing written) if it does not fit in the device.
        NoSpace if the pool and every file tier are full: the pages that
        found room are stored, the others keep their old content.
        """
        mv = memoryview(data)  # type: ignore[arg-type]
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        if offset < 0 or offset + n > dev.size_bytes:
            raise OutOfRange(f"{dev.name}: write of {n} bytes at {offset} past the end "
                             f"({dev.size_bytes} bytes)")
        dev.writes += 1
        if n == 0:
            return 0
        try:
            if not (offset | n) & PAGE_MASK:
                await self._store(dev, offset >> PAGE_SHIFT, mv, n >> PAGE_SHIFT)
            else:
                await self._write_unaligned(dev, offset, mv)
        except PoolFull as e:
            self._nospace(dev, str(e))
            raise NoSpace(f"{dev.name}: no space for write at {offset}: {e}") from None
        except NoSpace as e:
            self._nospace(dev, str(e))
            raise
        dev.written_bytes += n
        return n

    def _nospace(self, dev: Device, why: str) -> None:
        dev.nospace_errors += 1
        now = time.monotonic()
        if now - self._last_nospace_log >= _NOSPACE_LOG_INTERVAL:
            self._last_nospace_log = now
            where = "every file tier is full" if self.tiers else "no lower tier configured"
            log.warning("%s: write refused, no space: %s (%s)", dev.name, why, where)

    async def _write_unaligned(self, dev: Device, offset: int, mv: memoryview) -> None:
        n = mv.nbytes
        end = offset + n
        slot = offset >> PAGE_SHIFT
        pos = 0
        head = offset & PAGE_MASK
        if head or n < PAGE_SIZE:
            # The first page is partial: read, modify, write.
            take = min(PAGE_SIZE - head, n)
            page = bytearray(await self._page(dev, slot))
            page[head:head + take] = mv[:take]
            await self._store(dev, slot, memoryview(page), 1)
            pos = take
            slot += 1
        nfull = (end >> PAGE_SHIFT) - slot
        if nfull > 0:
            await self._store(dev, slot, mv[pos:pos + (nfull << PAGE_SHIFT)], nfull)
            pos += nfull << PAGE_SHIFT
            slot += nfull
        if pos < n:
            # The last page is partial.
            page = bytearray(await self._page(dev, slot))
            page[:n - pos] = mv[pos:]
            await self._store(dev, slot, memoryview(page), 1)

    async def _store(self, dev: Device, first: int, mv: memoryview, npages: int) -> None:
        """Store whole pages: same-filled and compressible ones inline, the
        rest (and all once the pool is full) in file tiers, if there are any
        and the device allows its pages to leave memory."""
        if not self.tiers or not dev.config.writeback:
            self._store_pages(dev, first, mv, npages, None)
            self._pool_check()
            return
        spill: list[int] = []
        self._store_pages(dev, first, mv, npages, spill)
        self._pool_check()
        try:
            if spill:
                await self._store_file_pages(dev, first, mv, spill)
        finally:
            await self.files.punch()  # a rewrite may have left a cluster entirely free

    def _pool_check(self) -> None:
        """Ask for a writeback pass if the pool passed its high watermark."""
        if self.pool.pool_bytes > self.pool_high_bytes and self.kick_writeback is not None:
            self.kick_writeback()

    def _store_pages(self, dev: Device, first: int, mv: memoryview, npages: int,
                     spill: list[int] | None) -> None:
        """Store ``npages`` whole pages of ``mv`` in slots ``first``...

        For each page the new location is allocated and written before the
        old one is freed and the handle replaced, all without an await, so a
        PoolFull leaves the slot as it was.  With ``spill`` (file tiers
        exist), a page that does not compress well enough, or finds the pool
        full, is not stored but its index in ``mv`` appended to ``spill``.
        """
        table = dev.table
        handles = table.handles
        info = table.info
        epoch = table.epoch
        ep = self.epoch
        compress = self.codec.compress
        pool = self.pool
        alloc = pool.alloc
        limit = self.accept_limit
        q = mv.cast("Q")
        d_stored = d_same = d_pool = d_huge = d_cbytes = d_pbytes = 0
        pool_full = False
        o = 0
        try:
            for idx, s in enumerate(range(first, first + npages)):
                qi = o >> 3
                if q[qi] == q[qi + _LAST_WORD] and (
                        (w := same_fill_word(mv[o:o + PAGE_SIZE])) is not None):
                    new_h = w
                    new_i = SAME
                    d_same += 1
                elif pool_full:
                    spill.append(idx)  # type: ignore[union-attr]
                    o += PAGE_SIZE
                    continue
                else:
                    page = mv[o:o + PAGE_SIZE]
                    c = compress(page)
                    n = len(c)
                    try:
                        if n > limit:
                            if spill is not None:
                                spill.append(idx)
                                o += PAGE_SIZE
                                continue
                            new_h = alloc(page, PAGE_SIZE)
                            new_i = _HUGE_INFO
                            d_huge += 1
                            d_cbytes += PAGE_SIZE
                            d_pbytes += PAGE_SIZE
                        else:
                            new_h = alloc(c, n)
                            new_i = n << 4 | POOL
                            d_pool += 1
                            d_cbytes += n
                            d_pbytes += (n + 31) & ~31
                    except PoolFull:
                        if spill is None:
                            raise
                        pool_full = True
                        spill.append(idx)
                        o += PAGE_SIZE
                        continue
                old = info[s]
                if old == EMPTY:
                    d_stored += 1
                else:  # a rewrite: rare on the swap path (freed slots are discarded)
                    self.free_slot_content(dev, s, old)
                handles[s] = new_h
                info[s] = new_i
                epoch[s] = ep
                o += PAGE_SIZE
        finally:
            dev.stored_pages += d_stored
            dev.same_filled_pages += d_same
            dev.pool_pages += d_pool
            dev.huge_pages += d_huge
            dev.compressed_bytes += d_cbytes
            dev.pool_bytes += d_pbytes

    async def _store_file_pages(self, dev: Device, first: int, mv: memoryview,
                                spill: list[int]) -> None:
        """Write the pages ``spill`` (indexes into ``mv``, slots ``first + k``)
        to file tiers, then point their slots at them.

        Tiers are tried by priority, round-robin within equal priority; a
        tier whose filesystem says ENOSPC counts as full and the pages move
        on to the next.  Pages that find no room raise NoSpace after the
        others are committed.  The slot is switched only after its page is
        on disk, so a read meanwhile returns the old content; a concurrent
        write of the same slot that ends first is overwritten (the later
        completion wins, as with any two overlapping writes).
        """
        files = self.files
        todo = spill
        errors: list[str] = []
        broken: set[int] = set()  # tiers that failed with an I/O error in this request
        while todo:
            grants = files.allocate(len(todo), broken)
            if not grants:
                break
            pos = 0
            retry: list[int] = []
            for ti, runs, count in grants:
                chunk = todo[pos:pos + count]
                pos += count
                pages = [mv[idx << PAGE_SHIFT:(idx + 1) << PAGE_SHIFT] for idx in chunk]
                files.inflight[ti] += count
                try:
                    await files[ti].write(runs, pages)
                except TierFull as e:  # the filesystem under a sparse tier is full
                    log.warning("%s; trying the next tier", e)
                    retry += chunk
                    continue
                except TierIOError as e:
                    errors.append(str(e))
                    broken.add(ti)
                    retry += chunk
                    continue
                finally:
                    files.inflight[ti] -= count
                self._commit_file_pages(dev, first, chunk, ti, runs)
            todo = retry
        if todo:
            if errors:
                raise BackingIOError(f"{dev.name}: {len(todo)} pages not written: {errors[-1]}")
            raise NoSpace(f"{dev.name}: {len(todo)} pages found no room: the pool and every "
                          "file tier are full")

    def _commit_file_pages(self, dev: Device, first: int, chunk: list[int], ti: int,
                           runs: list[tuple[int, int]]) -> None:
        handles = dev.table.handles
        info = dev.table.info
        epoch = dev.table.epoch
        ep = self.epoch
        kind = FILE0 + ti
        stored = 0
        for idx, page in zip(chunk, run_pages(runs)):
            s = first + idx
            old = info[s]
            if old == EMPTY:
                stored += 1
            else:
                self.free_slot_content(dev, s, old)
            handles[s] = page
            info[s] = kind
            epoch[s] = ep
        dev.stored_pages += stored
        dev.file_pages += len(chunk)

    def free_slot_content(self, dev: Device, s: int, old: int) -> None:
        """Free what slot ``s`` (info ``old``, not EMPTY) holds, keeping the
        device counters right for a slot that is about to be refilled."""
        h = dev.table.handles[s]
        if old == SAME:
            dev.same_filled_pages -= 1
        elif old & KIND_MASK >= FILE0:
            self.files.free_page((old & KIND_MASK) - FILE0, h)
            dev.file_pages -= 1
        else:
            n = (old >> 4) & LENGTH_MASK
            self.pool.free_object(h, n)
            dev.compressed_bytes -= n
            dev.pool_bytes -= (n + 31) & ~31
            if old & KIND_MASK == POOL:
                dev.pool_pages -= 1
            else:
                dev.huge_pages -= 1

    # -- read -------------------------------------------------------------

    async def read(self, dev: Device, offset: int, size: int) -> bytes | bytearray:
        """Up to ``size`` bytes at ``offset``; short (or empty) past the end.

        Never-written and discarded ranges read as zeros.
        """
        if offset < 0 or size < 0:
            raise OutOfRange(f"{dev.name}: read of {size} bytes at {offset}")
        dev.reads += 1
        end = min(offset + size, dev.size_bytes)
        if end <= offset:
            return b""
        n = end - offset
        dev.read_bytes += n
        if not (offset | n) & PAGE_MASK:
            if n == PAGE_SIZE:
                return await self._page(dev, offset >> PAGE_SHIFT)
            return await self._read_pages(dev, offset >> PAGE_SHIFT, n >> PAGE_SHIFT)
        first = offset >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        head = offset & PAGE_MASK
        if first == last:
            return (await self._page(dev, first))[head:head + n]
        buf = await self._read_pages(dev, first, last - first + 1)
        del buf[head + n:]
        del buf[:head]
        return buf

    async def _page(self, dev: Device, slot: int) -> bytes:
        """The content of one slot, from whatever tier holds it."""
        if dev.table.info[slot] & KIND_MASK >= FILE0:
            out = bytearray(PAGE_SIZE)
            await self._read_file_pages(dev, out, [(0, slot)])
            return bytes(out)
        dev.table.epoch[slot] = self.epoch
        return self.load_page(dev, slot)

    def load_page(self, dev: Device, slot: int) -> bytes:
        """The content of one slot held in memory, as bytes."""
        i = dev.table.info[slot]
        k = i & KIND_MASK
        if k == EMPTY:
            return ZERO_PAGE
        h = dev.table.handles[slot]
        if k == SAME:
            return fill_page(h)
        if k == POOL:
            return self.codec.decompress(self.pool.view(h, (i >> 4) & LENGTH_MASK))
        if k == HUGE:
            return bytes(self.pool.view(h, PAGE_SIZE))
        raise AssertionError(f"{dev.name}: slot {slot} has kind {k}, not in memory")

    async def _read_pages(self, dev: Device, first: int, npages: int) -> bytearray:
        out = bytearray(npages << PAGE_SHIFT)
        table = dev.table
        handles = table.handles
        info = table.info
        epoch = table.epoch
        ep = self.epoch
        pool = self.pool
        views = pool.views
        osize = pool.osize
        decompress = self.codec.decompress
        on_disk: list[tuple[int, int]] | None = None
        o = 0
        for s in range(first, first + npages):
            i = info[s]
            if i:
                k = i & KIND_MASK
                h = handles[s]
                if k == POOL:
                    aid = h >> INDEX_BITS
                    off = (h & INDEX_MASK) * osize[aid]
                    out[o:o + PAGE_SIZE] = decompress(
                        views[aid][off:off + ((i >> 4) & LENGTH_MASK)])  # type: ignore[index]
                    epoch[s] = ep
                elif k == SAME:
                    if h:
                        out[o:o + PAGE_SIZE] = fill_page(h)
                elif k == HUGE:
                    aid = h >> INDEX_BITS
                    off = (h & INDEX_MASK) * PAGE_SIZE
                    out[o:o + PAGE_SIZE] = views[aid][off:off + PAGE_SIZE]  # type: ignore[index]
                    epoch[s] = ep
                elif k >= FILE0:
                    if on_disk is None:
                        on_disk = []
                    on_disk.append((o, s))
                else:
                    raise AssertionError(f"{dev.name}: slot {s} has unknown kind {k}")
            o += PAGE_SIZE
        if on_disk:
            await self._read_file_pages(dev, out, on_disk)
        return out

    async def _read_file_pages(self, dev: Device, out: bytearray,
                               where: list[tuple[int, int]]) -> None:
        """Fill ``out`` at each (offset, slot) of ``where`` from the file
        tiers.  The pages are pinned while read: a concurrent write or
        discard of their slots defers freeing them, so no other slot can
        reuse them under the pread.  A slot that changed during the read is
        read again (the newer content wins)."""
        table = dev.table
        info = table.info
        handles = table.handles
        cache = self.cache
        files = self.files
        promoted = False
        pending = where
        while pending:
            by_tier: dict[int, list[tuple[int, int, int]]] = {}
            for o, s in pending:
                i = info[s]
                k = i & KIND_MASK
                if k < FILE0:  # it left the file tiers meanwhile
                    out[o:o + PAGE_SIZE] = self.load_page(dev, s)
                    continue
                ti = k - FILE0
                p = handles[s]
                hit = cache.get(file_key(ti, p))
                if hit is not None:
                    cache.hits += 1
                    out[o:o + PAGE_SIZE] = hit
                    promoted |= self._accessed(dev, s, i, ti, hit)
                    continue
                cache.misses += 1
                by_tier.setdefault(ti, []).append((o, s, p))
            pending = []
            # Pin the pages of every tier before the first await: a page
            # looked up now must not be freed and reused before its read.
            pinned: dict[int, list[int]] = {}
            for ti, items in by_tier.items():
                items.sort(key=lambda x: x[2])
                pinned[ti] = files.pin(ti, [p for _, _, p in items])
            try:
                for ti, items in by_tier.items():
                    try:
                        data = await files[ti].read_many([p for _, _, p in items])
                    except ChecksumError as e:
                        raise Corruption(f"{dev.name}: {e}") from None
                    except TierIOError as e:
                        raise BackingIOError(f"{dev.name}: {e}") from None
                    finally:
                        files.unpin(pinned.pop(ti))
                    kind = FILE0 + ti
                    for (o, s, p), page in zip(items, data):
                        i = info[s]
                        if i & KIND_MASK == kind and handles[s] == p:
                            out[o:o + PAGE_SIZE] = page
                            cache.put(file_key(ti, p), page)
                            promoted |= self._accessed(dev, s, i, ti, page)
                        else:
                            pending.append((o, s))
            finally:
                for keys in pinned.values():  # reads not done (an error or cancelled)
                    files.unpin(keys)
        if promoted:
            await files.punch()  # a promotion may have left a cluster entirely free

    def _accessed(self, dev: Device, s: int, i: int, ti: int, page: object) -> bool:
        """A page of file tier ``ti`` (slot ``s``, info ``i``) was just read.

        Without a shadow its access epoch is updated.  With one, the read is
        a refault: if the distance (demotions since the page was demoted) is
        within ``promote_distance`` and the pool has room, the page is
        promoted to the pool; otherwise the shadow is
        re-armed at the current demotion count, so a second read soon after
        finds a short distance.  No await: atomic.  True if promoted."""
        epoch = dev.table.epoch
        if not i & SHADOW:
            epoch[s] = self.epoch
            return False
        self.moves.refaults[1 + ti] += 1
        dist = (self.demotions - epoch[s]) & EPOCH_MASK
        limit = self.promote_distance
        if limit is None:
            limit = max(self.pool.objects, 1)
        if dist <= limit and self._promote(dev, s, ti, page):
            return True
        epoch[s] = self.demotions & EPOCH_MASK
        return False

    def _promote(self, dev: Device, s: int, ti: int, page: object) -> bool:
        """Move slot ``s`` (a page of file tier ``ti`` whose content is
        ``page``) to the pool, if the pool holds less than
        ``promote_limit_bytes`` and the page goes in: it is stored exactly as
        a write would store it (a page that does not compress well enough,
        or finds the pool full, stays where it is).  Like a write, it
        replaces the info word, so a move of the slot in flight aborts at
        its commit.  No await."""
        if self.pool.pool_bytes >= self.promote_limit_bytes:
            return False
        stay: list[int] = []
        self._store_pages(dev, s, memoryview(page), 1, stay)  # type: ignore[arg-type]
        if stay:
            return False
        self.moves.promotions[1 + ti] += 1
        self._pool_check()  # make room again: demote what is colder
        return True

    # -- discard ----------------------------------------------------------

    async def discard(self, dev: Device, offset: int, length: int) -> None:
        """Punch a hole: the range reads as zeros afterwards.

        Whole pages are freed at once; partial pages at the ends are zeroed
        in place (read, modify, write; NoSpace is possible there in theory,
        if the zeroed page compresses worse).  The range is clipped to the
        device.  File-tier clusters left entirely free are punched in the
        backing file before this returns.
        """
        dev.discards += 1
        start = max(offset, 0)
        end = min(offset + length, dev.size_bytes)
        if end <= start:
            return
        dev.discarded_bytes += end - start
        first_full = (start + PAGE_MASK) >> PAGE_SHIFT
        end_full = end >> PAGE_SHIFT
        try:
            if first_full > end_full:
                # Inside one page, touching neither of its ends.
                await self._zero_part(dev, start >> PAGE_SHIFT, start & PAGE_MASK, end & PAGE_MASK)
                return
            if start & PAGE_MASK:
                await self._zero_part(dev, start >> PAGE_SHIFT, start & PAGE_MASK, PAGE_SIZE)
            if end_full > first_full:
                self._free_slots(dev, first_full, end_full)
            if end & PAGE_MASK:
                await self._zero_part(dev, end_full, 0, end & PAGE_MASK)
        except PoolFull as e:
            self._nospace(dev, str(e))
            raise NoSpace(f"{dev.name}: no space to zero part of a page: {e}") from None
        await self.files.punch()

    async def _zero_part(self, dev: Device, slot: int, a: int, b: int) -> None:
        if dev.table.info[slot] == EMPTY:
            return
        page = bytearray(await self._page(dev, slot))
        page[a:b] = bytes(b - a)
        await self._store(dev, slot, memoryview(page), 1)

    def _free_slots(self, dev: Device, first: int, end: int) -> None:
        table = dev.table
        handles = table.handles
        info = table.info
        freed = 0
        for c0, c1 in table.stored_chunks(first, end):
            for s in range(c0, c1):
                old = info[s]
                if old == EMPTY:
                    continue
                freed += 1
                self.free_slot_content(dev, s, old)
                handles[s] = 0
                info[s] = 0
        dev.stored_pages -= freed

