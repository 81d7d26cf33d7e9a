"""The compressed memory pool: size-classed objects carved from large arenas.

zsmalloc-shaped.  An object of ``n`` bytes (1 <= n <= 4096) lives in size
class ``(n - 1) >> 5``, whose objects are ``(class + 1) * 32`` bytes; the
last class (4096 bytes) holds raw, incompressible ("huge") pages.  Each class
is carved from arenas: one anonymous mapping of ``arena_bytes`` (256 KiB by
default; ``MAP_POPULATE``: one system call, no page faults afterwards, and
the memory goes back to the system when the arena is released) cut into
equal objects.  Arenas are allocated and released whole,
so the pool's memory (``pool_bytes``) grows and shrinks in arena steps and
never holds one Python object per page.

A handle is ``arena_id << 16 | object_index``: the object lives at byte
``object_index * object_size[arena_id]`` of arena ``arena_id``.  Per arena the
bookkeeping is a few compact array entries (object size, used count, bump
pointer) and a free stack (``array('H')``) of freed object indices; objects
never handed out are taken from the bump pointer, so a new arena costs no
per-object work.  Per class, ``partial[class]`` lists the arenas with room;
allocation takes the last one.  An arena that becomes empty is released,
except one spare per class (kept to absorb alloc/free churn at a boundary).

Nothing here awaits: every method runs to completion in the caller's step
of the trio loop (see docs/store.md).
"""

from __future__ import annotations

import mmap
import sys
from array import array

from swapfs.config import PAGE_SIZE

CLASS_SHIFT = 5
CLASS_STEP = 1 << CLASS_SHIFT  # 32 bytes
NCLASSES = PAGE_SIZE // CLASS_STEP  # 128
HUGE_CLASS = NCLASSES - 1  # objects of 4096 bytes
ARENA_BYTES = 256 * 1024
INDEX_BITS = 16
INDEX_MASK = (1 << INDEX_BITS) - 1
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


