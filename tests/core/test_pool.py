"""The pool allocator: classes, arenas, reuse, release, limits."""

from __future__ import annotations

import os
import random

import pytest

from swapfs.tiers.pool import CLASS_STEP, HUGE_CLASS, NCLASSES, Pool, PoolFull, class_of, \
    class_size

KiB = 1024


def check(pool: Pool, live: dict[int, tuple[int, bytes]]) -> None:
    """Invariants, and every live object reads back."""
    idx: dict[int, list[int]] = {}
    for h, (n, data) in live.items():
        idx.setdefault(h >> 16, []).append(h & 0xFFFF)
        assert bytes(pool.view(h, n)) == data
    pool.check_invariants(idx, sum(n for n, _ in live.values()))


def test_classes() -> None:
    assert class_of(1) == 0 and class_of(32) == 0 and class_of(33) == 1
    assert class_of(4096) == HUGE_CLASS == NCLASSES - 1
    assert class_size(1) == 32 and class_size(33) == 64 and class_size(4096) == 4096
    assert CLASS_STEP == 32


def test_alloc_free_reuse() -> None:
    pool = Pool(max_bytes=1 << 20, arena_bytes=64 * KiB)
    live: dict[int, tuple[int, bytes]] = {}
    for n in (1, 31, 32, 33, 100, 1000, 3000, 4096):
        data = os.urandom(n)
        h = pool.alloc(data, n)
        assert h not in live
        live[h] = (n, data)
    check(pool, live)
    assert pool.objects == 8
    assert pool.compressed_bytes == sum(n for n, _ in live.values())
    # Free one and allocate the same size: the object is reused.
    h = next(h for h, (n, _) in live.items() if n == 100)
    pool.free_object(h, 100)
    del live[h]
    data = os.urandom(110)
    h2 = pool.alloc(data, 110)
    assert h2 == h
    live[h2] = (110, data)
    check(pool, live)


def test_arena_release_and_spare() -> None:
    pool = Pool(max_bytes=4 << 20, arena_bytes=64 * KiB)
    n = 1000  # class 1024: 64 objects per 64 KiB arena
    per_arena = pool.class_cap[class_of(n)]
    assert per_arena == 64
    live = {}
    for _ in range(3 * per_arena):
        d = os.urandom(n)
        live[pool.alloc(d, n)] = (n, d)
    assert pool.arenas == 3 and pool.pool_bytes == 3 * 64 * KiB
    check(pool, live)
    # Free everything: one arena stays as the class's spare, the others go.
    for h, (m, _) in list(live.items()):
        pool.free_object(h, m)
        del live[h]
    check(pool, live)
    assert pool.arenas == 1 and pool.pool_bytes == 64 * KiB
    assert pool.objects == 0 and pool.compressed_bytes == 0
    # The spare is used again before any new arena.
    h = pool.alloc(b"x" * n, n)
    assert pool.arenas == 1
    pool.free_object(h, n)
    pool.release_spares()
    assert pool.arenas == 0 and pool.pool_bytes == 0
    check(pool, {})


def test_fragmentation() -> None:
    pool = Pool(max_bytes=1 << 20, arena_bytes=64 * KiB)
    assert pool.fragmentation == 0.0
    h = pool.alloc(b"a" * 100, 100)
    assert pool.pool_bytes == (64 * KiB // 128) * 128
    assert pool.fragmentation == pytest.approx(1 - 100 / pool.pool_bytes)
    live = {h: (100, b"a" * 100)}
    # Fill the arena with objects that use their class exactly: fragmentation
    # is then only the first object's slack.
    for _ in range(pool.class_cap[class_of(128)] - 1):
        live[pool.alloc(b"b" * 128, 128)] = (128, b"b" * 128)
    assert pool.arenas == 1
    assert pool.fragmentation == pytest.approx(28 / pool.pool_bytes)
    assert pool.class_counts() == {128: 512}
    check(pool, live)


def test_full() -> None:
    pool = Pool(max_bytes=128 * KiB, arena_bytes=64 * KiB)
    live = {}
    for _ in range(32):
        d = os.urandom(4096)
        live[pool.alloc(d, 4096)] = (4096, d)
    assert pool.pool_bytes == 128 * KiB
    with pytest.raises(PoolFull, match="max_bytes"):
        pool.alloc(b"z" * 4096, 4096)
    # Another class needs its own arena: also full.
    with pytest.raises(PoolFull):
        pool.alloc(b"z" * 100, 100)
    check(pool, live)
    # Freeing makes room again.
    h = next(iter(live))
    pool.free_object(h, 4096)
    del live[h]
    live[pool.alloc(b"y" * 4096, 4096)] = (4096, b"y" * 4096)
    check(pool, live)


def test_full_releases_other_spares() -> None:
    pool = Pool(max_bytes=128 * KiB, arena_bytes=64 * KiB)
    h = pool.alloc(b"a" * 100, 100)
    pool.free_object(h, 100)  # class 128's arena is now a spare
    assert pool.arenas == 1
    live = {}
    for _ in range(32):  # needs both arenas of the budget
        d = os.urandom(4096)
        live[pool.alloc(d, 4096)] = (4096, d)
    assert pool.arenas == 2
    check(pool, live)


def test_random_churn() -> None:
    rng = random.Random(7)
    pool = Pool(max_bytes=8 << 20, arena_bytes=16 * KiB)
    live: dict[int, tuple[int, bytes]] = {}
    for step in range(5000):
        if live and rng.random() < 0.45:
            h = rng.choice(list(live))
            pool.free_object(h, live.pop(h)[0])
        else:
            n = rng.choice([rng.randrange(1, 4097), rng.randrange(1, 300)])
            d = rng.randbytes(n)
            h = pool.alloc(d, n)
            assert h not in live
            live[h] = (n, d)
        if step % 500 == 0:
            check(pool, live)
    check(pool, live)
    for h, (n, _) in list(live.items()):
        pool.free_object(h, n)
    pool.release_spares()
    assert pool.pool_bytes == 0 and pool.arenas == 0
    check(pool, {})


def test_bookkeeping_per_page() -> None:
    pool = Pool(max_bytes=256 << 20)
    rng = random.Random(3)
    n_pages = 20000
    for _ in range(n_pages):
        n = rng.randrange(800, 2400)
        pool.alloc(b"q" * n, n)
    assert pool.metadata_bytes() / n_pages <= 16


def test_arena_bytes_bounds() -> None:
    with pytest.raises(ValueError):
        Pool(max_bytes=1 << 20, arena_bytes=4 << 20)
