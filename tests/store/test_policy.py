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
