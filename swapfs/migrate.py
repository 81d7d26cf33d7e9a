"""Migration: the mechanism that moves pages down the tiers.

The policy (which pages, when) is swapfs/writeback.py; this module moves
the pages it is given, by the rule of docs/writeback.md:

1. each slot still at the source level is flagged MOVING and its content
   copied (decompressed from the pool, or read from its file tier with the
   page pinned);
2. the copies are written to freshly allocated pages of the first file
   tiers below with room, as contiguous extents;
3. then, with no await in between, each slot whose info and handle are
   exactly what was copied is switched to its new page, leaving a shadow,
   and its old place is freed.  Any write, discard or promotion meanwhile
   replaced the info word and so cleared MOVING: that slot keeps its new
   content and the copy is freed (``aborted_moves``).

Until the commit a read finds the page where it was, or in the swap cache.
Cancellation at any await leaves every slot as it was.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .cache import file_key
from .fileset import Grant, run_pages, to_runs
from .slots import EPOCH_MASK, FILE0, MOVING, SHADOW, movable
from .tiers.file import TierFull, TierIOError

if TYPE_CHECKING:
    from .store import Device, Store

log = logging.getLogger(__name__)


class MoveCounters:
    """Counters of migration, refaults and promotions, per level (0: the
    pool, 1 + i: file tier i) where it matters."""

    __slots__ = ("moved", "aborted", "batches", "failed_batches", "requests", "demotions",
                 "refaults", "promotions", "pairs")

    def __init__(self, levels: int) -> None:
        self.moved = 0  # pages demoted (committed moves)
        self.aborted = 0  # copies dropped because their slot changed
        self.batches = 0  # migrations that committed at least one page
        self.failed_batches = 0  # tier writes that failed
        self.requests = 0  # explicit writeback requests served
        self.demotions = [0] * levels  # by source level
        self.refaults = [0] * levels
        self.promotions = [0] * levels
        # (source level, destination level) -> [pages, batches]
        self.pairs: dict[tuple[int, int], list[int]] = {}


class Move:
    """One page in a migration: its slot, what the slot held when copied,
    the copy, and the destination page once granted."""

    __slots__ = ("dev", "slot", "handle", "info", "data", "dest")

    def __init__(self, dev: Device, slot: int, handle: int, info: int) -> None:
        self.dev = dev
        self.slot = slot
        self.handle = handle
        self.info = info  # with MOVING set
        self.data: bytes | None = None
        self.dest = -1

    def unchanged(self) -> bool:
        """The slot still holds exactly what was copied (and MOVING)."""
        table = self.dev.table
        return table.info[self.slot] == self.info and table.handles[self.slot] == self.handle


class Migrator:
    """Moves pages of one store.  One migration at a time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.files = store.files
        self.cache = store.cache
        self.counters = MoveCounters(1 + len(store.files))
        self._running = False
        self.moving = 0  # slots flagged MOVING by the migration in flight

    async def migrate(self, victims: list[tuple[Device, int]], src: int) -> int:
        """Move the pages of ``victims`` from level ``src`` (0: the pool,
        1 + i: file tier i) to the first file tiers below it with room;
        return how many moved."""
        if not len(self.files) or not victims:
            return 0
        if self._running:
            raise RuntimeError("one migration at a time (Writeback holds a lock)")
        self._running = True
        try:
            return await self._migrate(victims, src)
        finally:
            self._running = False

    async def _migrate(self, victims: list[tuple[Device, int]], src: int) -> int:
        files = self.files
        min_group = 0
        if src:
            min_group = files.group_of(src - 1) + 1
            if min_group > files.last_group:
                return 0
        mask, want = movable(src)
        moves = [Move(dev, s, dev.table.handles[s], i | MOVING)
                 for dev, s in victims if (i := dev.table.info[s]) & mask == want]
        if not moves:
            return 0
        grants = files.allocate(len(moves), min_group=min_group)
        del moves[sum(g.npages for g in grants):]
        if not moves:
            return 0
        for mv in moves:
            mv.dev.table.info[mv.slot] = mv.info
        self.moving += len(moves)
        for g in grants:
            files.inflight[g.tier] += g.npages
        todo = list(grants)  # grants neither written nor given back yet
        pins: list[int] = []
        moved = 0
        try:
            if src == 0:
                load = self.store.load_page
                for mv in moves:
                    mv.data = load(mv.dev, mv.slot)
            else:
                await self._copy_from_file(src - 1, moves, pins)
            pos = 0
            while todo:
                grant = todo.pop(0)
                chunk = moves[pos:pos + grant.npages]
                pos += grant.npages
                moved += await self._write_and_commit(grant, chunk, src)
        finally:
            for g in todo:  # never written: give the pages back
                files[g.tier].free_runs(g.runs)
                files.inflight[g.tier] -= g.npages
            for mv in moves:  # whatever did not commit keeps its place
                if mv.dev.table.info[mv.slot] == mv.info:
                    mv.dev.table.info[mv.slot] = mv.info & ~MOVING
            self.moving -= len(moves)
            if pins:
                files.unpin(pins)
        if moved:
            self.counters.batches += 1
        await files.punch()
        return moved

    async def _write_and_commit(self, grant: Grant, chunk: list[Move], src: int) -> int:
        """Write the copies of ``chunk`` to the pages of ``grant`` and commit
        the moves whose slots did not change meanwhile."""
        files = self.files
        ti = grant.tier
        tier = files[ti]
        live: list[Move] = []
        copies: list[bytes] = []
        dead: list[int] = []
        for mv, page in zip(chunk, run_pages(grant.runs)):
            if mv.data is not None and mv.dev.table.info[mv.slot] == mv.info:
                mv.dest = page
                live.append(mv)
                copies.append(mv.data)
            else:  # the slot changed before the copy was written
                dead.append(page)
        if dead:
            tier.free(dead)
            files.inflight[ti] -= len(dead)
            self.counters.aborted += len(dead)
        if not live:
            return 0
        cache = self.cache
        for mv, data in zip(live, copies):  # the page in flight
            cache.put(file_key(ti, mv.dest), data)
        ok = False
        try:
            await tier.write(to_runs([mv.dest for mv in live]), copies)
            ok = True
        except (TierFull, TierIOError) as e:  # the tier gave the pages back
            log.warning("writeback to %s failed: %s", tier.name, e)
            self.counters.failed_batches += 1
        finally:
            files.inflight[ti] -= len(live)
            if not ok:  # cancelled or failed: the tier gave the pages back
                for mv in live:
                    cache.invalidate(file_key(ti, mv.dest))
        return self._commit(live, src, ti) if ok else 0

    async def _copy_from_file(self, ti: int, moves: list[Move], pins: list[int]) -> None:
        """Fill the copies of ``moves`` (slots of file tier ``ti``) from the
        swap cache or the tier, their pages pinned (``pins``) until the move
        ends.  A slot that changed during the read keeps no copy."""
        cache = self.cache
        pins += self.files.pin(ti, [mv.handle for mv in moves])
        todo: list[Move] = []
        for mv in moves:
            hit = cache.get(file_key(ti, mv.handle))
            if hit is not None:
                mv.data = bytes(hit)
            else:
                todo.append(mv)
        if not todo:
            return
        todo.sort(key=lambda mv: mv.handle)
        data = await self.files[ti].read_many([mv.handle for mv in todo])
        for mv, page in zip(todo, data):
            if mv.unchanged():
                mv.data = page
                cache.put(file_key(ti, mv.handle), page)  # in flight

    def _commit(self, live: list[Move], src: int, ti: int) -> int:
        """Switch each slot of ``live`` still holding what was copied to its
        new page of tier ``ti``; free the new page of the others.  No await."""
        store = self.store
        moved = 0
        aborted: list[int] = []
        dst_info = FILE0 + ti | SHADOW
        for mv in live:
            if not mv.unchanged():
                aborted.append(mv.dest)
                self.cache.invalidate(file_key(ti, mv.dest))
                continue
            dev, s = mv.dev, mv.slot
            table = dev.table
            if src == 0:
                store.free_slot_content(dev, s, mv.info)  # the pool object (MOVING still set)
                dev.file_pages += 1
            else:
                self.files.free_page(src - 1, mv.handle)  # pinned: freed when the move unpins
            table.handles[s] = mv.dest
            table.info[s] = dst_info
            table.epoch[s] = store.demotions & EPOCH_MASK
            store.demotions += 1
            moved += 1
        c = self.counters
        if aborted:
            self.files[ti].free(aborted)
            c.aborted += len(aborted)
        if moved:
            c.moved += moved
            c.demotions[src] += moved
            pair = c.pairs.setdefault((src, 1 + ti), [0, 0])
            pair[0] += moved
            pair[1] += 1
        return moved
