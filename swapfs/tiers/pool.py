"""The compressed memory pool: size-classed objects in small spans, compacted.

zsmalloc-shaped (mm/zsmalloc.c: size classes, zspages, class merging,
compaction), built for Python: no Python object per page, per span or per
object; all bookkeeping lives in ``array`` columns.

**Classes.**  An object of ``n`` bytes takes ``n + 8`` bytes: an 8-byte
header (the object's *owner* word, see below) and the payload, rounded up
to a 16-byte class.  For each class the **span** (zsmalloc's zspage) is the
run of 1..4 contiguous 4 KiB pages that wastes least; objects straddle page
boundaries inside a span (the pages are contiguous in the address space, so
a read is still one ``memoryview`` slice).  Neighbouring classes whose spans
have the same page count and hold the same number of objects are merged
into the larger one, as zsmalloc does: they cost the same memory per span,
and fewer classes leave fewer partly used spans.  Objects of more than
``4096 - 8`` bytes (raw "huge" pages) are in the last class: one page each,
no header, no span bookkeeping (see ``page_word``).

**Memory.**  The objects live in one region of the store's state memory
(``pool`` of a ``swapfs.memory.StateMemory``: private, or a memory file a
successor adopts) reserved at
``4 * max_bytes`` of address space (``MAP_NORESERVE``, never populated): a
page costs memory only once touched, and the daemon's
``mlockall(MCL_ONFAULT)`` locks it only then.  Spans are carved from it by
a bump pointer.  A released span's pages go back to the system with
``madvise(MADV_DONTNEED_LOCKED)`` (``MADV_DONTNEED`` fails on locked memory;
plain DONTNEED on kernels before 5.18), or a hole punched in the memory file
of a shared region, and its first page goes on the free
list for its page count (``cold[k]``), reused before any new address space.
Up to ``spare_pages`` (64: 256 KiB) pages stay resident instead, as
*spares*, to absorb alloc/free churn: a span that becomes empty stays listed
in its class (its next object costs no span set-up), and a freed huge page
or released span's pages wait on ``spare[k]``; spares are released first
when the pool nears ``max_bytes``.  ``pool_bytes`` is the memory
really held: pages of live spans, huge pages and spares.  An empty pool
holds at most the spares.  Address space used by k-page spans never exceeds
``max_bytes`` (free ones are reused first), hence the 4x reservation.

**Handles.**  A handle is the payload's byte offset in the mapping:
``view(h, n)`` is ``mem[h:h + n]`` (the store's read loop inlines it).

**Per page** (``page_word``, ``array('Q')`` over the pages carved so far):
the span id of a page of a span, or ``HUGE_TAG | owner`` for a huge page.
The ``pool.layout`` region keeps, per page, ``(first page + 1) << 16 |
class`` of the span (or huge page) it belongs to, written when the span is
set up and cleared when it is released (never per object): with the
handles slots name, all a successor needs to find every span again
(``rebuild``; span ids, free lists and class lists are derived).

**Per span** (indexed by span id; released ids are reused): first page,
class, objects in use, objects ever handed out (a bump index: a new span
costs no per-object work), and the head of the span's free list (the
header offset + 1, 0 when empty; each free object's header holds
``FREE_TAG | next``).  Per
class, ``partial[class]`` (an ``array('I')``) lists the spans with room,
each span knowing its position (``pos``) so it leaves the list in O(1);
allocation takes the last listed span.

**Owners and compaction.**  ``alloc(data, n, owner)`` records ``owner``, an
opaque integer below OWNER_LIMIT (2**62; larger ones raise ``Misuse``) given
by the store (its slot key, ``swapfs.slots.slot_key``), in the object's
header (a huge page's in its ``page_word``).
``compact(relocate)`` moves objects out of the sparsest spans of each class
into the fullest ones with room (only in classes whose free objects add up
to at least one span), and releases the spans it empties.  For each object
moved it calls ``relocate(owner, old_handle, new_handle)`` synchronously,
after the copy: the callee points its reference at the new handle and
returns True, or returns False and the pool drops the copy and keeps the
object where it was (the store refuses a slot being migrated, see
docs/store.md).  Huge pages are never moved (nothing to gain), nor are
*pinned* objects: a header with the PINNED bit (above every owner) says
"do not move"; the rest of such a header belongs to whoever pinned it (the
dedup index, swapfs/dedup.py, pins shared objects and counts their
references there) and the pool does not read it.

Nothing here awaits: every method runs to completion in the caller's step
of the trio loop, so a copy, its relocate call and the free of the old
object happen in one step and no reader sees a handle about to be freed
(see docs/store.md).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from array import array
from collections.abc import Callable, Iterator

from ..errors import InvariantError, Misuse, StoreError
from ..kernel import PAGE_SIZE
from ..memory import StateMemory

log = logging.getLogger(__name__)

HEADER = 8  # the owner word before each (non-huge) object
CLASS_STEP = 16
MAX_SPAN_PAGES = 4
SPARE_PAGES = 64
# Holes (see Pool.holes) above which the store compacts after writeback.
COMPACT_HOLES = 0.10
FREE_TAG = 1 << 63  # a free object's header: FREE_TAG | next free index + 1
HUGE_TAG = 1 << 63  # a huge page's page_word: HUGE_TAG | owner
# Owners are below OWNER_LIMIT; a header at or above it is PINNED: never
# moved by compaction, its low bits another module's (swapfs/dedup.py).
OWNER_LIMIT = 1 << 62
PINNED = OWNER_LIMIT
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
_NO_CLASS = 0xFFFF
_ZERO_LAYOUT = memoryview(array("Q", bytes(8 * MAX_SPAN_PAGES)))


def _build_classes() -> tuple[list[int], list[int], list[int]]:
    """Class object sizes, span pages and objects per span; the huge class last."""
    raw = []
    for size in range(CLASS_STEP, PAGE_SIZE + 1, CLASS_STEP):
        best = None
        for k in range(1, MAX_SPAN_PAGES + 1):
            cap = k * PAGE_SIZE // size
            used = cap * size / (k * PAGE_SIZE)
            if best is None or used > best[0] + 1e-12:
                best = (used, k, cap)
        if best is None:
            raise InvariantError(f"pool: no span shape for {size}-byte objects")
        raw.append((size, best[1], best[2]))
    merged: list[tuple[int, int, int]] = []
    for c in reversed(raw):  # a class merges into the next larger one of the same shape
        if merged and merged[-1][1:] == c[1:]:
            continue
        merged.append(c)
    merged.reverse()
    sizes = [c[0] for c in merged] + [PAGE_SIZE]
    pages = [c[1] for c in merged] + [1]
    caps = [c[2] for c in merged] + [1]
    return sizes, pages, caps


CLASS_SIZE, CLASS_PAGES, CLASS_CAP = _build_classes()
NCLASSES = len(CLASS_SIZE)
HUGE_CLASS = NCLASSES - 1
MAX_OBJECT = PAGE_SIZE - HEADER  # larger objects are huge: stored raw, no header


def _class_table() -> list[int]:
    table = [0] * (PAGE_SIZE + 1)
    c = 0
    for n in range(1, PAGE_SIZE + 1):
        if n > MAX_OBJECT:
            table[n] = HUGE_CLASS
            continue
        while CLASS_SIZE[c] < n + HEADER:
            c += 1
        table[n] = c
    return table


SIZE_CLASS = _class_table()  # n -> class, n in 1..4096
OBJECT_BYTES = [CLASS_SIZE[c] for c in SIZE_CLASS]  # n -> bytes the object takes
OBJECT_BYTES[0] = 0


def class_of(n: int) -> int:
    """Size class of an object of ``n`` bytes."""
    return SIZE_CLASS[n]


def class_size(n: int) -> int:
    """Bytes an object of ``n`` bytes takes in the pool, header included."""
    return OBJECT_BYTES[n]


class PoolFull(StoreError):
    """Allocating would take the pool's memory above max_bytes (or the
    system has no memory for the pool's bookkeeping)."""


