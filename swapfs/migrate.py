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

from .cache import file_key
from .errors import Misuse
from .fileset import Grant, run_pages, to_runs
from .slots import POOL_LEVEL, level_tier, movable, tier_level
from .state import Device, StoreState
from .tiers.file import TierFull, TierIOError

log = logging.getLogger(__name__)


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
    """Moves pages of one store's state.  One migration at a time."""

    def __init__(self, state: StoreState) -> None:
        self.state = state
        self.files = state.files
        self.cache = state.cache
        self.counters = state.moves
        self._running = False

    async def migrate(self, victims: list[tuple[Device, int]], src: int) -> int:
        """Move the pages of ``victims`` from level ``src`` (0: the pool,
        1 + i: file tier i) to the first file tiers below it with room;
        return how many moved."""
        if not len(self.files) or not victims:
            return 0
        if self._running:
            raise Misuse("one migration at a time (Writeback holds a lock)")
        self._running = True
        try:
            return await self._migrate(victims, src)
        finally:
            self._running = False

    async def _migrate(self, victims: list[tuple[Device, int]], src: int) -> int:
        files = self.files
        min_group = 0
        if src:
            min_group = files.group_of(level_tier(src)) + 1
            if min_group > files.last_group:
                return 0
        mask, want = movable(src)
        moves = [Move(dev, s, dev.table.handles[s], 0)
                 for dev, s in victims if dev.table.info[s] & mask == want]
        if not moves:
            return 0
        grants = files.allocate(len(moves), min_group=min_group)
        del moves[sum(g.npages for g in grants):]
        if not moves:
            return 0
        state = self.state
        for mv in moves:
            mv.info = state.flag_moving(mv.dev, mv.slot)
        for g in grants:
            files.inflight[g.tier] += g.npages
        todo = list(grants)  # grants neither written nor given back yet
        pins: list[int] = []
        moved = 0
        try:
            if src == POOL_LEVEL:
                load = state.load_page
                for mv in moves:
                    mv.data = load(mv.dev, mv.slot)
            else:
                await self._copy_from_file(level_tier(src), moves, pins)
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
                state.unflag_moving(mv.dev, mv.slot, mv.info)
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
        commit = self.state.commit_move
        moved = 0
        aborted: list[int] = []
        for mv in live:
            if commit(mv.dev, mv.slot, mv.info, mv.handle, src, ti, mv.dest):
                moved += 1
            else:
                aborted.append(mv.dest)
                self.cache.invalidate(file_key(ti, mv.dest))
        c = self.counters
        if aborted:
            self.files[ti].free(aborted)
            c.aborted += len(aborted)
        if moved:
            c.moved += moved
            c.demotions[src] += moved
            pair = c.pairs.setdefault((src, tier_level(ti)), [0, 0])
            pair[0] += moved
            pair[1] += 1
        return moved
