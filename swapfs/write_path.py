"""The write path: staging, the one-step commit, sub-page writes, discard
and promotion.

:class:`WritePath` is the read path (:class:`swapfs.read_path.ReadPath`,
over the state layer) with ``write`` and ``discard`` on top; the facade
:class:`swapfs.store.Store` adds migration, recompression, stats and the
consistency check.

A write is all or nothing: its pages are staged (placed in the pool, as
fill words, or written to fresh file pages) without touching a slot, then
every slot of the request is switched in one step with no await
(``_commit``); a sub-page write reads its partial pages first and commits
only if no other store or free of them came in between.  One whole page
into the pool, what a swap-out is, takes a shorter road in one step
(``_store_page``).  docs/store.md has the rules.
"""

from __future__ import annotations

import logging
import time

from .codec import same_fill_word
from .config import Config
from .errors import BackingIOError, NoSpace, OutOfRange
from .kernel import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from .memory import StateMemory
from .read_path import ReadPath
from .slots import (
    EMPTY,
    FILE0,
    HUGE_INFO,
    KIND_MASK,
    POOL,
    PROMOTED_MARK,
    SAME,
    SLOT_SHIFT,
    UNREAD_MARK,
    file_info,
    in_file,
    in_pool,
    kind_of,
    length_of,
    slot_key,
    tier_level,
    tier_of_kind,
)
from .state import CACHE_PAGES, Device, Staged
from .tiers.file import RAW, TierFull, TierIOError
from .tiers.pool import MAX_OBJECT, OBJECT_BYTES, PoolFull

log = logging.getLogger(__name__)

# A write that finds every file tier out of room, but some tier's cleaning could make it,
# waits for the writeback task's cleaning this many times, this long each, before NoSpace.
ROOM_WAITS = 16
ROOM_WAIT_SECONDS = 0.5

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


class WritePath(ReadPath):
    """The state and the paths that read and change it."""

    def __init__(self, config: Config, *, cache_pages: int = CACHE_PAGES,
                 memory: StateMemory | None = None) -> None:
        super().__init__(config, cache_pages=cache_pages, memory=memory)
        self._last_nospace_log = -_NOSPACE_LOG_INTERVAL
        self._scratch = Staged(_SCRATCH_PAGES)
        # Slots of partly written pages whose read-modify-write is in flight:
        # key (slot_key) -> [generation, writers].  Every store or free of
        # such a slot bumps its generation.
        self._partial: dict[int, list[int]] = {}

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
        if old == EMPTY:  # the info word is the commit (docs/store.md)
            table.filled(s)
            dev.stored_pages += 1
            table.handles[s] = h
            table.info[s] = n << 4 | POOL
        else:  # a rewrite: journaled (StoreState.journal_switch, inline)
            j = self.journal
            oh = j[1] = table.handles[s]
            j[2] = old
            key = dev.index << SLOT_SHIFT | s
            j[0] = key + 1
            table.handles[s] = h
            table.info[s] = n << 4 | POOL
            j[0] = 0
            self.free_slot_content(dev, s, old, oh)
        table.epoch[s] = self.epoch | UNREAD_MARK  # (swapfs/policy.py)
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
        owner = staged.owner
        # Each page as the object it will be: compressed with the pool's
        # codec if that saves anything (a page that found the pool full
        # usually does), else raw.
        compress = self.codec.compress
        cid = self.codec.id
        objs: dict[int, tuple[int, bytes]] = {}
        for idx in staged.spill:
            page = mv[idx << PAGE_SHIFT:(idx + 1) << PAGE_SHIFT]
            c = compress(page)
            objs[idx] = (cid, c) if len(c) < PAGE_SIZE else (RAW, bytes(page))
        todo = staged.spill
        errors: list[str] = []
        broken: set[int] = set()  # tiers that failed with an I/O error in this request
        waits = 0
        while todo:
            lengths = [len(objs[idx][1]) for idx in todo]
            grants = files.allocate(lengths, broken)
            if not grants:
                if files.punch_pending:  # emptied segments wait for their punch: reuse them
                    await files.punch()
                    continue
                # out of room but not full: the writeback task cleans (a write, not a
                # fault, waits for it; a bounded number of times)
                if waits < ROOM_WAITS and await files.wait_for_room(ROOM_WAIT_SECONDS):
                    waits += 1
                    continue
                break
            for g in grants:
                files.inflight[g.tier] += g.npages
            retry: list[int] = []
            pos = 0
            try:
                while grants:
                    ti, hs, count = grants[0]
                    chunk = todo[pos:pos + count]
                    pos += count
                    del grants[0]  # the tier's write frees the objects if it fails
                    try:
                        await files[ti].write(hs, [(owner + idx, *objs[idx]) for idx in chunk])
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
                    for idx, h in zip(chunk, hs):
                        handles[idx] = h
                        info[idx] = file_info(ti, len(objs[idx][1]))
            finally:
                gpos = pos
                for g in grants:  # allocated, never written
                    files.give_back(g, lengths[gpos:gpos + g.npages])
                    files.inflight[g.tier] -= g.npages
                    gpos += g.npages
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
                self.files[ti].free(handles[idx], length_of(i))
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
        ep = self.epoch | UNREAD_MARK  # written, not read since (swapfs/policy.py)
        track = partial if partial else None
        base = slot_key(dev.index, 0)
        filled = table.filled
        stored = 0
        for idx in range(staged.npages):
            s = first + idx
            old = info[s]
            if old == EMPTY:  # the info word is the commit (docs/store.md)
                stored += 1
                filled(s)
                handles[s] = new_h[idx]
                info[s] = new_i[idx]
            else:  # a rewrite: rare on the swap path (freed slots are discarded)
                j = self.journal  # journaled (StoreState.journal_switch, inline)
                oh = j[1] = handles[s]
                j[2] = old
                j[0] = (base | s) + 1
                handles[s] = new_h[idx]
                info[s] = new_i[idx]
                j[0] = 0
                self.free_slot_content(dev, s, old, oh)
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
        dev.table.epoch[s] = self.epoch | PROMOTED_MARK  # not read since (swapfs/policy.py)
        self.moves.promotions[tier_level(ti)] += 1
        self._pool_check()  # make room again: demote what is colder
        return True

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
                h = handles[s]
                info[s] = 0  # the commit: the slot is empty from here on
                handles[s] = 0
                self.free_slot_content(dev, s, old, h)
                table.emptied(s)
                if track is not None and (entry := track.get(base | s)) is not None:
                    entry[0] += 1
        dev.stored_pages -= freed
