"""The store over the pool and file tiers: where pages go, integrity, failures, concurrency."""

from __future__ import annotations

import functools
import os
import random

import pytest
import trio
import trio.lowlevel

from swapfs.errors import BackingIOError, Corruption, NoSpace
from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.store import Store
from swapfs.tiers.file import CLUSTER_PAGES, DATA_OFFSET

from ..conftest import MakeStore, tier

MiB = 1 << 20
CLUSTER = CLUSTER_PAGES * PAGE


@pytest.fixture
def stores(make_store: MakeStore) -> MakeStore:
    return functools.partial(make_store, pool_bytes=1 * MiB, devices=(("swap0", 32 * MiB),))


def tier_stats(store: Store) -> dict:
    return {t.name: t for t in store.stats().tiers}


def accounting(store: Store) -> None:
    st = store.stats()
    t = st.totals
    assert t.stored_pages == t.same_filled_pages + sum(x.stored_pages for x in st.tiers)
    assert t.stored_pages == sum(d.stored_pages for d in st.devices)


async def test_incompressible_pages_go_to_the_file_tier(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 8 * MiB)])
    dev = store.devices[0]
    rng = random.Random(1)
    pages = [rng.randbytes(PAGE) for _ in range(64)]
    text = (b"compressible " * 400)[:PAGE]
    await store.write(dev, 0, b"".join(pages))
    await store.write(dev, 64 * PAGE, text * 4)
    ts = tier_stats(store)
    assert ts["ssd"].stored_pages == 64
    assert ts["pool"].stored_pages == 4 and ts["pool"].huge_pages == 0
    assert store.stats().device("swap0").file_pages == 64
    assert await store.read(dev, 0, 64 * PAGE) == b"".join(pages)
    for i in (0, 17, 63):
        assert await store.read(dev, i * PAGE, PAGE) == pages[i]
    assert await store.read(dev, 64 * PAGE, 4 * PAGE) == text * 4
    # unaligned read across a file page and a pool page, and an unaligned rewrite
    assert await store.read(dev, 63 * PAGE + 100, PAGE) == (pages[63] + text)[100:100 + PAGE]
    await store.write(dev, 10 * PAGE + 7, b"xyz")
    expect = bytearray(pages[10])
    expect[7:10] = b"xyz"
    assert await store.read(dev, 10 * PAGE, PAGE) == bytes(expect)
    accounting(store)


async def test_pool_full_spills_to_file_tier(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=256 * 1024)
    dev = store.devices[0]
    rng = random.Random(2)
    words = [b"alpha ", b"beta ", b"gamma ", b"delta "]
    pages = [b"".join(rng.choice(words) for _ in range(1000))[:PAGE] for _ in range(1024)]
    await store.write(dev, 0, b"".join(pages))
    ts = tier_stats(store)
    assert ts["pool"].pool_bytes <= 256 * 1024
    assert ts["pool"].stored_pages > 0 and ts["ssd"].stored_pages > 0
    assert ts["pool"].stored_pages + ts["ssd"].stored_pages == 1024
    assert await store.read(dev, 0, 1024 * PAGE) == b"".join(pages)
    accounting(store)


