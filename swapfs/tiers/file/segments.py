"""The segment map of a file tier: where the heads of its two logs are, what each segment holds.

The data area is cut into segments of ``segment_bytes`` (the last one may be shorter).  Each
segment is in one state:

* FREE: empty, punched, on the free stack;
* HEAD: a segment objects are appended to: at most one per log (below);
* SEALED: appended to, no longer the head; it holds live objects (or is about to be cleaned);
* PENDING: no live object left, queued for its punch; PUNCHING: the punch is running.

Per segment, in compact arrays (no Python object per object or per segment): live bytes
(objects allocated and not freed, in-flight writes included), live objects, how far it was
appended (``fill``), its state; and its **generation** (u32), bumped each time the segment
becomes the head.  The generation is bound into every object's tag and nonce, so an offset is
written once per generation (the head only moves forward; a failed write's bytes stay dead), and
it is the one part of the map that is truth: the region ``tier.<name>.gen`` of the store's state
memory, which a successor maps again (a nonce must never repeat under the key it inherits).
Everything else is rebuilt from the slot tables after a failover (``rebuild``).

Two logs, each with its own head: pages written or moved down are appended to the **user**
log's head, the survivors of cleaning to the **cleaning** log's.  Survivors are the data that
outlived a segment's other objects, the cold data; kept apart from fresh pages, the segments
they fill stay live, and those fresh pages fill die together (hot/cold separation, as in LFS).

Victims of cleaning are chosen by cost and benefit (LFS): the segment with the highest
``(1 - u) * age / (1 + u)``, where ``u`` is its live share and ``age`` how many user segments
were opened since its youngest data was written (``stamp``: the clock when a user segment was
opened; a cleaning segment takes the youngest stamp of the segments whose survivors it took).
An old segment is cleaned at a higher ``u`` than a young one, whose objects are still dying.
The stamps are not state memory: after a failover every segment is as old as any other, and
the choice is greedy (least live first) until new segments are written.

Placement: an object never crosses a segment's end, and never spans more than two 4 KiB blocks
(if it would, it starts at the next block boundary), so a read is one pread of at most two
aligned blocks.  ``reserve`` segments are kept back for cleaning: appends other than cleaning's
stop when only they are left.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from ...errors import Misuse, StoreError
from ...kernel import PAGE_SIZE as PAGE
from ...memory import StateMemory
from .objects import object_bytes

SEGMENT_BYTES = 4 << 20  # the default segment size ([[tier]] segment_bytes)
FREE = 0
HEAD = 1
SEALED = 2
PENDING = 3
PUNCHING = 4
GEN_MASK = 0xFFFFFFFF
_BLOCK_MASK = PAGE - 1
USER = 0  # the log of pages written and moved down
CLEANING = 1  # the log of cleaning's survivors


class SegmentMap:
    """Segments of one tier.  See the module docstring."""

    def __init__(self, name: str, size_bytes: int, segment_bytes: int, *, reserve: int,
                 recycle_at_once: bool, memory: StateMemory | None = None) -> None:
        if segment_bytes <= 0 or segment_bytes % PAGE:
            raise Misuse(f"tier {name!r}: segment size {segment_bytes} is not a positive "
                         f"multiple of {PAGE}")
        self.name = name
        self.size_bytes = size_bytes
        self.segment_bytes = segment_bytes
        self.nsegments = n = -(-size_bytes // segment_bytes)
        self.reserve = min(reserve, max(n - 1, 0))
        self.recycle_at_once = recycle_at_once
        memory = memory if memory is not None else StateMemory()
        self._gen_map = memory.reserve(f"tier.{name}.gen", max(4 * n, 4))
        self.gen = memoryview(self._gen_map).cast("I")
        self.live = array("I", bytes(4 * n))
        # Live objects per segment: kept beside the generations so that a successor can
        # count the objects no slot names any more (``rebuild``).
        self._obj_map = memory.reserve(f"tier.{name}.objects", max(4 * n, 4))
        self.objects = memoryview(self._obj_map).cast("I")
        self.fill = array("I", bytes(4 * n))
        self.state = bytearray(n)  # all FREE
        self.free_stack = array("I", range(n - 1, -1, -1))  # pops segment 0 first
        self.pending = array("I")
        # Per log (USER, CLEANING): its head segment (-1: none) and how far it is appended.
        self.heads = [-1, -1]
        self.offs = [0, 0]
        # Per segment, the clock of its youngest data (see the module docstring); the clock
        # counts user segments opened.
        self.stamp = array("I", bytes(4 * n))
        self.clock = 0
        self.stored = 0  # live objects
        self.live_bytes = 0
        self.switches = 0  # heads opened

    def close(self) -> None:
        self.gen.release()
        self.objects.release()
        self._gen_map.close()
        self._obj_map.close()

    def seg_size(self, s: int) -> int:
        if s == self.nsegments - 1:
            return self.size_bytes - s * self.segment_bytes
        return self.segment_bytes

    def segment_of(self, handle: int) -> int:
        return handle // self.segment_bytes

    @property
    def head(self) -> int:
        """The user log's head segment (-1: none)."""
        return self.heads[USER]

    @property
    def head_off(self) -> int:
        return self.offs[USER]

    def _open_head(self, log: int) -> bool:
        """Seal ``log``'s head and make a free segment its head; False if none may be taken
        (the user log leaves ``reserve`` segments to cleaning)."""
        if len(self.free_stack) <= (self.reserve if log == USER else 0):
            return False
        self._seal_head(log)
        s = self.free_stack.pop()
        self.gen[s] = (self.gen[s] + 1) & GEN_MASK
        self.state[s] = HEAD
        self.fill[s] = 0
        if log == USER:
            self.clock = (self.clock + 1) & GEN_MASK
            self.stamp[s] = self.clock
        else:
            self.stamp[s] = 0  # the youngest of the survivors it takes (``allocate``)
        self.heads[log] = s
        self.offs[log] = 0
        self.switches += 1
        return True

    def _seal_head(self, log: int) -> None:
        h = self.heads[log]
        if h < 0:
            return
        self.heads[log] = -1
        self.fill[h] = self.offs[log]
        self.state[h] = SEALED
        if not self.live[h]:
            self._emptied(h)

    def allocate(self, sizes: Iterable[int], cleaning: bool = False,
                 survivors_of: int = -1) -> list[int]:
        """Handles for objects of ``sizes`` bytes, appended at the head of the user log (of
        the cleaning log with ``cleaning``, which may use the reserve) in order; fewer (a
        prefix) when out of room.  ``survivors_of``: the segment cleaning moves them from
        (its stamp passes to the segments that take them)."""
        out: list[int] = []
        live, objects = self.live, self.objects
        log = CLEANING if cleaning else USER
        heads, offs = self.heads, self.offs
        seg = self.segment_bytes
        h, off = heads[log], offs[log]
        size_h = self.seg_size(h) if h >= 0 else 0
        stamp = self.stamp
        age = stamp[survivors_of] if survivors_of >= 0 else 0
        total = 0
        for size in sizes:
            if h >= 0:
                if (off & _BLOCK_MASK) + size > 2 * PAGE:
                    off = (off + _BLOCK_MASK) & ~_BLOCK_MASK
                if off + size > size_h:
                    h = -1
            if h < 0:
                offs[log] = off
                if not self._open_head(log) or size > self.seg_size(heads[log]):
                    h, off = heads[log], offs[log]
                    break
                h, off = heads[log], 0
                size_h = self.seg_size(h)
            if stamp[h] < age:
                stamp[h] = age
            live[h] += size
            objects[h] += 1
            total += size
            out.append(h * seg + off)
            off += size
        if out:
            offs[log] = off
            self.fill[h] = off
            self.stored += len(out)
            self.live_bytes += total
        return out

    def check_free(self, handle: int, size: int) -> int:
        """The segment of the object at ``handle``; Misuse unless it can be live there."""
        s = handle // self.segment_bytes if handle >= 0 else -1
        if not 0 <= s < self.nsegments or self.state[s] not in (HEAD, SEALED) \
                or self.live[s] < size or not self.objects[s] \
                or handle - s * self.segment_bytes + size > self.fill[s]:
            raise Misuse(f"tier {self.name!r}: free of an object at {handle!r} "
                         f"({size} bytes) that is not live")
        return s

    def free(self, handle: int, size: int) -> None:
        s = self.check_free(handle, size)
        self.live[s] -= size
        self.objects[s] -= 1
        self.stored -= 1
        self.live_bytes -= size
        if not self.live[s] and s != self.heads[USER] and s != self.heads[CLEANING]:
            self._emptied(s)

    def _emptied(self, s: int) -> None:
        if self.objects[s]:
            raise StoreError(f"tier {self.name!r}: segment {s} has no live bytes but "
                             f"{self.objects[s]} objects")
        self.fill[s] = 0
        if self.recycle_at_once:
            self.state[s] = FREE
            self.free_stack.append(s)
        else:
            self.state[s] = PENDING
            self.pending.append(s)

    def is_live(self, handle: int, size: int) -> bool:
        try:
            self.check_free(handle, size)
        except Misuse:
            return False
        return True

    def take_pending(self) -> list[int]:
        segs = sorted(self.pending)
        self.pending = array("I")
        for s in segs:
            self.state[s] = PUNCHING
        return segs

    def recycle(self, segs: Iterable[int]) -> None:
        """Punched (or not punchable) segments become free, the lowest on top."""
        for s in sorted(segs, reverse=True):
            self.state[s] = FREE
            self.free_stack.append(s)

    # -- what cleaning needs ----------------------------------------------------------

    @property
    def free_segments(self) -> int:
        st = self.state
        return st.count(FREE) + st.count(PENDING) + st.count(PUNCHING)

    @property
    def punch_queued(self) -> int:
        """Segments emptied and not yet punched (queued, or their punch running)."""
        st = self.state
        return st.count(PENDING) + st.count(PUNCHING)

    @property
    def dead_bytes(self) -> int:
        """Bytes appended to segments in use that no live object holds (padding included)."""
        st, fill, live = self.state, self.fill, self.live
        return sum(fill[s] - live[s] for s in range(self.nsegments) if st[s] in (HEAD, SEALED))

    def victims(self, n: int, max_live: float) -> list[int]:
        """Up to ``n`` sealed segments worth cleaning, the best first: each at most
        ``max_live`` of its size live and holding some dead bytes, ordered by cost and
        benefit, ``(1 - u) * age / (1 + u)`` (u: the live share; age: user segments opened
        since its youngest data was written, plus one), the least live first among equals."""
        st, live, fill, stamp = self.state, self.live, self.fill, self.stamp
        clock = self.clock
        full = self.segment_bytes
        last = self.nsegments - 1
        cands = []
        for s in range(self.nsegments):
            if st[s] != SEALED:
                continue
            lv = live[s]
            size = full if s != last else self.seg_size(s)
            if lv < fill[s] and lv <= max_live * size:
                u = lv / size
                age = ((clock - stamp[s]) & GEN_MASK) + 1
                cands.append((-(1.0 - u) * age / (1.0 + u), lv, s))
        if n == 1:
            return [min(cands)[2]] if cands else []
        cands.sort()
        return [s for _, _, s in cands[:n]]

    def room_bytes(self, max_live: float) -> int:
        """Bytes appends could still take: the rest of the head, the free segments beyond
        the reserve, those waiting for their punch, and what cleaning would reclaim from the
        sealed segments it takes (at most ``max_live`` live).  Placement's padding makes the
        real figure a little lower."""
        st, live = self.state, self.live
        free = max(0, len(self.free_stack) - self.reserve)
        room = free * self.segment_bytes
        if self.head >= 0:
            room += self.seg_size(self.head) - self.head_off
        for s in range(self.nsegments):
            if st[s] == SEALED and live[s] <= max_live * self.seg_size(s):
                room += self.seg_size(s) - live[s]
            elif st[s] >= PENDING:
                room += self.seg_size(s)
        return room

    # -- recovery ---------------------------------------------------------------------

    def rebuild(self, objects: Iterable[tuple[int, int]]) -> int:
        """After adopting the generations: ``objects`` (handle, bytes) are what slots name;
        every segment holding one is sealed (appends resume in a fresh segment, a new
        generation), the others free (a segment that held objects before is queued for its
        punch).  Returns the objects no slot named any more (leaks of writes cut short),
        counted from the old map when it is known (0 on a fresh map)."""
        n = self.nsegments
        before = sum(self.objects[:n])
        live = array("I", bytes(4 * n))
        objs = array("I", bytes(4 * n))
        ends = array("I", bytes(4 * n))
        seg = self.segment_bytes
        count = total = 0
        for h, size in objects:
            s = h // seg if h >= 0 else -1
            if not 0 <= s < n or h - s * seg + size > self.seg_size(s):
                raise StoreError(f"tier {self.name!r}: a slot names an object at {h} "
                                 f"({size} bytes), out of range")
            live[s] += size
            objs[s] += 1
            ends[s] = max(ends[s], h - s * seg + size)
            count += 1
            total += size
        had = [bool(self.objects[s]) or self.state[s] != FREE for s in range(n)]
        self.live, self.fill = live, ends
        self.objects[:n] = objs
        self.free_stack = array("I")
        self.pending = array("I")
        self.heads, self.offs = [-1, -1], [0, 0]
        self.stamp = array("I", bytes(4 * n))  # ages unknown: all alike
        self.clock = 0
        for s in range(n - 1, -1, -1):
            if objs[s]:
                self.state[s] = SEALED
                self.fill[s] = self.seg_size(s)  # what was appended after the last is unknown
            elif had[s] and not self.recycle_at_once:
                self.state[s] = PENDING
                self.pending.append(s)
            else:
                self.state[s] = FREE
                self.free_stack.append(s)
        self.stored, self.live_bytes = count, total
        return max(before - count, 0)

    # -- checks ---------------------------------------------------------------------

    @property
    def metadata_bytes(self) -> int:
        return 21 * self.nsegments + 4 * (len(self.free_stack) + len(self.pending))

    def check_invariants(self) -> None:
        def fail(what: str) -> None:
            raise AssertionError(f"tier {self.name}: {what}")

        st, live, objs, fill = self.state, self.live, self.objects, self.fill
        if sum(live) != self.live_bytes:
            fail(f"live bytes {self.live_bytes} != sum over segments {sum(live)}")
        if sum(objs[:self.nsegments]) != self.stored:
            fail(f"stored objects {self.stored} != sum over segments {sum(objs)}")
        heads = [s for s in range(self.nsegments) if st[s] == HEAD]
        if heads != sorted(h for h in self.heads if h >= 0) or self.heads[0] == self.heads[1] >= 0:
            fail(f"heads {self.heads}, segments in state head {heads}")
        for log, h in enumerate(self.heads):
            if h >= 0 and self.fill[h] != self.offs[log]:
                fail(f"head {h}: fill {self.fill[h]} != its log's offset {self.offs[log]}")
        for s in range(self.nsegments):
            if st[s] in (FREE, PENDING, PUNCHING):
                if live[s] or objs[s]:
                    fail(f"segment {s} in state {st[s]} holds {objs[s]} objects")
            elif st[s] == SEALED:
                if not objs[s]:
                    fail(f"segment {s} sealed without objects")
            if bool(live[s]) != bool(objs[s]) or live[s] > fill[s] or fill[s] > self.seg_size(s):
                fail(f"segment {s}: {objs[s]} objects, {live[s]} live bytes, fill {fill[s]}")
        if sorted(self.free_stack) != [s for s in range(self.nsegments) if st[s] == FREE]:
            fail("free stack != segments in state free")
        if sorted(self.pending) != [s for s in range(self.nsegments) if st[s] == PENDING]:
            fail("punch queue != segments in state pending")


