"""The store's consistency check: every table walked, every counter recounted.

Tests call it after every test and, in the model-based concurrency test,
after every step; it reads the state layer (swapfs/state.py) and the tiers
through their public interfaces only, and recounts everything derived from
the slot tables.  It raises InvariantError (an AssertionError too) naming
the first discrepancy.
"""

from __future__ import annotations

from . import store_stats
from .cache import KEY_PAGE_MASK, KEY_SHIFT
from .errors import InvariantError
from .slots import (
    ALT,
    EMPTY,
    HUGE,
    KIND_NAMES,
    MOVING,
    POOL,
    SAME,
    SETTLED,
    SHADOW,
    in_file,
    kind_of,
    length_of,
    slot_key,
    tier_of_kind,
    unknown_bits,
)
from .state import Device, StoreState
from .tiers.pool import MAX_OBJECT, OBJECT_BYTES


def check_store(store: StoreState, *, quiescent: bool = True) -> None:
    """Walk every table of ``store`` and recount; InvariantError naming the
    first discrepancy.

    ``quiescent``: no request is running (no page may be pinned).  With
    False, reads may be in flight: pinned pages and the frees they defer are
    allowed.  The accounting identity is checked at every moment: pages in
    flight and deferred frees are left out of the tiers' counts."""
    files = store.files
    live: dict[int, tuple[int, int]] = {}  # pool handle -> (payload bytes, owner)
    refs: dict[int, int] = {}  # pool handle -> references, where more than one
    # file tier -> handle -> (device name, slot, payload length)
    file_owner: list[dict[int, tuple[str, int, int]]] = [{} for _ in files]
    moving = 0
    for dev in store.devices:
        _cbytes, nmoving = _check_device(store, dev, live, refs, file_owner)
        moving += nmoving
    for h, n, owner in store.staged_pool_objects():  # writes waiting for a file tier
        _reference(store, live, refs, h, n, owner, "a staged write")
    _check_dedup(store, live, refs)
    store.pool.check_invariants(live, sum(n for n, _ in live.values()))
    in_moves = store.moves_in_flight
    if moving > in_moves:
        raise InvariantError(f"{moving} slots flagged MOVING, {in_moves} in moves")
    if quiescent and files.pinned_pages:
        raise InvariantError(f"file pages still pinned: {files.pinned_pages}")
    for ti, tier in enumerate(files):
        tier.check_invariants()
        owned = files.owned_pages(ti)
        if owned != len(file_owner[ti]):
            raise InvariantError(f"tier {tier.name}: {owned} pages owned by slots by the counts, "
                                 f"{len(file_owner[ti])} referenced by slot tables")
        _check_segments(store, ti, file_owner[ti])
    _check_cache(store, file_owner, quiet=not in_moves)
    _check_accounting(store)


def _reference(store: StoreState, live: dict[int, tuple[int, int]], refs: dict[int, int], h: int,
               n: int, owner: int, who: str) -> None:
    """Count a reference to pool object ``h`` of ``n`` bytes."""
    if h not in live:
        live[h] = (n, owner)
        return
    if store.dedup is None or n > MAX_OBJECT:
        raise InvariantError(f"{who} shares pool object {h:#x} (dedup is off)")
    if live[h][0] != n:
        raise InvariantError(f"{who} holds pool object {h:#x} with length {n}, another "
                             f"reference with {live[h][0]}")
    refs[h] = refs.get(h, 1) + 1