async def test_priority_order_then_round_robin(stores, tmp_path):
    store = stores([
        tier("slow", tmp_path / "slow.img", 64 * MiB, priority=10),
        tier("fast", tmp_path / "fast.img", 2 * CLUSTER, priority=100),
        # 256 KiB segments (a tier has at least 256 where it can)
        tier("ssd_a", tmp_path / "a.img", 64 * MiB, priority=50),
        tier("ssd_b", tmp_path / "b.img", 64 * MiB, priority=50),
    ])
    dev = store.devices[0]
    data = os.urandom(2 * CLUSTER)
    await store.write(dev, 0, data)  # fills "fast"; what does not fit goes to the next priority
    ts = tier_stats(store)
    fast = ts["fast"].stored_pages
    assert fast > 0 and store.tiers[1].allocate([PAGE]) == []  # full: raw pages and their tags
    assert ts["slow"].stored_pages == 0
    assert ts["ssd_a"].stored_pages + ts["ssd_b"].stored_pages == 2 * CLUSTER_PAGES - fast
    # four more clusters, one request each: equal priorities take turns, segment by segment
    more = [os.urandom(CLUSTER) for _ in range(4)]
    for i, chunk in enumerate(more):
        await store.write(dev, 2 * CLUSTER + i * CLUSTER, chunk)
    ts = tier_stats(store)
    per_segment = store.tiers[2].segment_bytes // store.tiers[2].object_bytes(PAGE)
    a, b = ts["ssd_a"].stored_pages, ts["ssd_b"].stored_pages
    assert a + b == 6 * CLUSTER_PAGES - fast
    assert a > 0 and b > 0 and abs(a - b) <= per_segment
    assert ts["slow"].stored_pages == 0
    assert await store.read(dev, 0, 6 * CLUSTER) == data + b"".join(more)
    accounting(store)


async def test_all_tiers_full_is_nospace_and_keeps_data(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", CLUSTER)], pool_bytes=64 * 1024)
    dev = store.devices[0]
    stored = []
    with pytest.raises(NoSpace):
        for i in range(1000):
            page = os.urandom(PAGE)
            await store.write(dev, i * PAGE, page)
            stored.append(page)
    # raw pages: all in the file tier, as many as fit with their headers and tags, less the
    # segments kept back for cleaning (nothing to clean: every object is live)
    t = store.tiers[0]
    usable = t.nsegments - 2
    assert len(stored) == usable * (t.segment_bytes // t.object_bytes(PAGE))
    assert t.stored_pages == len(stored) and t.full
    assert await store.read(dev, 0, len(stored) * PAGE) == b"".join(stored)
    assert await store.read(dev, len(stored) * PAGE, PAGE) == bytes(PAGE)
    # same-filled pages need no space
    await store.write(dev, (len(stored) + 1) * PAGE, bytes(PAGE))
    assert store.stats().device("swap0").nospace_errors == 1


async def test_discard_frees_file_pages_and_punches_clusters(stores, tmp_path):
    path = tmp_path / "ssd.img"
    store = stores([tier("ssd", path, 8 * MiB)])
    dev = store.devices[0]
    await store.write(dev, 0, os.urandom(4 * CLUSTER))
    blocks_full = os.stat(path).st_blocks
    assert blocks_full * 512 >= 4 * CLUSTER
    await store.discard(dev, CLUSTER, 2 * CLUSTER)
    assert tier_stats(store)["ssd"].stored_pages == 2 * CLUSTER_PAGES
    # every segment left without a live object is punched: all of those the discarded range
    # covers but the two it shares with the pages kept
    seg = store.tiers[0].segment_bytes
    assert os.stat(path).st_blocks * 512 <= blocks_full * 512 - 2 * CLUSTER * 4128 // PAGE + 2 * seg
    assert await store.read(dev, CLUSTER, 2 * CLUSTER) == bytes(2 * CLUSTER)
    # a rewrite that moves a whole cluster's pages to the pool frees their segments too
    await store.write(dev, 0, (b"now compressible " * 250)[:PAGE] * CLUSTER_PAGES)
    assert tier_stats(store)["ssd"].stored_pages == CLUSTER_PAGES
    assert os.stat(path).st_blocks * 512 <= blocks_full * 512 - 3 * CLUSTER * 4128 // PAGE + 3 * seg
    accounting(store)


async def test_flipped_byte_in_backing_file_is_eio_for_that_page_only(stores, tmp_path):
    path = tmp_path / "ssd.img"
    store = stores([tier("ssd", path, 8 * MiB)])
    dev = store.devices[0]
    pages = [os.urandom(PAGE) for _ in range(8)]
    await store.write(dev, 0, b"".join(pages))
    victim = 5
    handle = dev.table.handles[victim]
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, DATA_OFFSET + handle + 123)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), DATA_OFFSET + handle + 123)
    finally:
        os.close(fd)
    with pytest.raises(Corruption):
        await store.read(dev, victim * PAGE, PAGE)
    with pytest.raises(Corruption):
        await store.read(dev, 0, 8 * PAGE)
    for i in range(8):
        if i != victim:
            assert await store.read(dev, i * PAGE, PAGE) == pages[i]
    assert tier_stats(store)["ssd"].checksum_errors >= 2
    # rewriting the page heals it
    await store.write(dev, victim * PAGE, pages[victim])
    assert await store.read(dev, victim * PAGE, PAGE) == pages[victim]


