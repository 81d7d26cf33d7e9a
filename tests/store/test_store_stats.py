"""Stats assembly (swapfs/store_stats.py): the counters as one record, its
dict and xattr renderings, and the bookkeeping the store reports."""

from __future__ import annotations

import random

import pytest

from swapfs.slots import BYTES_PER_SLOT
from swapfs.store import Store

from ..conftest import MakeStore
from .conftest import MiB, compressible_page

P = 4096


async def test_stats_counters(store: Store) -> None:
    dev = store.devices[0]
    s0 = store.stats().device(dev.name)
    assert (s0.reads, s0.writes, s0.discards, s0.stored_pages) == (0, 0, 0, 0)
    rng = random.Random(5)
    await store.write(dev, 0, compressible_page(rng) + bytes(P))
    await store.write(dev, 10, b"abc")
    await store.read(dev, 0, 2 * P)
    await store.read(dev, 100, 5)
    await store.discard(dev, P, P)
    st = store.stats()
    d = st.device(dev.name)
    assert (d.writes, d.written_bytes) == (2, 2 * P + 3)
    assert (d.reads, d.read_bytes) == (2, 2 * P + 5)
    assert d.discards == 1
    assert d.stored_pages == 1 and d.same_filled_pages == 0 and d.pool_pages == 1
    t = st.totals
    assert (t.reads, t.writes, t.discards) == (2, 2, 1)
    assert t.stored_pages == t.same_filled_pages + st.pool.stored_pages == 1
    assert t.memory_ratio == pytest.approx(P / st.pool.pool_bytes)
    assert 0 < st.pool.fragmentation < 1
    assert d.compressed_bytes == st.pool.compressed_bytes < P
    store.check_invariants()


async def test_stats_dict(store: Store) -> None:
    from swapfs.stats import xattr_items
    dev = store.devices[0]
    await store.write(dev, 0, b"\x01" * P)
    d = store.stats().to_dict()
    assert set(d) == {"schema", "devices", "tiers", "totals", "writeback", "cache"}
    contract_dev = {"size_bytes", "stored_pages", "same_filled_pages", "reads", "writes",
                    "discards", "read_bytes", "written_bytes", "compressed_bytes", "pool_bytes",
                    "metadata_bytes"}
    assert contract_dev <= set(d["devices"]["swap0"])
    assert {"kind", "stored_pages", "compressed_bytes", "pool_bytes", "max_bytes", "huge_pages",
            "fragmentation", "metadata_bytes", "arenas"} <= set(d["tiers"]["pool"])
    assert d["tiers"]["pool"]["kind"] == "pool"
    assert {"stored_pages", "same_filled_pages", "compressed_bytes", "pool_bytes",
            "metadata_bytes", "compression_ratio", "reads", "writes", "discards"} <= set(d["totals"])
    contract_wb = {"moved_pages": 0, "aborted_moves": 0, "promotions": 0, "refaults": 0}
    assert {k: d["writeback"][k] for k in contract_wb} == contract_wb
    contract_cache = {"pages": 0, "hits": 0, "misses": 0}
    assert {k: d["cache"][k] for k in contract_cache} == contract_cache
    assert d["devices"]["swap0"]["same_filled_pages"] == 1
    x = xattr_items(d["devices"]["swap0"])
    assert x["same_filled_pages"] == "1" and all(v.isascii() for v in x.values())
    assert xattr_items(d["totals"])["compression_ratio"] == "0.0000"
    import json
    json.dumps(d)
    store.check_invariants()


async def test_metadata_budget(make_store: MakeStore) -> None:
    store = make_store(devices=(("swap0", 1 << 30),), pool_bytes=512 * MiB)
    dev = store.devices[0]
    st = store.stats().device(dev.name)
    assert BYTES_PER_SLOT == 16
    assert st.metadata_bytes <= 16 * dev.npages + 256
    assert st.metadata_bytes / dev.npages <= 16.001
    assert st.metadata_bytes < 4096  # nothing stored: no cluster of the table in use
    rng = random.Random(6)
    pages = [compressible_page(rng) for _ in range(64)]
    batch = b"".join(pages)
    for i in range(0, 20000, 64):
        await store.write(dev, i * P, batch)
    pst = store.stats().pool
    assert pst.stored_pages == 20032
    assert pst.metadata_bytes / pst.stored_pages <= 16
    used = store.stats().device(dev.name).metadata_bytes
    assert used <= 16 * 20480 + 4096  # the table holds the 20 clusters in use
    # Check only the written part to keep the test fast: the full walk is
    # done at teardown.
    store.check_invariants()



async def test_compression_ratio_is_zrams_and_the_memory_ratio_has_its_own_name(store: Store) -> None:
    """compression_ratio = orig_data_size / compr_data_size in the same object (same-filled
    pages are data with no compressed bytes, as in zram); memory_ratio = the pool's data over
    the pool's memory."""
    dev = store.devices[0]
    rng = random.Random(8)
    for i in range(64):
        await store.write(dev, i * P, compressible_page(rng))
    for i in range(64, 96):
        await store.write(dev, i * P, bytes(P))  # same-filled
    d = store.stats().to_dict()
    t = d["totals"]
    assert t["compression_ratio"] == pytest.approx(t["orig_data_size"] / t["compr_data_size"])
    pool = d["tiers"]["pool"]
    assert t["memory_ratio"] == pytest.approx(pool["stored_pages"] * P / pool["pool_bytes"])
    assert t["compression_ratio"] > t["memory_ratio"] > 1
    assert d["schema"] == 4


