"""Writeback: watermarks, requests, no-writeback devices, refaults and promotion,
and a model-based concurrency test of moves against writes, reads and discards."""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.lowlevel

from swapfs.policy import make_policy
from swapfs.slots import FILE0, KIND_MASK, POOL, SHADOW, length_of
from swapfs.store import Store
from swapfs.writeback import Writeback, open_writeback

from ..conftest import tier
from .conftest import compressible_page

MiB = 1 << 20
PAGE = 4096


def pages_of(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [compressible_page(rng) for _ in range(n)]


def where(store: Store, dev, s: int) -> str:
    k = dev.table.info[s] & KIND_MASK
    return "pool" if k < FILE0 else store.tiers[k - FILE0].name


async def test_pool_above_high_watermark_drains_below_low(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)])
    dev = store.devices[0]
    data = pages_of(600)
    # (an interval of an hour: only the writes' kick starts a pass)
    async with open_writeback(store, interval=3600) as wb:
        for i, p in enumerate(data):
            await store.write(dev, i * PAGE, p)
        with trio.fail_after(10):  # the pass the writes kicked drains the pool
            while store.pool.pool_bytes > store.pool_high_bytes or not store.moves.moved:
                await wb.next_pass()
        st = store.stats()
        assert st.pool.pool_bytes <= store.pool_high_bytes
        assert st.writeback.moved_pages > 0
        assert st.writeback.pairs["pool_to_ssd"]["pages"] == st.writeback.moved_pages
        assert st.writeback.watermarks["pool"]["high"] == store.pool_high_bytes
        store.check_invariants()
    assert await store.read(dev, 0, 600 * PAGE) == b"".join(data)
    # demoted pages carry a shadow
    assert any(dev.table.info[s] & SHADOW for s in range(600))


async def test_ctl_pages_moves_the_coldest_contiguously(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB)
    dev = store.devices[0]
    data = pages_of(64)
    wb = Writeback(store)
    for i in range(64):
        store.epoch = 1000 + i  # as the clock would advance
        await store.write(dev, i * PAGE, data[i])
    # slots 0..15 are the oldest
    moved = await wb.writeback_pages(16)
    assert moved == 16
    assert [where(store, dev, s) for s in range(16)] == ["ssd"] * 16
    assert all(where(store, dev, s) == "pool" for s in range(16, 64))
    # one batch, one contiguous extent: each object right after the one
    # before (or at the next block, where it would span three)
    tier_ = store.files[0]
    objs = sorted((dev.table.handles[s], tier_.object_bytes(length_of(dev.table.info[s])))
                  for s in range(16))
    assert objs[0][0] == 0
    for (h0, n0), (h1, _n1) in zip(objs, objs[1:]):
        assert h1 == h0 + n0 or (h1 % PAGE == 0 and h0 + n0 < h1 < h0 + n0 + PAGE)
    st = store.stats()
    assert st.writeback.batches == 1 and st.writeback.moved_bytes == 16 * PAGE
    assert st.writeback.requests == 1
    assert await store.read(dev, 0, 64 * PAGE) == b"".join(data)


async def test_idle_writeback_with_a_mock_clock(stores, tmp_path, autojump_clock):
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB)
    dev = store.devices[0]
    data = pages_of(40)
    async with open_writeback(store) as wb:
        await store.write(dev, 0, b"".join(data[:20]))
        await trio.sleep(100)
        await store.write(dev, 20 * PAGE, b"".join(data[20:]))
        await trio.sleep(30)
        await store.read(dev, 5 * PAGE, PAGE)  # touched: not idle
        await trio.sleep(1)
        moved = await wb.writeback_idle(60)
        assert moved == 19
        assert where(store, dev, 5) == "pool"
        assert all(where(store, dev, s) == "ssd" for s in range(20) if s != 5)
        assert all(where(store, dev, s) == "pool" for s in range(20, 40))
        # (the mock clock jumps while the tier's thread writes: no age check here)
        assert await wb.writeback_idle(10_000) == 0
        assert await wb.writeback_idle(0) == 21
    assert await store.read(dev, 0, 40 * PAGE) == b"".join(data)