async def test_backing_io_error_is_reported(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 8 * MiB)])
    dev = store.devices[0]
    page = os.urandom(PAGE)
    await store.write(dev, 0, page)
    t = store.tiers[0]
    real_fd = t._fd
    t._fd = os.open("/dev/null", os.O_RDONLY)  # reads return nothing, writes fail with EBADF
    try:
        with pytest.raises((BackingIOError, Corruption)):
            await store.read(dev, 0, PAGE)
        with pytest.raises(BackingIOError):
            await store.write(dev, PAGE, os.urandom(PAGE))
    finally:
        os.close(t._fd)
        t._fd = real_fd
    assert tier_stats(store)["ssd"].io_errors >= 1
    assert await store.read(dev, 0, PAGE) == page
    assert await store.read(dev, PAGE, PAGE) == bytes(PAGE)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_backing_filesystem_really_fills_up(stores, tmp_path, small_ext4):
    # a sparse 64 MiB tier on an 8 MiB ext4: ENOSPC comes from the filesystem
    store = stores([
        tier("small", small_ext4 / "tier.img", 64 * MiB, priority=100),
        tier("big", tmp_path / "big.img", 64 * MiB, priority=10),
    ], pool_bytes=64 * 1024, devices=(("swap0", 64 * MiB),))
    dev = store.devices[0]
    written = []
    for i in range(3000):  # ~12 MiB of raw pages
        page = os.urandom(PAGE)
        await store.write(dev, i * PAGE, page)
        written.append(page)
    ts = tier_stats(store)
    assert ts["small"].full
    assert ts["small"].stored_pages > 0 and ts["big"].stored_pages > 0
    assert ts["small"].stored_pages + ts["big"].stored_pages + ts["pool"].stored_pages == 3000
    for i in range(0, 3000, 64):
        chunk = written[i:i + 64]
        assert await store.read(dev, i * PAGE, len(chunk) * PAGE) == b"".join(chunk)
    accounting(store)


class PageModel:
    """What each page may read as while operations overlap.

    An operation (a write of one page, or a discard) commits at some moment
    between its start and its end, so when it ends the page holds its content
    or that of any operation that overlapped it in time (which may have
    committed later).  A read may return what the page could hold when the
    read started, or the content of any operation started during the read.
    """

    def __init__(self, npages: int) -> None:
        self.possible: list[set[bytes]] = [{bytes(PAGE)} for _ in range(npages)]
        self.inflight: list[dict[int, tuple[bytes, set[bytes]]]] = [{} for _ in range(npages)]
        self.started: list[list[bytes]] = [[] for _ in range(npages)]
        self.next_id = 0

    def start(self, p: int, content: bytes) -> int:
        op = self.next_id
        self.next_id += 1
        others = self.inflight[p]
        for _, overlapped in others.values():
            overlapped.add(content)
        others[op] = (content, {c for c, _ in others.values()})
        self.possible[p].add(content)
        self.started[p].append(content)
        return op

    def end(self, p: int, op: int) -> None:
        content, overlapped = self.inflight[p].pop(op)
        self.possible[p] = {content} | overlapped

    def before_read(self, p: int) -> tuple[set[bytes], int]:
        return set(self.possible[p]), len(self.started[p])

    def acceptable(self, p: int, snapshot: tuple[set[bytes], int]) -> set[bytes]:
        before, mark = snapshot
        return before | set(self.started[p][mark:])


