"""The store without FUSE: byte-exact I/O, discard, limits, a model test."""

from __future__ import annotations

import random
import sys
from array import array
from pathlib import Path

import pytest

from swapfs.errors import NoSpace, OutOfRange, StoreError
from swapfs.store import Store

from ..conftest import MakeStore
from .conftest import MiB, compressible_page, random_page

P = 4096


async def test_devices(make_store: MakeStore) -> None:
    store = make_store(devices=(("a", 1 * MiB), ("b", 8192)))
    assert [d.name for d in store.devices] == ["a", "b"]
    a, b = store.devices
    assert (a.index, a.size_bytes, a.npages) == (0, MiB, 256)
    assert (b.index, b.npages, b.config.size) == (1, 2, 8192)
    assert store.device("b") is b
    with pytest.raises(KeyError):
        store.device("c")
    assert await store.read(a, 0, 3 * P) == bytes(3 * P)
    store.check_invariants()
    await store.aclose()


async def test_aligned_kinds(store: Store) -> None:
    dev = store.devices[0]
    rng = random.Random(1)
    pages = [compressible_page(rng), random_page(), bytes(P), b"\x07" * P,
             (0x0102030405060708).to_bytes(8, sys.byteorder) * 512, compressible_page(rng)]
    data = b"".join(pages)
    assert await store.write(dev, 8 * P, memoryview(data)) == len(data)
    assert await store.read(dev, 8 * P, len(data)) == data
    for i, page in enumerate(pages):
        got = await store.read(dev, (8 + i) * P, P)
        assert got == page
    st = store.stats().device(dev.name)
    assert st.stored_pages == 6
    assert st.same_filled_pages == 3
    assert st.huge_pages == 1
    assert st.pool_pages == 2
    assert store.stats().pool.huge_pages == 1
    store.check_invariants()


@pytest.mark.parametrize("offset, length", [
    (1, 10), (100, P), (P - 1, 2), (P - 100, 3 * P + 200), (5 * P + 17, 7 * P),
    (3 * P, 2 * P + 1), (3 * P + 1, 2 * P - 1), (0, 1), (10 * P - 1, 1), (7, 3 * P - 7),
])
async def test_unaligned(store: Store, offset: int, length: int) -> None:
    dev = store.devices[0]
    rng = random.Random(offset * 31 + length)
    # Existing content around the write must survive the read-modify-write.
    base = b"".join(compressible_page(rng) for _ in range(12))
    await store.write(dev, 0, base)
    data = rng.randbytes(length)
    assert await store.write(dev, offset, data) == length
    want = bytearray(base) + bytes(8 * P)
    want[offset:offset + length] = data
    assert await store.read(dev, 0, len(want)) == want
    for a, b in [(offset, offset + length), (offset - 1, offset + 5), (0, offset + 3),
                 (offset + length - 3, offset + length + 4100)]:
        a = max(a, 0)
        assert await store.read(dev, a, b - a) == want[a:b]
    store.check_invariants()


async def test_unaligned_on_empty(store: Store) -> None:
    dev = store.devices[0]
    await store.write(dev, 5000, b"hello")
    got = await store.read(dev, 0, 3 * P)
    assert got == bytes(5000) + b"hello" + bytes(3 * P - 5005)
    store.check_invariants()


async def test_rewrite_frees(store: Store) -> None:
    dev = store.devices[0]
    rng = random.Random(2)
    await store.write(dev, 0, b"".join(compressible_page(rng) for _ in range(4)))
    before = store.stats()
    data = b"".join(compressible_page(rng) for _ in range(4))
    await store.write(dev, P * 20, data)
    await store.write(dev, P * 20, bytes(len(data)))
    after = store.stats()
    assert after.pool.compressed_bytes == before.pool.compressed_bytes
    # Emptied arenas are kept as spares (one per class) until released.
    assert after.pool.pool_bytes - after.pool.spare_bytes == before.pool.pool_bytes
    store.pool.release_spares()
    assert store.stats().pool.pool_bytes <= before.pool.pool_bytes
    assert after.device(dev.name).pool_bytes == before.device(dev.name).pool_bytes
    assert after.device(dev.name).same_filled_pages == 4
    # Rewriting one page many times keeps one object.
    for _ in range(50):
        await store.write(dev, P * 30, compressible_page(rng))
        await store.write(dev, P * 31, random_page())
    st = store.stats()
    assert st.pool.stored_pages == 4 + 2
    store.check_invariants()


