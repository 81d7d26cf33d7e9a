"""Migration: the mechanism that moves pages down the tiers, and cleans
the file tiers' segments.

The policy (which pages, when) is swapfs/writeback.py; this module moves
the pages it is given, by the rule of docs/writeback.md:

1. each slot still at the source level is flagged MOVING and its object
   copied as it is stored, still compressed (from the pool's memory, or
   read and verified from its file tier with the object pinned); a tier
   with ``recompress`` gets lz4 objects recompressed with zstd on the way;
2. the copies are appended at the log head of the first file tiers below
   with room, in one write per tier;
3. then, with no await in between, each slot whose info and handle are
   exactly what was copied is switched to its new object, leaving a shadow,
   and its old place is freed.  Any write, discard or promotion meanwhile
   replaced the info word and so cleared MOVING: that slot keeps its new
   content and the copy is freed (``aborted_moves``).

Cleaning (:meth:`Migrator.clean`) is the same move within one tier: the
live objects of a segment worth cleaning (by cost and benefit) are
re-appended at the head of the tier's cleaning log, apart from fresh pages,
and each slot switched under the same commit-if-unchanged rule; the
segment, left without live objects, is punched and reused.

Moves from the pool go a chunk (CHUNK_PAGES) at a time, each copied and
placed while the chunks before it are written, and committed as its write
ends.  They are kept in columns (``PoolChunk``: lists side by side, no
object per page), and the state flags, copies and commits each chunk in one
loop (``StoreState.flag_pool_moves``, ``load_objects``,
``commit_pool_moves``); moves from a file tier and cleaning keep a ``Move``
per page.

Until the commit a read finds the page where it was.  Cancellation at any
await leaves every slot as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
import trio.lowlevel

from .codec import Lz4Codec, ZstdCodec
from .errors import Misuse
from .fileset import Grant
from .slots import (
    MOVING,
    POOL_LEVEL,
    file_kind,
    key_device,
    key_slot,
    kind_of,
    length_of,
    level_tier,
    movable,
    slot_key,
    tier_level,
)
from .state import Device, StoreState
from .tiers.file import ChecksumError, TierFull, TierIOError

log = logging.getLogger(__name__)

# Pages per write of a move from the pool: a larger batch is cut into chunks
# of this many, each copied and placed while the one before is being
# written (the tier's group writer takes the chunks queued meanwhile in one
# thread hop).
CHUNK_PAGES = 256


class Move:
    """One page in a migration: its slot, what the slot held when copied,
    the copy (codec id and payload, as stored), and the destination once
    granted."""

    __slots__ = ("dev", "slot", "handle", "info", "codec", "data", "dest")

    def __init__(self, dev: Device, slot: int, handle: int, info: int) -> None:
        self.dev = dev
        self.slot = slot
        self.handle = handle
        self.info = info  # with MOVING set
        self.codec = 0
        self.data: bytes | None = None
        self.dest = -1

    @property
    def key(self) -> int:
        return slot_key(self.dev.index, self.slot)

    def unchanged(self) -> bool:
        """The slot still holds exactly what was copied (and MOVING)."""
        table = self.dev.table
        return table.info[self.slot] == self.info and table.handles[self.slot] == self.handle


class PoolChunk:
    """A chunk of a move from the pool, in columns (no object per page): the
    slots still unchanged when copied, what each held as flagged, and its
    copy (codec id and bytes, as stored)."""

    __slots__ = ("devs", "slots", "handles", "flagged", "codecs", "datas")

    def __init__(self, devs: list[Device], slots: list[int], handles: list[int],
                 flagged: list[int], codecs: list[int], datas: list[bytes]) -> None:
        self.devs = devs
        self.slots = slots
        self.handles = handles
        self.flagged = flagged
        self.codecs = codecs
        self.datas = datas


class Migrator:
    """Moves pages of one store's state.  One migration at a time."""

    def __init__(self, state: StoreState) -> None:
        self.state = state
        self.files = state.files
        self.cache = state.cache
        self.counters = state.moves
        self._running = False
        self._zstd: ZstdCodec | None = None
        self._lz4: Lz4Codec | None = None

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
        if src == POOL_LEVEL:
            moved = await self._from_pool(victims, min_group)
        else:
            moved = await self._from_file(victims, src, min_group)
        if moved:
            self.counters.batches += 1
        await files.punch()
        return moved

    async def _from_file(self, victims: list[tuple[Device, int]], src: int,
                         min_group: int) -> int:
        mask, want = movable(src)
        moves = [Move(dev, s, dev.table.handles[s], 0)
                 for dev, s in victims if dev.table.info[s] & mask == want]
        if not moves:
            return 0
        state = self.state
        for mv in moves:
            mv.info = state.flag_moving(mv.dev, mv.slot)
        pins: list[int] = []
        try:
            await self._copy_from_file(level_tier(src), moves, pins)
            return await self._place([mv for mv in moves if mv.data is not None
                                      and mv.unchanged()], src, min_group)
        finally:
            for mv in moves:  # whatever did not commit keeps its place
                state.unflag_moving(mv.dev, mv.slot, mv.info)
            if pins:
                self.files.unpin(pins)

    async def _from_pool(self, victims: list[tuple[Device, int]], min_group: int) -> int:
        """Flag, copy, place, write and commit the pool's ``victims``,
        CHUNK_PAGES at a time: each chunk is copied (the slots still
        unchanged) and placed while the chunks before it are written.  The
        batch is kept in columns (no object per page): the state flags, copies
        and commits a chunk in one loop each."""
        state = self.state
        devs, slots, handles, flagged = state.flag_pool_moves(victims)
        moved = 0

        async def place(chunk: PoolChunk) -> None:
            nonlocal moved
            got = await self._place_pool(chunk, min_group)
            moved += got  # after the await: chunks finish in any order

        try:
            async with trio.open_nursery() as nursery:
                for lo in range(0, len(slots), CHUNK_PAGES):
                    idx, codecs, datas = state.load_objects(devs, slots, handles, flagged, lo,
                                                            lo + CHUNK_PAGES)
                    if idx:
                        nursery.start_soon(place, PoolChunk(
                            [devs[k] for k in idx], [slots[k] for k in idx],
                            [handles[k] for k in idx], [flagged[k] for k in idx], codecs, datas))
                    # the chunk allocates and hands its write over before the next is copied
                    await trio.lowlevel.checkpoint()
        finally:  # whatever did not commit keeps its place
            state.unflag_moves(devs, slots, flagged)
        return moved

    async def _place_pool(self, chunk: PoolChunk, min_group: int) -> int:
        """``_place`` for a chunk from the pool."""
        recompress = self._recompress_below(min_group)
        if recompress:
            self._recompress_chunk(recompress, chunk)
        lengths = [len(d) for d in chunk.datas]

        async def write(grant: Grant, lo: int) -> int:
            return await self._write_and_commit_pool(grant, chunk, lo, lengths)
        return await self._write_grants(lengths, min_group, write)

    def _recompress_below(self, min_group: int) -> str | None:
        """The codec the first tier from ``min_group`` down recompresses to, if any."""
        files = self.files
        for ti in {ti for g in files.groups[min_group:] for ti in g}:
            if files[ti].recompress:
                return files[ti].recompress
        return None

    async def _write_grants(self, lengths: list[int], min_group: int,
                            write: Callable[[Grant, int], Awaitable[int]]) -> int:
        """Allocate objects of ``lengths`` from ``min_group`` down and ``write(grant, lo)``
        each grant in turn (``lo``: the index of its first object); grants never written
        are given back.  Returns the moves committed."""
        files = self.files
        grants = files.allocate(lengths, min_group=min_group)
        for g in grants:
            files.inflight[g.tier] += g.npages
        todo = list(grants)  # grants neither written nor given back yet
        moved = 0
        pos = 0
        try:
            while todo:
                grant = todo.pop(0)
                lo = pos
                pos += grant.npages
                moved += await write(grant, lo)
        finally:
            for g in todo:  # never written: give the objects back
                files.give_back(g, lengths[pos:pos + g.npages])
                files.inflight[g.tier] -= g.npages
                pos += g.npages
        return moved

    async def _write_and_commit_pool(self, grant: Grant, chunk: PoolChunk, lo: int,
                                     lengths: list[int]) -> int:
        """Write the copies ``lo:lo + grant.npages`` of ``chunk`` to the objects
        of ``grant`` and commit the moves whose slots did not change meanwhile."""
        files = self.files
        ti = grant.tier
        tier = files[ti]
        hi = lo + grant.npages
        dests = grant.handles
        devs, slots, flagged = chunk.devs, chunk.slots, chunk.flagged
        keep = [k for k in range(lo, hi) if devs[k].table.info[slots[k]] == flagged[k]]
        if len(keep) < hi - lo:  # some slots changed before the copy was written
            kept = set(keep)
            for k, h in zip(range(lo, hi), dests):
                if k not in kept:
                    tier.free(h, lengths[k])
                    files.inflight[ti] -= 1
                    self.counters.aborted += 1
            dests = [dests[k - lo] for k in keep]
        if not keep:
            return 0
        codecs, datas = chunk.codecs, chunk.datas
        if not await self._tier_write(ti, dests, [(slot_key(devs[k].index, slots[k]), codecs[k],
                                                   datas[k]) for k in keep]):
            return 0
        lens = [lengths[k] for k in keep]
        done = self.state.commit_pool_moves(
            [devs[k] for k in keep], [slots[k] for k in keep], [flagged[k] for k in keep],
            [chunk.handles[k] for k in keep], ti, dests, lens)
        moved = nbytes = aborted = 0
        for h, n, committed in zip(dests, lens, done):
            if committed:
                moved += 1
                nbytes += n
            else:
                aborted += 1
                tier.free(h, n)
        self._count(moved, nbytes, aborted, POOL_LEVEL, ti)
        return moved

    async def _place(self, moves: list[Move], src: int, min_group: int) -> int:
        """Append the copies of ``moves`` to the tiers from ``min_group`` down
        and commit; returns the moves committed.  A tier with
        ``recompress`` gets lz4 copies recompressed first."""
        if not moves:
            return 0
        recompress = self._recompress_below(min_group)
        if recompress:
            self._recompress_for(recompress, moves)
        lengths = [len(mv.data) for mv in moves if mv.data is not None]

        async def write(grant: Grant, lo: int) -> int:
            return await self._write_and_commit(grant, moves[lo:lo + grant.npages], src)
        return await self._write_grants(lengths, min_group, write)

    def _recompress_chunk(self, name: str, chunk: PoolChunk) -> None:
        """``_recompress_for`` of a chunk from the pool."""
        if name != "zstd":
            return
        if self._zstd is None or self._lz4 is None:
            self._zstd, self._lz4 = ZstdCodec(), Lz4Codec()
        z, lz = self._zstd, self._lz4
        codecs, datas = chunk.codecs, chunk.datas
        for k, (cid, data) in enumerate(zip(codecs, datas)):
            if cid == lz.id:
                c = z.compress(lz.decompress(data))
                if len(c) < len(data):
                    codecs[k], datas[k] = z.id, c
                    self.counters.recompressed += 1

    def _recompress_for(self, name: str, moves: list[Move]) -> None:
        """Recompress lz4 copies with ``name`` (zstd) where that is smaller."""
        if name != "zstd":
            return
        if self._zstd is None or self._lz4 is None:
            self._zstd, self._lz4 = ZstdCodec(), Lz4Codec()
        z, lz = self._zstd, self._lz4
        for mv in moves:
            if mv.codec == lz.id and mv.data is not None:
                c = z.compress(lz.decompress(mv.data))
                if len(c) < len(mv.data):
                    mv.codec, mv.data = z.id, c
                    self.counters.recompressed += 1

    async def _write_and_commit(self, grant: Grant, chunk: list[Move], src: int) -> int:
        """Write the copies of ``chunk`` to the objects of ``grant`` and
        commit the moves whose slots did not change meanwhile."""
        files = self.files
        ti = grant.tier
        tier = files[ti]
        live: list[Move] = []
        for mv, h in zip(chunk, grant.handles):
            mv.dest = h
            if mv.data is not None and mv.dev.table.info[mv.slot] == mv.info:
                live.append(mv)
            else:  # the slot changed before the copy was written
                tier.free(h, len(mv.data or b""))
                files.inflight[ti] -= 1
                self.counters.aborted += 1
        if not live:
            return 0
        if not await self._tier_write(ti, [mv.dest for mv in live],
                                      [(mv.key, mv.codec, mv.data or b"") for mv in live]):
            return 0
        return self._commit(live, src, ti)

    async def _tier_write(self, ti: int, dests: list[int],
                          objects: list[tuple[int, int, bytes]]) -> bool:
        """Write ``objects`` to ``dests`` of tier ``ti``, whose in-flight count they leave
        either way; False if the tier refused or failed (it gave the objects back)."""
        tier = self.files[ti]
        try:
            await tier.write(dests, objects)
            return True
        except (TierFull, TierIOError) as e:
            log.warning("writeback to %s failed: %s", tier.name, e)
            self.counters.failed_batches += 1
            return False
        finally:
            self.files.inflight[ti] -= len(objects)

    async def _copy_from_file(self, ti: int, moves: list[Move], pins: list[int]) -> None:
        """Fill the copies of ``moves`` (slots of file tier ``ti``) with their
        objects, read and verified, their places pinned (``pins``) until the
        move ends.  A slot that changed during the read keeps no copy; an
        object that does not verify stays where it is (its reads say EIO)."""
        pins += self.files.pin(ti, [mv.handle for mv in moves])
        moves.sort(key=lambda mv: mv.handle)
        tier = self.files[ti]
        items = [(mv.handle, length_of(mv.info), mv.key) for mv in moves]
        try:
            got = await tier.read_objects(items)
        except ChecksumError:  # one at a time, to leave only the bad ones behind
            got = []
            for item in items:
                try:
                    got += await tier.read_objects([item])
                except ChecksumError:
                    got.append((-1, b""))
        for mv, (cid, payload) in zip(moves, got):
            if cid >= 0 and mv.unchanged():
                mv.codec, mv.data = cid, payload

    def _commit(self, live: list[Move], src: int, ti: int) -> int:
        """Switch each slot of ``live`` still holding what was copied to its
        new object in tier ``ti``; free the new object of the others.  No
        await."""
        moved = 0
        tier = self.files[ti]
        aborted = 0
        nbytes = 0
        lengths = [len(mv.data or b"") for mv in live]
        if src == POOL_LEVEL:  # the common case, in one loop
            done = self.state.commit_pool_moves(
                [mv.dev for mv in live], [mv.slot for mv in live], [mv.info for mv in live],
                [mv.handle for mv in live], ti, [mv.dest for mv in live], lengths)
        else:
            commit = self.state.commit_move
            done = [commit(mv.dev, mv.slot, mv.info, mv.handle, src, ti, mv.dest, n)
                    for mv, n in zip(live, lengths)]
        for mv, n, ok in zip(live, lengths, done):
            if ok:
                moved += 1
                nbytes += n
            else:
                aborted += 1
                tier.free(mv.dest, n)
        self._count(moved, nbytes, aborted, src, ti)
        return moved

    def _count(self, moved: int, nbytes: int, aborted: int, src: int, ti: int) -> None:
        c = self.counters
        c.aborted += aborted
        if moved:
            c.moved += moved
            c.moved_payload += nbytes
            c.demotions[src] += moved
            pair = c.pairs.setdefault((src, tier_level(ti)), [0, 0])
            pair[0] += moved
            pair[1] += 1

    # -- cleaning -------------------------------------------------------------

    async def clean(self, ti: int, segments: int = 1, max_live: float | None = None) -> int:
        """Clean up to ``segments`` segments of file tier ``ti`` (the best
        by cost and benefit, at most ``max_live`` of each live: the tier's
        threshold unless given): re-append their live objects at the
        cleaning log's head and switch their slots, commit-if-unchanged; the segments, left without
        live objects, are punched and reused.  Returns the objects moved."""
        if self._running:
            raise Misuse("one migration at a time (Writeback holds a lock)")
        self._running = True
        try:
            moved = 0
            tier = self.files[ti]
            victims = (tier.cleaning_victims(segments) if max_live is None
                       else tier.cleaning_victims(segments, max_live))
            for seg in victims:
                moved += await self._clean_segment(ti, seg)
            await self.files.punch()
            self.files.room_made()
            return moved
        finally:
            self._running = False

    async def _clean_segment(self, ti: int, seg: int) -> int:
        files = self.files
        tier = files[ti]
        state = self.state
        found = await tier.read_segment(seg)
        kind = file_kind(ti)
        devices = state.devices
        moves: list[Move] = []
        for h, key, n, buf in found:
            di, s = key_device(key), key_slot(key)
            if di >= len(devices) or s >= devices[di].npages:
                continue
            dev = devices[di]
            i = dev.table.info[s]
            if kind_of(i) != kind or i & MOVING or dev.table.handles[s] != h \
                    or length_of(i) != n:
                continue  # dead: its slot moved on
            try:
                cid, _payload = tier.open_object(h, n, key, buf)
            except ChecksumError:
                continue  # stays where it is; its reads say EIO
            mv = Move(dev, s, h, 0)
            mv.codec, mv.data = cid, _payload
            moves.append(mv)
        if not moves:
            return 0
        for mv in moves:
            mv.info = state.flag_moving(mv.dev, mv.slot)
        pins = files.pin(ti, [mv.handle for mv in moves])
        moved = 0
        try:
            lengths = [len(mv.data or b"") for mv in moves]
            handles = tier.allocate(lengths, cleaning=True, survivors_of=seg)
            live = moves[:len(handles)]
            for mv, h in zip(live, handles):
                mv.dest = h
            if live:
                files.inflight[ti] += len(live)
                ok = False
                try:
                    await tier.write(handles, [(mv.key, mv.codec, mv.data or b"") for mv in live])
                    ok = True
                except (TierFull, TierIOError) as e:
                    log.warning("cleaning of %s failed: %s", tier.name, e)
                finally:
                    files.inflight[ti] -= len(live)
                if ok:
                    nbytes = 0
                    for mv in live:
                        n = len(mv.data or b"")
                        if state.commit_clean(mv.dev, mv.slot, mv.info, mv.handle, ti, mv.dest):
                            moved += 1
                            nbytes += tier.object_bytes(n)
                        else:
                            tier.free(mv.dest, n)
                            self.counters.aborted += 1
                    tier.cleaned(moved, nbytes)
        finally:
            for mv in moves:
                state.unflag_moving(mv.dev, mv.slot, mv.info)
            files.unpin(pins)
        return moved