@pytest.mark.parametrize("seed", range(6))
async def test_concurrent_io_against_a_model(stores, tmp_path, seed):
    """Writers, readers and discarders interleave at every await of the file tier."""
    store = stores([tier("a", tmp_path / "a.img", 4 * MiB, priority=5),
                    tier("b", tmp_path / "b.img", 4 * MiB, priority=5)],
                   pool_bytes=128 * 1024, devices=(("swap0", 2 * MiB),))
    dev = store.devices[0]
    npages = 2 * MiB // PAGE
    model = PageModel(npages)
    rng = random.Random(seed)
    zero = bytes(PAGE)

    def content(i: int, k: int) -> bytes:
        r = random.Random(i * 100003 + k)
        if k % 3 == 0:
            return (b"%d:%d " % (i, k) * PAGE)[:PAGE]
        return r.randbytes(PAGE)

    async def writer(w: int) -> None:
        for k in range(150):
            i = rng.randrange(npages - 4)
            n = rng.randrange(1, 4)
            pages = [content(i + j, w * 1000 + k) for j in range(n)]
            ops = [model.start(i + j, pages[j]) for j in range(n)]
            await store.write(dev, i * PAGE, b"".join(pages))
            for j in range(n):
                model.end(i + j, ops[j])
            await trio.lowlevel.checkpoint()

    async def discarder() -> None:
        for _ in range(60):
            i = rng.randrange(npages - 8)
            n = rng.randrange(1, 8)
            ops = [model.start(i + j, zero) for j in range(n)]
            await store.discard(dev, i * PAGE, n * PAGE)
            for j in range(n):
                model.end(i + j, ops[j])
            await trio.lowlevel.checkpoint()

    async def reader() -> None:
        for _ in range(300):
            i = rng.randrange(npages - 4)
            snaps = [model.before_read(i + j) for j in range(4)]
            got = await store.read(dev, i * PAGE, 4 * PAGE)
            for j in range(4):
                page = bytes(got[j * PAGE:(j + 1) * PAGE])
                assert page in model.acceptable(i + j, snaps[j]), f"page {i + j} read wrong"
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        for w in range(3):
            n.start_soon(writer, w)
        n.start_soon(discarder)
        for _ in range(3):
            n.start_soon(reader)
    for i in range(npages):
        assert bytes(await store.read(dev, i * PAGE, PAGE)) in model.possible[i], f"page {i}"
    assert sum(t.stored_pages for t in store.tiers) > 0
    accounting(store)


async def test_concurrent_sub_page_writes_to_a_file_page_both_land(stores, tmp_path):
    # Two 512-byte writes into different sectors of one page that lives in a
    # file tier: each reads the page, modifies it and stores it across
    # awaits; neither may lose the other's sector.
    store = stores([tier("ssd", tmp_path / "ssd.img", 4 * MiB)])
    dev = store.devices[0]
    for round_ in range(20):
        slot = round_
        base = os.urandom(PAGE)  # incompressible: the page is in the file tier
        await store.write(dev, slot * PAGE, base)
        assert dev.table.info[slot] & 0xF >= 8
        a, b = os.urandom(512), os.urandom(512)
        sa, sb = round_ % 8, (round_ + 3) % 8
        async with trio.open_nursery() as n:
            n.start_soon(store.write, dev, slot * PAGE + sa * 512, a)
            n.start_soon(store.write, dev, slot * PAGE + sb * 512, b)
        want = bytearray(base)
        want[sa * 512:(sa + 1) * 512] = a
        want[sb * 512:(sb + 1) * 512] = b
        assert await store.read(dev, slot * PAGE, PAGE) == want, f"round {round_}"
        store.check_invariants()


