"""The file tier on real files: segments, objects, I/O, integrity, cleaning's reads, a full
filesystem."""

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

from swapfs.errors import Misuse
from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.stats import FileTierStats
from swapfs.tiers.file import (
    DATA_OFFSET,
    RAW,
    ChecksumError,
    FileTier,
    TierFull,
    TierIOError,
)
from swapfs.tiers.file.header import TierHeader

from .conftest import CLUSTER_BYTES, MiB

SEG = 64 * 1024  # the segments of the tiers below (a tier of 4 MiB has 64 of them)


def payloads(rng: random.Random, n: int, lo: int = 200, hi: int = PAGE) -> list[bytes]:
    """Object payloads of random lengths (raw pages when ``lo == hi == PAGE``)."""
    return [rng.randbytes(rng.randint(lo, hi)) for _ in range(n)]


async def put(t: FileTier, data: list[bytes], key0: int = 0) -> list[int]:
    """Append ``data`` as objects of slots key0, key0 + 1, ...; their handles."""
    handles = t.allocate([len(p) for p in data])
    assert len(handles) == len(data)
    await t.write(handles, [(key0 + i, RAW if len(p) == PAGE else 1, p)
                            for i, p in enumerate(data)])
    return handles


async def get(t: FileTier, handles: list[int], data: list[bytes], key0: int = 0) -> list[bytes]:
    got = await t.read_objects([(h, len(p), key0 + i)
                                for i, (h, p) in enumerate(zip(handles, data))])
    return [payload for _cid, payload in got]


def flip(t: FileTier, offset: int) -> None:
    fd = os.open(t.path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, DATA_OFFSET + offset)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), DATA_OFFSET + offset)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- placement (no I/O)


