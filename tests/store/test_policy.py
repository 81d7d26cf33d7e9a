"""Tiering policies (swapfs/policy.py): their decisions on small cases, and
the counters that judge them (wasted promotions)."""

from __future__ import annotations

import random

import pytest

from swapfs.config import DEFAULT_POLICY, POLICY_NAMES, ConfigError, parse_config
from swapfs.policy import POLICIES, make_policy
from swapfs.slots import FILE0, KIND_MASK, PROMOTED_MARK, UNREAD_MARK
from swapfs.store import Store
from swapfs.writeback import Writeback

from ..conftest import tier
from .conftest import compressible_page

MiB = 1 << 20
PAGE = 4096


def where(store: Store, dev, s: int) -> str:
    k = dev.table.info[s] & KIND_MASK
    return "pool" if k < FILE0 else store.tiers[k - FILE0].name


def pages_of(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [compressible_page(rng) for _ in range(n)]


def use(store: Store, name: str) -> Store:
    store.policy = make_policy(name, store)
    return store


def test_policy_names_and_config():
    assert set(POLICY_NAMES) == set(POLICIES)
    base = '[[device]]\nname = "swap0"\nsize = "1M"\n'
    assert parse_config(base).writeback.policy == DEFAULT_POLICY
    assert parse_config(base + '[writeback]\npolicy = "classic"\n').writeback.policy == "classic"
    with pytest.raises(ConfigError, match=r"writeback\.policy: unknown policy 'lru'"):
        parse_config(base + '[writeback]\npolicy = "lru"\n')
    with pytest.raises(ConfigError, match=r"writeback\.cold_age: unknown key"):
        parse_config(base + "[writeback]\ncold_age = 3\n")


@pytest.mark.parametrize("name", POLICY_NAMES)
async def test_marks_on_the_epoch_column(stores, tmp_path, name):
    """Writes mark a page unread, reads clear it; a promotion marks the page
    promoted until it is read; the marks never change what reads return."""
    store = use(stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB), name)
    dev = store.devices[0]
    data = pages_of(4)
    await store.write(dev, 0, b"".join(data))
    assert all(dev.table.epoch[s] & UNREAD_MARK for s in range(4))
    assert await store.read(dev, 0, PAGE) == data[0]
    assert not dev.table.epoch[0] & UNREAD_MARK
    await Writeback(store).writeback_pages(4)
    store.promote_distance = 1 << 20
    assert await store.read(dev, PAGE, PAGE) == data[1]  # a refault: promoted
    assert where(store, dev, 1) == "pool" and dev.table.epoch[1] & PROMOTED_MARK
    assert await store.read(dev, PAGE, PAGE) == data[1]  # a pool hit clears the mark
    assert not dev.table.epoch[1] & PROMOTED_MARK


async def test_wasted_promotions_count_promoted_pages_demoted_unread(stores, tmp_path):
    store = use(stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB),
                "classic")
    dev = store.devices[0]
    data = pages_of(8)
    await store.write(dev, 0, b"".join(data))
    wb = Writeback(store)
    assert await wb.writeback_pages(8) == 8
    store.promote_distance = 1 << 20
    for s in (0, 1):  # both refault and are promoted
        assert await store.read(dev, s * PAGE, PAGE) == data[s]
    assert store.stats().writeback.promotions == 2
    assert await store.read(dev, PAGE, PAGE) == data[1]  # slot 1 is read in the pool
    assert await wb.writeback_pages(8) == 2
    st = store.stats().writeback
    assert st.wasted_promotions == 1  # slot 0 went down again unread; slot 1 had a hit
    assert await store.read(dev, 0, 8 * PAGE) == b"".join(data)


@pytest.mark.parametrize("name", POLICY_NAMES)
async def test_a_page_just_promoted_is_not_the_next_demoted(stores, tmp_path, name):
    """Every pool page has the same age; the promoted one sits in the first
    slot, where the window starts.  Classic takes it first (the old
    ping-pong); workingset passes it over."""
    store = use(stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB), name)
    dev = store.devices[0]
    data = pages_of(64)
    await store.write(dev, 0, data[0])
    wb = Writeback(store)
    assert await wb.writeback_pages(1) == 1
    await store.write(dev, PAGE, b"".join(data[1:]))
    store.promote_distance = 1 << 20
    assert await store.read(dev, 0, PAGE) == data[0]
    assert where(store, dev, 0) == "pool"
    assert await wb.writeback_pages(8) == 8
    if name == "classic":
        assert where(store, dev, 0) == "ssd"
        assert store.stats().writeback.wasted_promotions == 1
    else:
        assert where(store, dev, 0) == "pool"
        assert store.stats().writeback.wasted_promotions == 0
    assert await store.read(dev, 0, 64 * PAGE) == b"".join(data)


@pytest.mark.parametrize("name", POLICY_NAMES)
async def test_a_scan_does_not_flush_the_hot_set(stores, tmp_path, name):
    """A hot set lives in the pool, read again and again; then a scan reads
    once each of many demoted pages, every one a refault at a short
    distance.  Classic promotes them all until the pool is full, and
    writeback makes room by demoting the hot set (older than the scan);
    workingset promotes only under the high watermark, and the hot set
    stays."""
    store = use(stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=512 * 1024,
                       high=0.5, low=0.4), name)
    dev = store.devices[0]
    scan = pages_of(200, 1)
    hot = pages_of(40, 2)
    wb = Writeback(store)
    store.set_epoch(100)
    await store.write(dev, 0, b"".join(scan))
    assert await wb.writeback_pages(200) == 200
    await store.write(dev, 1000 * PAGE, b"".join(hot))
    for k in range(3):
        store.set_epoch(200 + k)
        assert await store.read(dev, 1000 * PAGE, 40 * PAGE) == b"".join(hot)
    assert all(where(store, dev, 1000 + i) == "pool" for i in range(40))
    store.promote_distance = 1 << 20  # every refault of the scan counts as hot
    store.set_epoch(300)
    for s in range(200):
        assert await store.read(dev, s * PAGE, PAGE) == scan[s]
    await wb.balance()
    hot_left = sum(where(store, dev, 1000 + i) == "pool" for i in range(40))
    if name == "classic":
        assert hot_left < 40
    else:
        assert hot_left == 40
        assert store.pool.pool_bytes <= store.pool_high_bytes
    assert await store.read(dev, 1000 * PAGE, 40 * PAGE) == b"".join(hot)
    assert await store.read(dev, 0, 200 * PAGE) == b"".join(scan)


