"""The file tier on real files: allocation, punching, I/O, checksums, a full filesystem."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import random
import stat
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.stats import FileTierStats
from swapfs.tiers.file import (
    CLUSTER_PAGES,
    DATA_OFFSET,
    ChecksumError,
    FileTier,
    TierFull,
    TierIOError,
)
from swapfs.tiers.file.header import TierHeader

from .conftest import CLUSTER_BYTES, MiB

C = CLUSTER_PAGES


def pages_of(runs: list[tuple[int, int]]) -> list[int]:
    return [p for s, k in runs for p in range(s, s + k)]


def rand_pages(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(PAGE) for _ in range(n)]


# ---------------------------------------------------------------- allocation (no I/O)


def test_fresh_batch_is_one_run(make_tier):
    t = make_tier(4 * CLUSTER_BYTES)
    assert t.capacity_pages == 4 * C
    assert t.allocate(100) == [(0, 100)]
    assert t.allocate(50) == [(100, 50)]
    assert t.stored_pages == 150 and t.free_pages == 4 * C - 150
    assert t.cluster_switches == 1
    t.check_invariants()


def test_batch_spanning_clusters_and_switches(make_tier):
    t = make_tier(4 * CLUSTER_BYTES)
    runs = t.allocate(C + 44)
    assert pages_of(runs) == list(range(C + 44))
    assert runs == [(0, C + 44)]  # the next free cluster happens to follow: one run
    assert t.cluster_switches == 2
    before = t.cluster_switches
    t.allocate(C - 44)  # exactly fills cluster 1: no switch yet
    assert t.cluster_switches == before
    t.allocate(1)  # moves to cluster 2
    assert t.cluster_switches == before + 1
    t.check_invariants()


def test_current_cluster_first_then_partial_then_free(make_tier):
    t = make_tier(4 * CLUSTER_BYTES)
    t.allocate(2 * C)  # clusters 0 and 1 full, cluster 1 current
    t.free(range(10, 20))  # cluster 0 becomes partial
    t.free([C + 5])  # the current cluster gets a hole
    sw = t.cluster_switches
    assert t.allocate(1) == [(C + 5, 1)]  # current cluster first
    assert t.cluster_switches == sw
    assert t.allocate(12) == [(10, 10), (2 * C, 2)]  # then the partial one, then a free one
    assert t.cluster_switches == sw + 2
    t.check_invariants()


def test_allocate_until_empty_and_reuse(make_tier):
    t = make_tier(2 * CLUSTER_BYTES + 3 * PAGE)  # a short last cluster
    runs = t.allocate(10_000)
    assert sum(k for _, k in runs) == 2 * C + 3
    assert t.full and t.free_pages == 0
    assert t.allocate(1) == []
    s = t.stats()
    assert (s.clusters_full, s.clusters_partial, s.clusters_free) == (3, 0, 0)
    t.free([7, 8, 9])
    assert not t.full
    assert t.allocate(5) == [(7, 3)]
    t.check_invariants()


def test_free_refuses_bad_pages(make_tier):
    t = make_tier()
    t.allocate(4)
    with pytest.raises(ValueError, match="not in use"):
        t.free([1, 5])
    assert t.stored_pages == 4  # nothing freed
    with pytest.raises(ValueError, match="out of range"):
        t.free([t.capacity_pages])
    with pytest.raises(ValueError, match="twice"):
        t.free([1, 1])
    t.free([1])
    with pytest.raises(ValueError):
        t.free([1])
    t.check_invariants()


async def test_empty_cluster_waits_for_its_punch(make_tier):
    t = make_tier(2 * CLUSTER_BYTES)
    t.allocate(2 * C)
    t.free(range(C))  # cluster 0 entirely free: queued for punching
    assert t.free_pages == C
    assert not t.full
    assert t.stats().clusters_punch_pending == 1
    assert t.allocate(1) == []  # not before the punch
    t.check_invariants()
    assert await t.punch_free_clusters() == 1
    assert await t.punch_free_clusters() == 0
    assert t.allocate(3) == [(0, 3)]
    t.check_invariants()


async def test_current_cluster_emptied_is_not_reused_before_punch(make_tier):
    t = make_tier(2 * CLUSTER_BYTES)
    runs = t.allocate(10)
    t.free(pages_of(runs))
    # cluster 0 (was current) waits for its punch; allocation moves to cluster 1
    assert t.allocate(1) == [(C, 1)]
    await t.punch_free_clusters()
    t.check_invariants()


# ---------------------------------------------------------------- I/O


async def test_round_trip_many_pages(make_tier):
    rng = random.Random(1)
    t = make_tier(8 * CLUSTER_BYTES)
    data: dict[int, bytes] = {}
    for n in (1, 7, 300, 100, 600):
        runs = t.allocate(n)
        pages = rand_pages(rng, n)
        await t.write(runs, pages)
        data.update(zip(pages_of(runs), pages))
    # single reads, random order
    for p in rng.sample(sorted(data), 200):
        assert await t.read(p) == data[p]
    # read_many with gaps, out of order, repeats
    ask = sorted(rng.sample(sorted(data), 500))
    ask = ask[:250] + ask[250:][::-1] + ask[:3]
    got = await t.read_many(ask)
    assert got == [data[p] for p in ask]
    assert await t.read_many(sorted(data)) == [data[p] for p in sorted(data)]
    assert await t.read_many([]) == []
    s = t.stats()
    assert s.written_bytes == len(data) * PAGE
    assert s.writes >= 5 and s.reads > 200
    assert s.checksum_errors == 0 and s.io_errors == 0
    t.check_invariants()


async def test_write_accepts_bytes_like(make_tier):
    t = make_tier()
    runs = t.allocate(3)
    a = bytearray(b"a" * PAGE)
    b = memoryview(b"b" * PAGE)
    import array
    c = array.array("Q", [0x6363636363636363] * (PAGE // 8))
    await t.write(runs, [a, b, c])
    assert await t.read_many([0, 1, 2]) == [b"a" * PAGE, b"b" * PAGE, b"c" * PAGE]


async def test_write_checks_arguments(make_tier):
    t = make_tier()
    runs = t.allocate(2)
    with pytest.raises(ValueError):
        await t.write(runs, [b"x" * PAGE])
    with pytest.raises(ValueError):
        await t.write(runs, [b"x" * PAGE, b"short"])
    with pytest.raises(ValueError, match="not allocated"):
        await t.write([(10, 2)], [b"x" * PAGE] * 2)
    with pytest.raises(ValueError):
        await t.read(10)
    assert t.stored_pages == 2  # refused writes do not free caller's pages
    t.check_invariants()


async def test_flipped_byte_is_a_checksum_error(make_tier, caplog):
    rng = random.Random(2)
    t = make_tier()
    runs = t.allocate(20)
    pages = rand_pages(rng, 20)
    await t.write(runs, pages)
    victim = 7
    fd = os.open(t.path, os.O_RDWR)
    try:
        off = DATA_OFFSET + victim * PAGE + 123
        b = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), off)
    finally:
        os.close(fd)
    with caplog.at_level(logging.ERROR, logger="swapfs.tiers.file"):
        with pytest.raises(ChecksumError) as ei:
            await t.read(victim)
    assert ei.value.page == victim
    assert t.stats().checksum_errors == 1
    assert any(t.path in r.getMessage() and str(victim) in r.getMessage()
               and t.name in r.getMessage() for r in caplog.records)
    for p in range(20):
        if p != victim:
            assert await t.read(p) == pages[p]
    with pytest.raises(ChecksumError) as ei:
        await t.read_many(list(range(20)))
    assert ei.value.page == victim
    assert t.checksum_errors == 2
    assert await t.read_many([5, 6, 8, 9]) == [pages[5], pages[6], pages[8], pages[9]]
    t.check_invariants()


async def test_io_error_frees_pages(make_tier):
    t = make_tier()
    runs = t.allocate(4)
    # make the tier's descriptor read-only underneath it: pwritev fails with EBADF
    ro = os.open(t.path, os.O_RDONLY)
    os.dup2(ro, t._fd)
    os.close(ro)
    with pytest.raises(TierIOError) as ei:
        await t.write(runs, [b"z" * PAGE] * 4)
    assert ei.value.errno == errno.EBADF
    assert t.stored_pages == 0 and t.stats().io_errors == 1
    assert not t.full
    t.check_invariants()


async def test_cancelled_write_frees_pages(make_tier):
    t = make_tier()
    runs = t.allocate(8)
    with trio.CancelScope() as cs:
        cs.cancel()
        await t.write(runs, [b"q" * PAGE] * 8)
    assert cs.cancelled_caught
    assert t.stored_pages == 0
    t.check_invariants()


async def test_punch_shrinks_the_file(make_tier):
    rng = random.Random(3)
    t = make_tier(4 * CLUSTER_BYTES)
    runs = t.allocate(3 * C)
    await t.write(runs, rand_pages(rng, 3 * C))
    os.fsync(t._fd)
    before = t.stats().disk_bytes
    assert before >= 3 * CLUSTER_BYTES
    t.free(range(C, 2 * C))  # the middle cluster
    t.free(range(2 * C, 2 * C + 10))  # a partial free: not punched
    assert await t.punch_free_clusters() == 1
    after = t.stats().disk_bytes
    assert after <= before - CLUSTER_BYTES
    assert after >= 2 * CLUSTER_BYTES - 10 * PAGE
    assert os.stat(t.path).st_size == DATA_OFFSET + t.capacity_pages * PAGE  # KEEP_SIZE
    # the punched cluster reads back as allocatable storage again
    runs = t.allocate(C)
    # the holes of the current cluster first, then the punched cluster
    assert runs == [(2 * C, 10), (C, C - 10)]
    await t.write(runs, [b"\x01" * PAGE] * C)
    assert await t.read(C + 3) == b"\x01" * PAGE
    assert t.stats().punched_clusters == 1
    t.check_invariants()


async def test_concurrent_io_and_close_while_in_flight(make_tier):
    t = make_tier(8 * CLUSTER_BYTES, max_inflight=3)
    data: dict[int, bytes] = {}

    async def writer(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(10):
            runs = t.allocate(r.randint(1, 40))
            pages = rand_pages(r, sum(k for _, k in runs))
            await t.write(runs, pages)
            data.update(zip(pages_of(runs), pages))

    async with trio.open_nursery() as nursery:
        for seed in range(6):
            nursery.start_soon(writer, seed)
    got = {}

    async def reader(ps: list[int]) -> None:
        for p, b in zip(ps, await t.read_many(ps)):
            got[p] = b

    keys = sorted(data)
    async with trio.open_nursery() as nursery:
        for i in range(0, len(keys), 50):
            nursery.start_soon(reader, keys[i:i + 50])
    assert got == data
    # close while a read is in flight (in a worker thread): the read completes, then the
    # descriptor goes
    t._nowait = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, keys)
        while t._inflight == 0:
            await trio.lowlevel.checkpoint()
        t.close()
        assert t._fd != -1  # deferred until the read is done
    with pytest.raises(TierIOError):
        await t.read(keys[0])
    assert t._fd == -1
    t.check_invariants()


async def test_reads_from_page_cache_inline_else_in_a_thread(make_tier):
    t = make_tier(2 * CLUSTER_BYTES)
    r = random.Random(5)
    runs = t.allocate(64)
    pages = rand_pages(r, 64)
    await t.write(runs, pages)
    # just written: in the page cache, served inline without a checkpoint
    with trio.CancelScope() as scope:
        scope.cancel()  # any checkpoint would raise Cancelled
        assert await t.read_many(pages_of(runs)) == pages
    assert t.cached_reads == 1 and t.thread_reads == 0
    # dropped from the page cache: RWF_NOWAIT refuses, a worker thread reads from disk
    os.fsync(t._fd)
    os.posix_fadvise(t._fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert await t.read_many(pages_of(runs)) == pages
    assert t.thread_reads == 1
    assert t.stats().cached_reads == 1


# ---------------------------------------------------------------- open, preallocate, stats


def test_open_creates_0600_and_refuses_symlink(make_tier, tmp_path: Path):
    t = make_tier(CLUSTER_BYTES, name="a")
    st = os.stat(t.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == DATA_OFFSET + CLUSTER_BYTES
    assert st.st_blocks * 512 <= PAGE  # sparse: only the header page is written
    target = tmp_path / "target.img"
    target.write_bytes(b"")
    link = tmp_path / "link.img"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        make_tier(CLUSTER_BYTES, name="l", path=str(link))
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(OSError, match="adir"):
        make_tier(CLUSTER_BYTES, name="d", path=str(d))
    with pytest.raises(OSError, match="missing"):
        make_tier(CLUSTER_BYTES, name="m", path=str(tmp_path / "missing" / "x.img"))


def test_open_reuses_existing_file_and_punches_it(make_tier, tmp_path: Path):
    # a tier file of a mount that is gone: our signature, old pages, no lock
    p = tmp_path / "old.img"
    old = TierHeader.new("t", 3 * CLUSTER_BYTES, "/gone", True).pack()
    p.write_bytes(old + b"\xaa" * (DATA_OFFSET - PAGE + 3 * CLUSTER_BYTES))
    os.chmod(p, 0o640)
    t = make_tier(2 * CLUSTER_BYTES, path=str(p))
    st = os.stat(p)
    assert st.st_size == DATA_OFFSET + 2 * CLUSTER_BYTES
    assert st.st_blocks * 512 <= PAGE  # only the new header page
    assert stat.S_IMODE(st.st_mode) == 0o600
    with open(p, "rb") as f:
        assert f.read(PAGE) == t.header.pack() != old
        f.seek(DATA_OFFSET)
        assert f.read(PAGE) == bytes(PAGE)


def test_bad_size_refused():
    with pytest.raises(ValueError, match="whole number"):
        FileTier("x", "/nonexistent/x", PAGE + 1, 1)
    with pytest.raises(ValueError):
        FileTier("x", "/nonexistent/x", 0, 1)


async def test_preallocate(make_tier):
    t = make_tier(2 * CLUSTER_BYTES, preallocate=True)
    assert t.stats().disk_bytes >= 2 * CLUSTER_BYTES
    runs = t.allocate(C)
    await t.write(runs, [b"p" * PAGE] * C)
    t.free(range(C))
    # a preallocated tier keeps its space: no punch, the cluster is allocatable at once
    assert await t.punch_free_clusters() == 0
    assert t.stats().disk_bytes >= 2 * CLUSTER_BYTES
    assert t.allocate(1) == [(0, 1)]
    t.check_invariants()


async def test_stats_fields(make_tier):
    t = make_tier(4 * CLUSTER_BYTES, name="ssd", priority=7)
    runs = t.allocate(C + 10)
    await t.write(runs, [b"s" * PAGE] * (C + 10))
    await t.read(3)
    await t.read_many([1, 2, 3, 9])
    s = t.stats()
    assert isinstance(s, FileTierStats)
    d = dataclasses.asdict(s)
    for key in ("name", "kind", "path", "priority", "capacity_pages", "stored_pages",
                "free_pages", "clusters_free", "clusters_partial", "clusters_full",
                "disk_bytes", "reads", "writes", "read_bytes", "written_bytes",
                "checksum_errors", "io_errors", "full", "metadata_bytes"):
        assert key in d, key
    assert list(d)[:3] == ["name", "kind", "path"]
    assert d["kind"] == "file" and d["name"] == "ssd" and d["priority"] == 7
    assert s.capacity_pages == 4 * C and s.stored_pages == C + 10
    assert s.free_pages == 3 * C - 10
    assert (s.clusters_full, s.clusters_partial, s.clusters_free) == (1, 1, 2)
    assert s.disk_bytes >= (C + 10) * PAGE
    assert s.writes == 1 and s.written_bytes == (C + 10) * PAGE
    assert s.reads == 3 and s.read_bytes == 5 * PAGE
    assert not s.full
    # metadata follows use: 9 bytes a page for the 2 clusters in use, a few per cluster else
    assert s.metadata_bytes <= 10 * 2 * C
    assert s.metadata_bytes >= 9 * 2 * C


def test_metadata_per_page_large_tier(tmp_path: Path):
    t = FileTier("big", str(tmp_path / "big.img"), 1 << 30, 1)  # never opened
    assert t.metadata_bytes / t.capacity_pages < 9.1
    assert t.metadata_bytes <= 8 * t.nclusters  # nothing stored: per-cluster arrays only
    t.check_invariants()


# ---------------------------------------------------------------- a real full filesystem


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_full_filesystem_enospc(small_ext4: Path):
    rng = random.Random(5)
    t = FileTier("small", str(small_ext4 / "tier.img"), 32 * MiB, 1)  # larger than the fs
    t.open()
    try:
        data: dict[int, bytes] = {}
        with pytest.raises(TierFull):
            for _ in range(10_000):
                runs = t.allocate(64)
                assert runs, "ran out of pages before the filesystem filled"
                pages = rand_pages(rng, sum(k for _, k in runs))
                await t.write(runs, pages)
                data.update(zip(pages_of(runs), pages))
        assert t.full
        assert t.allocate(1) == []
        assert len(data) > 256  # several MiB went in before ENOSPC
        assert t.stored_pages == len(data)  # the failed batch was freed
        t.check_invariants()
        keys = sorted(data)
        assert await t.read_many(keys) == [data[p] for p in keys]
        # frees clear the condition; punching gives the space back
        first_cluster = [p for p in keys if p < C]
        t.free(first_cluster)
        assert not t.full
        assert await t.punch_free_clusters() == 1
        runs = t.allocate(C)
        assert runs
        await t.write(runs, [b"\x05" * PAGE] * sum(k for _, k in runs))
        assert t.stats().io_errors == 0
        t.check_invariants()
    finally:
        t.close()


@pytest.mark.root
@pytest.mark.timeout(60)
def test_preallocate_enospc_is_a_clear_error(small_ext4: Path):
    path = small_ext4 / "pre.img"
    t = FileTier("pre", str(path), 32 * MiB, 1, preallocate=True)
    with pytest.raises(OSError, match="cannot preallocate .* no space") as ei:
        t.open()
    assert ei.value.errno == errno.ENOSPC
    assert not path.exists()  # the file it created is gone again


# ---------------------------------------------------------------- randomized bookkeeping


async def test_random_allocate_free_punch_against_a_model(make_tier):
    rng = random.Random(6)
    t = make_tier(5 * CLUSTER_BYTES + 17 * PAGE)
    owned: set[int] = set()
    freed_since_punch: set[int] = set()  # pages of clusters waiting for their punch
    for step in range(400):
        op = rng.random()
        if op < 0.5:
            runs = t.allocate(rng.randint(1, 300))
            got = pages_of(runs)
            assert len(set(got)) == len(got)
            assert not owned & set(got), "a page handed out twice"
            assert not freed_since_punch & set(got), "a cluster reused before its punch"
            for _, k in runs:
                assert k > 0
            owned.update(got)
        elif op < 0.9 and owned:
            batch = rng.sample(sorted(owned), rng.randint(1, min(len(owned), 200)))
            t.free(batch)
            owned.difference_update(batch)
            for p in batch:
                c = p // C
                if not any(q // C == c for q in owned):
                    freed_since_punch.update(range(c * C, min((c + 1) * C, t.capacity_pages)))
        else:
            await t.punch_free_clusters()
            freed_since_punch.clear()
        assert t.stored_pages == len(owned)
        if step % 20 == 0:
            t.check_invariants()