def _check_dedup(store: StoreState, live: dict[int, tuple[int, int]], refs: dict[int, int]) -> None:
    """Reference counts in the object headers equal the references the
    slot tables (and writes in flight) hold; every index entry is a live
    object that hashes to it; every shared object is indexed.  The owner a
    shared object's header must hold is put in ``live`` for the pool's check."""
    dd = store.dedup
    pool = store.pool
    if dd is None:
        return
    indexed = dd.check()
    extra = payload = pbytes = 0
    for h, n in indexed.items():
        if h not in live or live[h][0] != n:
            raise InvariantError(f"dedup: index entry {h:#x} ({n} bytes) is no live object")
    for h, (n, _owner) in list(live.items()):
        if n > MAX_OBJECT:
            continue
        want = refs.get(h, 1)
        have = dd.refs(h, n)
        if have != want:
            raise InvariantError(f"dedup: object {h:#x} counts {have} references, "
                                 f"{want} are held")
        if dd.is_shared(h, n):  # its header is the index's count, not an owner
            live[h] = (n, pool.owner(h, n))
        if want > 1:
            if h not in indexed:
                raise InvariantError(f"dedup: shared object {h:#x} is not indexed")
            extra += want - 1
            payload += (want - 1) * n
            pbytes += (want - 1) * OBJECT_BYTES[n]
    if (extra, payload, pbytes) != (dd.extra_refs, dd.saved_payload, dd.saved_bytes):
        raise InvariantError(f"dedup: counts {dd.extra_refs} shared references "
                             f"({dd.saved_payload}/{dd.saved_bytes} bytes), tables hold "
                             f"{extra} ({payload}/{pbytes})")


def _check_device(store: StoreState, dev: Device, live: dict[int, tuple[int, int]],
                  refs: dict[int, int],
                  file_owner: list[dict[int, tuple[str, int, int]]]) -> tuple[int, int]:
    """Walk one slot table; returns (compressed bytes, slots flagged MOVING)."""
    table = dev.table
    if not (len(table.handles) == len(table.info) == len(table.epoch) == dev.npages):
        raise InvariantError(f"{dev.name}: slot table columns are not {dev.npages} long")
    table.check()
    counts = {EMPTY: 0, SAME: 0, POOL: 0, HUGE: 0}
    nfile = cbytes = pbytes = moving = 0
    counts[EMPTY] = dev.npages - sum(table.cluster_used)
    for s in (s for c0, c1 in table.stored_chunks(0, dev.npages) for s in range(c0, c1)):
        i = table.info[s]
        h = table.handles[s]
        if i == EMPTY:
            if h:
                raise InvariantError(f"{dev.name}: empty slot {s} has handle {h:#x}")
            continue
        k = kind_of(i)
        n = length_of(i)
        if unknown_bits(i):
            raise InvariantError(f"{dev.name}: slot {s} has unknown info bits {i:#x}")
        if i & MOVING:
            moving += 1
            if k != POOL and k != HUGE and not in_file(i):
                raise InvariantError(f"{dev.name}: {KIND_NAMES.get(k, k)} slot {s} is flagged MOVING")
        if i & SHADOW and not in_file(i):
            raise InvariantError(f"{dev.name}: slot {s} in memory has a shadow")
        if i & (ALT | SETTLED) and (k != POOL or i & ALT and store.recodec is None
                                    or i & ALT and i & SETTLED):
            raise InvariantError(f"{dev.name}: {KIND_NAMES.get(k, k)} slot {s} has recompression "
                                 f"flags {i & (ALT | SETTLED):#x}")
        if k == SAME:
            if n:
                raise InvariantError(f"{dev.name}: same-filled slot {s} has length {n}")
        elif k == POOL or k == HUGE:
            if k == POOL and not 0 < n <= store.accept_limit:
                raise InvariantError(f"{dev.name}: pool slot {s} has length {n}, "
                                     f"accept limit {store.accept_limit}")
            if k == HUGE and n != 4096:
                raise InvariantError(f"{dev.name}: huge slot {s} has length {n}")
            _reference(store, live, refs, h, n, slot_key(dev.index, s),
                       f"{dev.name}: slot {s} ({KIND_NAMES[k]})")
            cbytes += n
            pbytes += OBJECT_BYTES[n]
        elif in_file(i) and tier_of_kind(k) < len(file_owner):
            tier = store.files[tier_of_kind(k)]
            if not 0 < n <= 4096 or not tier.is_used(h, n):
                raise InvariantError(f"{dev.name}: file slot {s} names an object of {n} bytes "
                                     f"at {h} of tier {tier.name}, not live there")
            owners = file_owner[tier_of_kind(k)]
            if h in owners:
                raise InvariantError(f"{dev.name}: slot {s} and {owners[h][:2]} share the "
                                     f"object at {h} of tier {tier.name}")
            owners[h] = (dev.name, s, n)
            nfile += 1
            continue
        else:
            raise InvariantError(f"{dev.name}: slot {s} has unknown kind {k}")
        counts[k] += 1
    want = {
        "stored_pages": dev.npages - counts[EMPTY],
        "same_filled_pages": counts[SAME],
        "pool_pages": counts[POOL],
        "huge_pages": counts[HUGE],
        "file_pages": nfile,
        "compressed_bytes": cbytes,
        "pool_bytes": pbytes,
    }
    for name, value in want.items():
        if getattr(dev, name) != value:
            raise InvariantError(f"{dev.name}: {name} counts {getattr(dev, name)}, "
                                 f"slot table holds {value}")
    return cbytes, moving