async def test_discard(store: Store) -> None:
    dev = store.devices[0]
    rng = random.Random(3)
    data = b"".join([compressible_page(rng), random_page(), b"\x01" * P, compressible_page(rng),
                     compressible_page(rng), random_page()])
    await store.write(dev, 0, data)
    # Whole pages 1..2.
    await store.discard(dev, P, 2 * P)
    want = bytearray(data)
    want[P:3 * P] = bytes(2 * P)
    assert await store.read(dev, 0, len(data)) == want
    st = store.stats().device(dev.name)
    assert st.stored_pages == 4 and st.huge_pages == 1 and st.same_filled_pages == 0
    assert st.discards == 1 and st.discarded_bytes == 2 * P
    # Partial pages at both ends and one whole page between.
    await store.discard(dev, 3 * P + 100, 2 * P)
    want[3 * P + 100:5 * P + 100] = bytes(2 * P)
    assert await store.read(dev, 0, len(data)) == want
    # Inside one page.
    await store.discard(dev, 5 * P + 10, 20)
    want[5 * P + 10:5 * P + 30] = bytes(20)
    assert await store.read(dev, 0, len(data)) == want
    store.check_invariants()
    # Everything, clipped to the device: all storage is freed.
    await store.discard(dev, 0, 1 << 40)
    assert await store.read(dev, 0, len(data)) == bytes(len(data))
    st2 = store.stats()
    assert st2.totals.stored_pages == 0
    assert st2.pool.compressed_bytes == 0
    assert st2.pool.stored_pages == 0
    assert st2.device(dev.name).pool_bytes == 0
    assert st2.pool.pool_bytes == st2.pool.spare_bytes
    store.pool.release_spares()
    assert store.stats().pool.pool_bytes == 0
    # Out of range and empty discards do nothing.
    await store.discard(dev, dev.size_bytes, P)
    await store.discard(dev, 0, 0)
    await store.discard(dev, -P, P)
    store.check_invariants()


async def test_discard_large_sparse(make_store: MakeStore) -> None:
    store = make_store(devices=(("big", 256 * MiB),))
    dev = store.devices[0]
    await store.write(dev, 100 * MiB, random_page())
    await store.write(dev, 200 * MiB + P, b"\x02" * P)
    await store.discard(dev, 0, dev.size_bytes)
    assert store.stats().totals.stored_pages == 0
    assert await store.read(dev, 100 * MiB, P) == bytes(P)


async def test_read_past_end(store: Store) -> None:
    dev = store.devices[0]
    end = dev.size_bytes
    await store.write(dev, end - P, b"\x09" * P)
    assert await store.read(dev, end, P) == b""
    assert await store.read(dev, end + 5 * P, 10) == b""
    assert await store.read(dev, end - 10, 100) == b"\x09" * 10
    assert await store.read(dev, end - 2 * P, 4 * P) == bytes(P) + b"\x09" * P
    assert await store.read(dev, 0, 0) == b""
    store.check_invariants()


async def test_write_past_end(store: Store) -> None:
    dev = store.devices[0]
    end = dev.size_bytes
    await store.write(dev, end - P, b"\x05" * P)
    before = store.stats()
    for offset, n in [(end, 1), (end - P, P + 1), (end - 10, 11), (end + P, P), (-1, 2)]:
        with pytest.raises(OutOfRange):
            await store.write(dev, offset, b"\x06" * n)
    assert issubclass(OutOfRange, StoreError)
    assert await store.read(dev, end - P, P) == b"\x05" * P
    after = store.stats()
    assert after.device(dev.name).written_bytes == before.device(dev.name).written_bytes
    assert after.totals.stored_pages == before.totals.stored_pages
    assert await store.write(dev, end - 1, b"\x06") == 1
    store.check_invariants()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
