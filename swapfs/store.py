"""The store: devices, slot tables and the read, write and discard paths.

Usable without FUSE: the FUSE adapter (swapfs/fs.py) translates requests to
``Store.read``, ``Store.write`` and ``Store.discard`` and maps the errors of
swapfs.errors to errnos.

Everything runs in the trio loop.  The methods are ``async def`` because
file tiers await worker threads, but the pool path never awaits: a request
served from the pool goes from start to end in one step, so the FUSE layer
answers it inline.  Which state relies on that is written down in
docs/store.md and docs/writeback.md.

Per page, the hot loops bind everything they need to locals and create no
objects beyond the compressor's output and a memoryview slice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from swapfs.cache import SwapCache
from swapfs.codec import ZERO_PAGE, fill_page, make_codec, same_fill_word
from swapfs.config import PAGE_SIZE, Config, DeviceConfig
from swapfs.errors import BackingIOError, Corruption, NoSpace, OutOfRange
from swapfs.slots import (EMPTY, FILE0, FLAGS, HUGE, KIND_MASK, KIND_NAMES, LENGTH_MASK, MOVING,
                          POOL, SAME, SHADOW, SlotTable)
from swapfs.stats import CacheStats, DeviceStats, PoolStats, Stats, TotalsStats, WritebackStats
from swapfs.tiers.file import ChecksumError, FileTier, TierFull, TierIOError
from swapfs.tiers.pool import OBJECT_BYTES, Pool, PoolFull

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_MASK = PAGE_SIZE - 1
_LAST_WORD = PAGE_SIZE // 8 - 1
_HUGE_INFO = PAGE_SIZE << 4 | HUGE
# Slots compared at once when a discard looks for stored pages.
_DISCARD_CHUNK = 4096
_ZERO_INFO_CHUNK = bytes(4 * _DISCARD_CHUNK)
# At most one NoSpace warning per this many seconds (the count is in stats).
_NOSPACE_LOG_INTERVAL = 10.0
# File tiers are slot kinds FILE0 .. FILE0 + MAX_FILE_TIERS - 1.
MAX_FILE_TIERS = 8
# A pinned file page is keyed tier_index << _PIN_SHIFT | page (the swap
# cache uses the same keys).
_PIN_SHIFT = 40
_PAGE_OF_KEY = (1 << _PIN_SHIFT) - 1
# A pool object's owner word is device_index << _OWNER_SHIFT | slot.
_OWNER_SHIFT = 40
_OWNER_SLOT = (1 << _OWNER_SHIFT) - 1
# Epochs: the store's clock, in these units per second (see docs/writeback.md).
EPOCHS_PER_SECOND = 4
EPOCH_MASK = 0xFFFFFFFF
# Default size of the swap cache, in pages.
CACHE_PAGES = 1024

assert PAGE_SIZE == 1 << PAGE_SHIFT


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted-or-not page numbers as (start, count) runs, in the given order."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


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
        # (arena_bytes: no longer used; the pool carves small spans.)
        self.pool = Pool(config.pool.max_bytes)
        # A page is kept compressed only if it compresses to at most this.
        self.accept_limit = int(config.pool.accept_ratio * PAGE_SIZE)
        self.devices = [Device(i, dc) for i, dc in enumerate(config.devices)]
        self._by_name = {d.name: d for d in self.devices}
        self._last_nospace_log = -_NOSPACE_LOG_INTERVAL
        if len(config.tiers) > MAX_FILE_TIERS:
            raise ValueError(f"at most {MAX_FILE_TIERS} file tiers")
        # File tiers in config order: tier i is slot kind FILE0 + i.
        self.tiers: list[FileTier] = []
        try:
            for tc in config.tiers:
                tier = FileTier(tc.name, tc.path, tc.size, tc.priority, preallocate=tc.preallocate)
                tier.open()
                self.tiers.append(tier)
        except BaseException:
            for tier in self.tiers:
                tier.close()
            raise
        # Groups of equal priority, highest first; round-robin inside a group.
        prios = sorted({t.priority for t in self.tiers}, reverse=True)
        self._groups = [[i for i, t in enumerate(self.tiers) if t.priority == p] for p in prios]
        self._rr = [0] * len(self._groups)
        # File pages being read (pinned) and frees deferred until their reads end:
        # a pinned page is never handed to another slot while a pread of it runs.
        self._pins: dict[int, int] = {}
        self._deferred: set[int] = set()
        # -- migration state (docs/writeback.md) --
        # The access clock: advanced by the writeback task (EPOCHS_PER_SECOND),
        # stored per slot on every access of a page in memory or on file.
        self.epoch = 0
        # Pages demoted so far (mod 2**32 in shadows): the refault clock.
        self.demotions = 0
        self.cache = SwapCache(cache_pages)
        self.pool_high_bytes = int(config.pool.high_watermark * self.pool.max_bytes)
        self.pool_low_bytes = int(config.pool.low_watermark * self.pool.max_bytes)
        # Called (no await) when a write leaves the pool above its high watermark.
        self.kick_writeback = None
        # The mount's swapfs.writeback.Writeback (policy, task, requests), if any.
        self.writeback = None
        self._migrating = False
        # Refault distance up to which a page counts as hot; None: the pages
        # the pool holds now (a page that would have stayed had the pool been
        # that much larger, as the kernel's workingset refault test).
        self.promote_distance: int | None = None
        # A hot page is promoted while the pool holds less than this (room
        # left; writeback then demotes colder pages below the watermarks).
        self.promote_limit_bytes = self.pool.max_bytes
        # Slots flagged MOVING and destination pages written but not committed.
        self._moving = 0
        self._inflight = [0] * len(self.tiers)
        # Level 0 is the pool, level 1 + i file tier i.
        self.level_names = ["pool"] + [t.name for t in self.tiers]
        nl = len(self.level_names)
        self.wb_demotions = [0] * nl
        self.wb_refaults = [0] * nl
        self.wb_promotions = [0] * nl
        self.wb_pairs: dict[tuple[int, int], list[int]] = {}  # (src, dst level) -> [pages, batches]
        self.wb_moved = 0
        self.wb_aborted = 0
        self.wb_batches = 0
        self.wb_failed_batches = 0
        self.wb_requests = 0

    def device(self, name: str) -> Device:
        return self._by_name[name]

    def device_stored_pages(self, dev: Device) -> int:
        """Slots of ``dev`` holding a page (same-filled ones included)."""
        return dev.stored_pages

    async def aclose(self) -> None:
        for tier in self.tiers:
            tier.close()

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
            if self.pool.pool_bytes > self.pool_high_bytes and self.kick_writeback is not None:
                self.kick_writeback()
            return
        spill: list[int] = []
        self._store_pages(dev, first, mv, npages, spill)
        if self.pool.pool_bytes > self.pool_high_bytes and self.kick_writeback is not None:
            self.kick_writeback()
        try:
            if spill:
                await self._store_file_pages(dev, first, mv, spill)
        finally:
            for tier in self.tiers:
                if tier.punch_pending:  # a rewrite left a cluster entirely free
                    await tier.punch_free_clusters()

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
        obase = dev.index << _OWNER_SHIFT  # the pool object's owner: obase | slot
        limit = self.accept_limit
        q = mv.cast("Q")
        d_stored = d_same = d_pool = d_huge = d_cbytes = d_pbytes = 0
        pool_full = False
        o = 0
        try:
            for k, s in enumerate(range(first, first + npages)):
                qi = o >> 3
                if q[qi] == q[qi + _LAST_WORD] and (
                        (w := same_fill_word(mv[o:o + PAGE_SIZE])) is not None):
                    new_h = w
                    new_i = SAME
                    d_same += 1
                elif pool_full:
                    spill.append(k)  # type: ignore[union-attr]
                    o += PAGE_SIZE
                    continue
                else:
                    page = mv[o:o + PAGE_SIZE]
                    c = compress(page)
                    n = len(c)
                    try:
                        if n > limit:
                            if spill is not None:
                                spill.append(k)
                                o += PAGE_SIZE
                                continue
                            new_h = alloc(page, PAGE_SIZE, obase | s)
                            new_i = _HUGE_INFO
                            d_huge += 1
                            d_cbytes += PAGE_SIZE
                            d_pbytes += PAGE_SIZE
                        else:
                            new_h = alloc(c, n, obase | s)
                            new_i = n << 4 | POOL
                            d_pool += 1
                            d_cbytes += n
                            d_pbytes += OBJECT_BYTES[n]
                    except PoolFull:
                        if spill is None:
                            raise
                        pool_full = True
                        spill.append(k)
                        o += PAGE_SIZE
                        continue
                old = info[s]
                if old == EMPTY:
                    d_stored += 1
                else:  # a rewrite: rare on the swap path (freed slots are discarded)
                    self._free_slot_content(dev, s, old)
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
        todo = spill
        errors: list[str] = []
        broken: set[int] = set()  # tiers that failed with an I/O error in this request
        while todo:
            grants = self._alloc_file(len(todo), broken)
            if not grants:
                break
            pos = 0
            retry: list[int] = []
            for ti, runs, count in grants:
                chunk = todo[pos:pos + count]
                pos += count
                pages = [mv[k << PAGE_SHIFT:(k + 1) << PAGE_SHIFT] for k in chunk]
                self._inflight[ti] += count
                try:
                    await self.tiers[ti].write(runs, pages)
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
                    self._inflight[ti] -= count
                self._commit_file_pages(dev, first, chunk, ti, runs)
            todo = retry
        if todo:
            if errors:
                raise BackingIOError(f"{dev.name}: {len(todo)} pages not written: {errors[-1]}")
            raise NoSpace(f"{dev.name}: {len(todo)} pages found no room: the pool and every "
                          "file tier are full")

    def _alloc_file(self, n: int, exclude: set[int] | frozenset[int] = frozenset(),
                    min_group: int = 0) -> list[tuple[int, list[tuple[int, int]], int]]:
        """Up to ``n`` file pages: [(tier index, runs, pages)], by priority,
        round-robin cluster by cluster among tiers of equal priority, from
        priority group ``min_group`` down."""
        grants = []
        tiers = self.tiers
        for gi, group in enumerate(self._groups):
            if gi < min_group:
                continue
            misses = 0
            while n > 0 and misses < len(group):
                pos = self._rr[gi]
                ti = group[pos]
                tier = tiers[ti]
                switches = tier.cluster_switches
                runs = tier.allocate(n) if not (tier.full or ti in exclude) else []
                got = sum(k for _, k in runs)
                if got:
                    grants.append((ti, runs, got))
                    n -= got
                else:
                    misses += 1
                if not got or tier.cluster_switches != switches:
                    self._rr[gi] = (pos + 1) % len(group)
            if n == 0:
                break
        return grants

    def _commit_file_pages(self, dev: Device, first: int, chunk: list[int], ti: int,
                           runs: list[tuple[int, int]]) -> None:
        handles = dev.table.handles
        info = dev.table.info
        epoch = dev.table.epoch
        ep = self.epoch
        kind = FILE0 + ti
        pages = [p for s, k in runs for p in range(s, s + k)]
        stored = 0
        for k, page in zip(chunk, pages):
            s = first + k
            old = info[s]
            if old == EMPTY:
                stored += 1
            else:
                self._free_slot_content(dev, s, old)
            handles[s] = page
            info[s] = kind
            epoch[s] = ep
        dev.stored_pages += stored
        dev.file_pages += len(chunk)

    def _free_slot_content(self, dev: Device, s: int, old: int) -> None:
        """Free what slot ``s`` (info ``old``, not EMPTY) holds, keeping the
        device counters right for a slot that is about to be refilled."""
        h = dev.table.handles[s]
        if old == SAME:
            dev.same_filled_pages -= 1
        elif old & KIND_MASK >= FILE0:
            self._free_file_page((old & KIND_MASK) - FILE0, h)
            dev.file_pages -= 1
        else:
            n = (old >> 4) & LENGTH_MASK
            self.pool.free_object(h, n)
            dev.compressed_bytes -= n
            dev.pool_bytes -= OBJECT_BYTES[n]
            if old & KIND_MASK == POOL:
                dev.pool_pages -= 1
            else:
                dev.huge_pages -= 1

    def _free_file_page(self, ti: int, page: int) -> None:
        key = ti << _PIN_SHIFT | page
        self.cache.invalidate(key)
        if self._pins and key in self._pins:
            self._deferred.add(key)  # freed when its last read ends
        else:
            self.tiers[ti].free((page,))

    # -- migration (writeback's mechanism; the policy is swapfs/writeback.py) --

    def group_of(self, ti: int) -> int:
        """The priority group (0 = highest) of file tier ``ti``."""
        for gi, group in enumerate(self._groups):
            if ti in group:
                return gi
        raise KeyError(ti)

    @property
    def moves_in_flight(self) -> int:
        return self._moving

    async def migrate(self, victims: list[tuple[Device, int]], src: int) -> int:
        """Move the pages of ``victims`` from level ``src`` (0: the pool,
        1 + i: file tier i) to the first file tiers below it with room, as
        contiguous extents; return how many moved.

        The rule (docs/writeback.md): each slot still at level ``src`` is
        flagged MOVING and its content copied (decompressed from the pool,
        or read from its file tier with the page pinned); the copy is written
        below; then, with no await in between, each slot whose info and
        handle are exactly what was copied (any write, discard or promotion
        meanwhile replaced the info word and so cleared MOVING) is switched
        to its new page, leaving a shadow, and its old place is freed;
        the new page of a slot that changed is freed (``aborted_moves``).
        Until the commit a read finds the page where it was, or in the swap
        cache.  Cancellation at any await leaves every slot as it was.
        """
        if not self.tiers or not victims:
            return 0
        if self._migrating:
            raise RuntimeError("one migration at a time (Writeback holds a lock)")
        self._migrating = True
        try:
            return await self._migrate(victims, src)
        finally:
            self._migrating = False

    async def _migrate(self, victims: list[tuple[Device, int]], src: int) -> int:
        if src == 0:
            want_mask, want, min_group = MOVING | 0xE, POOL, 0
        else:
            want_mask, want = MOVING | KIND_MASK, FILE0 + src - 1
            min_group = self.group_of(src - 1) + 1
            if min_group >= len(self._groups):
                return 0
        # (dev, slot, handle, info with MOVING, content)
        items: list[list] = []
        for dev, s in victims:
            i = dev.table.info[s]
            if i & want_mask == want:
                items.append([dev, s, dev.table.handles[s], i | MOVING, None])
        if not items:
            return 0
        grants = self._alloc_file(len(items), min_group=min_group)
        ngrant = sum(c for _, _, c in grants)
        del items[ngrant:]
        if not items:
            return 0
        for it in items:
            it[0].table.info[it[1]] = it[3]
        self._moving += len(items)
        for ti, _, count in grants:
            self._inflight[ti] += count
        todo = list(grants)  # grants neither written nor given back yet
        src_ti = src - 1
        pins: list[int] = []
        moved = 0
        try:
            if src == 0:
                for it in items:
                    it[4] = self._load_page(it[0], it[1])
            else:
                await self._copy_from_file(src_ti, items, pins)
            pos = 0
            while todo:
                ti, runs, count = todo.pop(0)
                chunk = items[pos:pos + count]
                pos += count
                pages = [p for st, k in runs for p in range(st, st + k)]
                live = []
                dead = []
                for it, page in zip(chunk, pages):
                    if it[4] is not None and it[0].table.info[it[1]] == it[3]:
                        it.append(page)
                        live.append(it)
                    else:  # the slot changed before the copy was written
                        dead.append(page)
                if dead:
                    self.tiers[ti].free(dead)
                    self._inflight[ti] -= len(dead)
                    self.wb_aborted += len(dead)
                if not live:
                    continue
                for it in live:  # the page in flight
                    self.cache.put(ti << _PIN_SHIFT | it[5], it[4])
                ok = False
                try:
                    await self.tiers[ti].write(_runs([it[5] for it in live]),
                                               [it[4] for it in live])
                    ok = True
                except (TierFull, TierIOError) as e:  # the tier gave the pages back
                    log.warning("writeback to %s failed: %s", self.tiers[ti].name, e)
                    self.wb_failed_batches += 1
                finally:
                    self._inflight[ti] -= len(live)
                    if not ok:  # cancelled or failed: the tier gave the pages back
                        for it in live:
                            self.cache.invalidate(ti << _PIN_SHIFT | it[5])
                if ok:
                    moved += self._commit_moves(live, src, ti)
        finally:
            for ti, runs, count in todo:  # never written: give the pages back
                self.tiers[ti].free_runs(runs)
                self._inflight[ti] -= count
            for it in items:  # whatever did not commit keeps its place
                table = it[0].table
                if table.info[it[1]] == it[3]:
                    table.info[it[1]] = it[3] & ~MOVING
            self._moving -= len(items)
            if pins:
                self._unpin(src_ti, pins)
        if moved:
            self.wb_batches += 1
        for tier in self.tiers:
            if tier.punch_pending:
                await tier.punch_free_clusters()
        return moved

    async def _copy_from_file(self, ti: int, items: list[list], pins: list[int]) -> None:
        """Fill the content of ``items`` (slots of file tier ``ti``) from the
        swap cache or the tier, their pages pinned (``pins``) until the move
        ends.  A slot that changed during the read keeps content None."""
        cache = self.cache
        todo = []
        for it in items:
            key = ti << _PIN_SHIFT | it[2]
            self._pins[key] = self._pins.get(key, 0) + 1
            pins.append(key)
            hit = cache.get(key)
            if hit is not None:
                it[4] = bytes(hit)
            else:
                todo.append(it)
        if not todo:
            return
        todo.sort(key=lambda it: it[2])
        data = await self.tiers[ti].read_many([it[2] for it in todo])
        for it, page in zip(todo, data):
            if it[0].table.info[it[1]] == it[3] and it[0].table.handles[it[1]] == it[2]:
                it[4] = page
                cache.put(ti << _PIN_SHIFT | it[2], page)  # in flight

    def _commit_moves(self, live: list[list], src: int, ti: int) -> int:
        """Switch each slot of ``live`` still holding what was copied to its
        new page of tier ``ti``; free the new page of the others.  No await."""
        moved = 0
        aborted: list[int] = []
        dst_kind = FILE0 + ti | SHADOW
        for dev, s, h, i, _data, page in live:
            table = dev.table
            if table.info[s] != i or table.handles[s] != h:
                aborted.append(page)
                self.cache.invalidate(ti << _PIN_SHIFT | page)
                continue
            if src == 0:
                self._free_slot_content(dev, s, i)  # the pool object (i still has MOVING)
                dev.file_pages += 1
            else:
                self._free_file_page(src - 1, h)  # pinned: freed when the move unpins it
            table.handles[s] = page
            table.info[s] = dst_kind
            table.epoch[s] = self.demotions & EPOCH_MASK
            self.demotions += 1
            moved += 1
        if aborted:
            self.tiers[ti].free(aborted)
            self.wb_aborted += len(aborted)
        if moved:
            self.wb_moved += moved
            self.wb_demotions[src] += moved
            pair = self.wb_pairs.setdefault((src, 1 + ti), [0, 0])
            pair[0] += moved
            pair[1] += 1
        return moved

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
        return self._load_page(dev, slot)

    def _load_page(self, dev: Device, slot: int) -> bytes:
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
        mem = pool.mem
        decompress = self.codec.decompress
        on_disk: list[tuple[int, int]] | None = None
        o = 0
        for s in range(first, first + npages):
            i = info[s]
            if i:
                k = i & KIND_MASK
                h = handles[s]
                if k == POOL:
                    out[o:o + PAGE_SIZE] = decompress(mem[h:h + ((i >> 4) & LENGTH_MASK)])
                    epoch[s] = ep
                elif k == SAME:
                    if h:
                        out[o:o + PAGE_SIZE] = fill_page(h)
                elif k == HUGE:
                    out[o:o + PAGE_SIZE] = mem[h:h + PAGE_SIZE]
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
        promoted = False
        pending = where
        while pending:
            by_tier: dict[int, list[tuple[int, int, int]]] = {}
            for o, s in pending:
                i = info[s]
                k = i & KIND_MASK
                if k < FILE0:  # it left the file tiers meanwhile
                    out[o:o + PAGE_SIZE] = self._load_page(dev, s)
                    continue
                ti = k - FILE0
                p = handles[s]
                hit = cache.get(ti << _PIN_SHIFT | p)
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
            pins = self._pins
            for ti, items in by_tier.items():
                items.sort(key=lambda x: x[2])
                keys = pinned[ti] = [ti << _PIN_SHIFT | p for _, _, p in items]
                for key in keys:
                    pins[key] = pins.get(key, 0) + 1
            try:
                for ti, items in by_tier.items():
                    try:
                        data = await self.tiers[ti].read_many([p for _, _, p in items])
                    except ChecksumError as e:
                        raise Corruption(f"{dev.name}: {e}") from None
                    except TierIOError as e:
                        raise BackingIOError(f"{dev.name}: {e}") from None
                    finally:
                        self._unpin(ti, pinned.pop(ti))
                    kind = FILE0 + ti
                    for (o, s, p), page in zip(items, data):
                        i = info[s]
                        if i & KIND_MASK == kind and handles[s] == p:
                            out[o:o + PAGE_SIZE] = page
                            cache.put(ti << _PIN_SHIFT | p, page)
                            promoted |= self._accessed(dev, s, i, ti, page)
                        else:
                            pending.append((o, s))
            finally:
                for ti, keys in pinned.items():  # reads not done (an error or cancelled)
                    self._unpin(ti, keys)
        if promoted:
            for tier in self.tiers:
                if tier.punch_pending:  # a promotion left a cluster entirely free
                    await tier.punch_free_clusters()

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
        self.wb_refaults[1 + ti] += 1
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
        self.wb_promotions[1 + ti] += 1
        if self.pool.pool_bytes > self.pool_high_bytes and self.kick_writeback is not None:
            self.kick_writeback()  # make room again: demote what is colder
        return True

    def _unpin(self, ti: int, keys: list[int]) -> None:
        pins = self._pins
        for key in keys:
            c = pins[key] - 1
            if c:
                pins[key] = c
                continue
            del pins[key]
            if key in self._deferred:
                self._deferred.discard(key)
                self.tiers[ti].free((key & ((1 << _PIN_SHIFT) - 1),))

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
        for tier in self.tiers:
            if tier.punch_pending:
                await tier.punch_free_clusters()

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
        info_bytes = memoryview(info).cast("B")
        freed = 0
        for c0 in range(first, end, _DISCARD_CHUNK):
            c1 = min(c0 + _DISCARD_CHUNK, end)
            # Skip runs of empty slots with one memcmp.
            if info_bytes[c0 * 4:c1 * 4] == _ZERO_INFO_CHUNK[:(c1 - c0) * 4]:
                continue
            for s in range(c0, c1):
                old = info[s]
                if old == EMPTY:
                    continue
                freed += 1
                self._free_slot_content(dev, s, old)
                handles[s] = 0
                info[s] = 0
        info_bytes.release()
        dev.stored_pages -= freed

    # -- pool compaction ----------------------------------------------------

    def compact(self, budget: int | None = None) -> tuple[int, int]:
        """Compact the pool now (no await); return (objects moved, bytes released)."""
        return self.pool.compact(self._relocate, budget)

    def _relocate(self, owner: int, old: int, new: int) -> bool:
        """The pool moved slot ``owner``'s object from handle ``old`` to
        ``new`` (called by Pool.compact, in the same step: no await): point
        the slot at it.  A slot flagged MOVING keeps its object (False):
        its migration commits only if the handle is unchanged."""
        dev = self.devices[owner >> _OWNER_SHIFT]
        s = owner & _OWNER_SLOT
        i = dev.table.info[s]
        if dev.table.handles[s] != old or i & MOVING or not (
                i & KIND_MASK == POOL or i & KIND_MASK == HUGE):
            return False
        dev.table.handles[s] = new
        return True

    # -- stats and checks -------------------------------------------------

    def stats(self) -> Stats:
        pool = self.pool
        devices = tuple(
            DeviceStats(
                name=d.name, size_bytes=d.size_bytes, stored_pages=d.stored_pages,
                same_filled_pages=d.same_filled_pages, pool_pages=d.pool_pages,
                huge_pages=d.huge_pages, file_pages=d.file_pages,
                compressed_bytes=d.compressed_bytes,
                pool_bytes=d.pool_bytes, metadata_bytes=d.table.metadata_bytes(),
                reads=d.reads, writes=d.writes, discards=d.discards, read_bytes=d.read_bytes,
                written_bytes=d.written_bytes, discarded_bytes=d.discarded_bytes,
                nospace_errors=d.nospace_errors)
            for d in self.devices)
        huge = sum(d.huge_pages for d in devices)
        pool_meta = pool.metadata_bytes()
        pstats = PoolStats(
            name="pool", kind="pool", algorithm=self.codec.name, stored_pages=pool.objects,
            huge_pages=huge, compressed_bytes=pool.compressed_bytes,
            pool_bytes=pool.pool_bytes, max_bytes=pool.max_bytes,
            fragmentation=pool.fragmentation, metadata_bytes=pool_meta, arenas=pool.arenas,
            spare_bytes=pool.spare_bytes(), used_bytes=pool.used_bytes,
            classes=pool.class_counts())
        same = sum(d.same_filled_pages for d in devices)
        # A tier's stored_pages counts the pages slots hold: pages written
        # but not committed yet (writes and moves in flight) and pages freed
        # while a read pins them are left out, so every stored page is
        # counted once at every moment.
        unowned = list(self._inflight)
        for key in self._deferred:
            unowned[key >> _PIN_SHIFT] += 1
        tier_stats = [dataclasses.replace(st, stored_pages=st.stored_pages - unowned[ti])
                      if unowned[ti] else st
                      for ti, st in enumerate(t.stats() for t in self.tiers)]
        file_pages = sum(t.stored_pages for t in tier_stats)
        totals = TotalsStats(
            stored_pages=same + pool.objects + file_pages,
            same_filled_pages=same,
            huge_pages=huge,
            compressed_bytes=pool.compressed_bytes,
            pool_bytes=pool.pool_bytes,
            metadata_bytes=(sum(d.metadata_bytes for d in devices) + pool_meta
                            + sum(t.metadata_bytes for t in tier_stats)),
            compression_ratio=(pool.objects * PAGE_SIZE / pool.pool_bytes
                               if pool.pool_bytes else 0.0),
            reads=sum(d.reads for d in devices),
            writes=sum(d.writes for d in devices),
            discards=sum(d.discards for d in devices),
            read_bytes=sum(d.read_bytes for d in devices),
            written_bytes=sum(d.written_bytes for d in devices))
        return Stats(devices=devices, tiers=(pstats, *tier_stats), totals=totals,
                     writeback=self._writeback_stats(), cache=self._cache_stats())

    def _writeback_stats(self) -> WritebackStats:
        names = self.level_names
        pairs = {f"{names[a]}->{names[b]}": {"pages": v[0], "bytes": v[0] * PAGE_SIZE,
                                               "batches": v[1]}
                 for (a, b), v in sorted(self.wb_pairs.items())}
        levels = {name: {"demotions": self.wb_demotions[k], "refaults": self.wb_refaults[k],
                         "promotions": self.wb_promotions[k]} for k, name in enumerate(names)}
        marks = {"pool": {"high": self.pool_high_bytes, "low": self.pool_low_bytes,
                          "used": self.pool.pool_bytes}}
        last = len(self._groups) - 1
        for ti, (tier, tc) in enumerate(zip(self.tiers, self.config.tiers)):
            if self.group_of(ti) < last:
                marks[tier.name] = {"high": int(tc.high_watermark * tier.capacity_pages),
                                    "low": int(tc.low_watermark * tier.capacity_pages),
                                    "used": tier.stored_pages}
        return WritebackStats(
            moved_pages=self.wb_moved, aborted_moves=self.wb_aborted,
            promotions=sum(self.wb_promotions), refaults=sum(self.wb_refaults),
            moved_bytes=self.wb_moved * PAGE_SIZE, batches=self.wb_batches,
            failed_batches=self.wb_failed_batches, inflight_pages=sum(self._inflight),
            requests=self.wb_requests, epoch=self.epoch, demotions_clock=self.demotions,
            pairs=pairs, levels=levels, watermarks=marks)

    def _cache_stats(self) -> CacheStats:
        c = self.cache
        return CacheStats(pages=len(c), hits=c.hits, misses=c.misses, capacity_pages=c.capacity,
                          inserts=c.inserts, evictions=c.evictions)

    def check_invariants(self, *, quiescent: bool = True) -> None:
        """Walk every table; AssertionError naming the first discrepancy.

        ``quiescent``: no request is running (no page may be pinned).  With
        False, reads may be in flight: pinned pages and the frees they defer
        are allowed.  The accounting identity is checked whenever no move is
        in flight."""
        pool = self.pool
        live: dict[int, tuple[int, int]] = {}
        file_owner: list[dict[int, tuple[str, int]]] = [{} for _ in self.tiers]
        total_cbytes = 0
        moving = 0
        for dev in self.devices:
            table = dev.table
            if not (len(table.handles) == len(table.info) == len(table.epoch) == dev.npages):
                raise AssertionError(f"{dev.name}: slot table columns are not {dev.npages} long")
            counts = {EMPTY: 0, SAME: 0, POOL: 0, HUGE: 0}
            nfile = 0
            cbytes = pbytes = 0
            for s, (i, h) in enumerate(zip(table.info, table.handles)):
                if i == EMPTY:
                    if h:
                        raise AssertionError(f"{dev.name}: empty slot {s} has handle {h:#x}")
                    counts[EMPTY] += 1
                    continue
                k = i & KIND_MASK
                n = (i >> 4) & LENGTH_MASK
                if i & ~(FLAGS | LENGTH_MASK << 4 | KIND_MASK):
                    raise AssertionError(f"{dev.name}: slot {s} has unknown info bits {i:#x}")
                if i & MOVING:
                    moving += 1
                    if k != POOL and k != HUGE and k < FILE0:
                        raise AssertionError(f"{dev.name}: {KIND_NAMES.get(k, k)} slot {s} "
                                             "is flagged MOVING")
                if i & SHADOW and k < FILE0:
                    raise AssertionError(f"{dev.name}: slot {s} in memory has a shadow")
                if k == SAME:
                    if n:
                        raise AssertionError(f"{dev.name}: same-filled slot {s} has length {n}")
                elif k == POOL or k == HUGE:
                    if k == POOL and not 0 < n <= self.accept_limit:
                        raise AssertionError(f"{dev.name}: pool slot {s} has length {n}, "
                                             f"accept limit {self.accept_limit}")
                    if k == HUGE and n != PAGE_SIZE:
                        raise AssertionError(f"{dev.name}: huge slot {s} has length {n}")
                    if h in live:
                        raise AssertionError(f"{dev.name}: slot {s} shares pool object {h:#x}")
                    live[h] = (n, dev.index << _OWNER_SHIFT | s)
                    cbytes += n
                    pbytes += OBJECT_BYTES[n]
                elif FILE0 <= k < FILE0 + len(self.tiers):
                    if n:
                        raise AssertionError(f"{dev.name}: file slot {s} has length {n}")
                    owners = file_owner[k - FILE0]
                    if h in owners:
                        raise AssertionError(f"{dev.name}: slot {s} and {owners[h]} share page {h} "
                                             f"of tier {self.tiers[k - FILE0].name}")
                    owners[h] = (dev.name, s)
                    nfile += 1
                    continue
                else:
                    raise AssertionError(f"{dev.name}: slot {s} has unknown kind {k}")
                counts[k] += 1
            total_cbytes += cbytes
            want = {
                "stored_pages": dev.npages - counts[EMPTY],
                "same_filled_pages": counts[SAME],
                "pool_pages": counts[POOL],
                "huge_pages": counts[HUGE],
                "file_pages": nfile,
                "compressed_bytes": cbytes,
                "pool_bytes": pbytes,
            }
            for name, value in want.items():
                if getattr(dev, name) != value:
                    raise AssertionError(f"{dev.name}: {name} counts {getattr(dev, name)}, "
                                         f"slot table holds {value}")
        pool.check_invariants(live, total_cbytes)
        if moving > self._moving:
            raise AssertionError(f"{moving} slots flagged MOVING, {self._moving} in moves")
        quiet = not self._moving
        if quiescent and self._pins:
            raise AssertionError(f"file pages still pinned: {len(self._pins)}")
        for ti, tier in enumerate(self.tiers):
            tier.check_invariants()
            owned = (len(file_owner[ti]) + self._inflight[ti]
                     + sum(1 for key in self._deferred if key >> _PIN_SHIFT == ti))
            if tier.stored_pages != owned:
                raise AssertionError(f"tier {tier.name}: {tier.stored_pages} pages in use, "
                                     f"{owned} referenced by slots or moves in flight")
        self.cache.check_invariants()
        for key in self.cache.keys():
            ti, page = key >> _PIN_SHIFT, key & _PAGE_OF_KEY
            if not (ti < len(self.tiers) and self.tiers[ti]._used[page]):
                raise AssertionError(f"swap cache holds tier {ti} page {page}, not in use")
            if quiet and page not in file_owner[ti]:
                raise AssertionError(f"swap cache holds tier {ti} page {page}, no slot's")
            if quiet:
                on_disk = os.pread(self.tiers[ti]._fd, PAGE_SIZE, page * PAGE_SIZE)
                if on_disk != self.cache.get(key):
                    raise AssertionError(f"swap cache: tier {ti} page {page} differs from disk")
        # (stats() leaves out pages in flight and deferred frees: the identity
        # holds at every moment.)
        st = self.stats()
        t = st.totals
        tier_pages = sum(tier.stored_pages for tier in st.tiers)
        dev_pages = sum(d.stored_pages for d in st.devices)
        if not t.stored_pages == t.same_filled_pages + tier_pages == dev_pages:
            raise AssertionError(f"accounting: totals.stored_pages {t.stored_pages}, same-filled "
                                 f"{t.same_filled_pages} + tiers {tier_pages}, devices {dev_pages}")
        if sum(d.compressed_bytes for d in st.devices) != st.pool.compressed_bytes:
            raise AssertionError("accounting: devices' compressed_bytes do not sum to the pool's")
        if sum(d.pool_bytes for d in st.devices) > st.pool.pool_bytes:
            raise AssertionError("accounting: devices' class bytes exceed the pool's memory")
