"""The store over the pool and a remote tier on a real local cluster: pages down and back,
integrity (a node returning another object's bytes), discards and cleaning, a full cluster
(the next tier takes the page), a master killed under reads."""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator

import pytest
import trio

from swapfs.config import TierConfig
from swapfs.errors import Corruption
from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.store import Store
from swapfs.testing.redis import LocalCluster, redis_server_missing
from swapfs.tiers.remote.client import Cluster, key_slot
from swapfs.tiers.remote.tier import RemoteTier

from ..conftest import MakeStore, tier

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
_prefixes = itertools.count()


def remote(cluster: LocalCluster, size: int = 16 * MiB, *, name: str = "far",
           priority: int = 5, segment_bytes: int = 64 * 1024, replicas: int = 1,
           read_deadline: float = 10.0) -> TierConfig:
    return TierConfig(name=name, kind="redis", path="", size=size, priority=priority,
                      high_watermark=0.95, low_watermark=0.9, segment_bytes=segment_bytes,
                      seeds=tuple(cluster.seeds[:2]), key_prefix=f"t{next(_prefixes)}:",
                      timeout=0.5, read_deadline=read_deadline, replicas=replicas,
                      password_file=cluster.password_file, user=cluster.user)


@pytest.fixture
def stores(make_store: MakeStore) -> MakeStore:
    return functools.partial(make_store, pool_bytes=1 * MiB, devices=(("swap0", 32 * MiB),))


