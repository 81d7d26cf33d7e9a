"""Recovery: a successor's store made whole from the truth a predecessor left.

After ``Store(config, memory=StateMemory.adopt(fds))`` the slot tables, the
pool's objects and span layout, the journal and the header are what the
predecessor wrote, up to the instruction it was killed at; everything else
is empty.  :func:`recover` trusts only the slot tables (and, for the one
slot switch that may have been in flight, the journal), checks every slot
against what it names, and rebuilds the rest from them:

1. the journal: a slot switch in flight is undone (its old handle and info
   are still valid: the old content is freed only after the journal is
   cleared);
2. every slot in use, read from the pages of the info column that hold
   data: its encoding must be valid, a MOVING flag is cleared (no move is in
   flight any more), a pool slot's object must lie in a span of its class
   and its header must name the slot as owner or be a shared (dedup)
   object's reference count; a stale handle of an empty slot is zeroed and
   a cluster left without slots gives its memory back;
3. the pool's bookkeeping (spans, free lists, class lists, counts) from the
   objects slots name; every object or page no slot names is freed and
   counted as a leak; shared objects get their reference count again;
4. each file tier's segment map from the objects slots name: live bytes
   and objects per segment; a segment no slot names is free (punched first
   if it held objects), appends resume in a fresh segment under a new
   generation (the generations are truth, kept in the state memory); the
   objects the predecessor counted that no slot names are the leaks;
5. the dedup index (hashing every indexed object), the device counters,
   the cluster counts.

Any slot that cannot be what it says raises StoreError: the state cannot be
served and the successor must refuse it (a page read as zeros, or as
another page's bytes, is worse than no page at all).  The order of writes
that makes step 1 the only repair a kill can need is docs/store.md's "Crash
consistency".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import StoreError
from .kernel import PAGE_SIZE
from .slots import (
    ALT,
    CLUSTER_SHIFT,
    CLUSTER_SLOTS,
    EMPTY,
    HUGE,
    HUGE_INFO,
    KIND_MASK,
    MOVING,
    POOL,
    SAME,
    VALID_BITS,
    in_file,
    key_device,
    key_slot,
    length_of,
    slot_key,
    tier_of_kind,
)
from .state import Device, StoreState
from .tiers.pool import FREE_TAG, HEADER, MAX_OBJECT, OBJECT_BYTES, PINNED


@dataclass(frozen=True)
class Recovery:
    """What one recovery found and did."""

    seconds: float  # how long it took
    leaked_objects: int  # pool objects (or huge pages) no slot named: freed
    leaked_file_pages: int  # file tier pages no slot named: freed
    pages: int  # slots holding a page


def recover(state: StoreState) -> Recovery:
    """Check and rebuild ``state`` from its slot tables (see the module
    docstring); StoreError if it cannot be served."""
    t0 = time.perf_counter()
    _undo_journal(state)
    objects: dict[int, tuple[int, int]] = {}  # handle -> (length, owner: first slot naming it)
    refs: dict[int, int] = {}  # handle -> slots naming it, where more than one
    alt: set[int] = set()  # handles of objects in the second codec
    file_pages: list[dict[int, int]] = [{} for _ in state.tiers]  # handle -> length
    pages = 0
    for dev in state.devices:
        pages += _scan_device(state, dev, objects, refs, alt, file_pages)
    pinned = _check_headers(state, objects, refs)
    leaked = state.pool.rebuild(objects, lambda w: _is_owner(state, w))
    leaked_file = sum(t.rebuild(p.items()) for t, p in zip(state.tiers, file_pages))
    _restore_headers(state, pinned, refs)
    dd = state.dedup
    if dd is not None:
        mem = state.pool.mem
        for h, (n, _owner) in objects.items():
            if n <= MAX_OBJECT and h not in alt:
                dd.insert(dd.hash(mem[h:h + n]), h, n)
        for h, r in refs.items():
            n = objects[h][0]
            dd.extra_refs += r - 1
            dd.saved_payload += (r - 1) * n
            dd.saved_bytes += (r - 1) * OBJECT_BYTES[n]
    seconds = time.perf_counter() - t0
    header = state.header
    header.set("recoveries", header.get("recoveries") + 1)
    header.set("recovered_leaks", header.get("recovered_leaks") + leaked + leaked_file)
    header.set("recovery_micros", header.get("recovery_micros") + int(seconds * 1e6))
    return Recovery(seconds=seconds, leaked_objects=leaked, leaked_file_pages=leaked_file,
                    pages=pages)


def _is_owner(state: StoreState, w: int) -> bool:
    """``w`` can be an object header: a slot of the store, or a shared count."""
    if w & PINNED:
        return 1 < w & (PINNED - 1) < 1 << 40
    di = key_device(w)
    return di < len(state.devices) and key_slot(w) < state.devices[di].npages


def _undo_journal(state: StoreState) -> None:
    j = state.journal
    if not j[0]:
        return
    key = j[0] - 1
    di, s = key_device(key), key_slot(key)
    if di >= len(state.devices) or s >= state.devices[di].npages:
        raise StoreError(f"state: the journal names slot {key:#x}, which no device has")
    table = state.devices[di].table
    table.handles[s] = j[1]
    table.info[s] = j[2]
    j[0] = 0


def _scan_device(state: StoreState, dev: Device, objects: dict[int, tuple[int, int]],
                 refs: dict[int, int], alt: set[int], file_pages: list[dict[int, int]]) -> int:
    table = dev.table
    handles = table.handles
    info = table.info
    memory = state.memory
    ntiers = len(state.tiers)
    same = pool_pages = huge = files = cbytes = pbytes = 0
    base = slot_key(dev.index, 0)
    clusters: set[int] = set()
    for m in table.columns():
        width = len(m) // (table.nclusters * CLUSTER_SLOTS)
        for start, end in memory.data_ranges(m):
            lo = start // (width * CLUSTER_SLOTS)
            hi = -(-end // (width * CLUSTER_SLOTS))
            clusters.update(range(lo, min(hi, table.nclusters)))
    for c in range(table.nclusters):
        table.cluster_used[c] = 0
        table.nonempty[c] = 0
    used_total = 0
    for c in sorted(clusters):
        lo = c << CLUSTER_SHIFT
        hi = min(lo + CLUSTER_SLOTS, dev.npages)
        used = 0
        for s in range(lo, hi):
            i = info[s]
            if not i:
                if handles[s]:
                    handles[s] = 0  # a discard killed between its two stores
                continue
            if i & ~VALID_BITS:
                raise StoreError(f"{dev.name}: slot {s} has an invalid info word {i:#x}")
            if i & MOVING:
                i &= ~MOVING
                info[s] = i
            used += 1
            k = i & KIND_MASK
            h = handles[s]
            if k == SAME:
                same += 1
            elif k == POOL or k == HUGE:
                n = length_of(i)
                if k == HUGE and i != HUGE_INFO or not 0 < n <= PAGE_SIZE or (
                        k == POOL and n > MAX_OBJECT):
                    raise StoreError(f"{dev.name}: slot {s} has an invalid length in {i:#x}")
                have = objects.get(h)
                if have is None:
                    objects[h] = (n, base | s)
                elif have[0] != n or n > MAX_OBJECT or state.dedup is None:
                    raise StoreError(f"{dev.name}: slot {s} names object {h:#x}, which "
                                     f"another slot names with another length or unshared")
                else:
                    refs[h] = refs.get(h, 1) + 1
                if i & ALT:
                    alt.add(h)
                if k == POOL:
                    pool_pages += 1
                else:
                    huge += 1
                cbytes += n
                pbytes += OBJECT_BYTES[n]
            elif in_file(i):
                ti = tier_of_kind(k)
                if ti >= ntiers:
                    raise StoreError(f"{dev.name}: slot {s} names file tier {ti}, which "
                                     "the configuration does not have")
                named = file_pages[ti]
                if h in named:
                    raise StoreError(f"{dev.name}: slot {s} names the object at {h} of tier "
                                     f"{state.tiers[ti].name}, which another slot names")
                n = length_of(i)
                if not 0 < n <= PAGE_SIZE:
                    raise StoreError(f"{dev.name}: slot {s} names an object of {n} bytes in "
                                     f"tier {state.tiers[ti].name}")
                named[h] = n
                files += 1
            elif k == EMPTY:
                raise StoreError(f"{dev.name}: slot {s} is empty with flags {i:#x}")
            else:
                raise StoreError(f"{dev.name}: slot {s} has unknown kind {k}")
        if used:
            table.cluster_used[c] = used
            table.nonempty[c] = 1
            used_total += used
        else:
            table.release_cluster(c)
    dev.stored_pages = used_total
    dev.same_filled_pages = same
    dev.pool_pages = pool_pages
    dev.huge_pages = huge
    dev.file_pages = files
    dev.compressed_bytes = cbytes
    dev.pool_bytes = pbytes
    return used_total


def _check_headers(state: StoreState, objects: dict[int, tuple[int, int]],
                   refs: dict[int, int]) -> list[int]:
    """Every object a slot names must be the slot's: its header names the
    slot as owner, or says it is shared (dedup).  Nothing is changed here.
    Returns the shared objects' handles."""
    pinned = []
    words = state.pool.words
    size = len(state.pool.mem)
    for h, (n, owner) in objects.items():
        if n > MAX_OBJECT:
            if h % PAGE_SIZE or h + PAGE_SIZE > size:
                raise StoreError(f"pool: huge handle {h:#x} of slot {owner:#x} is no page")
            continue
        if h < HEADER or h % 16 != HEADER or h + n > size:
            raise StoreError(f"pool: handle {h:#x} of slot {owner:#x} is no object")
        w = words[(h - HEADER) >> 3]
        if w & FREE_TAG:
            raise StoreError(f"pool: slot {owner:#x} names object {h:#x}, which is free")
        if w & PINNED:
            if state.dedup is None:
                raise StoreError(f"pool: object {h:#x} of slot {owner:#x} is pinned without "
                                 "dedup")
            pinned.append(h)
        elif h in refs:
            raise StoreError(f"pool: object {h:#x} is named by {refs[h]} slots, unshared")
        elif w != owner:
            raise StoreError(f"pool: slot {owner:#x} names object {h:#x}, whose owner is "
                             f"{w:#x}")
    return pinned


def _restore_headers(state: StoreState, pinned: list[int], refs: dict[int, int]) -> None:
    """Shared objects' reference counts, recounted from the slots."""
    words = state.pool.words
    for h in pinned:
        words[(h - HEADER) >> 3] = PINNED | refs.get(h, 1)
