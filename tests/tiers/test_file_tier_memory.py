"""File-tier metadata follows what is stored: reserved for the capacity, backed as clusters
fill, given back as they empty."""

from __future__ import annotations

from pathlib import Path

from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.tiers.file import CLUSTER_PAGES, FileTier

C = CLUSTER_PAGES
MiB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_2_tib_tier_costs_its_per_cluster_arrays_only(tmp_path: Path) -> None:
    before = rss()
    t = FileTier("big", str(tmp_path / "big.img"), 2 << 40, 1)  # 2M clusters, never opened
    grew = rss() - before
    assert t.nclusters == 2 << 20
    assert t.metadata_bytes <= 8 * t.nclusters  # 16 MiB; by capacity it was 4.5 GiB
    assert grew <= 32 * MiB, f"RSS grew {grew / MiB:.1f} MiB"
    runs = t.allocate(3 * C + 5)  # backs the columns of the clusters in use only
    assert t.metadata_bytes <= 8 * t.nclusters + 4 * C * 9
    assert rss() - before <= 32 * MiB + 4 * PAGE * 4
    t.free_runs(runs)


async def test_an_emptied_cluster_gives_its_columns_back(make_tier) -> None:
    t = make_tier(4 * C * PAGE)
    runs = t.allocate(2 * C)  # clusters 0 and 1: one page of checksums, one of used bytes
    await t.write(runs, [b"\x07" * PAGE] * (2 * C))
    csum = t._map.csum
    assert csum[0] != 0 and csum[C] != 0
    t.free(range(C))  # cluster 0 empties; cluster 1 shares its pages of both columns: kept
    assert csum[C] != 0 and t._map.used[C] == 1
    assert await t.read(C + 1) == b"\x07" * PAGE
    t.free(range(C, 2 * C))  # both empty: the pages are handed back and read as zeros
    assert csum[0] == 0 and csum[C] == 0 and csum[2 * C - 1] == 0
    assert t._map.release_errors == 0
    await t.punch_free_clusters()
    runs = t.allocate(C + 3)  # and are backed again as written
    await t.write(runs, [b"\x08" * PAGE] * (C + 3))
    assert await t.read_many([p for s, k in runs for p in range(s, s + k)]) == \
        [b"\x08" * PAGE] * (C + 3)
    assert t.metadata_bytes >= 2 * C * 9