def pages_of(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    words = [b"alpha ", b"beta ", b"gamma ", b"delta ", b"%d " % seed]
    return [b"".join(rng.choice(words) for _ in range(900))[:PAGE] if i % 4
            else rng.randbytes(PAGE) for i in range(n)]


async def test_pages_go_down_to_the_cluster_and_come_back(stores, redis_cluster):
    store = stores([remote(redis_cluster)])
    dev = store.devices[0]
    pages = pages_of(1, 400)
    await store.write(dev, 0, b"".join(pages))
    assert await store.migrate([(dev, s) for s in range(400)], 0) > 0
    t = store.tiers[0]
    assert isinstance(t, RemoteTier)
    st = t.stats()
    assert st.kind == "redis" and st.stored_pages == 400 and st.remote_requests > 0
    assert st.remote_sent_bytes >= st.live_bytes
    assert sum(st.remote_pages_per_node.values()) == 400
    assert await store.read(dev, 0, 400 * PAGE) == b"".join(pages)
    for s in (0, 1, 199, 399):
        assert await store.read(dev, s * PAGE, PAGE) == pages[s]
    st = t.stats()
    assert sum(st.remote_read_latency_us.values()) > 0 and st.checksum_errors == 0
    # Segments are strings of exactly segment_bytes - 64 bytes on the cluster.
    port = redis_cluster.port_of_slot(key_slot(t.seg_key(0)))
    assert int(redis_cluster.cli(port, "STRLEN", t.seg_key(0).decode())) == 64 * 1024 - 64


async def test_another_objects_bytes_are_refused(stores, redis_cluster):
    """A node that returns another object's bytes (here: one segment's bytes copied over
    another's) fails the tag: EIO for those pages, counted, and the others still read."""
    store = stores([remote(redis_cluster)])
    dev = store.devices[0]
    pages = pages_of(2, 200)
    await store.write(dev, 0, b"".join(pages))
    await store.migrate([(dev, s) for s in range(200)], 0)
    t = store.tiers[0]
    assert isinstance(t, RemoteTier)
    src, dst = t.seg_key(0), t.seg_key(1)
    # Through a client of our own: the bytes of segment 0 SET as segment 1.
    c = Cluster(redis_cluster.seeds, timeout=2.0)
    raw = await c.execute(src, "GET", src)
    await c.execute(dst, "SET", dst, raw)
    await c.aclose()
    bad = good = 0
    for s in range(200):
        try:
            got = await store.read(dev, s * PAGE, PAGE)
        except Corruption:
            bad += 1
            continue
        assert got == pages[s]
        good += 1
    assert bad > 0 and good > 0
    assert t.stats().checksum_errors >= bad
    # The consistency check would read the bad pages too: discard them first.
    for s in range(200):
        try:
            await store.read(dev, s * PAGE, PAGE)
        except Corruption:
            await store.discard(dev, s * PAGE, PAGE)


async def test_discards_and_cleaning_delete_segments(stores, redis_cluster):
    store = stores([remote(redis_cluster, 4 * MiB)], pool_bytes=256 * 1024)
    dev = store.devices[0]
    rng = random.Random(11)
    n = 600
    pages = [rng.randbytes(PAGE) if i % 3 else (b"clean me %d " % i * 400)[:PAGE]
             for i in range(n)]
    await store.write(dev, 0, b"".join(pages))
    await store.migrate([(dev, s) for s in range(n)], 0)
    t = store.tiers[0]
    assert isinstance(t, RemoteTier)
    kept = set(range(n))
    for s in rng.sample(range(n), n // 2):
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
    assert after.punched_segments > before.punched_segments
    assert after.dead_bytes < before.dead_bytes and after.stored_pages == len(kept)
    for s in range(n):
        assert await store.read(dev, s * PAGE, PAGE) == (pages[s] if s in kept else bytes(PAGE))
    # Discarding everything leaves no segment on the cluster once emptied ones are deleted.
    await store.discard(dev, 0, n * PAGE)
    await store.files.punch()
    assert t.stats().stored_pages == 0
    c = Cluster(redis_cluster.seeds, timeout=2.0)
    live = [s for s in range(t.nsegments)
            if await c.execute(t.seg_key(s), "EXISTS", t.seg_key(s))]
    await c.aclose()
    assert set(live) <= {h for h in t._map.heads if h >= 0}  # at most the two logs' heads


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[LocalCluster]:
    """3 masters without replicas and 3 MiB of maxmemory each: fills fast."""
    why = redis_server_missing()
    if why:
        pytest.skip(why)
    with LocalCluster(masters=3, replicas=0, maxmemory=3 << 20) as cluster:
        yield cluster


async def test_a_full_cluster_sends_pages_to_the_next_tier(stores, small_cluster, tmp_path):
    store = stores([remote(small_cluster, 64 * MiB, priority=10, replicas=0),
                    tier("ssd", tmp_path / "ssd.img", 64 * MiB, priority=1)],
                   devices=(("swap0", 64 * MiB),))
    dev = store.devices[0]
    rng = random.Random(5)
    pages = [rng.randbytes(PAGE) for _ in range(4096)]  # 16 MiB: more than the cluster holds
    for i in range(0, 4096, 256):
        await store.write(dev, i * PAGE, b"".join(pages[i:i + 256]))
    far, ssd = store.tiers[0].stats(), store.tiers[1].stats()
    assert far.stored_pages > 0 and ssd.stored_pages > 0
    assert far.stored_pages + ssd.stored_pages == 4096
    assert far.remote_failures["full"] > 0
    for i in range(0, 4096, 512):
        assert await store.read(dev, i * PAGE, 512 * PAGE) == b"".join(pages[i:i + 512])


@pytest.mark.slow
async def test_reads_ride_out_a_killed_master(stores):
    why = redis_server_missing()
    if why:
        pytest.skip(why)
    with LocalCluster(masters=3, replicas=1) as cluster:
        store: Store = stores([remote(cluster, read_deadline=15.0)])
        dev = store.devices[0]
        pages = pages_of(3, 300)
        await store.write(dev, 0, b"".join(pages))
        await store.migrate([(dev, s) for s in range(300)], 0)
        t = store.tiers[0]
        assert isinstance(t, RemoteTier)
        victim = cluster.master_ports()[0]
        cluster.kill(victim)
        longest = 0.0
        for s in range(300):
            t0 = trio.current_time()
            assert await store.read(dev, s * PAGE, PAGE) == pages[s]
            longest = max(longest, trio.current_time() - t0)
        st = t.stats()
        assert st.remote_retries > 0
        assert longest < 10.0, f"longest read {longest:.1f} s"
        store.files.close()  # keys deleted while the cluster still runs


async def test_concurrent_first_writes_wait_for_the_sweep(stores, redis_cluster):
    """A mount deletes what an earlier mount of its prefix left before its first write; the
    writes that come meanwhile wait for it (one that overtook the delete of its segment's old
    key would be deleted with it, after it was acknowledged).  Several fresh tiers: the race
    is with their first connections."""
    rng = random.Random(9)
    for _ in range(6):
        store = stores([remote(redis_cluster)], pool_bytes=256 * 1024)
        dev = store.devices[0]
        pages = [rng.randbytes(PAGE) for _ in range(256)]  # incompressible: to the tier

        async def one(i: int, store: Store = store, dev=dev, pages=pages) -> None:
            await store.write(dev, i * 8 * PAGE, b"".join(pages[i * 8:i * 8 + 8]))

        async with trio.open_nursery() as n:
            for i in range(32):
                n.start_soon(one, i)
        assert store.tiers[0].stats().stored_pages == 256
        assert await store.read(dev, 0, 256 * PAGE) == b"".join(pages)
        # Each segment's string was made at its full length once, whatever order the
        # batches arrived in (one that grew would take up to twice the memory).
        t = store.tiers[0]
        for seg in range(t.nsegments):
            k = t.seg_key(seg)
            if t.segment_live()[seg][0]:
                port = redis_cluster.port_of_slot(key_slot(k))
                assert int(redis_cluster.cli(port, "STRLEN", k.decode())) == 64 * 1024 - 64
                assert int(redis_cluster.cli(port, "MEMORY", "USAGE", k.decode())) \
                    <= 64 * 1024 + 256


def test_segments_waiting_for_unlink_are_not_free_for_appends() -> None:
    """The file tiers' rule (SegmentedTier): an emptied segment is free for appends only once
    deleted.  Until its UNLINK it counts for cleaning's decisions (not full, nothing to clean)
    but not for the kick that starts cleaning in time (low on segments)."""
    t = RemoteTier("far", 8 * 64 * 1024, 5, seeds=["127.0.0.1:1"], segment_bytes=64 * 1024)
    m = t._map
    per_seg = (64 * 1024 - 65) // t.object_bytes(2000)
    handles = t.allocate([2000] * (5 * per_seg))
    assert len(handles) == 5 * per_seg and len(m.free_stack) == 3  # the reserve and one
    assert t.low_on_segments and not t.full
    for h in handles[:4 * per_seg]:
        t.free(h, 2000)
    assert m.punch_queued == 4 and len(m.free_stack) == 3
    assert t.low_on_segments  # the emptied segments are not reusable before their UNLINK
    assert not t.needs_cleaning and not t.full  # ... but cleaning has nothing to gain
    assert t.used_pages == -(-(per_seg * t.object_bytes(2000)) // PAGE)
    assert t.free_pages == t.capacity_pages - t.used_pages
    t.check_invariants()