async def test_an_empty_pool_reads_as_calm_not_as_an_alarm(store: Store) -> None:
    """A pool that held pages and gave them back keeps spare pages: its fragmentation and
    holes are 0, its ratios 0 (nothing to divide), and the Prometheus text leaves the ratios
    out instead of exporting 0."""
    from swapfs.stats import prometheus_text

    dev = store.devices[0]
    rng = random.Random(9)
    for i in range(32):
        await store.write(dev, i * P, compressible_page(rng))
    await store.discard(dev, 0, 32 * P)
    st = store.stats()
    assert st.pool.stored_pages == 0 and st.pool.pool_bytes > 0  # spares stay
    assert st.pool.fragmentation == 0.0 and st.pool.holes == 0.0
    assert st.totals.compression_ratio == 0.0 and st.totals.memory_ratio == 0.0
    text = prometheus_text(st.to_dict(), "/m")
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert not any(line.startswith(("swapfs_compression_ratio", "swapfs_memory_ratio"))
                   for line in samples)
    assert 'swapfs_tier_fragmentation{mount="/m",tier="pool"} 0.0' in samples
    assert 'swapfs_tier_holes{mount="/m",tier="pool"} 0.0' in samples
    await store.write(dev, 0, compressible_page(rng))
    text = prometheus_text(store.stats().to_dict(), "/m")
    assert any(line.startswith("swapfs_compression_ratio{") for line in text.splitlines())


async def test_devices_say_whether_their_pages_may_move_down(make_store: MakeStore) -> None:
    store = make_store(devices=(("kept", 8 * MiB, False), ("moves", 8 * MiB, True)))
    d = store.stats().to_dict()["devices"]
    assert d["kept"]["writeback"] is False and d["moves"]["writeback"] is True


async def test_headroom_of_an_empty_store_assumes_the_codecs_ratio(make_store: MakeStore,
                                                                  tmp_path) -> None:
    """Nothing stored: the pool's headroom is its max_bytes at the assumed ratio (lz4: 2.5),
    a file tier's its room at that ratio too (it stores the pool codec's objects);
    backed_fraction is their share of the devices' pages."""
    from ..conftest import tier

    store = make_store([tier("ssd", tmp_path / "ssd.img", 8 * MiB)], pool_bytes=4 * MiB,
                       devices=(("swap0", 64 * MiB),))
    st = store.stats()
    assert st.pool.headroom_ratio == 2.5
    assert st.pool.headroom_pages == 4 * MiB * 5 // 2 // P
    ssd = st.tiers[1]
    from swapfs.tiers.file import CLEAN_RESERVE

    room = store.files[0].room_bytes  # every segment but those kept back for cleaning
    assert room == 8 * MiB - CLEAN_RESERVE * store.files[0].segment_bytes
    assert ssd.headroom_pages == int(room * 2.5) // P
    assert st.totals.headroom_pages == st.pool.headroom_pages + ssd.headroom_pages
    assert st.totals.backed_fraction == pytest.approx(st.totals.headroom_pages / (64 * MiB // P))
    d = st.to_dict()
    assert d["totals"]["headroom_pages"] == st.totals.headroom_pages
    assert d["tiers"]["ssd"]["headroom_pages"] == ssd.headroom_pages


async def test_headroom_follows_what_is_stored_until_the_store_is_full(make_store: MakeStore,
                                                                      tmp_path) -> None:
    """With pages in the pool the headroom uses the pool's measured ratio (pages over the
    bytes of the objects in use); filled to NoSpace, the headroom is next to nothing and the
    pages stored are all that backs the devices."""
    from swapfs.errors import NoSpace

    from ..conftest import tier

    store = make_store([tier("ssd", tmp_path / "ssd.img", 2 * MiB)], pool_bytes=1 * MiB,
                       devices=(("swap0", 64 * MiB),))
    dev = store.devices[0]
    rng = random.Random(11)
    for i in range(64):
        await store.write(dev, i * P, compressible_page(rng))
    for i in range(64, 80):
        await store.write(dev, i * P, bytes(P))  # same-filled: no room taken
    st = store.stats()
    pool = store.pool
    ratio = 64 * P / pool.used_bytes
    assert st.pool.headroom_ratio == pytest.approx(ratio)
    assert ratio > 2  # the measured ratio, not the assumed 2.5
    assert st.pool.headroom_pages == int((MiB - pool.used_bytes) * ratio) // P
    ssd = st.tiers[1]
    assert st.totals.headroom_pages == st.pool.headroom_pages + ssd.headroom_pages
    assert st.totals.backed_fraction == pytest.approx(
        (80 + st.totals.headroom_pages) / (64 * MiB // P))
    before = st.totals.headroom_pages
    i = 80
    with pytest.raises(NoSpace):
        while i < 64 * MiB // P:
            await store.write(dev, i * P, compressible_page(rng))
            i += 1
    st = store.stats()
    assert st.tiers[1].headroom_pages < 64  # padding and the head's tail
    assert st.totals.headroom_pages < before // 50
    assert st.totals.backed_fraction == pytest.approx(
        (st.totals.stored_pages + st.totals.headroom_pages) / (64 * MiB // P))
    assert st.totals.backed_fraction < 0.2