async def test_no_writeback_device_stays_in_memory(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=512 * 1024,
                   devices=(("keep", 4 * MiB, False), ("swap0", 4 * MiB, True)))
    keep, dev = store.devices
    a = pages_of(50, 1)
    b = pages_of(50, 2)
    noise = os.urandom(PAGE)
    await store.write(keep, 0, b"".join(a) + noise)
    await store.write(dev, 0, b"".join(b) + noise)
    assert where(store, keep, 50) == "pool"  # incompressible, yet kept in memory
    assert where(store, dev, 50) == "ssd"
    wb = Writeback(store)
    assert await wb.writeback_pages(1000, keep) == 0
    assert await wb.writeback_pages(1000) == 50
    assert all(where(store, keep, s) == "pool" for s in range(51))
    assert all(where(store, dev, s) == "ssd" for s in range(51))
    assert await store.read(keep, 0, 51 * PAGE) == b"".join(a) + noise


async def test_refault_promotes_a_hot_page_and_leaves_a_cold_one(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB,
                   cache_pages=0)
    dev = store.devices[0]
    data = pages_of(300)
    await store.write(dev, 0, b"".join(data))
    wb = Writeback(store)
    store.promote_distance = 50
    # slot 0 demoted first, then 250 more: a long refault distance
    assert await wb.writeback_pages(1) == 1
    assert await wb.writeback_pages(250) == 250
    assert where(store, dev, 0) == "ssd"
    cold = 0
    hot = 250  # demoted last: distance 0
    assert await store.read(dev, cold * PAGE, PAGE) == data[cold]
    assert await store.read(dev, hot * PAGE, PAGE) == data[hot]
    assert where(store, dev, cold) == "ssd"
    assert where(store, dev, hot) == "pool"
    st = store.stats().writeback
    assert st.refaults == 2 and st.promotions == 1
    assert st.levels["ssd"] == {"demotions": 0, "refaults": 2, "promotions": 1}
    assert st.levels["pool"]["demotions"] == 251
    # the cold page's shadow was re-armed: read again soon, it is hot now
    assert await store.read(dev, cold * PAGE, PAGE) == data[cold]
    assert where(store, dev, cold) == "pool"
    assert store.stats().writeback.promotions == 2


async def test_no_promotion_when_the_pool_has_no_room(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB)
    dev = store.devices[0]
    await store.write(dev, 0, b"".join(pages_of(10)))
    wb = Writeback(store)
    await wb.writeback_pages(10)
    store.promote_limit_bytes = 0
    await store.read(dev, 0, 10 * PAGE)
    assert all(where(store, dev, s) == "ssd" for s in range(10))
    assert store.stats().writeback.refaults == 10


async def test_pool_hit_rate_counts_the_page_reads_file_tiers_served(stores, tmp_path):
    """file_reads counts every page a file tier served (one page alone, a run of them, the
    swap cache's copy again); pool_hit_rate is the rest's share of the page reads."""
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB)
    dev = store.devices[0]
    data = pages_of(20)
    await store.write(dev, 0, b"".join(data))
    assert store.stats().writeback.pool_hit_rate == 1.0  # no read yet
    store.promote_limit_bytes = 0  # what is read from the tier stays there
    assert await Writeback(store).writeback_pages(10) == 10
    down = [s for s in range(20) if where(store, dev, s) == "ssd"]
    assert len(down) == 10
    assert await store.read(dev, 0, 20 * PAGE) == b"".join(data)  # 10 from the tier, 10 not
    assert await store.read(dev, down[0] * PAGE, PAGE) == data[down[0]]  # from the cache
    assert await store.read(dev, 12 * PAGE, 3 * PAGE + 100) == b"".join(data[12:16])[:3 * PAGE + 100]
    st = store.stats().writeback
    expected = 10 + 1 + sum(where(store, dev, s) == "ssd" for s in range(12, 16))
    assert st.file_reads == expected
    page_reads = (20 * PAGE + PAGE + 3 * PAGE + 100) // PAGE
    assert st.pool_hit_rate == pytest.approx(1 - expected / page_reads)
    assert store.stats().to_dict()["writeback"]["file_reads"] == expected


async def test_file_tier_watermark_moves_down_to_the_next_group(stores, tmp_path):
    store = stores([tier("fast", tmp_path / "fast.img", 1 * MiB, priority=100, high=0.5, low=0.25),
                    tier("slow", tmp_path / "slow.img", 16 * MiB, priority=10)],
                   pool_bytes=64 * 1024)
    dev = store.devices[0]
    data = [os.urandom(PAGE) for _ in range(200)]  # incompressible: straight to "fast"
    await store.write(dev, 0, b"".join(data))
    fast = store.tiers[0]
    assert fast.stored_pages == 200
    wb = Writeback(store)
    await wb.balance()
    assert fast.stored_pages <= 64
    st = store.stats().writeback
    assert st.pairs["fast_to_slow"]["pages"] == 200 - fast.stored_pages
    assert await store.read(dev, 0, 200 * PAGE) == b"".join(data)
    assert "fast" in st.watermarks and "slow" not in st.watermarks


