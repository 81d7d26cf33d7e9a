"""The swap cache: bounded CLOCK cache of file pages, and its use by the store."""

from __future__ import annotations

import os

from swapfs.cache import SwapCache
from swapfs.config import Config, DeviceConfig, PoolConfig, TierConfig
from swapfs.store import Store

PAGE = 4096
MiB = 1 << 20


def page(n: int) -> bytes:
    return bytes([n % 251]) * PAGE


def test_put_get_invalidate_and_bound():
    c = SwapCache(4)
    for k in range(4):
        c.put(k, page(k))
    assert len(c) == 4 and bytes(c.get(2)) == page(2)
    c.put(2, page(9))  # replace in place
    assert bytes(c.get(2)) == page(9) and len(c) == 4
    c.invalidate(1)
    assert c.get(1) is None and len(c) == 3
    c.invalidate(1)  # twice is harmless
    for k in range(10, 20):
        c.put(k, page(k))
        assert len(c) <= 4
        c.check_invariants()
    assert c.evictions > 0
    assert all(bytes(c.get(k)) == page(k) for k in c.keys())


def test_clock_keeps_referenced_pages():
    c = SwapCache(4)
    for k in range(4):
        c.put(k, page(k))
    c.get(0)  # referenced: survives the next eviction
    c.put(100, page(100))
    assert 0 in c and 1 not in c


def test_zero_capacity_caches_nothing():
    c = SwapCache(0)
    c.put(1, page(1))
    assert c.get(1) is None and len(c) == 0
    c.check_invariants()


async def test_repeated_file_reads_hit_and_frees_invalidate(tmp_path):
    cfg = Config(pool=PoolConfig(max_bytes=1 * MiB), devices=(DeviceConfig(name="d", size=4 * MiB),),
                 tiers=(TierConfig(name="ssd", kind="file", path=str(tmp_path / "t.img"),
                                   size=8 * MiB, priority=1, high_watermark=0.95,
                                   low_watermark=0.9),))
    store = Store(cfg, cache_pages=8)
    try:
        dev = store.devices[0]
        data = [os.urandom(PAGE) for _ in range(4)]  # incompressible: file tier
        await store.write(dev, 0, b"".join(data))
        assert await store.read(dev, 0, 4 * PAGE) == b"".join(data)
        st = store.stats().cache
        assert st.misses == 4 and st.hits == 0 and st.pages == 4
        assert await store.read(dev, PAGE, PAGE) == data[1]
        assert store.stats().cache.hits == 1
        # a rewrite frees the file page: its entry goes, the new content is read
        new = os.urandom(PAGE)
        await store.write(dev, PAGE, new)
        assert store.stats().cache.pages == 3
        assert await store.read(dev, PAGE, PAGE) == new
        await store.discard(dev, 0, 4 * PAGE)
        assert store.stats().cache.pages == 0
        store.check_invariants()
    finally:
        await store.aclose()
