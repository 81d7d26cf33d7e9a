"""File-tier metadata is a few bytes per segment, nothing per stored object: a huge tier
mounts with little memory, and storing objects adds none."""

from __future__ import annotations

import random
from pathlib import Path

from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.tiers.file import RAW, FileTier

MiB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_2_tib_tier_costs_its_per_segment_arrays_only(tmp_path: Path) -> None:
    before = rss()
    t = FileTier("big", str(tmp_path / "big.img"), 2 << 40, 1)  # 512k segments, never opened
    grew = rss() - before
    assert t.nsegments == (2 << 40) // (4 * MiB)
    assert t.metadata_bytes <= 25 * t.nsegments  # 12.5 MiB; raw pages by capacity was 4.5 GiB
    assert grew <= 32 * MiB, f"RSS grew {grew / MiB:.1f} MiB"
    hs = t.allocate([PAGE] * 3000)  # bookkeeping of the segments in use only
    assert len(hs) == 3000
    assert rss() - before <= 32 * MiB + 4 * PAGE * 4
    for h in hs:
        t.free(h, PAGE)


async def test_storing_objects_adds_no_metadata(make_tier) -> None:
    t = make_tier(8 * MiB, segment_bytes=64 * 1024)
    empty = t.metadata_bytes
    rng = random.Random(1)
    data = [rng.randbytes(rng.randint(100, PAGE)) for _ in range(1000)]
    hs = t.allocate([len(p) for p in data])
    await t.write(hs, [(i, RAW if len(p) == PAGE else 1, p) for i, p in enumerate(data)])
    assert t.stored_pages == 1000
    assert t.metadata_bytes <= empty + 4 * t.nsegments  # the free stack shrank, if anything
    got = await t.read_objects([(h, len(p), i) for i, (h, p) in enumerate(zip(hs, data))])
    assert [p for _c, p in got] == data
    for h, p in zip(hs, data):
        t.free(h, len(p))
    await t.punch_free_segments()
    assert t.metadata_bytes <= empty