async def test_write_during_move_wins_and_the_move_aborts(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB)
    dev = store.devices[0]
    old = pages_of(8, 1)
    new = pages_of(8, 2)
    await store.write(dev, 0, b"".join(old))
    wb = Writeback(store)
    async with trio.open_nursery() as n:
        n.start_soon(wb.writeback_pages, 8)
        for _ in range(100):  # until the move copied the pages and awaits the tier write
            if store.moves_in_flight:
                break
            await trio.lowlevel.checkpoint()
        assert store.moves_in_flight == 8
        assert await store.read(dev, 0, 8 * PAGE) == b"".join(old)  # from the old place
        await store.write(dev, 2 * PAGE, new[2])
        await store.discard(dev, 5 * PAGE, PAGE)
    st = store.stats().writeback
    assert st.moved_pages == 6 and st.aborted_moves == 2
    expect = list(old)
    expect[2] = new[2]
    expect[5] = bytes(PAGE)
    assert await store.read(dev, 0, 8 * PAGE) == b"".join(expect)
    assert where(store, dev, 2) == "pool" and dev.table.info[5] == 0
    assert dev.table.info[2] & KIND_MASK == POOL


async def test_a_large_request_keeps_several_writes_in_flight_and_each_commit_checks(
        stores, tmp_path):
    """A request's batch is moved in chunks: each chunk's write is in flight while the next is
    copied, and every chunk commits by the same rule (a write or discard meanwhile wins)."""
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB)
    dev = store.devices[0]
    n = 600  # three chunks
    old = pages_of(n, 3)
    await store.write(dev, 0, b"".join(old))
    t = store.tiers[0]
    write = t.write
    held: list[int] = []
    release = trio.Event()

    async def held_write(handles, objects):
        held.append(len(handles))
        await release.wait()
        await write(handles, objects)

    t.write = held_write
    wb = Writeback(store)
    new = pages_of(2, 4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wb.writeback_pages, n)
        for _ in range(100):
            if sum(held) == n:
                break
            await trio.lowlevel.checkpoint()
        assert len(held) > 1 and sum(held) == n  # every chunk's write in flight at once
        assert store.moves_in_flight == n
        await store.write(dev, 1 * PAGE, new[0])
        await store.write(dev, (n - 1) * PAGE, new[1])
        await store.discard(dev, 300 * PAGE, PAGE)
        release.set()
    st = store.stats().writeback
    assert st.moved_pages == n - 3 and st.aborted_moves == 3
    expect = list(old)
    expect[1], expect[n - 1], expect[300] = new[0], new[1], bytes(PAGE)
    assert where(store, dev, 1) == where(store, dev, n - 1) == "pool"
    assert [s for s in range(n) if where(store, dev, s) != "ssd"] == [1, 300, n - 1]
    assert await store.read(dev, 0, n * PAGE) == b"".join(expect)  # (reads may promote)
    store.check_invariants()


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
@pytest.mark.parametrize("seed", [0, 1, *(pytest.param(s, marks=pytest.mark.slow)
                                          for s in range(2, 8))])