def reservation_bytes(size_bytes: int, segment_bytes: int) -> int:
    """Address space the state-memory regions of a tier reserve (generations and object
    counts, 4 bytes each per segment)."""
    return 8 * max(-(-size_bytes // segment_bytes), 1)


# A segment is worth cleaning while at most this share of it is live (a tier is full only
# when no segment is: less than this share of it is live).
CLEAN_MAX_LIVE = 0.75


class SegmentedTier:
    """What every tier over a segment map has in common, the file tier and the remote one:
    its counts, the objects' bookkeeping, when it is full and cleaning's view.  A subclass
    sets ``name``, ``encrypt``, ``capacity_pages``, ``_map`` and the ``cleaned_*`` counters.

    One rule for both kinds: a segment is free for appends only once it is back on the free
    stack (punched, or for a remote tier deleted with UNLINK); one queued for its punch counts
    as free for cleaning's decisions (``needs_cleaning``, ``full``: it is about to be), not
    for ``low_on_segments`` (the kick that starts cleaning in time).  Where the remote tier
    differs it says so in its own class: the cluster's OOM (the tier is full for a while
    whatever its segments say) and a failed UNLINK (the segment stays queued and is tried
    again later, where a failed punch recycles the segment at once)."""

    name: str
    encrypt: bool
    capacity_pages: int
    _map: SegmentMap
    cleaned_objects: int
    cleaned_bytes: int

    @property
    def stored_pages(self) -> int:
        """Live objects (one page each), in-flight writes included."""
        return self._map.stored

    @property
    def live_bytes(self) -> int:
        return self._map.live_bytes

    @property
    def used_pages(self) -> int:
        """The space live objects take, in pages (what the watermarks compare)."""
        return -(-self._map.live_bytes // PAGE)

    @property
    def free_pages(self) -> int:
        return max(self.capacity_pages - self.used_pages, 0)

    @property
    def clean_low(self) -> int:
        """Cleaning starts when fewer segments than this are free: lazily, just above the
        reserve, whatever the tier's size (every segment kept free is space the others must
        make up for, so they are cleaned fuller; and a segment left alone longer holds more
        dead bytes when its turn comes)."""
        return self._map.reserve + 2

    @property
    def low_on_segments(self) -> bool:
        """Fewer segments than ``clean_low`` are free for appends (a cheap test, for every
        allocation)."""
        return len(self._map.free_stack) < self.clean_low

    @property
    def needs_cleaning(self) -> bool:
        """Free segments (those queued for their punch included) run low and some segment is
        worth cleaning."""
        m = self._map
        return m.free_segments < self.clean_low and bool(m.victims(1, CLEAN_MAX_LIVE))

    def _head_room(self) -> bool:
        """The user log's head takes one more object of a whole page."""
        m = self._map
        return m.head >= 0 and m.seg_size(m.head) - m.head_off >= object_bytes(PAGE,
                                                                                self.encrypt)

    def _segments_full(self) -> bool:
        """No room to append, even after cleaning: no segment is free beyond the reserve or
        queued for its punch, the head is full, and cleaning cannot free one (none is
        ``CLEAN_MAX_LIVE`` live or less)."""
        m = self._map
        if len(m.free_stack) > m.reserve or m.pending:
            return False
        return not m.victims(1, CLEAN_MAX_LIVE) and not self._head_room()

    @property
    def segment_switches(self) -> int:
        """Segments opened for appending so far."""
        return self._map.switches

    def object_bytes(self, length: int) -> int:
        """Bytes stored of an object of ``length`` payload bytes."""
        return object_bytes(length, self.encrypt)

    def free(self, handle: int, length: int) -> None:
        raise NotImplementedError

    def free_many(self, objects: Iterable[tuple[int, int]]) -> None:
        """``free`` for ``(handle, length)`` pairs."""
        for h, n in objects:
            self.free(h, n)

    def is_used(self, handle: int, length: int) -> bool:
        """An object of ``length`` payload bytes can be live at ``handle``."""
        return self._map.is_live(handle, object_bytes(length, self.encrypt))

    def segment_of(self, handle: int) -> int:
        return self._map.segment_of(handle)

    def _free_written(self, handles: Sequence[int],
                      objects: Sequence[tuple[int, int, bytes]]) -> None:
        for h, (_key, _codec, payload) in zip(handles, objects):
            self._map.free(h, object_bytes(len(payload), self.encrypt))

    def _check_read(self, handle: int, length: int) -> int:
        size = object_bytes(length, self.encrypt)
        if not self._map.is_live(handle, size):
            raise Misuse(f"tier {self.name!r}: read of an object at {handle!r} "
                         f"({length!r} bytes), not live")
        return size

    def cleaning_victims(self, n: int = 1, max_live: float = CLEAN_MAX_LIVE) -> list[int]:
        """Up to ``n`` sealed segments worth cleaning (at most ``max_live`` of each live),
        the best first by cost and benefit."""
        return self._map.victims(n, max_live)

    def cleaned(self, objects: int, nbytes: int) -> None:
        """Count objects cleaning re-appended."""
        self.cleaned_objects += objects
        self.cleaned_bytes += nbytes

    def segment_live(self) -> list[tuple[int, int]]:
        """Per segment, ``(live objects, live bytes)`` (for the consistency check)."""
        m = self._map
        return [(m.objects[s], m.live[s]) for s in range(m.nsegments)]