Relocate = Callable[[int, int, int], bool]


class Pool:
    """Size-classed spans holding compressed (and raw huge) pages."""

    def __init__(self, max_bytes: int, spare_pages: int = SPARE_PAGES,
                 memory: StateMemory | None = None) -> None:
        self.max_bytes = max_bytes
        self.memory = memory if memory is not None else StateMemory()
        self.spare_limit = spare_pages
        # The mapping: address space for every span the pool may ever need.
        self.reserve_pages = max(MAX_SPAN_PAGES * -(-max_bytes // PAGE_SIZE), MAX_SPAN_PAGES)
        try:
            self._map = self.memory.reserve("pool", self.reserve_pages * PAGE_SIZE)
            # Per page of address space: ``(first page + 1) << 16 | class``
            # of the span it was last carved into (0: never).  Written when a
            # span is set up, never per object: what recovery needs to find
            # a span's objects from a handle (see ``rebuild``).
            self._layout_map = self.memory.reserve("pool.layout", self.reserve_pages * 8)
        except OSError as e:
            raise OSError(e.errno, f"cannot reserve {self.reserve_pages * PAGE_SIZE} bytes of "
                                   f"address space for a pool of {max_bytes} bytes: "
                                   f"{e.strerror}") from e
        self.mem = memoryview(self._map)
        # The mapping itself: a slice of it is a bytes copy, so comparing one
        # with bytes is a memcmp (a memoryview compares element by element).
        self.raw = self._map
        self.words = self.mem.cast("Q")
        self.layout = memoryview(self._layout_map).cast("Q")
        self.page_word = array("Q")  # per page carved: span id, or HUGE_TAG | owner
        # Free spans' first pages by page count: spares (resident, counted in
        # pool_bytes) and released ones (pages given back).
        self.spare: list[array[int]] = [array("I") for _ in range(MAX_SPAN_PAGES + 1)]
        self.cold: list[array[int]] = [array("I") for _ in range(MAX_SPAN_PAGES + 1)]
        self.spare_pages = 0
        # Per span, by span id.
        self.s_page = array("I")
        self.s_cls = array("H")
        self.s_used = array("H")
        self.s_fresh = array("H")
        self.s_free = array("Q")
        self.s_pos = array("I")
        self.free_ids = array("I")
        # Per class.
        self.partial: list[array[int]] = [array("I") for _ in range(NCLASSES)]
        self.class_objects = array("Q", [0]) * NCLASSES
        self.class_spans = array("Q", [0]) * NCLASSES  # huge: pages
        # Totals.
        self.pool_bytes = 0
        self.compressed_bytes = 0
        self.spans = 0  # huge pages included
        # Compaction.
        self.compactions = 0
        self.compacted_objects = 0
        self.compacted_bytes = 0  # memory released by compaction
        self.release_errors = 0  # page ranges the kernel would not take back
        # Inside ``batch()``: pages to give back at its end, ``(first page, count)``
        # side by side, still held and counted until then.
        self._batching = 0
        self._rel_first = array("I")
        self._rel_pages = array("B")
        self.release_calls = 0  # calls that gave pages back (a run of adjacent spans is one)

    @property
    def arenas(self) -> int:
        """Spans held, huge pages included (the stats' historical name)."""
        return self.spans

    # -- hot path ---------------------------------------------------------

    def alloc(self, data: bytes | memoryview, n: int, owner: int = 0) -> int:
        """Store ``n`` bytes of ``data`` for ``owner`` (< OWNER_LIMIT); return
        the handle.  Raises PoolFull."""
        if owner >= OWNER_LIMIT:
            raise Misuse(f"pool: owner {owner:#x} is not below {OWNER_LIMIT:#x}")
        if n > MAX_OBJECT:
            g = self._take_pages(1, HUGE_CLASS)
            self.page_word[g] = HUGE_TAG | owner
            self.layout[g] = (g + 1) << 16 | HUGE_CLASS
            self.compressed_bytes += n
            self.class_objects[HUGE_CLASS] += 1
            self.class_spans[HUGE_CLASS] += 1
            self.spans += 1
            off = g << PAGE_SHIFT
            self.mem[off:off + n] = data
            return off
        cls = SIZE_CLASS[n]
        part = self.partial[cls]
        sid = part[-1] if part else self._new_span(cls)
        used = self.s_used
        u = used[sid] + 1
        used[sid] = u
        if u == 1:  # the span was empty: no longer a spare
            self.spare_pages -= CLASS_PAGES[cls]
        if u == CLASS_CAP[cls]:
            part.pop()
        self.compressed_bytes += n
        self.class_objects[cls] += 1
        words = self.words
        off = self.s_free[sid]
        if off:  # the free list's head: header offset + 1
            off -= 1
            self.s_free[sid] = words[off >> 3] ^ FREE_TAG
        else:
            idx = self.s_fresh[sid]
            self.s_fresh[sid] = idx + 1
            off = (self.s_page[sid] << PAGE_SHIFT) + idx * CLASS_SIZE[cls]
        words[off >> 3] = owner
        off += HEADER
        self.mem[off:off + n] = data
        return off

    def free_object(self, handle: int, n: int) -> None:
        """Free the object ``handle`` of ``n`` bytes."""
        self.compressed_bytes -= n
        if n > MAX_OBJECT:
            self.class_objects[HUGE_CLASS] -= 1
            self.class_spans[HUGE_CLASS] -= 1
            self.spans -= 1
            self.layout[handle >> PAGE_SHIFT] = 0
            self._free_pages(handle >> PAGE_SHIFT, 1, keep=True)
            return
        sid = self.page_word[handle >> PAGE_SHIFT]
        cls = self.s_cls[sid]
        self.class_objects[cls] -= 1
        used = self.s_used
        u = used[sid]
        if u == 1:
            k = CLASS_PAGES[cls]
            if self.spare_pages + k > self.spare_limit:
                self._release_span(sid, cls, listed=CLASS_CAP[cls] > 1)
                return
            self.spare_pages += k  # the span stays, empty, as a spare
        used[sid] = u - 1
        if u == CLASS_CAP[cls]:
            part = self.partial[cls]
            self.s_pos[sid] = len(part)
            part.append(sid)
        handle -= HEADER
        self.words[handle >> 3] = FREE_TAG | self.s_free[sid]
        self.s_free[sid] = handle + 1

    def view(self, handle: int, n: int) -> memoryview:
        """The ``n`` stored bytes of ``handle``, without a copy.

        Valid until the object is freed or moved; the store only hands it to
        the decompressor or copies it within the same step.
        """
        return self.mem[handle:handle + n]

    def header(self, handle: int) -> int:
        """The header word of the (not huge) object ``handle``: its owner, or
        PINNED and whatever its pinner keeps there."""
        return self.words[(handle - HEADER) >> 3]

    def set_header(self, handle: int, word: int) -> None:
        """Rewrite the header of the (not huge) object ``handle``: a word with
        PINNED set keeps it where it is (its owner is then not known)."""
        self.words[(handle - HEADER) >> 3] = word

    def owner(self, handle: int, n: int) -> int:
        """The owner word the object ``handle`` of ``n`` bytes was stored with."""
        if n > MAX_OBJECT:
            return self.page_word[handle >> PAGE_SHIFT] ^ HUGE_TAG
        return self.words[(handle - HEADER) >> 3]

    @property
    def objects(self) -> int:
        """Objects stored (compressed and huge)."""
        return sum(self.class_objects)

    @property
    def used_bytes(self) -> int:
        """Bytes of the objects in use (class bytes, headers included): what
        the pool would hold with no free object in any span."""
        return sum(c * n for c, n in zip(CLASS_SIZE, self.class_objects))

    # -- objects within spans, for compaction (payload totals unchanged) --

    def _take_slot(self, sid: int, cls: int) -> int:
        """Hand out a free object of span ``sid`` (listed as having room);
        return the offset of its header."""
        off = self.s_free[sid]
        if off:
            off -= 1
            self.s_free[sid] = self.words[off >> 3] ^ FREE_TAG
        else:
            idx = self.s_fresh[sid]
            self.s_fresh[sid] = idx + 1
            off = (self.s_page[sid] << PAGE_SHIFT) + idx * CLASS_SIZE[cls]
        u = self.s_used[sid] + 1
        self.s_used[sid] = u
        if u == 1:
            self.spare_pages -= CLASS_PAGES[cls]
        if u == CLASS_CAP[cls]:
            self._unlist(sid, cls)
        return off

    def _drop_slot(self, sid: int, cls: int, hdr: int) -> None:
        """Return the object whose header is at ``hdr`` to span ``sid``'s free
        list (the span keeps at least one object)."""
        u = self.s_used[sid]
        if u <= 1:
            raise InvariantError(f"pool: span {sid} would be left empty by a compaction move")
        self.s_used[sid] = u - 1
        if u == CLASS_CAP[cls]:
            part = self.partial[cls]
            self.s_pos[sid] = len(part)
            part.append(sid)
        self.words[hdr >> 3] = FREE_TAG | self.s_free[sid]
        self.s_free[sid] = hdr + 1

    def _unlist(self, sid: int, cls: int) -> None:
        part = self.partial[cls]
        pos = self.s_pos[sid]
        last = part.pop()
        if last != sid:
            part[pos] = last
            self.s_pos[last] = pos

    # -- spans and pages --------------------------------------------------

    def _take_pages(self, k: int, cls: int) -> int:
        """First page of ``k`` free pages: a spare, a released span or new
        address space.  Raises PoolFull."""
        spare = self.spare[k]
        if spare:
            self.spare_pages -= k
            return spare.pop()
        nbytes = k * PAGE_SIZE
        if self.pool_bytes + nbytes > self.max_bytes:
            self.release_spares()
            if self.pool_bytes + nbytes > self.max_bytes:
                raise PoolFull(
                    f"pool holds {self.pool_bytes} of max_bytes {self.max_bytes}: no room for "
                    f"another {k}-page span for {CLASS_SIZE[cls]}-byte objects")
        cold = self.cold[k]
        if cold:
            g = cold.pop()
        else:
            g = len(self.page_word)
            if g + k > self.reserve_pages:  # cannot happen: see the module docstring
                raise PoolFull(f"pool address space ({self.reserve_pages} pages) exhausted")
            try:
                self.page_word.frombytes(bytes(8 * k))
            except MemoryError:  # the system is out of memory: as good as full
                raise PoolFull(f"no memory for the pool's bookkeeping of {k} more pages") from None
        self.pool_bytes += nbytes
        return g

    def _free_pages(self, g: int, k: int, *, keep: bool) -> None:
        """Free ``k`` pages from page ``g``: a spare (``keep`` and room among
        the spares) or back to the system (inside ``batch()``: at its end)."""
        if not (keep and self.spare_pages + k <= self.spare_limit):
            if self._batching:
                self._rel_first.append(g)
                self._rel_pages.append(k)
                return
            if self._give_back(g, k):
                self.cold[k].append(g)
                self.pool_bytes -= k * PAGE_SIZE
                return
        self.spare[k].append(g)  # kept resident (or could not be given back)
        self.spare_pages += k

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Within the block, pages freed to the system are given back at its
        end, a run of adjacent ones in one call (a hole punched in a shared
        region is a system call and a TLB flush each).  Until then they stay
        held and counted in ``pool_bytes``, and are not reused.  The block
        must not await: nothing may see the pool between the free and the
        release (``check_invariants`` would count the pages nowhere)."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching and self._rel_first:
                self._release_batch()

    def _release_batch(self) -> None:
        """Give back the pages ``batch()`` collected, adjacent runs together."""
        runs = sorted(zip(self._rel_first, self._rel_pages))
        del self._rel_first[:]
        del self._rel_pages[:]
        i, n = 0, len(runs)
        while i < n:
            g, k = runs[i]
            end = g + k
            j = i + 1
            while j < n and runs[j][0] == end:
                end += runs[j][1]
                j += 1
            ok = self._give_back(g, end - g)
            for g, k in runs[i:j]:
                if ok:
                    self.cold[k].append(g)
                    self.pool_bytes -= k * PAGE_SIZE
                else:  # kept resident, as a spare
                    self.spare[k].append(g)
                    self.spare_pages += k
            i = j

    def _give_back(self, g: int, k: int) -> bool:
        """Return ``k`` pages from page ``g`` to the system; False (the pages
        stay held, and are counted) if the kernel refuses."""
        try:
            self.memory.release(self._map, g << PAGE_SHIFT, k * PAGE_SIZE)
            self.release_calls += 1
            return True
        except OSError as e:
            self.release_errors += 1
            if self.release_errors == 1:
                log.warning("pool: cannot give free pages back to the system (%s); they stay "
                            "held as spares", e)
            return False

    def _new_span(self, cls: int) -> int:
        k = CLASS_PAGES[cls]
        g = self._take_pages(k, cls)
        if self.free_ids:
            sid = self.free_ids.pop()
            self.s_page[sid] = g
            self.s_cls[sid] = cls
            self.s_used[sid] = 0
            self.s_fresh[sid] = 0
            self.s_free[sid] = 0
        else:
            sid = len(self.s_page)
            self.s_page.append(g)
            self.s_cls.append(cls)
            self.s_used.append(0)
            self.s_fresh.append(0)
            self.s_free.append(0)
            self.s_pos.append(0)
        pw = self.page_word
        lay = self.layout
        word = (g + 1) << 16 | cls
        for p in range(g, g + k):
            lay[p] = word
            pw[p] = sid
        part = self.partial[cls]
        self.s_pos[sid] = len(part)
        part.append(sid)
        self.spans += 1
        self.class_spans[cls] += 1
        self.spare_pages += k  # empty until its first object
        return sid

    def _release_span(self, sid: int, cls: int, *, listed: bool, keep: bool = True) -> None:
        if listed:
            self._unlist(sid, cls)
        g = self.s_page[sid]
        self.layout[g:g + CLASS_PAGES[cls]] = _ZERO_LAYOUT[:CLASS_PAGES[cls]]
        self._free_pages(g, CLASS_PAGES[cls], keep=keep)
        self.s_cls[sid] = _NO_CLASS
        self.s_used[sid] = 0
        self.free_ids.append(sid)
        self.spans -= 1
        self.class_spans[cls] -= 1

    def release_spares(self) -> None:
        """Give every spare's pages back to the system: empty spans and free
        pages kept resident."""
        s_used = self.s_used
        for cls in range(HUGE_CLASS):
            part = self.partial[cls]
            for sid in [sid for sid in part if not s_used[sid]]:
                self.spare_pages -= CLASS_PAGES[cls]
                self._release_span(sid, cls, listed=True, keep=False)
        for k in range(1, MAX_SPAN_PAGES + 1):
            spare = self.spare[k]
            stuck = array("I")
            while spare:
                g = spare.pop()
                if self._give_back(g, k):
                    self.cold[k].append(g)
                    self.pool_bytes -= k * PAGE_SIZE
                else:
                    stuck.append(g)
            spare.extend(stuck)
        self.spare_pages = sum(k * len(self.spare[k]) for k in range(1, MAX_SPAN_PAGES + 1))

    # -- compaction -------------------------------------------------------

    def compactable_bytes(self) -> int:
        """Memory compaction could release now: per class, whole spans' worth
        of free objects in partly used spans."""
        total = 0
        s_used = self.s_used
        for cls in range(HUGE_CLASS):
            part = self.partial[cls]
            if len(part) < 2:
                continue
            cap = CLASS_CAP[cls]
            free = len(part) * cap - sum(s_used[s] for s in part)
            total += free // cap * CLASS_PAGES[cls] * PAGE_SIZE
        return total

    def compact(self, relocate: Relocate, budget: int | None = None) -> tuple[int, int]:
        """Move objects out of the sparsest spans into the fullest with room,
        class by class, and release the spans emptied; return (objects
        moved, bytes of memory released).

        ``relocate(owner, old_handle, new_handle)`` is called for every
        object copied, before the old one is freed; it returns True once the
        owner refers to the new handle, or False to keep the object where it
        was (the copy is dropped).  ``budget``: at most this many objects
        are moved.  Spans emptied here give their pages back before it
        returns, adjacent ones in one call (they do not become spares)."""
        with self.batch():  # the spans emptied go back in runs, at the end
            return self._compact(relocate, budget)

    def _compact(self, relocate: Relocate, budget: int | None) -> tuple[int, int]:
        moved = 0
        freed = 0
        s_used = self.s_used
        s_fresh = self.s_fresh
        words = self.words
        mem = self.mem
        for cls in range(HUGE_CLASS):
            if budget is not None and moved >= budget:
                break
            part = self.partial[cls]
            if len(part) < 2:
                continue
            cap = CLASS_CAP[cls]
            if len(part) * cap - sum(s_used[s] for s in part) < cap:
                continue  # the free objects do not add up to a span
            size = CLASS_SIZE[cls]
            order = sorted(part, key=s_used.__getitem__)
            lo, hi = 0, len(order) - 1
            while lo < hi and (budget is None or moved < budget):
                src = order[lo]
                first = self.s_page[src] << PAGE_SHIFT
                for idx in range(s_fresh[src]):
                    hdr = first + idx * size
                    owner = words[hdr >> 3]
                    if owner & (FREE_TAG | PINNED):
                        continue  # free, or pinned (its owners are not known)
                    while hi > lo and s_used[order[hi]] == cap:
                        hi -= 1
                    if hi <= lo or (budget is not None and moved >= budget):
                        break
                    dst = order[hi]
                    new = self._take_slot(dst, cls)
                    mem[new:new + size] = mem[hdr:hdr + size]
                    if not relocate(owner, hdr + HEADER, new + HEADER):
                        self._drop_slot(dst, cls, new)
                        continue
                    moved += 1
                    if s_used[src] == 1:
                        self._release_span(src, cls, listed=True, keep=False)
                        freed += CLASS_PAGES[cls] * PAGE_SIZE
                        break
                    self._drop_slot(src, cls, hdr)
                lo += 1
        self.compactions += 1
        self.compacted_objects += moved
        self.compacted_bytes += freed
        return moved, freed

    # -- recovery -----------------------------------------------------------

    def rebuild(self, objects: dict[int, tuple[int, int]],
                is_owner: Callable[[int], bool] = bool) -> int:
        """Rebuild every piece of bookkeeping from the objects in use, after
        adopting the pool's memory (regions ``pool`` and ``pool.layout``):
        ``objects`` maps each handle a slot names to ``(length, owner)``.
        Spans are found again through the layout words; objects no handle
        names are freed (their span's free list, or whole spans and pages
        given back).  Returns the objects freed (holes of spans in use
        excepted: those are free space, not leaks, unless they held an
        object header).  In a span no slot uses any more, an object counts
        as a leak if its header ``is_owner`` (a slot key of the store, or a
        shared object's count): objects never handed out hold whatever the
        page held before.  StoreError if a handle cannot be an object of the
        pool as laid out (the state cannot be served)."""
        layout = self.layout
        words = self.words
        limit = self.reserve_pages
        spans: dict[int, tuple[int, list[int]]] = {}  # first page -> (class, object indexes)
        huge: dict[int, int] = {}  # page -> owner
        # In handle order: the objects of one span come together, and all but
        # the first of each take the short road.
        lo = hi = base = size = cap = 0
        want = -1
        idxs: list[int] = []
        for h in sorted(objects):
            n, owner = objects[h]
            if lo <= h < hi and SIZE_CLASS[n] == want:
                rel = h - base
                i = rel // size
                if rel % size or i >= cap:
                    raise StoreError(f"pool: handle {h:#x} is not an object of the span at "
                                     f"page {lo >> PAGE_SHIFT}")
                idxs.append(i)
                continue
            g = h >> PAGE_SHIFT
            if not 0 < n <= PAGE_SIZE or not 0 <= g < limit:
                raise StoreError(f"pool: handle {h:#x} ({n} bytes) is outside the pool")
            if n > MAX_OBJECT:
                if h & (PAGE_SIZE - 1):
                    raise StoreError(f"pool: huge handle {h:#x} is not a page")
                huge[g] = owner
                continue
            w = layout[g]
            first, cls = (w >> 16) - 1, w & 0xFFFF
            if not w or cls != SIZE_CLASS[n] or not first <= g < first + CLASS_PAGES[cls]:
                raise StoreError(f"pool: handle {h:#x} of {n} bytes is in no span of its class")
            if first in spans:
                raise StoreError(f"pool: span at page {first} is named out of order or "
                                 "with two classes")
            for p in range(first, first + CLASS_PAGES[cls]):
                if layout[p] != w:
                    raise StoreError(f"pool: span at page {first} is torn at page {p}")
            want, size, cap = cls, CLASS_SIZE[cls], CLASS_CAP[cls]
            lo, hi = first << PAGE_SHIFT, (first + CLASS_PAGES[cls]) << PAGE_SHIFT
            base = lo + HEADER
            rel = h - base
            if rel % size or rel // size >= cap:
                raise StoreError(f"pool: handle {h:#x} is not an object of the span at page "
                                 f"{first}")
            idxs = [rel // size]
            spans[first] = (cls, idxs)
        owner_of: dict[int, int] = {}  # page -> first page of its span (or itself, huge)
        for g in huge:
            owner_of[g] = g
        for first, (cls, _) in spans.items():
            for p in range(first, first + CLASS_PAGES[cls]):
                if p in owner_of:
                    raise StoreError(f"pool: page {p} is in two objects' spans")
                owner_of[p] = first
        carved = max(owner_of) + 1 if owner_of else 0
        # Derived state from scratch.
        self.page_word = array("Q", bytes(8 * carved))
        self.spare = [array("I") for _ in range(MAX_SPAN_PAGES + 1)]
        self.cold = [array("I") for _ in range(MAX_SPAN_PAGES + 1)]
        self.spare_pages = 0
        for col in (self.s_page, self.s_cls, self.s_used, self.s_fresh, self.s_free, self.s_pos,
                    self.free_ids):
            del col[:]
        self.partial = [array("I") for _ in range(NCLASSES)]
        self.class_objects = array("Q", [0]) * NCLASSES
        self.class_spans = array("Q", [0]) * NCLASSES
        self.compressed_bytes = sum(n for n, _ in objects.values())
        leaked = 0
        for g, owner in huge.items():
            self.page_word[g] = HUGE_TAG | owner
        self.class_objects[HUGE_CLASS] = self.class_spans[HUGE_CLASS] = len(huge)
        pages = len(huge)
        for first, (cls, idxs) in sorted(spans.items()):
            sid = len(self.s_page)
            size = CLASS_SIZE[cls]
            cap = CLASS_CAP[cls]
            k = CLASS_PAGES[cls]
            base = first << PAGE_SHIFT
            fresh = idxs[-1] + 1  # (in handle order: increasing, no index twice)
            head = 0
            taken = set(idxs) if fresh != len(idxs) else range(fresh)
            for i in range(fresh - 1 if fresh != len(idxs) else -1, -1, -1):
                if i in taken:  # the free list, lowest object first
                    continue
                hdr = base + i * size
                w = words[hdr >> 3]
                if not w & FREE_TAG:
                    leaked += 1  # an object no slot names (or never finished)
                words[hdr >> 3] = FREE_TAG | head
                head = hdr + 1
            for p in range(first, first + k):
                self.page_word[p] = sid
            self.s_page.append(first)
            self.s_cls.append(cls)
            self.s_used.append(len(idxs))
            self.s_fresh.append(fresh)
            self.s_free.append(head)
            self.s_pos.append(0)
            if len(idxs) < cap:
                part = self.partial[cls]
                self.s_pos[sid] = len(part)
                part.append(sid)
            self.class_objects[cls] += len(idxs)
            self.class_spans[cls] += 1
            pages += k
        self.spans = len(huge) + len(spans)
        self.pool_bytes = pages * PAGE_SIZE
        # Pages carved but in no object's span: given back, reusable one by one.
        lost = [g for g in range(carved) if g not in owner_of]
        for g in lost:
            leaked += self._leaks_in_page(g, is_owner)
        for g in lost:
            self.layout[g] = 0
        for g in reversed(lost):
            if self._give_back(g, 1):
                self.cold[1].append(g)
            else:
                self.spare[1].append(g)
                self.spare_pages += 1
                self.pool_bytes += PAGE_SIZE
        if carved < limit:  # never carved: nothing there may survive
            self.memory.release(self._map, carved << PAGE_SHIFT, (limit - carved) << PAGE_SHIFT)
            edge = min(-(-carved * 8 // PAGE_SIZE) * PAGE_SIZE // 8, limit)
            self.layout[carved:edge] = array("Q", bytes(8 * (edge - carved)))
            if edge < limit:
                self.memory.release(self._layout_map, edge * 8, len(self._layout_map) - edge * 8)
        return leaked

    def _leaks_in_page(self, g: int, is_owner: Callable[[int], bool]) -> int:
        """Objects (not free) that started in page ``g`` of a span no slot
        uses any more, or 1 for a huge page's worth of data: leaks freed."""
        w = self.layout[g]
        if not w:
            return 0
        first, cls = (w >> 16) - 1, w & 0xFFFF
        if first != g:
            return 0
        if cls == HUGE_CLASS:
            return 1
        size = CLASS_SIZE[cls]
        n = 0
        for i in range(CLASS_CAP[cls]):
            hw = self.words[((g << PAGE_SHIFT) + i * size) >> 3]
            if hw and not hw & FREE_TAG and is_owner(hw):
                n += 1
        return n

    # -- accounting -------------------------------------------------------

    @property
    def fragmentation(self) -> float:
        """Share of the pool's memory not holding payload: 1 - compressed/pool."""
        if not self.pool_bytes:
            return 0.0
        return 1.0 - self.compressed_bytes / self.pool_bytes

    @property
    def holes(self) -> float:
        """Share of the pool's memory held but not taken by an object in use
        (free objects, span tails, spares): 1 - used_bytes/pool_bytes.  What
        compaction can win back, at most; cheap enough to read per write."""
        if not self.pool_bytes:
            return 0.0
        return 1.0 - self.used_bytes / self.pool_bytes

    def metadata_bytes(self) -> int:
        """Bytes of allocator bookkeeping: page, span and class columns, free
        lists (object headers are in pool_bytes)."""
        size = sys.getsizeof
        total = (size(self.page_word) + size(self.s_page) + size(self.s_cls)
                 + size(self.s_used) + size(self.s_fresh) + size(self.s_free)
                 + size(self.s_pos) + size(self.free_ids) + size(self.class_objects)
                 + size(self.class_spans) + size(self.partial) + size(self.spare)
                 + size(self.cold) + size(self._map) + size(self.mem) + size(self.words))
        total += sum(size(a) for a in self.partial)
        total += sum(size(a) for a in self.spare) + sum(size(a) for a in self.cold)
        return total

    def spare_bytes(self) -> int:
        """Memory held by spare spans (released under pressure)."""
        return self.spare_pages * PAGE_SIZE

    def class_counts(self) -> dict[int, int]:
        """Stored objects by object size (header included), for classes that hold any."""
        return {CLASS_SIZE[c]: n for c, n in enumerate(self.class_objects) if n}

    def check_invariants(self, live: dict[int, tuple[int, int]], compressed_bytes: int) -> None:
        """Check the bookkeeping against the live objects the slot tables hold.

        ``live`` maps each handle referenced from a slot to (payload bytes,
        owner); ``compressed_bytes`` is the payload the slot tables account
        for."""
        nspans = len(self.s_page)
        npages = len(self.page_word)
        per_span: dict[int, list[int]] = {}
        class_objects = [0] * NCLASSES
        huge_pages: set[int] = set()
        cbytes = 0
        for h, (n, owner) in live.items():
            g = h >> PAGE_SHIFT
            if not 0 <= g < npages:
                raise InvariantError(f"pool: handle {h:#x} is outside the pages carved")
            cbytes += n
            if n > MAX_OBJECT:
                if h & (PAGE_SIZE - 1) or self.page_word[g] != HUGE_TAG | owner:
                    raise InvariantError(f"pool: huge handle {h:#x} is not a page of {owner:#x}")
                huge_pages.add(g)
                class_objects[HUGE_CLASS] += 1
                continue
            sid = self.page_word[g]
            if sid >= nspans or self.s_cls[sid] == _NO_CLASS:
                raise InvariantError(f"pool: handle {h:#x} is in released span {sid}")
            cls = self.s_cls[sid]
            if SIZE_CLASS[n] != cls:
                raise InvariantError(f"pool: handle {h:#x} of {n} bytes is in a span of "
                                     f"class {CLASS_SIZE[cls]}")
            rel = h - HEADER - (self.s_page[sid] << PAGE_SHIFT)
            if rel < 0 or rel % CLASS_SIZE[cls] or rel // CLASS_SIZE[cls] >= self.s_fresh[sid]:
                raise InvariantError(f"pool: handle {h:#x} is not an object of span {sid}")
            if self.owner(h, n) != owner:
                raise InvariantError(f"pool: object {h:#x} has owner {self.owner(h, n):#x}, "
                                     f"its slot is {owner:#x}")
            per_span.setdefault(sid, []).append(rel // CLASS_SIZE[cls])
            class_objects[cls] += 1
        spans = len(huge_pages)
        page_spares = sum(k * len(self.spare[k]) for k in range(MAX_SPAN_PAGES + 1))
        empty_pages = 0
        pool_bytes = (page_spares + len(huge_pages)) * PAGE_SIZE
        free_ids = set(self.free_ids)
        if len(free_ids) != len(self.free_ids):
            raise InvariantError("pool: a span id is free twice")
        taken: set[int] = set(huge_pages)
        class_spans = [0] * NCLASSES
        class_spans[HUGE_CLASS] = len(huge_pages)
        for sid in range(nspans):
            cls = self.s_cls[sid]
            if cls == _NO_CLASS:
                if sid not in free_ids:
                    raise InvariantError(f"pool: span {sid} is neither live nor free")
                continue
            if sid in free_ids:
                raise InvariantError(f"pool: live span {sid} is on the free list")
            spans += 1
            class_spans[cls] += 1
            k = CLASS_PAGES[cls]
            cap = CLASS_CAP[cls]
            pool_bytes += k * PAGE_SIZE
            g = self.s_page[sid]
            for p in range(g, g + k):
                if p >= npages or self.page_word[p] != sid or p in taken:
                    raise InvariantError(f"pool: page {p} of span {sid} is not its own")
                taken.add(p)
            used = self.s_used[sid]
            fresh = self.s_fresh[sid]
            idxs = per_span.get(sid, [])
            if not used:
                empty_pages += k
            if len(idxs) != used or not 0 <= used <= cap:
                raise InvariantError(f"pool: span {sid} counts {used} objects, slots "
                                     f"reference {len(idxs)} (cap {cap})")
            if len(set(idxs)) != len(idxs):
                raise InvariantError(f"pool: two slots share an object of span {sid}")
            # Walk the free list: every free object once, none in use.
            size = CLASS_SIZE[cls]
            seen = set()
            head = self.s_free[sid]
            while head:
                rel = head - 1 - (g << PAGE_SHIFT)
                i = rel // size
                if rel % size or i in seen or not 0 <= i < fresh or i in idxs:
                    raise InvariantError(f"pool: span {sid} free list is broken at {head - 1}")
                seen.add(i)
                w = self.words[(head - 1) >> 3]
                if not w & FREE_TAG:
                    raise InvariantError(f"pool: free object {i} of span {sid} is untagged")
                head = w ^ FREE_TAG
            if used + len(seen) != fresh or fresh > cap:
                raise InvariantError(f"pool: span {sid} used={used} free={len(seen)} "
                                     f"fresh={fresh} cap={cap}")
            listed = self.partial[cls].count(sid)
            if listed != (1 if used < cap else 0):
                raise InvariantError(f"pool: span {sid} ({used}/{cap}) is listed {listed} times "
                                     "as having room")
            if listed and self.partial[cls][self.s_pos[sid]] != sid:
                raise InvariantError(f"pool: span {sid} has a stale list position")
        for k in range(1, MAX_SPAN_PAGES + 1):
            for g in list(self.spare[k]) + list(self.cold[k]):
                for p in range(g, g + k):
                    if p >= npages or p in taken:
                        raise InvariantError(f"pool: free page {p} is in use or not carved")
                    taken.add(p)
        if len(taken) != npages:
            raise InvariantError(f"pool: {npages - len(taken)} carved pages are lost")
        if page_spares + empty_pages != self.spare_pages or self.spare_pages > max(
                self.spare_limit, MAX_SPAN_PAGES):
            raise InvariantError(f"pool: {self.spare_pages} spare pages counted, "
                                 f"{page_spares} free and {empty_pages} in empty spans")
        if list(self.class_objects) != class_objects:
            raise InvariantError("pool: objects per class disagree with the spans")
        if list(self.class_spans) != class_spans:
            raise InvariantError("pool: spans per class miscounted")
        if pool_bytes != self.pool_bytes or spans != self.spans:
            raise InvariantError(f"pool: pool_bytes {self.pool_bytes}/spans {self.spans} "
                                 f"counted, spans sum to {pool_bytes}/{spans}")
        if self.pool_bytes > self.max_bytes:
            raise InvariantError(f"pool: pool_bytes {self.pool_bytes} above max {self.max_bytes}")
        if compressed_bytes != self.compressed_bytes or cbytes != compressed_bytes:
            raise InvariantError(f"pool: compressed_bytes {self.compressed_bytes} counted, "
                                 f"slots hold {compressed_bytes}")