async def test_concurrent_moves_against_a_model(stores, tmp_path, seed, dedup):
    """Writers, readers, discarders and writeback (tiny watermarks, pool to
    file and file to file) with promotions; the model is checked after every
    operation and the store's invariants whenever they must hold.  With
    dedup, a third of the pages written are one of five contents, so pages
    share pool objects while they are rewritten, discarded, demoted,
    promoted and compacted."""
    store = stores([tier("fast", tmp_path / "fast.img", 1 * MiB, priority=100, high=0.3, low=0.1),
                    tier("slow", tmp_path / "slow.img", 8 * MiB, priority=10)],
                   pool_bytes=64 * 1024, high=0.3, low=0.1, devices=(("swap0", 1 * MiB, True),),
                   cache_pages=int(os.environ.get("WB_CACHE", "16")), recompress="zstd",
                   dedup=dedup)
    dev = store.devices[0]
    npages = dev.npages
    rng = random.Random(seed)
    store.promote_distance = None if seed % 2 else 1 << 30
    # Even seeds promote every refault: the classic policy's rule (workingset
    # promotes only under the low watermark, which these tiny watermarks
    # never leave room for); odd seeds run the default policy's victim order.
    store.policy = make_policy("workingset" if seed % 2 else "classic", store)
    # Per page: every content a read may show.  Overlapping writes and
    # discards of a page may land in any order (a write request's pool pages
    # land at once, its file pages later), so when the last overlapping
    # operation ends, the page may hold the value of any of them; the next
    # read with nothing in flight on the page pins down which.
    model: list[set[bytes]] = [{bytes(PAGE)} for _ in range(npages)]
    episode: list[set[bytes]] = [set() for _ in range(npages)]
    busy = [0] * npages
    version = [0] * npages
    checks = [0]

    def begin(i: int, value: bytes) -> None:
        if not busy[i]:
            episode[i] = set()
        busy[i] += 1
        version[i] += 1
        episode[i].add(value)
        model[i].add(value)

    def end(i: int) -> None:
        busy[i] -= 1
        if not busy[i]:
            model[i] = set(episode[i])

    def content(i: int, k: int) -> bytes:
        r = random.Random(i * 100003 + k + seed * 7)
        if dedup and k % 3 == 1:
            return compressible_page(random.Random(k % 5))  # one of five, everywhere
        if k % 4 == 0:
            return r.randbytes(PAGE)
        return compressible_page(r)

    def check() -> None:
        checks[0] += 1
        store.check_invariants(quiescent=False)

    async def writer(w: int) -> None:
        for k in range(120):
            i = rng.randrange(npages - 4)
            n = rng.randrange(1, 4)
            pages = [content(i + j, w * 1000 + k) for j in range(n)]
            for j in range(n):
                begin(i + j, pages[j])
            await store.write(dev, i * PAGE, b"".join(pages))
            for j in range(n):
                end(i + j)
            check()
            await trio.lowlevel.checkpoint()
        writing[0] -= 1

    async def discarder() -> None:
        for _ in range(50):
            i = rng.randrange(npages - 8)
            n = rng.randrange(1, 8)
            for j in range(n):
                begin(i + j, bytes(PAGE))
            await store.discard(dev, i * PAGE, n * PAGE)
            for j in range(n):
                end(i + j)
            check()
            await trio.lowlevel.checkpoint()

    async def reader() -> None:
        for _ in range(250):
            i = rng.randrange(npages - 4)
            before = [set(model[i + j]) for j in range(4)]
            quiet = [(version[i + j], busy[i + j]) for j in range(4)]
            got = await store.read(dev, i * PAGE, 4 * PAGE)
            for j in range(4):
                page = bytes(got[j * PAGE:(j + 1) * PAGE])
                assert page in before[j] or page in model[i + j], f"page {i + j} read wrong"
                if quiet[j][1] == 0 and quiet[j] == (version[i + j], busy[i + j]):
                    model[i + j] = {page}  # nothing touched it: this is its content
            check()
            await trio.lowlevel.checkpoint()

    async def requester(wb: Writeback) -> None:
        for _ in range(40):
            if rng.random() < 0.5:
                await wb.writeback_pages(rng.randrange(1, 40))
            else:
                await wb.writeback_idle(0)
            check()
            await trio.sleep(0.001)

    cleaned = [0]

    writing = [3]

    async def cleaner(wb: Writeback) -> None:
        # the file tiers' segments cleaned at any point, as long as the
        # writers run: their live objects re-appended and their slots
        # switched while the others run
        k = 0
        while writing[0] or k < 60:
            cleaned[0] += await wb.clean_now(rng.randrange(2), rng.randrange(1, 4))
            check()
            k += 1
            await trio.sleep(0.001)

    async def compactor() -> None:
        # compaction in small steps at any point, between any two awaits of
        # the others (the writeback task also compacts as it drains)
        for _ in range(200):
            store.compact(rng.randrange(1, 16))
            check()
            await trio.sleep(0.0005)

    async def recompressor() -> None:
        # idle pages recompressed with zstd in small steps, between any two
        # awaits of the others (the writeback task also does it each pass)
        for _ in range(200):
            store.recompressor.step(rng.randrange(1, 16), 0)
            check()
            await trio.sleep(0.0005)

    async with open_writeback(store, interval=0.001) as wb:
        async with trio.open_nursery() as n:
            for w in range(3):
                n.start_soon(writer, w)
            n.start_soon(discarder)
            for _ in range(3):
                n.start_soon(reader)
            n.start_soon(requester, wb)
            n.start_soon(compactor)
            n.start_soon(recompressor)
            n.start_soon(cleaner, wb)
    for i in range(npages):
        page = bytes(await store.read(dev, i * PAGE, PAGE))
        assert page in model[i], f"page {i}"
        assert bytes(await store.read(dev, i * PAGE, PAGE)) == page  # stable
    store.check_invariants()
    st = store.stats()
    assert st.writeback.moved_pages > 0
    assert st.writeback.pairs.get("fast_to_slow", {}).get("pages", 0) > 0
    if store.promote_distance:
        assert st.writeback.promotions > 0
    assert st.pool.compacted_objects > 0
    assert st.pool.recompressed_pages > 0
    assert cleaned[0] > 0
    assert sum(t.cleaned_objects for t in store.tiers) >= cleaned[0]
    if dedup:
        assert st.pool.dedup_hits > 0
    print(f"seed {seed}: {checks[0]} checked steps, moved {st.writeback.moved_pages}, "
          f"cleaned {cleaned[0]}, "
          f"dedup hits {st.pool.dedup_hits}, "
          f"aborted {st.writeback.aborted_moves}, promotions {st.writeback.promotions}, "
          f"cache hits {st.cache.hits}, compacted {st.pool.compacted_objects}, "
          f"recompressed {st.pool.recompressed_pages}")


