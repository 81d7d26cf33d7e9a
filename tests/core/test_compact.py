"""Pool compaction through the store: slots follow their objects and memory
goes back.  (Compaction interleaved with writes, discards, reads and
migrations against a model is part of the model test in test_writeback.py.)"""

from __future__ import annotations

import random

from swapfs.slots import MOVING

from ..conftest import MakeStore
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
    assert not store.relocate(owner, h, h + 16)
    assert dev.table.handles[3] == h
    dev.table.info[3] &= ~MOVING
    assert not store.relocate(owner, h + 16, h)  # not the slot's handle
    assert store.pool.owner(h, (dev.table.info[3] >> 4) & 0x1FFF) == owner