async def test_workingset_threshold_follows_wasted_promotions(stores, tmp_path):
    store = use(stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB),
                "workingset")
    pol = store.policy
    moves = store.moves
    assert pol.share == 1.0
    moves.promotions[1] += 256
    moves.wasted += 200
    pol.promote(0)
    assert pol.share == 0.5
    moves.promotions[1] += 256  # none of these wasted
    pol.promote(0)
    assert pol.share == 0.625


def _search_by_slot(pol, cursor, devs, src, n, now, whole_round):
    """The victim search one slot at a time, as a reference for the chunked
    one: the same window, a key per candidate, ``heapq.nsmallest``."""
    import heapq

    from swapfs.policy import CANDIDATES_PER_VICTIM, SCAN_SLOTS
    from swapfs.slots import AGE_MASK, SHADOW, movable

    mask, want = movable(src)
    cands = []
    scanned = 0
    for dev, start, end in cursor.walk(devs, sum(d.npages for d in devs)):
        scanned += end - start
        di = devs.index(dev)
        for s in range(start, end):
            i = dev.table.info[s]
            if i & mask == want:
                e = dev.table.epoch[s]
                cands.append((-(1 << 33) if i & SHADOW else pol._age_key(e, now), di, s))
        if len(cands) >= n * CANDIDATES_PER_VICTIM or (
                scanned >= SCAN_SLOTS and (cands or not whole_round)):
            break
    chosen = heapq.nsmallest(n, cands) if len(cands) > n else cands
    oldest = max((-k for k, _, _ in chosen if k > -(1 << 33)), default=-1)
    assert AGE_MASK  # (the keys count ages modulo AGE_MASK + 1)
    return [(devs[d], s) for _, d, s in chosen], oldest


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("seed", range(6))
def test_chunked_search_chooses_what_a_slot_by_slot_search_would(name, seed):
    """Random slot tables (every kind, MOVING and SHADOW, every mark, ages
    across the clock's wrap, empty clusters, two devices): the chunked search
    takes the same victims as a search that keys each candidate, leaves the
    cursor at the same place and learns the same eviction age."""
    from types import SimpleNamespace

    from swapfs.slots import FILE0, HUGE, MOVING, POOL, SAME, SHADOW, SlotTable, file_info
    from swapfs.state import SlotCursor

    rng = random.Random(seed)
    devs = []
    for npages in (rng.choice((3000, 40000)), rng.choice((1500, 70000))):
        table = SlotTable(npages)
        for c in range(-(-npages // 1024)):
            if rng.random() < 0.3:
                continue  # an empty cluster
            dense = rng.random()
            for s in range(c * 1024, min((c + 1) * 1024, npages)):
                if rng.random() > dense:
                    continue
                kind = rng.choice((SAME, POOL, POOL, POOL, HUGE, FILE0, FILE0 + 1))
                info = kind | rng.randrange(1, 4096) << 4 if kind in (POOL, HUGE) else (
                    file_info(kind - FILE0, rng.randrange(1, 4097)) if kind >= FILE0 else kind)
                if rng.random() < 0.05:
                    info |= MOVING
                if kind >= FILE0 and rng.random() < 0.3:
                    info |= SHADOW
                table.info[s] = info
                table.filled(s)
                table.epoch[s] = rng.choice((
                    rng.randrange(1 << 32),  # anything, marks included
                    (5000 - rng.randrange(64)) | rng.choice((0, UNREAD_MARK, PROMOTED_MARK)),
                    rng.randrange(4990, 5001) | rng.choice((0, UNREAD_MARK))))
        devs.append(SimpleNamespace(npages=npages, table=table, name=f"d{len(devs)}"))
    state = SimpleNamespace(epoch=5000)
    for trial in range(12):
        now = rng.choice((5000, 5000 + (1 << 30) - 3, 17))
        n = rng.choice((1, 3, 64, 256, 1024))
        src = rng.choice((0, 0, 1, 2))
        ours, ref = POLICIES[name](state), POLICIES[name](state)
        if name == "workingset":
            ours.eviction_age = ref.eviction_age = rng.choice((0, 5, 40, 1 << 29, (1 << 30) - 1))
        a, b = SlotCursor(), SlotCursor()
        a.di = b.di = rng.randrange(2)
        a.slot = b.slot = rng.randrange(devs[a.di].npages)
        whole = rng.random() < 0.5
        got = ours.select(a, devs, src, n, now=now, whole_round=whole)
        want, oldest = _search_by_slot(ref, b, devs, src, n, now, whole)
        key = [(devs.index(d), s) for d, s in got]
        assert sorted(key) == sorted((devs.index(d), s) for d, s in want), (trial, n, src)
        assert len(set(key)) == len(key)
        assert (a.di, a.slot) == (b.di, b.slot)
        if name == "workingset":
            ref._selected(oldest)
            assert ours.eviction_age == ref.eviction_age
