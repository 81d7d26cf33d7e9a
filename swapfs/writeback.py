"""Writeback: the policy that moves cold pages down the tiers.

One :class:`Writeback` per store (per mount), run as a trio task
(``await nursery.start(wb.run)``, or ``async with open_writeback(store)``).
It drives the access clock (``Store.set_epoch``, EPOCHS_PER_SECOND times a
second on trio's clock, so MockClock drives it in tests), balances the
tiers against their watermarks, and serves explicit requests (the
``user.swapfs.ctl.writeback`` xattr).  While it runs, the store asks it for
a pass through the callback it registers (``Store.set_writeback_kicker``).
The mechanism, copy then commit only if the slot did not change, is
``Store.migrate``; see docs/writeback.md.

Victims: chosen by the store's policy (swapfs/policy.py: the coldest pages
of the source tier in a window of the slot tables that a cursor per level
walks round, ``swapfs.state.SlotCursor``; CLOCK-like sampling: scanning
every slot per batch would cost more than the move).
Devices whose config says ``writeback = false`` are never scanned.

One migration at a time (a lock): concurrent moves of one slot could
otherwise pass each other's commit check.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
import trio.lowlevel

from .fileset import LowerTier
from .slots import POOL_LEVEL, level_tier, tier_level
from .state import SlotCursor
from .store import Device, Store
from .tiers.file import CLUSTER_PAGES
from .tiers.pool import COMPACT_HOLES

log = logging.getLogger(__name__)

# The access clock's units per second (store.epoch; see docs/writeback.md).
EPOCHS_PER_SECOND = 4
# Pages per migration: one cluster, one pwritev.  A request (not the
# watermarks, which should not overshoot the low one by much) takes
# REQUEST_BATCH_PAGES at a time, moved in chunks of a cluster with several
# writes in flight (swapfs/migrate.py).
BATCH_PAGES = CLUSTER_PAGES
REQUEST_BATCH_PAGES = 4 * CLUSTER_PAGES
# The pool is compacted when its holes pass COMPACT_HOLES (swapfs.tiers.pool),
# in steps of at most this many objects (one step of the trio loop: a few
# milliseconds).
COMPACT_STEP = 2048
# Recompression (swapfs/recompress.py): pages per step (one step of the trio
# loop, about 1 ms: lz4 decompress + zstd compress is some 15 us a page) and
# per writeback pass (4 passes a second at rest).
RECOMPRESS_STEP = 64
RECOMPRESS_PER_PASS = 1024
# Segments a writeback pass cleans at most, per file tier (one step each: a
# segment's read, one append of its live objects).
CLEAN_SEGMENTS_PER_PASS = 16


class Writeback:
    def __init__(self, store: Store, *, interval: float = 1.0 / EPOCHS_PER_SECOND,
                 throttle: float = 0.002) -> None:
        self.store = store
        self.interval = interval
        self.throttle = throttle  # pause between batches while foreground I/O runs
        self._wake = trio.Event()
        self._passed = trio.Event()  # set at the end of each pass of run()
        self._lock = trio.Lock()
        self._cursors: dict[int, SlotCursor] = {}  # by source level
        self.busy = False  # a pass is running

    @property
    def pending(self) -> bool:
        """A pass is running or has been asked for."""
        return self.busy or self._wake.is_set()

    async def settle(self) -> None:
        """Wait until no pass runs or is asked for (replay runs requests
        between passes, never during one, so that it is deterministic)."""
        while self.pending:
            await self.next_pass()

    # -- the task ---------------------------------------------------------

    def kick(self) -> None:
        """Ask for a balance pass soon (called by the store, no await)."""
        self._wake.set()

    async def next_pass(self) -> None:
        """Wait until the task's next pass (balance and recompression) ends."""
        await self._passed.wait()

    def tick(self) -> None:
        """Advance the store's access clock to trio's clock."""
        self.store.set_epoch(int(trio.current_time() * EPOCHS_PER_SECOND))

    async def run(self, *, task_status: trio.TaskStatus[Writeback] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Balance the tiers whenever kicked or every ``interval``; forever.
        While it runs, the store kicks it when the pool passes its high
        watermark."""
        store = self.store
        self.tick()
        store.set_writeback_kicker(self.kick)
        self.busy = True  # the first pass starts at once
        try:
            task_status.started(self)
            while True:
                self._wake = trio.Event()
                self.busy = True
                self.tick()
                try:
                    await self.balance()
                    if store.recodec is not None:
                        await self.recompress()
                except Exception:  # never let a failing tier take the mount down
                    log.exception("writeback pass failed")
                self.busy = False
                self._passed.set()
                self._passed = trio.Event()
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
        finally:
            self.busy = False
            store.set_writeback_kicker(None)

    # -- policy -----------------------------------------------------------

    async def balance(self) -> int:
        """Bring every tier above the last under its low watermark if it is
        above its high one; return the pages moved."""
        store = self.store
        moved = 0
        pool = store.pool
        if pool.pool_bytes > store.pool_high_bytes:
            # The memory held, after compaction, is what is drained to the low
            # watermark: demotion frees objects scattered over spans, and
            # compaction turns those holes into released spans.
            low = store.pool_low_bytes
            await self.compact(until_bytes=low)
            if store.tiers and pool.pool_bytes > low:
                moved += await self._drain(POOL_LEVEL, lambda: self._pool_above(low),
                                           urgent=True)
            if pool.pool_bytes > low:
                pool.release_spares()
        for ti, (tier, tc) in enumerate(zip(store.tiers, store.config.tiers)):
            if not store.files.has_lower(ti):
                continue
            if tier.used_pages > tc.high_watermark * tier.capacity_pages:
                low_pages = tc.low_watermark * tier.capacity_pages

                def above_low(t: LowerTier = tier, lo: float = low_pages) -> bool:
                    return t.used_pages > lo

                moved += await self._drain(tier_level(ti), above_low, urgent=True)
        await self.clean()
        return moved

    async def clean(self, *, limit: int = CLEAN_SEGMENTS_PER_PASS) -> int:
        """Clean the file tiers whose free segments run low, a segment per
        step (the best by cost and benefit first), at most ``limit`` segments a pass;
        returns the objects re-appended."""
        store = self.store
        moved = 0
        for ti, tier in enumerate(store.tiers):
            budget = limit
            while budget > 0 and tier.needs_cleaning:
                async with self._lock:
                    got = await store.clean(ti, 1)
                budget -= 1
                moved += got
                await self._yield(False)
        return moved

    async def clean_now(self, ti: int, segments: int = 1) -> int:
        """Clean up to ``segments`` segments of file tier ``ti`` now, needed
        or not, any sealed segment with dead bytes (between migrations: the
        same lock); the objects moved."""
        async with self._lock:
            return await self.store.clean(ti, segments, max_live=1.0)

    async def recompress(self, *, limit: int = RECOMPRESS_PER_PASS) -> int:
        """Recompress pool pages idle for ``pool.recompress_after`` (see
        swapfs/recompress.py) in steps of RECOMPRESS_STEP with a checkpoint
        between them, up to ``limit`` per call; returns the pages switched."""
        store = self.store
        age = int(store.config.pool.recompress_after * EPOCHS_PER_SECOND)
        converted = 0
        while limit > 0:
            handled, got = store.recompressor.step(min(RECOMPRESS_STEP, limit), age)
            converted += got
            limit -= handled
            if handled < RECOMPRESS_STEP:
                break
            await trio.lowlevel.checkpoint()
        if converted and store.pool.holes > COMPACT_HOLES:
            # the objects given up are scattered over spans: give the memory back
            await self.compact(holes=COMPACT_HOLES)
        return converted

    def _pool_above(self, mark: int) -> bool:
        """The pool holds more than ``mark`` bytes, after a compaction step
        if its holes passed COMPACT_HOLES (no await)."""
        pool = self.store.pool
        if pool.pool_bytes <= mark:
            return False
        if pool.holes > COMPACT_HOLES:
            self.store.compact(COMPACT_STEP)
        return pool.pool_bytes > mark

    async def compact(self, *, until_bytes: int = 0, holes: float | None = None) -> tuple[int, int]:
        """Compact the pool in steps (checkpoints between them) while its
        holes pass ``holes`` (default COMPACT_HOLES with ``until_bytes``, else
        0) and it holds more than ``until_bytes``; return (objects moved,
        bytes released).  Neither given: a full compaction
        (``user.swapfs.ctl.compact``)."""
        pool = self.store.pool
        threshold = holes if holes is not None else COMPACT_HOLES if until_bytes else 0.0
        moved = freed = 0
        while pool.pool_bytes > until_bytes and pool.holes > threshold:
            m, f = self.store.compact(COMPACT_STEP)
            moved += m
            freed += f
            if not m:
                break
            await trio.lowlevel.checkpoint()
        return moved, freed

    async def _drain(self, src: int, more: Callable[[], bool], *, urgent: bool,
                     limit: int | None = None,
                     devices: list[Device] | None = None, idle_before: int | None = None,
                     now: int | None = None) -> int:
        moved = 0
        budget = limit if limit is not None else self._stored_at(src)
        batch = BATCH_PAGES if urgent else REQUEST_BATCH_PAGES
        while more() and budget > 0:
            want = min(batch, budget)
            async with self._lock:
                victims = self.select(src, want, devices=devices, idle_before=idle_before,
                                      now=now, whole_round=not urgent)
                if not victims:
                    break
                got = await self.store.migrate(victims, src)
            if not got:
                break
            moved += got
            budget -= len(victims)
            await self._yield(urgent)
        return moved

    def _stored_at(self, src: int) -> int:
        store = self.store
        if src == POOL_LEVEL:
            return store.pool.objects
        return store.tiers[level_tier(src)].stored_pages

    def _foreground(self) -> int:
        return sum(d.reads + d.writes + d.discards for d in self.store.devices)

    async def _yield(self, urgent: bool) -> None:
        """Between batches: let every waiting request run first; when not
        urgent and requests keep coming, pause ``throttle`` seconds."""
        before = self._foreground()
        await trio.lowlevel.checkpoint()
        if not urgent and self._foreground() != before:
            await trio.sleep(self.throttle)

    def _devices(self, devices: list[Device] | None) -> list[Device]:
        return [d for d in (devices or self.store.devices) if d.config.writeback]

    def select(self, src: int, n: int, *, devices: list[Device] | None = None,
               idle_before: int | None = None, now: int | None = None,
               whole_round: bool = False) -> list[tuple[Device, int]]:
        """Up to ``n`` cold pages of level ``src``, as the store's policy
        chooses them (swapfs/policy.py) from the level's cursor.  With
        ``idle_before`` (an age in epochs), only pages not accessed for at
        least that long, in slot order (the cursor walks the tables once per
        request); ``now`` is the epoch the age counts from (the request's,
        not the clock's while the request runs); ``whole_round``: a request's
        search, which walks on (one round at most) while it finds nothing."""
        cursor = self._cursors.setdefault(src, SlotCursor())
        return self.store.policy.select(cursor, self._devices(devices), src, n,
                                        idle_before=idle_before, now=now,
                                        whole_round=whole_round)

    # -- requests (user.swapfs.ctl.writeback) ------------------------------

    async def writeback_pages(self, n: int, device: Device | None = None) -> int:
        """Move up to ``n`` of the pool's coldest pages down now."""
        self.store.moves.requests += 1
        if not self.store.tiers or n <= 0:
            return 0
        return await self._drain(POOL_LEVEL, lambda: True, urgent=False, limit=n,
                                 devices=[device] if device else None)

    async def writeback_idle(self, seconds: float, device: Device | None = None) -> int:
        """Move down every pool page not accessed for ``seconds`` or more."""
        self.store.moves.requests += 1
        if not self.store.tiers:
            return 0
        self.tick()
        age = max(int(seconds * EPOCHS_PER_SECOND), 0)
        devs = [device] if device else None
        start = self._cursors.get(POOL_LEVEL)
        self._cursors[POOL_LEVEL] = SlotCursor()  # one full walk, from the start
        try:
            return await self._drain(POOL_LEVEL, lambda: True, urgent=False, devices=devs,
                                     idle_before=age, now=self.store.epoch)
        finally:
            if start is not None:
                self._cursors[POOL_LEVEL] = start


@contextlib.asynccontextmanager
async def open_writeback(store: Store, **kw: Any) -> AsyncIterator[Writeback]:
    """Run a store's writeback task for the length of the block."""
    wb = Writeback(store, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        try:
            yield wb
        finally:
            nursery.cancel_scope.cancel()
