"""The store: the facade over the state layer, and the read, write and
discard paths.

Usable without FUSE: the FUSE adapter (swapfs/fs.py) translates requests to
``Store.read``, ``Store.write`` and ``Store.discard`` and maps the errors of
swapfs.errors to errnos.  Only the adapter, the writeback task and the
daemon import this module.

:class:`Store` is a :class:`swapfs.state.StoreState` (the devices, slot
tables, pool, file tiers, counters and the operations that change a slot)
with the I/O paths on top, and the only module that imports every part of
the store: moving pages between tiers is :mod:`swapfs.migrate` (the
mechanism; :mod:`swapfs.writeback` is the policy, run by the daemon),
recompression :mod:`swapfs.recompress`, stats are assembled by
:mod:`swapfs.store_stats`, the consistency check is
:mod:`swapfs.invariants`; each of those works on the state alone.

Everything runs in the trio loop.  The methods are ``async def`` because
file tiers await worker threads, but the pool path never awaits: a request
served from the pool goes from start to end in one step, so the FUSE layer
answers it inline.  Which state relies on that is written down in
docs/store.md and docs/writeback.md.

Per page, the hot loops (``slots.HOT_LOOPS``) bind everything they need to
locals, inline the slot encoding and the state layer's slot updates, and
create no objects beyond the compressor's output and a memoryview slice.
"""

from __future__ import annotations

import logging
import time

from . import invariants, store_stats
from .cache import file_key
from .codec import fill_page, same_fill_word
from .config import Config
from .errors import BackingIOError, Corruption, InvariantError, NoSpace, OutOfRange
from .fileset import run_pages
from .kernel import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from .migrate import Migrator
from .recompress import Recompressor
from .slots import (
    ALT,
    EMPTY,
    EPOCH_MASK,
    FILE0,
    HUGE,
    HUGE_INFO,
    KIND_MASK,
    LENGTH_MASK,
    POOL,
    SAME,
    SHADOW,
    SLOT_SHIFT,
    file_kind,
    in_file,
    in_pool,
    kind_of,
    length_of,
    slot_key,
    tier_level,
    tier_of_kind,
)
from .state import CACHE_PAGES, Device, Staged, StoreState
from .stats import Stats
from .tiers.file import ChecksumError, TierFull, TierIOError
from .tiers.pool import MAX_OBJECT, OBJECT_BYTES, PoolFull

__all__ = ["CACHE_PAGES", "Device", "Store"]

log = logging.getLogger(__name__)

_LAST_WORD = PAGE_SIZE // 8 - 1
_HUGE_BYTES = OBJECT_BYTES[PAGE_SIZE]
# At most one NoSpace warning per this many seconds (the count is in stats).
_NOSPACE_LOG_INTERVAL = 10.0
# Requests up to this many pages stage in one preallocated record (1 MiB,
# the largest FUSE write swapfs asks for).
_SCRATCH_PAGES = 256


class _SlotChanged(Exception):
    """A slot that a read-modify-write read was stored or freed before the
    write could commit: it must start over."""