def test_fresh_objects_are_appended_back_to_back(make_tier):
    t = make_tier(4 * MiB, segment_bytes=SEG)
    assert t.nsegments == 64 and t.segment_bytes == SEG
    sizes = [100, 1000, 37, 4096, 2000]
    hs = t.allocate(sizes)
    pos = 0
    for h, n in zip(hs, sizes):
        if (pos % PAGE) + t.object_bytes(n) > 2 * PAGE:  # never more than two blocks
            pos = -(-pos // PAGE) * PAGE
        assert h == pos
        pos += t.object_bytes(n)
    assert t.stored_pages == 5 and t.live_bytes == sum(t.object_bytes(n) for n in sizes)
    assert t.segment_switches == 1


def test_objects_never_span_more_than_two_blocks_nor_a_segment(make_tier):
    t = make_tier(8 * MiB, segment_bytes=SEG)
    rng = random.Random(1)
    sizes = [rng.choice([1, 50, 1500, 3000, 4000, 4096]) for _ in range(2000)]
    hs = t.allocate(sizes)
    assert len(hs) == len(sizes)
    for h, n in zip(hs, sizes):
        end = h + t.object_bytes(n)
        assert end - 1 < (h // PAGE + 2) * PAGE
        assert h // SEG == (end - 1) // SEG
    assert sorted(hs) == hs  # the head only moves forward
    assert t.segment_switches > 1


def test_a_full_tier_allocates_a_prefix_then_nothing(make_tier):
    t = make_tier(1 * MiB, segment_bytes=SEG)  # 16 segments, 2 kept back for cleaning
    per = SEG // t.object_bytes(PAGE)
    hs = t.allocate([PAGE] * 1000)
    assert len(hs) == (t.nsegments - 2) * per
    assert t.allocate([10]) == [] or t.allocate([10])  # the head may hold a small one
    assert t.full  # every segment live: nothing to clean
    # cleaning may use the reserve
    assert len(t.allocate([PAGE] * per, cleaning=True)) == per


def test_free_refuses_what_is_not_live(make_tier):
    t = make_tier(4 * MiB, segment_bytes=SEG)
    hs = t.allocate([100, 200])
    with pytest.raises(Misuse):
        t.free(10 * SEG, 100)  # a free segment
    with pytest.raises(Misuse):
        t.free(-1, 100)
    with pytest.raises(Misuse):
        t.free(hs[0], 5000)  # more than the segment holds
    with pytest.raises(Misuse):
        t.allocate([0])
    with pytest.raises(Misuse):
        t.allocate([PAGE + 1])
    t.free(hs[0], 100)
    t.free(hs[1], 200)
    assert t.stored_pages == 0 and t.live_bytes == 0


async def test_an_emptied_segment_waits_for_its_punch_and_a_new_generation(make_tier):
    t = make_tier(4 * MiB, segment_bytes=SEG)
    per = SEG // t.object_bytes(PAGE)
    hs = t.allocate([PAGE] * (2 * per))  # segments 0 and 1; 1 is the head
    assert {h // SEG for h in hs} == {0, 1}
    gen0 = t._map.gen[0]
    for h in hs[:per]:
        t.free(h, PAGE)
    assert t.punch_pending and t.stats().segments_punch_pending == 1
    # not reused before its punch: the next segments come from the free stack
    more = t.allocate([PAGE] * per)
    assert all(h // SEG == 2 for h in more)
    assert await t.punch_free_segments() == 1
    assert not t.punch_pending
    t.check_invariants()
    # the head emptied stays the head (appends go on) and is not punched under them
    for h in more:
        t.free(h, PAGE)
    assert not t.punch_pending
    # a reused segment gets a new generation
    while True:
        h = t.allocate([PAGE])[0]
        if h // SEG == 0:
            break
    assert t._map.gen[0] == gen0 + 1


# ---------------------------------------------------------------- I/O


async def test_round_trip_many_objects(make_tier):
    rng = random.Random(1)
    t = make_tier(4 * MiB, segment_bytes=SEG)
    data = payloads(rng, 300) + payloads(rng, 20, PAGE, PAGE)
    hs = await put(t, data, key0=1 << 40)
    assert await get(t, hs, data, key0=1 << 40) == data
    got = await t.read_objects([(hs[5], len(data[5]), (1 << 40) + 5)])
    assert got == [(1, data[5])]
    assert t.read_now(hs[-1], PAGE, (1 << 40) + len(data) - 1) == (RAW, data[-1])
    # the writes went out in few large pwritev calls (one per run of adjacent objects)
    assert t.writes <= t.segment_switches + 1
    assert t.stats().written_bytes == t.live_bytes
    t.check_invariants()


async def test_write_accepts_bytes_like(make_tier):
    t = make_tier(4 * MiB, segment_bytes=SEG)
    hs = t.allocate([5, 5, 5])
    await t.write(hs, [(0, 1, b"aaaaa"), (1, 1, bytearray(b"bbbbb")), (2, 1, memoryview(b"ccccc"))])
    assert await get(t, hs, [b"aaaaa", b"bbbbb", b"ccccc"]) == [b"aaaaa", b"bbbbb", b"ccccc"]


async def test_write_checks_arguments(make_tier):
    t = make_tier(4 * MiB, segment_bytes=SEG)
    hs = t.allocate([10, 10])
    with pytest.raises(Misuse):
        await t.write(hs, [(0, 1, b"x" * 10)])  # one object for two handles
    with pytest.raises(Misuse):
        await t.write(hs, [(0, 1, b"x" * 10), (1, 1, b"x" * 11)])  # not its length
    with pytest.raises(Misuse):
        await t.write([30 * SEG], [(0, 1, b"x" * 10)])  # not allocated
    with pytest.raises(Misuse):
        await t.read_objects([(30 * SEG, 10, 0)])
    assert t.stored_pages == 2  # nothing was written nor freed
    t.free_many([(hs[0], 10), (hs[1], 10)])


async def test_flipped_bit_is_a_checksum_error(make_tier, caplog):
    rng = random.Random(2)
    t = make_tier(4 * MiB, segment_bytes=SEG)
    data = payloads(rng, 20)
    hs = await put(t, data)
    victim = 7
    for where in (0, 2, 5, 12, 16 + 3, t.object_bytes(len(data[victim])) - 1):
        flip(t, hs[victim] + where)  # header, payload, tag: each
        with caplog.at_level(logging.ERROR, logger="swapfs.tiers.file"):
            with pytest.raises(ChecksumError) as ei:
                await get(t, [hs[victim]], [data[victim]], key0=victim)
        assert ei.value.page == hs[victim]
        assert any(t.path in r.getMessage() and str(hs[victim]) in r.getMessage()
                   and t.name in r.getMessage() for r in caplog.records)
        flip(t, hs[victim] + where)  # back
        assert await get(t, [hs[victim]], [data[victim]], key0=victim) == [data[victim]]
    flip(t, hs[victim] + 20)
    assert t.stats().checksum_errors == 6
    others = [i for i in range(20) if i != victim]
    for i in others:
        assert await get(t, [hs[i]], [data[i]], key0=i) == [data[i]]
    with pytest.raises(ChecksumError) as ei:
        await get(t, hs, data)
    assert ei.value.page == hs[victim]
    t.check_invariants()


async def test_an_object_of_another_slot_or_place_or_generation_never_passes(make_tier):
    rng = random.Random(3)
    t = make_tier(4 * MiB, segment_bytes=SEG)
    data = payloads(rng, 4, 1000, 1000)  # equal lengths: a copy fits any of their places
    hs = await put(t, data)
    # asked as another slot's
    with pytest.raises(ChecksumError):
        await t.read_objects([(hs[1], 1000, 0)])
    # an object copied over another's place (same length, same segment, same generation)
    fd = os.open(t.path, os.O_RDWR)
    try:
        n = t.object_bytes(1000)
        os.pwrite(fd, os.pread(fd, n, DATA_OFFSET + hs[0]), DATA_OFFSET + hs[2])
    finally:
        os.close(fd)
    with pytest.raises(ChecksumError):
        await t.read_objects([(hs[2], 1000, 2)])
    with pytest.raises(ChecksumError):  # even asked as the slot it names
        await t.read_objects([(hs[2], 1000, 0)])
    # a stale segment: the generation moved on (the segment was emptied, punched and reused
    # while its old bytes stayed, as when a punch fails)
    t._map.gen[0] += 1
    with pytest.raises(ChecksumError):
        await t.read_objects([(hs[3], 1000, 3)])
    t._map.gen[0] -= 1
    assert await get(t, [hs[3]], [data[3]], key0=3) == [data[3]]


async def test_io_error_frees_the_objects(make_tier):
    t = make_tier(4 * MiB, segment_bytes=SEG)
    hs = t.allocate([PAGE] * 4)
    # make the tier's descriptor read-only underneath it: pwritev fails with EBADF
    ro = os.open(t.path, os.O_RDONLY)
    os.dup2(ro, t._fd)
    os.close(ro)
    with pytest.raises(TierIOError) as ei:
        await t.write(hs, [(i, RAW, b"z" * PAGE) for i in range(4)])
    assert ei.value.errno == errno.EBADF
    assert t.stored_pages == 0 and t.live_bytes == 0 and t.stats().io_errors == 1
    assert not t.full
    t.check_invariants()


async def test_cancelled_write_frees_the_objects(make_tier):
    t = make_tier(4 * MiB, segment_bytes=SEG)
    hs = t.allocate([PAGE] * 8)
    with trio.CancelScope() as cs:
        cs.cancel()
        await t.write(hs, [(i, RAW, b"q" * PAGE) for i in range(8)])
    assert cs.cancelled_caught
    assert t.stored_pages == 0
    t.check_invariants()


async def test_punch_shrinks_the_file(make_tier):
    rng = random.Random(3)
    t = make_tier(4 * MiB, segment_bytes=SEG)
    per = SEG // t.object_bytes(PAGE)
    data = payloads(rng, 3 * per, PAGE, PAGE)
    hs = await put(t, data)
    os.fsync(t._fd)
    before = t.stats().disk_bytes
    assert before >= 3 * per * PAGE
    for h in hs[per:2 * per]:  # the middle segment
        t.free(h, PAGE)
    for h in hs[2 * per:2 * per + 3]:  # a partial free: not punched
        t.free(h, PAGE)
    assert await t.punch_free_segments() == 1
    after = t.stats().disk_bytes
    assert after <= before - SEG + PAGE
    assert os.stat(t.path).st_size == DATA_OFFSET + t.size_bytes  # KEEP_SIZE
    assert t.stats().punched_segments == 1
    keep = list(range(per)) + list(range(2 * per + 3, 3 * per))
    got = await t.read_objects([(hs[i], PAGE, i) for i in keep])
    assert [p for _c, p in got] == [data[i] for i in keep]
    t.check_invariants()


async def test_concurrent_io_and_close_while_in_flight(make_tier):
    t = make_tier(8 * MiB, max_inflight=3, segment_bytes=SEG)
    data: dict[int, tuple[int, bytes]] = {}  # key -> (handle, payload)

    async def writer(seed: int) -> None:
        r = random.Random(seed)
        for k in range(10):
            ps = payloads(r, r.randint(1, 40))
            key0 = seed << 20 | k << 8
            hs = await put(t, ps, key0)
            data.update((key0 + i, (h, p)) for i, (h, p) in enumerate(zip(hs, ps)))

    async with trio.open_nursery() as nursery:
        for seed in range(6):
            nursery.start_soon(writer, seed)
    got: dict[int, bytes] = {}

    async def reader(keys: list[int]) -> None:
        res = await t.read_objects([(data[k][0], len(data[k][1]), k) for k in keys])
        for k, (_cid, p) in zip(keys, res):
            got[k] = p

    keys = sorted(data)
    async with trio.open_nursery() as nursery:
        for i in range(0, len(keys), 50):
            nursery.start_soon(reader, keys[i:i + 50])
    assert got == {k: p for k, (_h, p) in data.items()}
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
        await reader(keys[:1])
    assert t._fd == -1
    t.check_invariants()


async def test_reads_from_page_cache_inline_else_in_a_thread(make_tier):
    t = make_tier(2 * MiB, segment_bytes=SEG)
    r = random.Random(5)
    data = payloads(r, 64)
    hs = await put(t, data)
    # just written: in the page cache, served inline without a checkpoint
    with trio.CancelScope() as scope:
        scope.cancel()  # any checkpoint would raise Cancelled
        assert await get(t, hs, data) == data
    assert t.cached_reads == 1 and t.thread_reads == 0
    # dropped from the page cache: RWF_NOWAIT refuses, a worker thread reads from disk
    os.fsync(t._fd)
    os.posix_fadvise(t._fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert await get(t, hs, data) == data
    assert t.thread_reads == 1
    assert t.stats().cached_reads == 1


# ---------------------------------------------------------------- what cleaning reads


async def test_read_segment_finds_the_objects_and_their_slots(make_tier):
    rng = random.Random(7)
    t = make_tier(4 * MiB, segment_bytes=SEG)
    data = payloads(rng, 40, 10, PAGE)
    hs = await put(t, data, key0=5 << 40)
    seg0 = [i for i, h in enumerate(hs) if h // SEG == 0]
    found = await t.read_segment(0)
    assert [(h, k, n) for h, k, n, _b in found] == [(hs[i], (5 << 40) + i, len(data[i]))
                                                     for i in seg0]
    for h, k, n, b in found:
        assert t.open_object(h, n, k, b)[1] == data[k - (5 << 40)]
    # a region that holds garbage (a failed write's bytes) is skipped, what follows is found
    fd = os.open(t.path, os.O_RDWR)
    try:
        os.pwrite(fd, rng.randbytes(t.object_bytes(len(data[1]))), DATA_OFFSET + hs[1])
    finally:
        os.close(fd)
    found = await t.read_segment(0)
    assert [h for h, _k, _n, _b in found if h != hs[1]] == [hs[i] for i in seg0 if i != 1]


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
    t = make_tier(2 * CLUSTER_BYTES, preallocate=True, segment_bytes=SEG)
    assert t.stats().disk_bytes >= 2 * CLUSTER_BYTES
    per = SEG // t.object_bytes(PAGE)
    hs = await put(t, [b"p" * PAGE] * (2 * per))
    for h in hs[:per]:
        t.free(h, PAGE)
    # a preallocated tier keeps its space: no punch, the segment is free at once
    assert await t.punch_free_segments() == 0
    assert t.stats().disk_bytes >= 2 * CLUSTER_BYTES
    assert t.stats().segments_free == t.nsegments - 1
    t.check_invariants()


async def test_stats_fields(make_tier):
    t = make_tier(4 * MiB, name="ssd", priority=7, segment_bytes=SEG)
    rng = random.Random(8)
    data = payloads(rng, 100, 1000, 1000)
    hs = await put(t, data)
    await get(t, hs[:4], data[:4])
    for h in hs[50:]:
        t.free(h, 1000)
    s = t.stats()
    assert isinstance(s, FileTierStats)
    d = dataclasses.asdict(s)
    for key in ("name", "kind", "path", "priority", "capacity_pages", "stored_pages",
                "free_pages", "disk_bytes", "reads", "writes", "read_bytes", "written_bytes",
                "checksum_errors", "io_errors", "full", "metadata_bytes", "live_bytes",
                "dead_bytes", "segments_used", "segments_free", "cleaned_objects",
                "cleaned_bytes", "write_amplification", "compression_ratio"):
        assert key in d, key
    assert list(d)[:3] == ["name", "kind", "path"]
    assert d["kind"] == "file" and d["name"] == "ssd" and d["priority"] == 7
    n = t.object_bytes(1000)
    assert s.capacity_pages == 4 * MiB // PAGE and s.stored_pages == 50
    assert s.live_bytes == 50 * n
    assert 50 * n <= s.dead_bytes < 50 * n + 2 * PAGE  # the freed objects, and padding
    assert s.compression_ratio == round(50 * PAGE / (50 * n), 4)
    assert s.segments_used + s.segments_free == t.nsegments
    assert s.disk_bytes >= 50 * 1000
    assert s.written_bytes == 100 * n and s.write_amplification == 1.0
    assert s.reads == 4 and s.read_bytes == 4 * n
    assert not s.full
    # metadata: a few bytes a segment, nothing per object
    assert s.metadata_bytes <= 25 * t.nsegments


def test_metadata_of_a_large_tier(tmp_path: Path):
    t = FileTier("big", str(tmp_path / "big.img"), 1 << 30, 1)  # never opened
    assert t.nsegments == 256
    assert t.metadata_bytes <= 25 * t.nsegments
    t.check_invariants()


# ---------------------------------------------------------------- a real full filesystem


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_full_filesystem_enospc(small_ext4: Path):
    rng = random.Random(5)
    t = FileTier("small", str(small_ext4 / "tier.img"), 32 * MiB, 1)  # larger than the fs
    t.open()
    try:
        data: dict[int, tuple[int, bytes]] = {}
        key = 0
        with pytest.raises(TierFull):
            for _ in range(10_000):
                ps = payloads(rng, 64, PAGE, PAGE)
                hs = t.allocate([PAGE] * 64)
                assert hs, "ran out of room before the filesystem filled"
                await t.write(hs, [(key + i, RAW, p) for i, p in enumerate(ps[:len(hs)])])
                data.update((key + i, (h, p)) for i, (h, p) in enumerate(zip(hs, ps)))
                key += 64
        assert t.full
        assert t.allocate([1]) == []
        assert len(data) > 256  # several MiB went in before ENOSPC
        assert t.stored_pages == len(data)  # the failed batch was freed
        t.check_invariants()
        keys = sorted(data)
        got = await t.read_objects([(data[k][0], PAGE, k) for k in keys])
        assert [p for _c, p in got] == [data[k][1] for k in keys]
        # frees clear the condition; punching gives the space back
        first = [k for k in keys if data[k][0] < t.segment_bytes]
        emptied = t.stats().segments_punch_pending  # segments only the failed batch used
        for k in first:
            t.free(data[k][0], PAGE)
        assert not t.full
        assert await t.punch_free_segments() == emptied + 1
        hs = t.allocate([PAGE] * 8)
        assert hs
        await t.write(hs, [(i, RAW, b"\x05" * PAGE) for i in range(len(hs))])
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
    t = make_tier(2 * MiB + 17 * PAGE, segment_bytes=SEG)
    owned: dict[int, int] = {}  # handle -> payload length
    waiting: set[int] = set()  # segments emptied, waiting for their punch
    for step in range(400):
        op = rng.random()
        if op < 0.5:
            sizes = [rng.randint(1, PAGE) for _ in range(rng.randint(1, 100))]
            got = t.allocate(sizes)
            assert sizes[:len(got)] == sizes[:len(got)]
            for h, n in zip(got, sizes):
                assert h not in owned, "an object place handed out twice"
                assert h // SEG not in waiting, "a segment reused before its punch"
                for o, m in owned.items():
                    assert h + t.object_bytes(n) <= o or o + t.object_bytes(m) <= h
                owned[h] = n
        elif op < 0.9 and owned:
            for h in rng.sample(sorted(owned), rng.randint(1, min(len(owned), 100))):
                t.free(h, owned.pop(h))
                seg = h // SEG
                if seg != t._map.head and not any(o // SEG == seg for o in owned):
                    waiting.add(seg)
        else:
            await t.punch_free_segments()
            waiting.clear()
        assert t.stored_pages == len(owned)
        assert t.live_bytes == sum(t.object_bytes(n) for n in owned.values())
        if step % 20 == 0:
            t.check_invariants()