async def test_sub_page_write_racing_whole_page_write_and_discard(stores, tmp_path):
    # A whole-page write or a discard that commits while a sub-page write of
    # the same page is between its read and its store: the sub-page write
    # starts over, so the other sectors come from the newer content.
    store = stores([tier("ssd", tmp_path / "ssd.img", 4 * MiB)])
    dev = store.devices[0]
    base, newer, sector = os.urandom(PAGE), os.urandom(PAGE), os.urandom(512)
    for slot, race in ((1, "write"), (2, "discard")):
        await store.write(dev, slot * PAGE, base)
        async with trio.open_nursery() as n:
            n.start_soon(store.write, dev, slot * PAGE + 1024, sector)
            await trio.testing.wait_all_tasks_blocked()  # the sub-page write is mid-flight
            if race == "write":
                await store.write(dev, slot * PAGE, newer)
            else:
                await store.discard(dev, slot * PAGE, PAGE)
        got = await store.read(dev, slot * PAGE, PAGE)
        want = bytearray(newer if race == "write" else bytes(PAGE))
        want[1024:1536] = sector
        if race == "write":
            # either order is a legal outcome of the two writes, never the stale page
            assert got in (bytes(want), newer)
        else:
            assert got in (bytes(want), bytes(PAGE))
        assert got[:1024] != base[:1024]
        store.check_invariants()


