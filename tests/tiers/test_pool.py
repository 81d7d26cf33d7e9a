"""The pool allocator: classes, spans, reuse, release, limits, compaction."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from swapfs.errors import Misuse
from swapfs.tiers.pool import (
    CLASS_CAP,
    CLASS_PAGES,
    CLASS_SIZE,
    HEADER,
    HUGE_CLASS,
    MAX_OBJECT,
    MAX_SPAN_PAGES,
    NCLASSES,
    OWNER_LIMIT,
    PINNED,
    SPARE_PAGES,
    Pool,
    PoolFull,
    class_of,
    class_size,
)

KiB = 1024
MiB = 1 << 20
P = 4096

Live = dict[int, tuple[int, bytes, int]]  # handle -> (n, data, owner)


def check(pool: Pool, live: Live) -> None:
    """Invariants, and every live object reads back with its owner."""
    for h, (n, data, owner) in live.items():
        assert bytes(pool.view(h, n)) == data
        assert pool.owner(h, n) == owner
    pool.check_invariants({h: (n, owner) for h, (n, _, owner) in live.items()},
                          sum(n for n, _, _ in live.values()))


def put(pool: Pool, live: Live, n: int, owner: int, rng: random.Random | None = None) -> int:
    data = (rng or random).randbytes(n)
    h = pool.alloc(data, n, owner)
    assert h not in live
    live[h] = (n, data, owner)
    return h


def relocator(live: Live, refuse: set[int] = frozenset()):  # type: ignore[assignment]
    """A relocate callback over ``live`` that refuses the owners in ``refuse``."""
    calls = []

    def relocate(owner: int, old: int, new: int) -> bool:
        calls.append((owner, old, new))
        n, data, o = live[old]
        assert o == owner
        if owner in refuse:
            return False
        del live[old]
        live[new] = (n, data, owner)
        return True
    relocate.calls = calls  # type: ignore[attr-defined]
    return relocate


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS")


def test_classes() -> None:
    assert class_size(1) == 16 and class_size(8) == 16 and class_size(9) == 32
    assert class_of(P) == HUGE_CLASS == NCLASSES - 1 and class_size(P) == P
    assert class_of(MAX_OBJECT + 1) == HUGE_CLASS and class_of(MAX_OBJECT) != HUGE_CLASS
    for n in range(1, MAX_OBJECT + 1):
        c = class_of(n)
        assert CLASS_SIZE[c] >= n + HEADER
        assert c == 0 or CLASS_SIZE[c - 1] < n + HEADER  # the smallest class that fits
    for c in range(NCLASSES):
        assert 1 <= CLASS_PAGES[c] <= MAX_SPAN_PAGES
        assert CLASS_CAP[c] * CLASS_SIZE[c] <= CLASS_PAGES[c] * P
        assert CLASS_SIZE[c] % 16 == 0
    # Merged: no two classes have the same span shape next to each other.
    for c in range(1, HUGE_CLASS):
        assert (CLASS_PAGES[c], CLASS_CAP[c]) != (CLASS_PAGES[c - 1], CLASS_CAP[c - 1])


def test_alloc_free_reuse() -> None:
    pool = Pool(max_bytes=1 * MiB)
    live: Live = {}
    for i, n in enumerate((1, 8, 9, 31, 100, 1000, 3000, MAX_OBJECT, MAX_OBJECT + 1, P)):
        put(pool, live, n, i)
    check(pool, live)
    assert pool.objects == 10
    assert pool.compressed_bytes == sum(n for n, _, _ in live.values())
    # Free one of a span's two and allocate in its class: the object is reused.
    put(pool, live, 95, 50)
    h = next(h for h, (n, _, _) in live.items() if n == 100)
    pool.free_object(h, 100)
    del live[h]
    assert class_of(104) == class_of(100)
    h2 = put(pool, live, 104, 77)
    assert h2 == h
    check(pool, live)
    for h, (n, _, _) in list(live.items()):
        pool.free_object(h, n)
        del live[h]
    check(pool, live)
    # Emptied spans stay as spares (bounded) until released.
    assert pool.objects == 0 and pool.used_bytes == 0
    assert pool.pool_bytes == pool.spare_bytes() <= SPARE_PAGES * P
    pool.release_spares()
    assert pool.spans == 0 and pool.pool_bytes == 0
    check(pool, live)


def test_huge_pages() -> None:
    pool = Pool(max_bytes=1 * MiB)
    live: Live = {}
    for i in range(40):
        put(pool, live, P, i << 40 | i)
    assert pool.spans == 40 and pool.pool_bytes == 40 * P
    assert pool.class_counts() == {P: 40}
    assert pool.fragmentation == 0.0 and pool.holes == 0.0
    check(pool, live)
    for h in list(live)[::2]:
        pool.free_object(h, P)
        del live[h]
    check(pool, live)
    assert pool.spans == 20


def test_spans_straddle_pages() -> None:
    # 1488-byte objects (1480 bytes of payload): 11 to a span of 4 pages,
    # most of them across a page boundary, each one slice of the mapping.
    n = 1480
    c = class_of(n)
    assert (CLASS_SIZE[c], CLASS_PAGES[c], CLASS_CAP[c]) == (1488, 4, 11)
    pool = Pool(max_bytes=1 * MiB)
    live: Live = {}
    for i in range(11):
        put(pool, live, n, i)
    assert pool.spans == 1 and pool.pool_bytes == 4 * P
    check(pool, live)


def test_empty_pool_under_1_mib() -> None:
    pool = Pool(max_bytes=1 << 30)
    assert pool.pool_bytes == 0 and pool.spans == 0
    assert pool.metadata_bytes() < 64 * KiB
    rng = random.Random(1)
    live: Live = {}
    for i in range(5000):
        put(pool, live, rng.choice([rng.randrange(1, P + 1), rng.randrange(200, 2500)]), i, rng)
    check(pool, live)
    for h, (n, _, _) in list(live.items()):
        pool.free_object(h, n)
        del live[h]
    check(pool, live)
    # Only spares stay, bounded; the bookkeeping stays small.
    assert pool.pool_bytes == pool.spare_bytes() <= SPARE_PAGES * P
    assert pool.pool_bytes + pool.metadata_bytes() < 1 * MiB
    pool.release_spares()
    assert pool.pool_bytes == 0
    check(pool, live)


def test_released_pages_go_back() -> None:
    """Freed spans give their memory back (madvise); the mapping stays."""
    pool = Pool(max_bytes=256 * MiB)
    live: Live = {}
    data = os.urandom(P)
    before = rss_bytes()
    for i in range(16384):  # 64 MiB of huge pages
        h = pool.alloc(data, P, i)
        live[h] = (P, data, i)
    grown = rss_bytes() - before
    assert grown > 56 * MiB
    for h in list(live):
        pool.free_object(h, P)
    del live
    assert pool.pool_bytes <= SPARE_PAGES * P
    assert rss_bytes() - before < 8 * MiB


def test_full() -> None:
    pool = Pool(max_bytes=128 * KiB, spare_pages=0)
    live: Live = {}
    for i in range(32):
        put(pool, live, P, i)
    assert pool.pool_bytes == 128 * KiB
    with pytest.raises(PoolFull, match="max_bytes"):
        pool.alloc(b"z" * P, P, 99)
    # Another class needs its own span: also full.
    with pytest.raises(PoolFull):
        pool.alloc(b"z" * 100, 100, 99)
    check(pool, live)
    # Freeing makes room again (for a class of 1-page spans).
    h = next(iter(live))
    pool.free_object(h, P)
    del live[h]
    assert CLASS_PAGES[class_of(120)] == 1
    put(pool, live, 120, 5)
    check(pool, live)


def test_full_releases_spares() -> None:
    pool = Pool(max_bytes=128 * KiB)
    live: Live = {}
    h = pool.alloc(b"a" * 100, 100, 1)
    pool.free_object(h, 100)  # its span (2 pages) stays, empty, as a spare
    assert pool.spans == 1 and pool.pool_bytes == 2 * P == pool.spare_bytes()
    for i in range(32):  # needs the whole budget
        put(pool, live, P, i)
    assert pool.spans == 32 and pool.spare_bytes() == 0
    check(pool, live)


def test_compaction_releases_memory() -> None:
    pool = Pool(max_bytes=64 * MiB)
    rng = random.Random(5)
    live: Live = {}
    for i in range(4000):
        put(pool, live, rng.randrange(900, 1300), i, rng)
    held = pool.pool_bytes
    # Free three objects in four, scattered: holes everywhere, few spans empty.
    for k, (h, (n, _, _)) in enumerate(list(live.items())):
        if k % 4:
            pool.free_object(h, n)
            del live[h]
    pool.release_spares()
    assert pool.holes > 0.6 and pool.pool_bytes > held // 2
    check(pool, live)
    expect = pool.compactable_bytes()
    assert expect > held // 2
    rss0 = rss_bytes()
    before = pool.pool_bytes
    relocate = relocator(live)
    moved, freed = pool.compact(relocate)
    assert moved == len(relocate.calls) > 0  # type: ignore[attr-defined]
    assert freed == expect and pool.pool_bytes == before - freed
    assert pool.holes < 0.1
    assert pool.compactions == 1 and pool.compacted_objects == moved
    assert pool.compacted_bytes == freed
    assert rss_bytes() <= rss0
    check(pool, live)
    # Nothing left to gain: a second pass moves nothing.
    assert pool.compactable_bytes() == 0
    assert pool.compact(relocator(live)) == (0, 0)
    check(pool, live)


def test_compaction_refused_moves_keep_objects() -> None:
    pool = Pool(max_bytes=16 * MiB)
    rng = random.Random(6)
    live: Live = {}
    for i in range(600):
        put(pool, live, 500, i, rng)
    for k, (h, (n, _, _)) in enumerate(list(live.items())):
        if k % 3:
            pool.free_object(h, n)
            del live[h]
    refuse = {o for _, _, o in live.values() if o % 2}
    handles = {o: h for h, (_, _, o) in live.items()}
    relocate = relocator(live, refuse)
    moved, _ = pool.compact(relocate)
    assert moved > 0
    for owner in refuse:
        assert live[handles[owner]][2] == owner  # still where it was
    check(pool, live)


def test_owners_stay_below_the_pinned_bit() -> None:
    pool = Pool(max_bytes=MiB)
    for n in (100, P):
        with pytest.raises(Misuse):
            pool.alloc(b"x" * n, n, OWNER_LIMIT)
        pool.alloc(b"x" * n, n, OWNER_LIMIT - 1)
    assert pool.objects == 2


def test_compaction_leaves_pinned_objects() -> None:
    pool = Pool(max_bytes=16 * MiB)
    rng = random.Random(7)
    live: Live = {}
    for i in range(600):
        put(pool, live, 500, i, rng)
    for k, (h, (n, _, _)) in enumerate(list(live.items())):
        if k % 3:
            pool.free_object(h, n)
            del live[h]
    pinned = [h for h, (_, _, o) in live.items() if o % 2]
    for h in pinned:
        pool.set_header(h, PINNED | 5)
    seen: list[int] = []

    def relocate(owner: int, old: int, new: int) -> bool:
        seen.append(old)
        return False

    pool.compact(relocate)
    assert seen and not set(seen) & set(pinned)
    for h in pinned:
        assert pool.header(h) == PINNED | 5
        pool.set_header(h, live[h][2])
    check(pool, live)


def test_compaction_budget() -> None:
    pool = Pool(max_bytes=16 * MiB)
    live: Live = {}
    for i in range(1000):
        put(pool, live, 200, i)
    for k, (h, (n, _, _)) in enumerate(list(live.items())):
        if k % 2:
            pool.free_object(h, n)
            del live[h]
    moved, _ = pool.compact(relocator(live), budget=10)
    assert moved == 10
    check(pool, live)
    moved, _ = pool.compact(relocator(live))
    assert moved > 0
    check(pool, live)


def test_random_churn() -> None:
    rng = random.Random(7)
    pool = Pool(max_bytes=8 * MiB)
    live: Live = {}
    for step in range(5000):
        if live and rng.random() < 0.45:
            h = rng.choice(list(live))
            pool.free_object(h, live.pop(h)[0])
        else:
            put(pool, live, rng.choice([rng.randrange(1, P + 1), rng.randrange(1, 300)]), step,
                rng)
        if step % 700 == 0:
            pool.compact(relocator(live), budget=50)
        if step % 500 == 0:
            check(pool, live)
    check(pool, live)
    for h, (n, _, _) in list(live.items()):
        pool.free_object(h, n)
    pool.release_spares()
    assert pool.pool_bytes == 0 and pool.spans == 0
    check(pool, {})


def test_bookkeeping_per_page() -> None:
    pool = Pool(max_bytes=256 * MiB)
    rng = random.Random(3)
    n_pages = 20000
    for i in range(n_pages):
        n = rng.randrange(800, 2400)
        pool.alloc(b"q" * n, n, i)
    assert pool.metadata_bytes() / n_pages <= 16


class PoolMachine(RuleBasedStateMachine):
    """Random allocs, frees and compactions against a model of the live objects."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool(max_bytes=2 * MiB, spare_pages=8)
        self.live: Live = {}
        self.owner = 0

    @rule(n=st.one_of(st.integers(1, 64), st.integers(1, P), st.sampled_from([MAX_OBJECT, P])),
          fill=st.binary(min_size=1, max_size=8))
    def alloc(self, n: int, fill: bytes) -> None:
        self.owner += 1
        data = (fill * (n // len(fill) + 1))[:n]
        try:
            h = self.pool.alloc(data, n, self.owner)
        except PoolFull:
            assert self.pool.pool_bytes + CLASS_PAGES[class_of(n)] * P > self.pool.max_bytes
            return
        assert h not in self.live
        self.live[h] = (n, data, self.owner)

    @precondition(lambda self: self.live)
    @rule(k=st.integers(0, 1 << 30))
    def free(self, k: int) -> None:
        h = list(self.live)[k % len(self.live)]
        n, _, _ = self.live.pop(h)
        self.pool.free_object(h, n)

    @rule(budget=st.one_of(st.none(), st.integers(0, 20)), refuse=st.integers(0, 3))
    def compact(self, budget: int | None, refuse: int) -> None:
        # refuse: every refuse-th owner stays put (0: none)
        held = self.pool.pool_bytes - self.pool.spare_bytes()
        deny = {o for _, _, o in self.live.values() if refuse and o % (refuse + 1) == 0}
        moved, freed = self.pool.compact(relocator(self.live, deny), budget)
        assert budget is None or moved <= budget
        assert self.pool.pool_bytes - self.pool.spare_bytes() == held - freed

    @rule()
    def release_spares(self) -> None:
        self.pool.release_spares()
        assert self.pool.spare_bytes() == 0

    @invariant()
    def consistent(self) -> None:
        check(self.pool, self.live)


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
test_pool_machine = PoolMachine.TestCase


@pytest.mark.parametrize("shared", [False, True])
def test_a_batch_gives_adjacent_spans_back_in_one_call(shared: bool) -> None:
    """Spans emptied inside ``batch()`` stay held until its end, then go back
    to the system a run of adjacent pages at a time (a hole punched in the
    memory file of a shared pool is a system call each), read as zeros, and
    are reused like any released pages."""
    from swapfs.memory import StateMemory

    pool = Pool(max_bytes=16 * MiB, spare_pages=0, memory=StateMemory(shared=shared))
    live: Live = {}
    n = 1000
    for i in range(600):  # a few hundred spans, carved one after the other
        put(pool, live, n, i)
    spans, held, carved = pool.spans, pool.pool_bytes, len(pool.page_word)
    calls = pool.release_calls
    with pool.batch():
        for h in list(live):
            pool.free_object(h, n)
            del live[h]
        assert pool.pool_bytes == held  # still held: nothing given back yet
    assert pool.release_calls - calls == 1  # one run of adjacent spans, one call
    assert pool.pool_bytes == 0 and pool.spans == 0
    assert spans > 100
    assert not any(pool.mem[:held])  # the pages read as zeros: given back
    check(pool, live)
    for i in range(600):
        put(pool, live, n, i)
    assert pool.pool_bytes == held and len(pool.page_word) == carved  # reused, none carved
    check(pool, live)
    # Without a batch each emptied span is one call.
    calls = pool.release_calls
    for h in list(live):
        pool.free_object(h, n)
        del live[h]
    assert pool.release_calls - calls == spans
    check(pool, live)
