"""Pool compaction through the store: slots follow their objects, memory goes
back, and compaction interleaved with writes, discards, reads and migrations
against a model."""

from __future__ import annotations

import random

import pytest
import trio
import trio.lowlevel

from swapfs.slots import MOVING
from swapfs.store import Store
from swapfs.writeback import Writeback, open_writeback

from ..conftest import MakeStore, tier
from .conftest import MiB, compressible_page, random_page

PAGE = 4096


async def test_compact_after_scattered_discards(make_store: MakeStore) -> None:
    store = make_store(devices=(("swap0", 16 * MiB),))
    dev = store.devices[0]
    rng = random.Random(1)
    pages = [compressible_page(rng) if i % 7 else random_page() for i in range(3000)]
    await store.write(dev, 0, b"".join(pages))
    full = store.pool.pool_bytes
    # Discard three pages in four: holes in nearly every span.
    for i in range(3000):
        if i % 4:
            await store.discard(dev, i * PAGE, PAGE)
            pages[i] = bytes(PAGE)
    store.pool.release_spares()
    before = store.stats().pool
    assert before.pool_bytes < full and store.pool.holes > 0.3
    moved, freed = store.compact()
    after = store.stats().pool
    assert moved > 0 and freed > 0
    assert after.pool_bytes == before.pool_bytes - freed
    assert store.pool.holes < 0.1
    assert after.compressed_bytes == before.compressed_bytes
    assert await store.read(dev, 0, 3000 * PAGE) == b"".join(pages)
    store.check_invariants()
    assert store.compact() == (0, 0)


async def test_relocate_refuses_a_moving_slot(make_store: MakeStore) -> None:
    store = make_store()
    dev = store.devices[0]
    rng = random.Random(2)
    await store.write(dev, 0, b"".join(compressible_page(rng) for _ in range(40)))
    h = dev.table.handles[3]
    owner = dev.index << 40 | 3
    dev.table.info[3] |= MOVING
    assert not store._relocate(owner, h, h + 16)
    assert dev.table.handles[3] == h
    dev.table.info[3] &= ~MOVING
    assert not store._relocate(owner, h + 16, h)  # not the slot's handle
    assert store.pool.owner(h, (dev.table.info[3] >> 4) & 0x1FFF) == owner


@pytest.mark.parametrize("seed", range(4))
async def test_compaction_interleaved_against_a_model(stores, tmp_path, seed):
    """Writers, discarders, readers, writeback (pool to file, with promotions)
    and compaction in between; every page reads back as the model says."""
    store: Store = stores([tier("ssd", tmp_path / "ssd.img", 8 * MiB)], pool_bytes=128 * 1024,
                          high=0.5, low=0.3, devices=(("swap0", 1 * MiB, True),))
    dev = store.devices[0]
    npages = dev.npages
    rng = random.Random(seed)
    model: list[set[bytes]] = [{bytes(PAGE)} for _ in range(npages)]
    busy = [0] * npages
    episode: list[set[bytes]] = [set() for _ in range(npages)]
    compactions = [0, 0]

    def begin(i: int, value: bytes) -> None:
        if not busy[i]:
            episode[i] = set()
        busy[i] += 1
        episode[i].add(value)
        model[i].add(value)

    def end(i: int) -> None:
        busy[i] -= 1
        if not busy[i]:
            model[i] = set(episode[i])

    async def writer(w: int) -> None:
        for k in range(100):
            i = rng.randrange(npages - 4)
            n = rng.randrange(1, 4)
            r = random.Random(seed * 7919 + w * 1000 + k)
            data = [compressible_page(r) if r.random() < 0.8 else r.randbytes(PAGE)
                    for _ in range(n)]
            for j in range(n):
                begin(i + j, data[j])
            await store.write(dev, i * PAGE, b"".join(data))
            for j in range(n):
                end(i + j)
            store.check_invariants(quiescent=False)
            await trio.lowlevel.checkpoint()

    async def discarder() -> None:
        for _ in range(60):
            i = rng.randrange(npages - 8)
            n = rng.randrange(1, 8)
            for j in range(n):
                begin(i + j, bytes(PAGE))
            await store.discard(dev, i * PAGE, n * PAGE)
            for j in range(n):
                end(i + j)
            await trio.lowlevel.checkpoint()

    async def reader() -> None:
        for _ in range(150):
            i = rng.randrange(npages - 4)
            before = [set(model[i + j]) for j in range(4)]
            got = await store.read(dev, i * PAGE, 4 * PAGE)
            for j in range(4):
                page = bytes(got[j * PAGE:(j + 1) * PAGE])
                assert page in before[j] or page in model[i + j], f"page {i + j} read wrong"
            await trio.lowlevel.checkpoint()

    async def compactor() -> None:
        for _ in range(120):
            moved, _ = store.compact(budget=rng.choice([None, 1, 8]))
            compactions[0] += 1
            compactions[1] += moved
            store.check_invariants(quiescent=False)
            await trio.sleep(0.0005)

    async def requester(wb: Writeback) -> None:
        for _ in range(30):
            await wb.writeback_pages(rng.randrange(1, 30))
            await trio.sleep(0.001)

    async with open_writeback(store, interval=0.001) as wb:
        async with trio.open_nursery() as n:
            for w in range(3):
                n.start_soon(writer, w)
            n.start_soon(discarder)
            n.start_soon(reader)
            n.start_soon(reader)
            n.start_soon(compactor)
            n.start_soon(requester, wb)
    for i in range(npages):
        page = bytes(await store.read(dev, i * PAGE, PAGE))
        assert page in model[i], f"page {i}"
    store.check_invariants()
    assert compactions[1] > 0
    assert store.stats().writeback.moved_pages > 0