async def test_a_write_that_finds_no_room_changes_nothing(stores, tmp_path):
    # All or nothing: a 64-page write of which only some pages would fit in
    # the pool and the file tier is refused whole; the old content stays.
    store = stores([tier("ssd", tmp_path / "ssd.img", CLUSTER)], pool_bytes=256 * 1024)
    dev = store.devices[0]
    t = store.tiers[0]
    room = (t.nsegments - 2) * (t.segment_bytes // t.object_bytes(PAGE))  # raw pages it holds
    nold = room - 60
    old = [os.urandom(PAGE) for _ in range(nold)]
    await store.write(dev, 0, b"".join(old))  # all but 60 of the tier's room
    before = store.stats()
    new = b"".join(os.urandom(PAGE) for _ in range(64))
    with pytest.raises(NoSpace):
        await store.write(dev, 100 * PAGE, new)
    after = store.stats()
    assert await store.read(dev, 0, nold * PAGE) == b"".join(old)
    assert after.totals.stored_pages == before.totals.stored_pages
    assert tier_stats(store)["ssd"].stored_pages == nold
    assert after.device("swap0").nospace_errors == 1
    store.check_invariants()
    # A write that fits still goes through, and the space is really free.
    await store.write(dev, 100 * PAGE, new[:50 * PAGE])
    assert await store.read(dev, 100 * PAGE, 50 * PAGE) == new[:50 * PAGE]


async def test_pages_that_skip_the_pool_are_counted(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 8 * MiB)], pool_bytes=1 * MiB)
    dev = store.devices[0]
    await store.write(dev, 0, b"".join(os.urandom(PAGE) for _ in range(10)))
    pool = store.stats().pool
    assert (pool.reject_compress_poor, pool.pool_limit_hit) == (10, 0)
    words = [b"swap", b"page", b"tier", b"pool"]
    rng = random.Random(1)
    text = b"".join(rng.choice(words) for _ in range(1200 * PAGE // 4))
    await store.write(dev, 16 * PAGE, text)  # compressible, 1200 pages: more than the 1 MiB pool holds
    pool = store.stats().pool
    assert pool.reject_compress_poor == 10
    assert pool.pool_limit_hit > 0  # the rest found the pool at its limit and went to the tier
    assert tier_stats(store)["ssd"].stored_pages == 10 + pool.pool_limit_hit
    assert await store.read(dev, 16 * PAGE, 1200 * PAGE) == text


async def test_cleaning_moves_live_objects_and_frees_segments(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 4 * MiB, segment_bytes=64 * 1024)],
                   pool_bytes=256 * 1024)
    dev = store.devices[0]
    rng = random.Random(11)
    n = 600
    pages = [rng.randbytes(PAGE) if i % 3 else (b"clean me %d " % i * 400)[:PAGE]
             for i in range(n)]
    await store.write(dev, 0, b"".join(pages[:300]))
    await store.migrate([(dev, s) for s in range(300)], 0)  # whatever the pool held, down
    await store.write(dev, 300 * PAGE, b"".join(pages[300:]))
    await store.migrate([(dev, s) for s in range(300, n)], 0)
    t = store.tiers[0]
    assert t.stored_pages == n
    kept = set(range(n))
    for s in rng.sample(range(n), n // 2):  # random discards leave segments half live
        await store.discard(dev, s * PAGE, PAGE)
        kept.discard(s)
    before = t.stats()
    assert before.dead_bytes > 0
    moved = 0
    while t.cleaning_victims():
        got = await store.clean(0, 4)
        if not got:
            break
        moved += got
        store.check_invariants()
    after = t.stats()
    assert moved > 0 and after.cleaned_objects == moved
    assert after.cleaned_bytes > 0 and after.write_amplification > 1.0
    assert after.segments_free > before.segments_free  # emptied, punched, reusable
    assert after.dead_bytes < before.dead_bytes
    assert after.live_bytes == before.live_bytes and after.stored_pages == len(kept)
    for s in range(n):
        assert await store.read(dev, s * PAGE, PAGE) == (pages[s] if s in kept else bytes(PAGE))
    accounting(store)


async def test_a_cleaning_move_loses_to_a_write_or_discard_meanwhile(stores, tmp_path):
    store = stores([tier("ssd", tmp_path / "ssd.img", 4 * MiB, segment_bytes=64 * 1024)])
    dev = store.devices[0]
    rng = random.Random(12)
    pages = [rng.randbytes(PAGE) for _ in range(64)]
    await store.write(dev, 0, b"".join(pages))  # incompressible: 15 to a segment
    for s in range(0, 64, 2):
        await store.discard(dev, s * PAGE, PAGE)
    t = store.tiers[0]
    write = t.write
    hold, holding = trio.Event(), trio.Event()

    async def held_write(*args, **kw):
        holding.set()
        await hold.wait()  # cleaning stays between its copy and its commit
        await write(*args, **kw)

    t.write = held_write
    new = rng.randbytes(PAGE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.clean, 0, 1)
        await holding.wait()
        t.write = write
        await store.write(dev, 1 * PAGE, new)  # slot 1 rewritten, slot 3 discarded meanwhile
        await store.discard(dev, 3 * PAGE, PAGE)
        hold.set()
    assert await store.read(dev, 1 * PAGE, PAGE) == new
    assert await store.read(dev, 3 * PAGE, PAGE) == bytes(PAGE)
    for s in range(5, 64, 2):
        assert await store.read(dev, s * PAGE, PAGE) == pages[s]
    assert store.stats().writeback.aborted_moves >= 2
    store.check_invariants()


async def test_cleaning_keeps_survivors_apart_from_fresh_pages(stores, tmp_path):
    """Survivors of cleaning (cold: they outlived their segment's other objects) go to
    segments of their own, never the head fresh pages are appended to."""
    seg = 64 * 1024
    store = stores([tier("ssd", tmp_path / "ssd.img", 4 * MiB, segment_bytes=seg)])
    dev = store.devices[0]
    t = store.tiers[0]
    rng = random.Random(15)
    pages = {s: rng.randbytes(PAGE) for s in range(90)}  # incompressible: 15 to a segment
    await store.write(dev, 0, b"".join(pages.values()))
    for s in range(0, 90, 3):  # two of three survive: no segment empties on its own
        await store.discard(dev, s * PAGE, PAGE)
        del pages[s]
    fresh = {90 + i: rng.randbytes(PAGE) for i in range(10)}
    await store.write(dev, 90 * PAGE, b"".join(fresh.values()))  # the user head takes them
    before = {s: dev.table.handles[s] for s in pages}
    assert await store.clean(0, 3, max_live=1.0) > 0
    moved = [s for s in pages if dev.table.handles[s] != before[s]]
    assert len(moved) == t.stats().cleaned_objects > 0
    more = {100 + i: rng.randbytes(PAGE) for i in range(20)}
    await store.write(dev, 100 * PAGE, b"".join(more.values()))
    hot = {dev.table.handles[s] // seg for s in [*fresh, *more]}
    cold = {dev.table.handles[s] // seg for s in moved}
    assert not cold & hot, "cleaning wrote survivors where fresh pages go"
    for s, p in {**pages, **fresh, **more}.items():
        assert await store.read(dev, s * PAGE, PAGE) == p
    store.check_invariants()


@pytest.mark.timeout(120)
async def test_a_tier_under_random_rewrites_at_70_percent_live_never_reports_full(stores, tmp_path):
    """The writeback task cleans as free segments run low: the tier never refuses a write
    while less than 70% of it is live."""
    from swapfs.writeback import open_writeback
    store = stores([tier("ssd", tmp_path / "ssd.img", 4 * MiB, segment_bytes=64 * 1024)],
                   pool_bytes=64 * 1024)
    dev = store.devices[0]
    t = store.tiers[0]
    rng = random.Random(13)
    nslots = int(0.7 * t.size_bytes / t.object_bytes(PAGE))  # 70% live, raw pages
    async with open_writeback(store, interval=0.01):
        for k in range(8 * nslots):
            await store.write(dev, rng.randrange(nslots) * PAGE, rng.randbytes(PAGE))
            assert not t.full
            if k % 200 == 0:
                await trio.lowlevel.checkpoint()
    st = t.stats()
    assert st.cleaned_objects > 0
    assert st.live_bytes <= 0.7 * t.size_bytes + t.object_bytes(PAGE)
    store.check_invariants()


@pytest.mark.parametrize("recompress", ["", "zstd"])
async def test_moves_keep_objects_compressed_and_a_tier_may_recompress(stores, tmp_path,
                                                                        recompress):
    store = stores([tier("ssd", tmp_path / "ssd.img", 8 * MiB, recompress=recompress)],
                   pool_bytes=4 * MiB)
    dev = store.devices[0]
    rng = random.Random(14)
    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"swap "]
    pages = [b"".join(rng.choice(words) for _ in range(900))[:PAGE] for _ in range(64)]
    await store.write(dev, 0, b"".join(pages))
    sizes = [dev.table.info[s] >> 4 & 0x1FFF for s in range(64)]  # the pool's lz4 lengths
    assert await store.migrate([(dev, s) for s in range(64)], 0) == 64
    t = store.tiers[0]
    codecs = []
    for s in range(64):
        n = dev.table.info[s] >> 4 & 0x1FFF
        cid, payload = t.read_now(dev.table.handles[s], n, s)
        codecs.append(cid)
        assert len(payload) == n < PAGE
    if recompress:
        assert set(codecs) == {2}  # zstd: every page came down denser
        assert store.moves.recompressed == 64
        assert sum(dev.table.info[s] >> 4 & 0x1FFF for s in range(64)) < sum(sizes)
    else:
        assert set(codecs) == {1}  # lz4, the pool's bytes as they were
        assert [dev.table.info[s] >> 4 & 0x1FFF for s in range(64)] == sizes
    assert t.stats().compression_ratio > 2
    assert await store.read(dev, 0, 64 * PAGE) == b"".join(pages)
    store.check_invariants()
