"""Colder means denser: idle pool pages recompressed with zstd
(swapfs/recompress.py), read back exact from every path that reads them."""

from __future__ import annotations

import functools
import random

import pytest
import trio

from swapfs.slots import ALT, KIND_MASK, POOL, SETTLED
from swapfs.writeback import EPOCHS_PER_SECOND, RECOMPRESS_STEP, open_writeback

from ..conftest import MakeStore, tier
from .conftest import compressible_page

PAGE = 4096
MiB = 1 << 20


@pytest.fixture
def rstores(make_store: MakeStore) -> MakeStore:
    return functools.partial(make_store, recompress="zstd", recompress_after=10.0)


def pages(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [compressible_page(rng) for _ in range(n)]


async def fill(store, data: list[bytes]) -> None:
    await store.write(store.devices[0], 0, b"".join(data))


async def test_idle_pages_recompressed_read_back_exact(rstores):
    store = rstores()
    dev = store.devices[0]
    data = pages(300)
    await fill(store, data)
    before = store.pool.used_bytes
    age = 10 * EPOCHS_PER_SECOND
    assert store.recompressor.step(1000, age) == (0, 0)  # nothing idle that long yet
    store.epoch += age
    handled, got = store.recompressor.step(1000, age)
    assert handled == 300 and got > 250
    info = dev.table.info
    assert sum(1 for s in range(300) if info[s] & ALT) == got
    assert store.pool.used_bytes < before
    st = store.stats().pool
    assert st.recompress == "zstd" and st.recompressed_pages == got
    assert st.recompress_saved_bytes == before - store.pool.used_bytes
    assert dev.compressed_bytes == sum((i >> 4) & 0x1FFF for i in info[:300])
    for i in range(300):  # one page at a time (the read fast path) ...
        assert await store.read(dev, i * PAGE, PAGE) == data[i]
    assert await store.read(dev, 0, 300 * PAGE) == b"".join(data)  # ... and many at once
    assert await store.read(dev, 5 * PAGE + 100, 50) == data[5][100:150]  # unaligned
    assert store.recompressor.step(1000, age) == (0, 0)  # every page done: nothing left


async def test_rewrite_and_discard_of_recompressed_pages(rstores):
    store = rstores()
    dev = store.devices[0]
    data = pages(64)
    await fill(store, data)
    store.epoch += 10_000
    store.recompressor.step(1000, 0)
    assert dev.table.info[3] & ALT
    new = pages(1, seed=99)[0]
    await store.write(dev, 3 * PAGE, new)
    assert not dev.table.info[3] & (ALT | SETTLED)  # a rewrite clears the flags
    await store.discard(dev, 10 * PAGE, 4 * PAGE)
    assert await store.read(dev, 3 * PAGE, PAGE) == new
    assert await store.read(dev, 10 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
    assert await store.read(dev, 20 * PAGE, PAGE) == data[20]
    store.check_invariants()


async def test_pages_with_nothing_to_gain_are_settled_not_retried(rstores):
    store = rstores()
    dev = store.devices[0]
    # half random: zstd saves 15 bytes over lz4, not a size class
    tiny = random.Random(1).randbytes(2048) + bytes(2048)
    await store.write(dev, 0, tiny)
    handled, got = store.recompressor.step(10, 0)
    assert (handled, got) == (1, 0)
    assert dev.table.info[0] & SETTLED and not dev.table.info[0] & ALT
    assert store.recompressor.step(10, 0) == (0, 0)
    assert await store.read(dev, 0, PAGE) == tiny


async def test_recompressed_pages_compact_and_write_back(rstores, tmp_path):
    store = rstores([tier("disk", tmp_path / "disk.img", 4 * MiB)])
    dev = store.devices[0]
    data = pages(256)
    await fill(store, data)
    store.recompressor.step(1000, 0)
    await store.discard(dev, 0, 128 * PAGE)  # holes among the recompressed objects
    moved, _ = store.compact()
    assert moved > 0
    async with open_writeback(store) as wb:
        assert await wb.writeback_pages(64) == 64
    kinds = [dev.table.info[s] & KIND_MASK for s in range(128, 256)]
    assert kinds.count(POOL) == 64
    assert await store.read(dev, 128 * PAGE, 128 * PAGE) == b"".join(data[128:])


async def test_writeback_task_recompresses_after_the_configured_idle_time(rstores, autojump_clock):
    store = rstores()
    dev = store.devices[0]
    n = 3 * RECOMPRESS_STEP + 5  # several steps
    data = pages(n)
    await fill(store, data)
    async with open_writeback(store):
        await trio.sleep(5)
        assert store.recompressor.recompressed_pages == 0  # not idle for 10 s yet
        await trio.sleep(10)
        assert store.recompressor.recompressed_pages > n * 3 // 4
    assert await store.read(dev, 0, n * PAGE) == b"".join(data)


async def test_devices_without_writeback_are_left_alone(make_store: MakeStore):
    store = make_store(recompress="zstd", devices=(("fast", 1 * MiB, False), ("bulk", 1 * MiB, True)))
    fast, bulk = store.devices
    data = pages(16)
    await store.write(fast, 0, b"".join(data))
    await store.write(bulk, 0, b"".join(data))
    store.recompressor.step(100, 0)
    assert not any(fast.table.info[s] & ALT for s in range(16))
    assert any(bulk.table.info[s] & ALT for s in range(16))


async def test_a_step_looks_at_a_bounded_number_of_slots(make_store: MakeStore):
    """A step's cost does not follow what is stored: it looks at ``scan`` slots
    in use at most, and the next step goes on from there."""
    store = make_store(recompress="zstd", devices=(("d", 16 * MiB),))
    dev = store.devices[0]
    data = pages(3000)
    await store.write(dev, 0, b"".join(data))
    assert store.recompressor.step(10**6, 10**6, scan=1000) == (0, 0)  # none idle enough
    handled, _ = store.recompressor.step(10**6, 0, scan=1000)
    assert handled == 1000
    handled, _ = store.recompressor.step(10**6, 0, scan=5000)
    assert handled == 2000  # the rest, from where the last step stopped
    assert await store.read(dev, 0, 3000 * PAGE) == b"".join(data)