class Store(StoreState):
    """Devices over a compressed memory pool and, below it, file tiers: the
    state (:class:`swapfs.state.StoreState`) and the paths that serve I/O."""

    def __init__(self, config: Config, *, cache_pages: int = CACHE_PAGES) -> None:
        super().__init__(config, cache_pages=cache_pages)
        self._last_nospace_log = -_NOSPACE_LOG_INTERVAL
        # Refault distance up to which a page counts as hot; None: the pages
        # the pool holds now (a page that would have stayed had the pool been
        # that much larger, as the kernel's workingset refault test).
        self.promote_distance: int | None = None
        # A hot page is promoted while the pool holds less than this (room
        # left; writeback then demotes colder pages below the watermarks).
        self.promote_limit_bytes = self.pool.max_bytes
        self._migrator = Migrator(self)
        self.recompressor = Recompressor(self)
        self._scratch = Staged(_SCRATCH_PAGES)
        # Slots of partly written pages whose read-modify-write is in flight:
        # key (slot_key) -> [generation, writers].  Every store or free of
        # such a slot bumps its generation.
        self._partial: dict[int, list[int]] = {}

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

    def stats(self) -> Stats:
        return store_stats.collect(self)

    def check_invariants(self, *, quiescent: bool = True) -> None:
        """Walk every table; InvariantError naming the first discrepancy
        (see :func:`swapfs.invariants.check_store`)."""
        invariants.check_store(self, quiescent=quiescent)

    # -- write ------------------------------------------------------------

    async def write(self, dev: Device, offset: int, data: object) -> int:
        """Store ``data`` at ``offset``; return its length.

        All or nothing: OutOfRange if it does not fit in the device; NoSpace
        if the pool and every file tier are full, BackingIOError if the file
        tiers failed; in every such case no slot changed.
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
        if n == PAGE_SIZE and not offset & PAGE_MASK and not self._partial \
                and self._store_page(dev, offset >> PAGE_SHIFT, mv):
            dev.written_bytes += n
            self._pool_check()
            if self.tiers:
                await self.files.punch()  # the page it replaced may have left a cluster free
            return n
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

    def _store_page(self, dev: Device, s: int, mv: memoryview) -> bool:
        """One whole page into slot ``s`` of the pool, in this step: what a
        swap-out is, without the staging the general path needs for many
        pages and file tiers.  False, with nothing changed, for every other
        case (a possibly same-filled page, one that compresses too poorly,
        a full pool): the general path (_store) then decides.  Not while a
        sub-page write is in flight (its generations are _commit's).
        A hot loop: inlines the slot encoding and the slot update."""
        q = mv.cast("Q")
        if q[0] == q[_LAST_WORD]:
            return False
        c = self.codec.compress(mv)
        n = len(c)
        if n > self.accept_limit:
            return False
        dedup = self.dedup
        if dedup is None or n > MAX_OBJECT:
            try:
                h = self.pool.alloc(c, n, dev.index << SLOT_SHIFT | s)
            except PoolFull:
                return False
        else:  # same content stored once: share an equal object, or index the new one
            hv = dedup.hash(c)
            h = dedup.find(hv, c, n)
            if h >= 0:
                dedup.share(h, n)
            else:
                try:
                    h = self.pool.alloc(c, n, dev.index << SLOT_SHIFT | s)
                except PoolFull:
                    return False
                dedup.insert(hv, h, n)
        table = dev.table
        old = table.info[s]
        if old == EMPTY:
            table.filled(s)
            dev.stored_pages += 1
        else:
            self.free_slot_content(dev, s, old)
        table.handles[s] = h
        table.info[s] = n << 4 | POOL
        table.epoch[s] = self.epoch
        dev.pool_pages += 1
        dev.compressed_bytes += n
        dev.pool_bytes += OBJECT_BYTES[n]
        return True

    def _nospace(self, dev: Device, why: str) -> None:
        dev.nospace_errors += 1
        now = time.monotonic()
        if now - self._last_nospace_log >= _NOSPACE_LOG_INTERVAL:
            self._last_nospace_log = now
            where = "every file tier is full" if self.tiers else "no lower tier configured"
            log.warning("%s: write refused, no space: %s (%s)", dev.name, why, where)

    async def _write_unaligned(self, dev: Device, offset: int, mv: memoryview) -> None:
        """A write that starts or ends inside a page: its pages are read,
        modified and stored as one run.  The partly written pages' slots are
        tracked meanwhile; if another store or free of one of them commits
        first (a concurrent write or discard), the stale copy is dropped and
        the write starts over (docs/store.md)."""
        n = mv.nbytes
        first = offset >> PAGE_SHIFT
        last = (offset + n - 1) >> PAGE_SHIFT
        npages = last - first + 1
        head = offset & PAGE_MASK
        partial = [first] if head else []
        if (offset + n) & PAGE_MASK and last not in partial:
            partial.append(last)
        keys = [self._track(dev, s) for s in partial]
        try:
            while True:
                expect = [(key, self._partial[key][0]) for key in keys]
                buf = bytearray(npages << PAGE_SHIFT)
                for s in partial:
                    o = (s - first) << PAGE_SHIFT
                    buf[o:o + PAGE_SIZE] = await self._page(dev, s)
                buf[head:head + n] = mv
                try:
                    await self._store(dev, first, memoryview(buf), npages, expect)
                    return
                except _SlotChanged:
                    continue
        finally:
            for key in keys:
                self._untrack(key)

    def _track(self, dev: Device, slot: int) -> int:
        key = slot_key(dev.index, slot)
        entry = self._partial.get(key)
        if entry is None:
            self._partial[key] = [0, 1]
        else:
            entry[1] += 1
        return key

    def _untrack(self, key: int) -> None:
        entry = self._partial[key]
        entry[1] -= 1
        if not entry[1]:
            del self._partial[key]

    async def _store(self, dev: Device, first: int, mv: memoryview, npages: int,
                     expect: list[tuple[int, int]] | None = None) -> None:
        """Store whole pages in slots ``first``..., all or nothing.

        Same-filled and compressible pages go to the pool inline; with file
        tiers (and a device whose pages may leave memory) the rest, and all
        once the pool is full, are written to file tiers first.  Then every
        slot is switched in one step.  ``expect``: tracked slots and the
        generation each must still have (else _SlotChanged, nothing stored).
        """
        spill_ok = bool(self.tiers) and dev.config.writeback
        if spill_ok or npages > _SCRATCH_PAGES:
            staged = Staged(npages)
        else:  # nothing awaits before the commit: one preallocated record serves
            staged = self._scratch
        self._stage(dev, first, mv, npages, staged, spill_ok)
        if staged.spill:
            self.staged.append(staged)
            try:
                await self._stage_file_pages(dev, mv, staged)
            except BaseException:
                self._unstage(staged)
                raise
            finally:
                self.staged.remove(staged)
        self._commit(dev, first, staged, expect)
        self._pool_check()
        if self.tiers:
            await self.files.punch()  # a rewrite may have left a cluster entirely free

    def _pool_check(self) -> None:
        """Ask for a writeback pass if the pool passed its high watermark."""
        if self.pool.pool_bytes > self.pool_high_bytes and self.kick_writeback is not None:
            self.kick_writeback()

    def _stage(self, dev: Device, first: int, mv: memoryview, npages: int, staged: Staged,
               spill_ok: bool) -> None:
        """Place ``npages`` pages of ``mv`` in the pool (or as fill words)
        without touching a slot.  With ``spill_ok``, a page that does not
        compress well enough, or finds the pool full, is left for a file
        tier (its index in ``staged.spill``); without, it is kept raw
        (huge), and a full pool raises PoolFull with nothing held.
        A hot loop: inlines the slot encoding."""
        staged.npages = npages
        staged.owner = owner = slot_key(dev.index, first)  # + idx: each object's slot
        handles = staged.handles
        info = staged.info
        spill = staged.spill
        spill.clear()
        compress = self.codec.compress
        alloc = self.pool.alloc
        limit = self.accept_limit
        dedup = self.dedup
        if dedup is not None:
            dd_hash = dedup.hash
            dd_find = dedup.find
            dd_insert = dedup.insert
            dd_limit = min(limit, MAX_OBJECT)
        q = mv.cast("Q")
        n_same = n_pool = n_huge = cbytes = pbytes = poor = 0
        shared = shared_bytes = shared_pbytes = 0
        pool_full = False
        o = idx = 0
        try:
            for idx in range(npages):
                qi = o >> 3
                if q[qi] == q[qi + _LAST_WORD] and (
                        (w := same_fill_word(mv[o:o + PAGE_SIZE])) is not None):
                    handles[idx] = w
                    info[idx] = SAME
                    n_same += 1
                elif pool_full:
                    info[idx] = 0
                    spill.append(idx)
                    self.pool_limit_hit += 1
                else:
                    page = mv[o:o + PAGE_SIZE]
                    c = compress(page)
                    n = len(c)
                    try:
                        if dedup is not None and n <= dd_limit:
                            hv = dd_hash(c)
                            h = dd_find(hv, c, n)
                            if h >= 0:
                                dedup.share(h, n)
                                shared += 1
                                shared_bytes += n
                                shared_pbytes += OBJECT_BYTES[n]
                            else:
                                h = alloc(c, n, owner + idx)
                                dd_insert(hv, h, n)
                            handles[idx] = h
                            info[idx] = n << 4 | POOL
                            n_pool += 1
                            cbytes += n
                            pbytes += OBJECT_BYTES[n]
                        elif n <= limit:
                            handles[idx] = alloc(c, n, owner + idx)
                            info[idx] = n << 4 | POOL
                            n_pool += 1
                            cbytes += n
                            pbytes += OBJECT_BYTES[n]
                        elif spill_ok:
                            info[idx] = 0
                            spill.append(idx)
                            poor += 1
                        else:
                            handles[idx] = alloc(page, PAGE_SIZE, owner + idx)
                            info[idx] = HUGE_INFO
                            n_huge += 1
                            cbytes += PAGE_SIZE
                            pbytes += _HUGE_BYTES
                    except PoolFull:
                        self.pool_limit_hit += 1
                        if not spill_ok:
                            raise
                        pool_full = True
                        info[idx] = 0
                        spill.append(idx)
                o += PAGE_SIZE
        except BaseException:
            staged.npages = idx  # pages before the failing one hold what to give back
            self._unstage(staged)
            raise
        self.reject_compress_poor += poor
        staged.same = n_same
        staged.pool = n_pool
        staged.huge = n_huge
        staged.cbytes = cbytes
        staged.pbytes = pbytes
        staged.shared = shared
        staged.shared_bytes = shared_bytes
        staged.shared_pbytes = shared_pbytes

    async def _stage_file_pages(self, dev: Device, mv: memoryview, staged: Staged) -> None:
        """Write the pages ``staged.spill`` (indexes into ``mv``) to file
        tiers and record where they went in ``staged``; no slot changes.

        Tiers are tried by priority, round-robin within equal priority; a
        tier whose filesystem says ENOSPC counts as full and the pages move
        on to the next.  NoSpace (or BackingIOError) if some pages found no
        room; the caller then gives back everything staged.  The written
        pages stay counted in flight (``FileTierSet.inflight``) until the
        commit or the give-back.
        """
        files = self.files
        handles = staged.handles
        info = staged.info
        todo = staged.spill
        errors: list[str] = []
        broken: set[int] = set()  # tiers that failed with an I/O error in this request
        while todo:
            grants = files.allocate(len(todo), broken)
            if not grants:
                break
            retry: list[int] = []
            pos = 0
            try:
                while grants:
                    ti, runs, count = grants[0]
                    chunk = todo[pos:pos + count]
                    pos += count
                    pages = [mv[idx << PAGE_SHIFT:(idx + 1) << PAGE_SHIFT] for idx in chunk]
                    del grants[0]  # the tier's write frees the pages if it fails
                    files.inflight[ti] += count
                    try:
                        await files[ti].write(runs, pages)
                    except TierFull as e:  # the filesystem under a sparse tier is full
                        log.warning("%s; trying the next tier", e)
                        retry += chunk
                        files.inflight[ti] -= count
                        continue
                    except TierIOError as e:
                        errors.append(str(e))
                        broken.add(ti)
                        retry += chunk
                        files.inflight[ti] -= count
                        continue
                    except BaseException:
                        files.inflight[ti] -= count
                        raise
                    kind = file_kind(ti)
                    for idx, page in zip(chunk, run_pages(runs)):
                        handles[idx] = page
                        info[idx] = kind
            finally:
                for g in grants:  # allocated, never written
                    files[g.tier].free_runs(g.runs)
            retry += todo[pos:]  # the tiers had room for fewer pages than asked
            todo = retry
        if todo:
            if errors:
                raise BackingIOError(f"{dev.name}: {len(todo)} pages not written: {errors[-1]}")
            raise NoSpace(f"{dev.name}: {len(todo)} pages found no room: the pool and every "
                          "file tier are full")

    def _unstage(self, staged: Staged) -> None:
        """Give back everything ``staged`` holds (nothing was committed)."""
        info = staged.info
        handles = staged.handles
        for idx in range(staged.npages):
            i = info[idx]
            if in_pool(i):
                self.free_object(handles[idx], length_of(i))
            elif in_file(i):
                ti = tier_of_kind(kind_of(i))
                self.files.inflight[ti] -= 1
                self.files[ti].free((handles[idx],))
            info[idx] = 0

    def _commit(self, dev: Device, first: int, staged: Staged,
                expect: list[tuple[int, int]] | None) -> None:
        """Switch slots ``first``... to what ``staged`` holds, freeing their
        old content; no await.  _SlotChanged (after giving everything back)
        if a tracked slot's generation is not what ``expect`` says.
        A hot loop: inlines the slot encoding and the slot update."""
        partial = self._partial
        if expect is not None:
            for key, gen in expect:
                if partial[key][0] != gen:
                    self._unstage(staged)
                    raise _SlotChanged
        table = dev.table
        handles = table.handles
        info = table.info
        epoch = table.epoch
        new_h = staged.handles
        new_i = staged.info
        ep = self.epoch
        track = partial if partial else None
        base = slot_key(dev.index, 0)
        filled = table.filled
        stored = 0
        for idx in range(staged.npages):
            s = first + idx
            old = info[s]
            if old == EMPTY:
                stored += 1
                filled(s)
            else:  # a rewrite: rare on the swap path (freed slots are discarded)
                self.free_slot_content(dev, s, old)
            handles[s] = new_h[idx]
            info[s] = new_i[idx]
            epoch[s] = ep
            if track is not None and (entry := track.get(base | s)) is not None:
                entry[0] += 1
        nfile = len(staged.spill)
        if nfile:
            inflight = self.files.inflight
            for idx in staged.spill:
                inflight[(new_i[idx] & KIND_MASK) - FILE0] -= 1
        dev.stored_pages += stored
        dev.same_filled_pages += staged.same
        dev.pool_pages += staged.pool
        dev.huge_pages += staged.huge
        dev.compressed_bytes += staged.cbytes
        dev.pool_bytes += staged.pbytes
        dev.file_pages += nfile

    # -- read -------------------------------------------------------------

    async def read(self, dev: Device, offset: int, size: int) -> bytes | bytearray:
        """Up to ``size`` bytes at ``offset``; short (or empty) past the end.

        Never-written and discarded ranges read as zeros.
        """
        if size == PAGE_SIZE and not offset & PAGE_MASK and 0 <= offset < dev.size_bytes:
            # One compressed page, what a swap-in asks for: answered without
            # the general path's calls (a few tenths of a microsecond each);
            # a hot loop, inlining the slot encoding.
            slot = offset >> PAGE_SHIFT
            table = dev.table
            if table.info[slot] & KIND_MASK == POOL:
                dev.reads += 1
                dev.read_bytes += PAGE_SIZE
                table.epoch[slot] = self.epoch
                return self.load_page(dev, slot)
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
        if in_file(dev.table.info[slot]):
            out = bytearray(PAGE_SIZE)
            await self._read_file_pages(dev, out, [(0, slot)])
            return bytes(out)
        if dev.table.info[slot]:  # (an empty slot's cluster may hold no memory: leave it so)
            dev.table.epoch[slot] = self.epoch
        return self.load_page(dev, slot)

    async def _read_pages(self, dev: Device, first: int, npages: int) -> bytearray:
        """A hot loop: inlines the slot encoding."""
        out = bytearray(npages << PAGE_SHIFT)
        table = dev.table
        handles = table.handles
        info = table.info
        epoch = table.epoch
        ep = self.epoch
        pool = self.pool
        mem = pool.mem
        decompress = self.codec.decompress
        redecompress = self.recodec.decompress if self.recodec is not None else decompress
        on_disk: list[tuple[int, int]] | None = None
        o = 0
        for s in range(first, first + npages):
            i = info[s]
            if i:
                k = i & KIND_MASK
                h = handles[s]
                if k == POOL:
                    out[o:o + PAGE_SIZE] = (redecompress if i & ALT else decompress)(
                        mem[h:h + ((i >> 4) & LENGTH_MASK)])
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
                    raise InvariantError(f"{dev.name}: slot {s} has unknown kind {k}")
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
                if not in_file(i):  # it left the file tiers meanwhile
                    out[o:o + PAGE_SIZE] = self.load_page(dev, s)
                    continue
                ti = tier_of_kind(kind_of(i))
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
                    kind = file_kind(ti)
                    for (o, s, p), page in zip(items, data):
                        i = info[s]
                        if kind_of(i) == kind and handles[s] == p:
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
        self.moves.refaults[tier_level(ti)] += 1
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
        staged = Staged(1)
        self._stage(dev, s, memoryview(page), 1, staged, True)  # type: ignore[arg-type]
        if staged.spill:  # it would not stay in the pool: nothing was allocated
            return False
        self._commit(dev, s, staged, None)
        self.moves.promotions[tier_level(ti)] += 1
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
        await self._write_unaligned(dev, (slot << PAGE_SHIFT) + a, memoryview(bytes(b - a)))

    def _free_slots(self, dev: Device, first: int, end: int) -> None:
        table = dev.table
        handles = table.handles
        info = table.info
        track = self._partial if self._partial else None
        base = slot_key(dev.index, 0)
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
                table.emptied(s)
                if track is not None and (entry := track.get(base | s)) is not None:
                    entry[0] += 1
        dev.stored_pages -= freed