async def test_victim_search_on_a_device_used_only_at_its_start(stores, tmp_path):
    # 16M slots, pages only in the first clusters: the search skips the
    # empty clusters without ending a pass, wherever its cursor stands.
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB,
                   devices=(("big", 64 << 30, True),))
    dev = store.devices[0]
    wb = Writeback(store)
    first, second = pages_of(300, 1), pages_of(300, 2)
    await store.write(dev, 0, b"".join(first))
    assert await wb.writeback_pages(300) == 300  # the cursor is now past the pages
    await store.write(dev, 1000 * PAGE, b"".join(second))
    assert await wb.writeback_pages(300) == 300
    assert all(where(store, dev, s) == "ssd" for s in range(1000, 1300))
    # One search walks the device round at most once: nothing left, nothing found.
    assert wb.select(0, 10) == []
    assert await store.read(dev, 1000 * PAGE, 300 * PAGE) == b"".join(second)
    assert await store.read(dev, 0, 300 * PAGE) == b"".join(first)


async def test_a_request_finds_pool_pages_past_a_long_stretch_of_others(stores, tmp_path):
    """Pool pages beyond more stored slots than one search window looks at
    (same-filled pages here, as a request leaves moved ones behind it): the
    search walks on (one round at most) and the request moves them all."""
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB,
                   devices=(("swap0", 96 * MiB, True),))
    dev = store.devices[0]
    zeros = bytes(MiB)
    for off in range(0, 80 * MiB, MiB):  # 20480 same-filled slots from the cursor on
        await store.write(dev, off, zeros)
    data = pages_of(16)
    await store.write(dev, 80 * MiB, b"".join(data))
    wb = Writeback(store)
    assert await wb.writeback_pages(1000) == 16
    assert all(where(store, dev, 20480 + i) == "ssd" for i in range(16))
    assert await store.read(dev, 80 * MiB, 16 * PAGE) == b"".join(data)


@pytest.mark.slow
async def test_writeback_compacts_the_holes_it_leaves(stores, tmp_path):
    # Demotion frees objects scattered over the pool's spans; the drain
    # compacts them, so the memory held follows what stays in the pool and the
    # drain stops at the low watermark of memory really held.
    store = stores([tier("ssd", tmp_path / "ssd.img", 64 * MiB)], pool_bytes=16 * MiB,
                   high=0.5, low=0.3, devices=(("swap0", 64 * MiB, True),))
    dev = store.devices[0]
    data = pages_of(8000, 7)
    await store.write(dev, 0, b"".join(data))  # more than the high watermark
    wb = Writeback(store)
    store.epoch = 100
    for s in range(0, 8000, 2):  # touch every other page: the others are the coldest
        await store.read(dev, s * PAGE, PAGE)
    assert store.pool.pool_bytes > store.pool_high_bytes
    await wb.balance()
    pool = store.stats().pool
    assert pool.pool_bytes <= store.pool_low_bytes
    assert pool.pool_bytes > store.pool_low_bytes * 0.8  # it stopped at the watermark
    assert pool.compactions > 0 and pool.compacted_objects > 0
    assert pool.holes <= 0.15
    assert await store.read(dev, 0, 8000 * PAGE) == b"".join(data)