def _new_buffer(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes, flags=_MAP_FLAGS, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def class_of(n: int) -> int:
    """Size class of an object of ``n`` bytes."""
    return (n - 1) >> CLASS_SHIFT


def class_size(n: int) -> int:
    """Bytes an object of ``n`` bytes occupies in its class."""
    return (n + CLASS_STEP - 1) & ~(CLASS_STEP - 1)


class PoolFull(Exception):
    """Allocating would take the pool's memory above max_bytes."""


class Pool:
    """Size-classed arenas holding compressed (and raw huge) pages."""

    def __init__(self, max_bytes: int, arena_bytes: int = ARENA_BYTES) -> None:
        if not PAGE_SIZE <= arena_bytes <= CLASS_STEP << INDEX_BITS:
            raise ValueError(f"arena_bytes must be in {PAGE_SIZE}..{CLASS_STEP << INDEX_BITS}")
        self.max_bytes = max_bytes
        self.arena_bytes = arena_bytes
        # Objects per arena, by class.
        self.class_cap = [arena_bytes // ((c + 1) * CLASS_STEP) for c in range(NCLASSES)]
        # Per arena, indexed by arena id; a released id has osize 0 and no buffer.
        self.bufs: list[mmap.mmap | None] = []
        self.views: list[memoryview | None] = []
        self.free: list[array | None] = []
        self.osize = array("I")
        self.used = array("I")
        self.fresh = array("I")
        self.free_ids: list[int] = []
        # Per class.
        self.partial: list[list[int]] = [[] for _ in range(NCLASSES)]
        self.spare = array("i", [-1]) * NCLASSES
        self.class_objects = array("Q", [0]) * NCLASSES
        # Totals.
        self.pool_bytes = 0
        self.compressed_bytes = 0
        # Bytes of the objects in use (size-class bytes): what the pool would
        # hold with no free object in any arena.  Writeback drains by this,
        # not by pool_bytes: freeing scattered objects rarely empties an
        # arena, but the holes are reused by the next allocations.
        self.used_bytes = 0
        self.objects = 0
        self.arenas = 0

    # -- hot path ---------------------------------------------------------

    def alloc(self, data: object, n: int) -> int:
        """Store ``n`` bytes of ``data``; return the handle.  Raises PoolFull."""
        cls = (n - 1) >> CLASS_SHIFT
        part = self.partial[cls]
        aid = part[-1] if part else self._new_arena(cls)
        fs = self.free[aid]
        if fs:
            idx = fs.pop()
        else:
            fresh = self.fresh
            idx = fresh[aid]
            fresh[aid] = idx + 1
        used = self.used
        u = used[aid] + 1
        used[aid] = u
        if u == 1 and self.spare[cls] == aid:
            self.spare[cls] = -1
        if u == self.class_cap[cls]:
            part.pop()
        off = idx * ((cls + 1) << CLASS_SHIFT)
        self.views[aid][off:off + n] = data  # type: ignore[index]
        self.compressed_bytes += n
        self.used_bytes += (cls + 1) << CLASS_SHIFT
        self.objects += 1
        self.class_objects[cls] += 1
        return aid << INDEX_BITS | idx

    def free_object(self, handle: int, n: int) -> None:
        """Free the object ``handle`` of ``n`` bytes."""
        aid = handle >> INDEX_BITS
        cls = (self.osize[aid] >> CLASS_SHIFT) - 1
        used = self.used
        u = used[aid]
        if u == self.class_cap[cls]:
            self.partial[cls].append(aid)
        u -= 1
        used[aid] = u
        self.free[aid].append(handle & INDEX_MASK)  # type: ignore[union-attr]
        self.compressed_bytes -= n
        self.used_bytes -= (cls + 1) << CLASS_SHIFT
        self.objects -= 1
        self.class_objects[cls] -= 1
        if u == 0:
            self._arena_empty(aid, cls)

    def view(self, handle: int, n: int) -> memoryview:
        """The ``n`` stored bytes of ``handle``, without a copy.

        Valid until the object is freed; the store only hands it to the
        decompressor or copies it within the same step.
        """
        aid = handle >> INDEX_BITS
        off = (handle & INDEX_MASK) * self.osize[aid]
        return self.views[aid][off:off + n]  # type: ignore[index]

    # -- arenas -----------------------------------------------------------

    def _new_arena(self, cls: int) -> int:
        osize = (cls + 1) << CLASS_SHIFT
        nbytes = self.class_cap[cls] * osize
        if self.pool_bytes + nbytes > self.max_bytes:
            self.release_spares()
            if self.pool_bytes + nbytes > self.max_bytes:
                raise PoolFull(
                    f"pool holds {self.pool_bytes} of max_bytes {self.max_bytes}: no room for "
                    f"another arena of {nbytes} bytes for {osize}-byte objects")
        buf = _new_buffer(nbytes)
        if self.free_ids:
            aid = self.free_ids.pop()
            self.bufs[aid] = buf
            self.views[aid] = memoryview(buf)
            self.free[aid] = array("H")
            self.osize[aid] = osize
            self.used[aid] = 0
            self.fresh[aid] = 0
        else:
            aid = len(self.bufs)
            self.bufs.append(buf)
            self.views.append(memoryview(buf))
            self.free.append(array("H"))
            self.osize.append(osize)
            self.used.append(0)
            self.fresh.append(0)
        self.partial[cls].append(aid)
        self.pool_bytes += nbytes
        self.arenas += 1
        return aid

    def _arena_empty(self, aid: int, cls: int) -> None:
        if self.spare[cls] < 0:
            # Keep it as the class's spare, reset to a fresh arena.
            self.spare[cls] = aid
            self.fresh[aid] = 0
            del self.free[aid][:]  # type: ignore[index]
        else:
            self._release(aid, cls)

    def _release(self, aid: int, cls: int) -> None:
        self.partial[cls].remove(aid)
        # Dropping the last references unmaps the arena (no view outlives a
        # request, see docs/store.md).
        buf = self.bufs[aid]
        assert buf is not None
        self.pool_bytes -= len(buf)
        self.arenas -= 1
        self.bufs[aid] = None
        self.views[aid] = None
        self.free[aid] = None
        self.osize[aid] = 0
        self.used[aid] = 0
        self.fresh[aid] = 0
        self.free_ids.append(aid)

    def release_spares(self) -> None:
        """Release every class's empty spare arena."""
        for cls in range(NCLASSES):
            aid = self.spare[cls]
            if aid >= 0:
                self.spare[cls] = -1
                self._release(aid, cls)

    # -- accounting -------------------------------------------------------

    @property
    def fragmentation(self) -> float:
        """Share of the pool's memory not holding payload: 1 - compressed/pool."""
        if not self.pool_bytes:
            return 0.0
        return 1.0 - self.compressed_bytes / self.pool_bytes

    def metadata_bytes(self) -> int:
        """Bytes of allocator bookkeeping: arrays, lists, arena headers, free stacks."""
        size = sys.getsizeof
        total = (size(self.bufs) + size(self.views) + size(self.free) + size(self.osize)
                 + size(self.used) + size(self.fresh) + size(self.free_ids)
                 + size(self.spare) + size(self.class_objects) + size(self.class_cap)
                 + size(self.partial) + sum(size(p) for p in self.partial))
        for buf, view, fs in zip(self.bufs, self.views, self.free):
            if buf is not None:
                total += size(buf) + size(view) + size(fs)
        return total

    def spare_bytes(self) -> int:
        """Memory held by empty spare arenas (released under pressure)."""
        return sum(len(self.bufs[aid]) for aid in self.spare if aid >= 0)  # type: ignore[arg-type]

    def class_counts(self) -> dict[int, int]:
        """Stored objects by object size, for classes that hold any."""
        return {(c + 1) * CLASS_STEP: n for c, n in enumerate(self.class_objects) if n}

    def check_invariants(self, live: dict[int, list[int]], compressed_bytes: int) -> None:
        """Check the bookkeeping against the live handles the slot tables hold.

        ``live`` maps arena id to the object indices referenced from slots;
        ``compressed_bytes`` is the payload the slot tables account for.
        """
        objects = 0
        pool_bytes = 0
        arenas = 0
        class_objects = [0] * NCLASSES
        for aid in live:
            if not (0 <= aid < len(self.bufs)) or self.bufs[aid] is None:
                raise AssertionError(f"pool: a slot references released arena {aid}")
        for aid, buf in enumerate(self.bufs):
            if buf is None:
                if self.osize[aid] or self.used[aid] or aid not in self.free_ids:
                    raise AssertionError(f"pool: released arena {aid} has state left")
                if aid in live:
                    raise AssertionError(f"pool: slots reference released arena {aid}")
                continue
            arenas += 1
            osize = self.osize[aid]
            cls = (osize >> CLASS_SHIFT) - 1
            cap = self.class_cap[cls]
            if len(buf) != cap * osize:
                raise AssertionError(f"pool: arena {aid} has {len(buf)} bytes, want {cap * osize}")
            pool_bytes += len(buf)
            fs = self.free[aid]
            assert fs is not None
            fresh = self.fresh[aid]
            used = self.used[aid]
            free_set = set(fs)
            if len(free_set) != len(fs):
                raise AssertionError(f"pool: arena {aid} has an object twice on its free stack")
            if any(i >= fresh for i in fs):
                raise AssertionError(f"pool: arena {aid} free stack holds a never-used object")
            if used != fresh - len(fs) or not 0 <= used <= cap or fresh > cap:
                raise AssertionError(f"pool: arena {aid} used={used} fresh={fresh} "
                                     f"free={len(fs)} cap={cap}")
            idxs = live.get(aid, [])
            if len(idxs) != used:
                raise AssertionError(f"pool: arena {aid} counts {used} used objects, "
                                     f"slots reference {len(idxs)}")
            if len(set(idxs)) != len(idxs):
                raise AssertionError(f"pool: two slots share an object in arena {aid}")
            for i in idxs:
                if i >= fresh or i in free_set:
                    raise AssertionError(f"pool: slot references free object {i} of arena {aid}")
            in_partial = self.partial[cls].count(aid)
            if in_partial != (1 if used < cap else 0):
                raise AssertionError(f"pool: arena {aid} ({used}/{cap} used) is listed "
                                     f"{in_partial} times as having room")
            if used == 0 and self.spare[cls] != aid:
                raise AssertionError(f"pool: empty arena {aid} is not its class's spare")
            objects += used
            class_objects[cls] += used
        if list(self.class_objects) != class_objects:
            raise AssertionError("pool: objects per class disagree with the arenas")
        used_bytes = sum(c * ((i + 1) << CLASS_SHIFT) for i, c in enumerate(class_objects))
        if used_bytes != self.used_bytes:
            raise AssertionError(f"pool: used_bytes {self.used_bytes} counted, objects in use "
                                 f"hold {used_bytes}")
        if objects != self.objects:
            raise AssertionError(f"pool: {self.objects} objects counted, arenas hold {objects}")
        if pool_bytes != self.pool_bytes or arenas != self.arenas:
            raise AssertionError(f"pool: pool_bytes {self.pool_bytes}/arenas {self.arenas} "
                                 f"counted, arenas sum to {pool_bytes}/{arenas}")
        if self.pool_bytes > self.max_bytes:
            raise AssertionError(f"pool: pool_bytes {self.pool_bytes} above max {self.max_bytes}")
        if compressed_bytes != self.compressed_bytes:
            raise AssertionError(f"pool: compressed_bytes {self.compressed_bytes} counted, "
                                 f"slots hold {compressed_bytes}")
        for cls in range(NCLASSES):
            aid = self.spare[cls]
            if aid >= 0 and (self.bufs[aid] is None or self.used[aid]
                             or (self.osize[aid] >> CLASS_SHIFT) - 1 != cls):
                raise AssertionError(f"pool: spare {aid} of class {cls} is not an empty arena of it")