def _check_segments(store: StoreState, ti: int, owners: dict[int, tuple[str, int, int]]) -> None:
    """With no object of tier ``ti`` in flight, each segment's live objects
    and bytes are exactly those slots name and deferred frees hold."""
    files = store.files
    if files.inflight[ti]:
        return
    tier = files[ti]
    want: dict[int, list[int]] = {}
    named = [(h, n) for h, (_d, _s, n) in owners.items()] + files.deferred_objects(ti)
    for h, n in named:
        w = want.setdefault(tier.segment_of(h), [0, 0])
        w[0] += 1
        w[1] += tier.object_bytes(n)
    for seg, (objs, nbytes) in enumerate(tier.segment_live()):
        w = want.get(seg, [0, 0])
        if [objs, nbytes] != w:
            raise InvariantError(f"tier {tier.name}: segment {seg} counts {objs} objects, "
                                 f"{nbytes} bytes; slots and deferred frees name {w[0]}, "
                                 f"{w[1]}")


def _check_cache(store: StoreState, file_owner: list[dict[int, tuple[str, int, int]]], *,
                 quiet: bool) -> None:
    """Every cached page is a live file object's; with no move in flight,
    a slot's, and equal to what the tier holds."""
    cache = store.cache
    files = store.files
    cache.check_invariants()
    for key in cache.keys():
        ti, h = key >> KEY_SHIFT, key & KEY_PAGE_MASK
        if ti >= len(files):
            raise InvariantError(f"swap cache holds tier {ti}, which does not exist")
        owner = file_owner[ti].get(h)
        if owner is None:
            if quiet:
                raise InvariantError(f"swap cache holds tier {ti} object {h}, no slot's")
            continue
        dname, s, n = owner
        if not files[ti].is_used(h, n):
            raise InvariantError(f"swap cache holds tier {ti} object {h}, not live")
        if not quiet:
            continue
        cached = cache.get(key)
        if cached is None:
            raise InvariantError(f"swap cache: key {key:#x} listed but not held")
        dev = store.device(dname)
        if files[ti].is_open and files.read_page_now(ti, h, n, slot_key(dev.index, s)) \
                != bytes(cached):
            raise InvariantError(f"swap cache: tier {ti} object {h} differs from disk")


def _check_accounting(store: StoreState) -> None:
    st = store_stats.collect(store)
    t = st.totals
    tier_pages = sum(tier.stored_pages for tier in st.tiers)
    dev_pages = sum(d.stored_pages for d in st.devices)
    if not t.stored_pages == t.same_filled_pages + tier_pages == dev_pages:
        raise InvariantError(f"accounting: totals.stored_pages {t.stored_pages}, same-filled "
                             f"{t.same_filled_pages} + tiers {tier_pages}, devices {dev_pages}")
    _pages, shared_payload, shared_pbytes = store.dedup_committed()
    if sum(d.compressed_bytes for d in st.devices) != st.pool.compressed_bytes + shared_payload:
        raise InvariantError("accounting: devices' compressed_bytes do not sum to the pool's "
                             "(and the shared pages')")
    if sum(d.pool_bytes for d in st.devices) - shared_pbytes > st.pool.pool_bytes:
        raise InvariantError("accounting: devices' class bytes exceed the pool's memory")