async def test_pool_full(make_store: MakeStore, algorithm: str) -> None:
    store = make_store(pool_bytes=256 * 1024, algorithm=algorithm)  # four 64 KiB arenas
    dev = store.devices[0]
    rng = random.Random(4)
    written = {}
    # Random pages (huge, 16 per arena) fill the pool; a write that does
    # not find room for all its pages is refused with NoSpace and changes
    # none of them (all or nothing).
    data = b"".join(random_page() for _ in range(100))
    old = compressible_page(rng)
    await store.write(dev, 200 * P, old)  # takes one arena of its class
    written[200] = old
    first = data[:10 * P]
    await store.write(dev, 0, first)
    before = store.stats()
    with pytest.raises(NoSpace, match="max_bytes"):
        await store.write(dev, 0, data)
    st = store.stats()
    assert st.pool.huge_pages == before.pool.huge_pages == 10
    assert st.pool.compressed_bytes == before.pool.compressed_bytes  # all given back
    assert await store.read(dev, 0, 10 * P) == first
    assert await store.read(dev, 10 * P, 90 * P) == bytes(90 * P)
    assert await store.read(dev, 200 * P, P) == old
    assert st.device(dev.name).nospace_errors == 1
    store.check_invariants()
    # Pages one at a time fill what is left; the write that finds no room
    # keeps the slot's old content.
    stored = 10
    with pytest.raises(NoSpace):
        while stored < 100:
            await store.write(dev, stored * P, data[stored * P:(stored + 1) * P])
            stored += 1
    assert 10 < stored < 100
    assert await store.read(dev, 0, stored * P) == data[:stored * P]
    assert await store.read(dev, stored * P, P) == bytes(P)
    # Overwriting a stored page with one needing a new arena fails and keeps it.
    with pytest.raises(NoSpace):
        await store.write(dev, 0, b"z" * 200 + bytes(P - 200))
    assert await store.read(dev, 0, P) == data[:P]
    # Same-filled pages need no space; discard frees room.
    await store.write(dev, 300 * P, bytes(10 * P))
    await store.discard(dev, 0, 16 * P)
    await store.write(dev, 0, random_page())
    store.check_invariants()


async def test_buffer_types(store: Store) -> None:
    dev = store.devices[0]
    page = compressible_page(random.Random(8))
    await store.write(dev, 0, bytearray(page))
    await store.write(dev, P, memoryview(page))
    await store.write(dev, 2 * P, memoryview(page * 2)[P:])
    import array
    await store.write(dev, 3 * P, array.array("I", page))
    assert await store.read(dev, 0, 4 * P) == page * 4
    store.check_invariants()


