"""The segment map of a file tier: where the log's head is, what each segment holds.

The data area is cut into segments of ``segment_bytes`` (the last one may be shorter).  Each
segment is in one state:

* FREE: empty, punched, on the free stack;
* HEAD: the segment objects are appended to (at most one);
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

Placement: an object never crosses a segment's end, and never spans more than two 4 KiB blocks
(if it would, it starts at the next block boundary), so a read is one pread of at most two
aligned blocks.  ``reserve`` segments are kept back for cleaning: appends other than cleaning's
stop when only they are left.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from ...errors import Misuse, StoreError
from ...kernel import PAGE_SIZE as PAGE
from ...memory import StateMemory

SEGMENT_BYTES = 4 << 20  # the default segment size ([[tier]] segment_bytes)
FREE = 0
HEAD = 1
SEALED = 2
PENDING = 3
PUNCHING = 4
GEN_MASK = 0xFFFFFFFF
_BLOCK_MASK = PAGE - 1


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
        self.head = -1
        self.head_off = 0
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

    def _open_head(self, cleaning: bool) -> bool:
        """Seal the head and make a free segment the head; False if none may be taken."""
        if len(self.free_stack) <= (0 if cleaning else self.reserve):
            return False
        self._seal_head()
        s = self.free_stack.pop()
        self.gen[s] = (self.gen[s] + 1) & GEN_MASK
        self.state[s] = HEAD
        self.fill[s] = 0
        self.head = s
        self.head_off = 0
        self.switches += 1
        return True

    def _seal_head(self) -> None:
        h = self.head
        if h < 0:
            return
        self.head = -1
        self.fill[h] = self.head_off
        self.state[h] = SEALED
        if not self.live[h]:
            self._emptied(h)

    def allocate(self, sizes: Iterable[int], cleaning: bool = False) -> list[int]:
        """Handles for objects of ``sizes`` bytes, appended at the head in order; fewer
        (a prefix) when out of room."""
        out: list[int] = []
        live, objects = self.live, self.objects
        for size in sizes:
            h = self.head
            off = self.head_off
            if h >= 0:
                if (off & _BLOCK_MASK) + size > 2 * PAGE:
                    off = (off + _BLOCK_MASK) & ~_BLOCK_MASK
                if off + size > self.seg_size(h):
                    h = -1
            if h < 0:
                if not self._open_head(cleaning) or size > self.seg_size(self.head):
                    break
                h, off = self.head, 0
            self.head_off = off + size
            self.fill[h] = self.head_off
            live[h] += size
            objects[h] += 1
            self.stored += 1
            self.live_bytes += size
            out.append(h * self.segment_bytes + off)
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
        if not self.live[s] and s != self.head:
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
    def dead_bytes(self) -> int:
        """Bytes appended to segments in use that no live object holds (padding included)."""
        st, fill, live = self.state, self.fill, self.live
        return sum(fill[s] - live[s] for s in range(self.nsegments) if st[s] in (HEAD, SEALED))

    def victims(self, n: int, max_live: float) -> list[int]:
        """Up to ``n`` sealed segments with the least live bytes, each at most ``max_live``
        of its size and holding some dead bytes."""
        st, live, fill = self.state, self.live, self.fill
        cands = [(live[s], s) for s in range(self.nsegments)
                 if st[s] == SEALED and live[s] <= max_live * self.seg_size(s)
                 and live[s] < fill[s]]
        cands.sort()
        return [s for _, s in cands[:n]]

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
        self.head, self.head_off = -1, 0
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
        return 17 * self.nsegments + 4 * (len(self.free_stack) + len(self.pending))

    def check_invariants(self) -> None:
        def fail(what: str) -> None:
            raise AssertionError(f"tier {self.name}: {what}")

        st, live, objs, fill = self.state, self.live, self.objects, self.fill
        if sum(live) != self.live_bytes:
            fail(f"live bytes {self.live_bytes} != sum over segments {sum(live)}")
        if sum(objs[:self.nsegments]) != self.stored:
            fail(f"stored objects {self.stored} != sum over segments {sum(objs)}")
        heads = [s for s in range(self.nsegments) if st[s] == HEAD]
        if heads != ([self.head] if self.head >= 0 else []):
            fail(f"head {self.head}, segments in state head {heads}")
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