async def test_multiple_devices_independent(make_store: MakeStore) -> None:
    store = make_store(devices=(("a", MiB), ("b", MiB)))
    a, b = store.devices
    await store.write(a, 0, b"\x01" * P + random_page())
    await store.write(b, 0, b"\x02" * P)
    assert await store.read(b, 0, P) == b"\x02" * P
    assert await store.read(b, P, P) == bytes(P)
    st = store.stats()
    assert st.device("a").stored_pages == 2 and st.device("b").stored_pages == 1
    assert store.device_stored_pages(a) == 2 and store.device_stored_pages(b) == 1
    store.check_invariants()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_random_against_model(make_store: MakeStore, algorithm: str, seed: int) -> None:
    size = 64 * P
    store = make_store(algorithm=algorithm, devices=(("m", size),))
    dev = store.devices[0]
    model = bytearray(size)
    rng = random.Random(seed)

    def payload(n: int) -> bytes:
        r = rng.random()
        if r < 0.3:
            return rng.randbytes(n)
        if r < 0.5:
            return bytes([rng.randrange(3)]) * n
        if r < 0.6:
            return (rng.randrange(1 << 64).to_bytes(8, sys.byteorder) * (n // 8 + 2))[:n]
        return (compressible_page(rng) * (n // P + 1))[:n]

    def span() -> tuple[int, int]:
        r = rng.random()
        if r < 0.4:
            off = rng.randrange(64) * P
            n = rng.randrange(1, 9) * P
        elif r < 0.8:
            off = rng.randrange(size)
            n = rng.randrange(1, 3 * P)
        else:
            off = rng.randrange(size)
            n = rng.randrange(1, 64)
        return off, n

    for step in range(3000):
        op = rng.random()
        off, n = span()
        if op < 0.5:
            data = payload(n)
            if off + n > size:
                with pytest.raises(OutOfRange):
                    await store.write(dev, off, data)
            else:
                assert await store.write(dev, off, data) == n
                model[off:off + n] = data
        elif op < 0.85:
            got = await store.read(dev, off, n)
            assert got == model[off:off + n], f"step {step}: read {n} at {off}"
        else:
            await store.discard(dev, off, n)
            end = min(off + n, size)
            model[off:end] = bytes(end - off)
        if step % 250 == 0:
            store.check_invariants()
    assert await store.read(dev, 0, size) == model
    store.check_invariants()


async def test_small_cases(store: Store) -> None:
    dev = store.devices[0]
    assert await store.write(dev, 0, b"") == 0
    assert await store.write(dev, dev.size_bytes, b"") == 0
    page = compressible_page(random.Random(9))
    await store.write(dev, P, page)
    one = await store.read(dev, P, P)
    assert isinstance(one, bytes) and one == page
    assert await store.read(dev, P + 5, 10) == page[5:15]
    with pytest.raises(OutOfRange):
        await store.read(dev, -1, 10)
    # A discard that zeroes part of a page keeps the rest.
    await store.discard(dev, P + 100, 10)
    assert await store.read(dev, P, P) == page[:100] + bytes(10) + page[110:]
    # Zeroing the whole content of a page through partial discards leaves a
    # same-filled zero page.
    await store.discard(dev, P, 2000)
    await store.discard(dev, P + 2000, P - 2000 - 1)
    await store.discard(dev, 2 * P - 1, 1)
    assert store.stats().device(dev.name).same_filled_pages == 1
    store.check_invariants()


class _NoMemory(array):  # type: ignore[type-arg]
    def frombytes(self, b: object) -> None:
        raise MemoryError


async def test_pool_out_of_memory_is_a_full_pool(make_store: MakeStore, tmp_path: Path) -> None:
    # The system refusing the pool memory for its bookkeeping is a full pool:
    # no slot changes, NoSpace without a file tier, the file tier with one.
    from ..conftest import tier

    for tiers in ((), (tier("ssd", tmp_path / "ssd.img", 8 * MiB),)):
        store = make_store(tiers)
        dev = store.devices[0]
        rng = random.Random(9)
        old = compressible_page(rng)
        await store.write(dev, 0, old)
        store.pool.page_word = _NoMemory("Q", store.pool.page_word)
        new = b"".join(compressible_page(rng) for _ in range(64))  # needs new spans
        if not tiers:
            with pytest.raises(NoSpace):
                await store.write(dev, 0, new)
            assert await store.read(dev, 0, P) == old
        else:
            await store.write(dev, 0, new)
            assert await store.read(dev, 0, 64 * P) == new
            assert store.stats().pool.pool_limit_hit > 0
        store.check_invariants()


async def test_single_page_writes_match_the_general_path(make_store: MakeStore) -> None:
    """Whole single pages take the store's one-page path (_store_page); the
    same pages written many at a time take the general one.  Both leave the
    same slots, counters and content, for every kind of page and for rewrites."""
    store = make_store(devices=(("one", 1 * MiB), ("many", 1 * MiB)))
    one, many = store.devices
    rng = random.Random(5)
    kinds = [compressible_page(rng), bytes(4096), b"\x07" * 4096, random_page(),
             compressible_page(rng)[:4000] + bytes(96)]
    data = [kinds[i % len(kinds)] for i in range(64)]
    for rnd in range(2):  # the second round rewrites every slot
        if rnd:
            data = data[1:] + data[:1]
        for i, page in enumerate(data):
            assert await store.write(one, i * 4096, page) == 4096
        await store.write(many, 0, b"".join(data))
        for attr in ("stored_pages", "same_filled_pages", "pool_pages", "huge_pages",
                     "compressed_bytes", "pool_bytes"):
            assert getattr(one, attr) == getattr(many, attr), attr
        assert [one.table.info[s] for s in range(64)] == [many.table.info[s] for s in range(64)]
        assert await store.read(one, 0, 64 * 4096) == b"".join(data)
        store.check_invariants()
