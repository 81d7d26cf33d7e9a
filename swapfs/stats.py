"""Typed stats records, rendered once for xattrs, the CLI and JSON.

``Stats.to_dict()`` is the stats contract of the design (names never
change once they exist), plus extra counters.  ``xattr_items`` renders one
level of it as ``{name: ASCII value}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class DeviceStats:
    name: str
    size_bytes: int
    stored_pages: int  # slots holding a page: same-filled + pool (compressed and huge)
    same_filled_pages: int
    pool_pages: int  # compressed pages in the pool, huge pages excluded
    huge_pages: int  # pages stored raw in the pool
    file_pages: int  # pages in file tiers
    compressed_bytes: int  # payload in the pool (huge pages count 4096)
    pool_bytes: int  # size-class bytes of the payload (arena slack not included)
    metadata_bytes: int  # the device's slot table
    reads: int  # requests
    writes: int
    discards: int
    read_bytes: int
    written_bytes: int  # bytes of successful writes
    discarded_bytes: int  # bytes of discards, clipped to the device
    nospace_errors: int  # writes refused (fully or partly) for lack of space


@dataclass(frozen=True)
class PoolStats:
    name: str
    kind: str
    algorithm: str
    stored_pages: int  # compressed + huge
    huge_pages: int
    compressed_bytes: int  # payload bytes (huge pages count 4096)
    pool_bytes: int  # memory held by arenas, fragmentation included
    max_bytes: int
    fragmentation: float  # 1 - compressed_bytes / pool_bytes (0.0 when empty)
    metadata_bytes: int  # allocator bookkeeping
    arenas: int
    spare_bytes: int  # empty arenas kept for reuse (at most one per class), in pool_bytes
    used_bytes: int  # size-class bytes of the objects in use (pool_bytes less free objects)
    classes: dict[int, int] = field(default_factory=dict)  # object size -> stored objects


@dataclass(frozen=True)
class TotalsStats:
    stored_pages: int
    same_filled_pages: int
    huge_pages: int
    compressed_bytes: int
    pool_bytes: int
    metadata_bytes: int  # slot tables + allocator bookkeeping
    compression_ratio: float  # pool pages * 4096 / pool_bytes (0.0 when empty)
    reads: int
    writes: int
    discards: int
    read_bytes: int
    written_bytes: int


@dataclass(frozen=True)
class WritebackStats:
    moved_pages: int = 0  # pages demoted (committed moves), all tier pairs
    aborted_moves: int = 0  # moves dropped because the slot changed under them
    promotions: int = 0  # refaulted pages moved back to the pool
    refaults: int = 0  # reads of demoted pages (pages with a shadow)
    moved_bytes: int = 0  # moved_pages * 4096
    batches: int = 0  # migrations that committed at least one page
    failed_batches: int = 0  # tier writes that failed (the pages stayed)
    inflight_pages: int = 0  # destination pages written or allocated, not committed
    requests: int = 0  # user.swapfs.ctl.writeback requests served
    epoch: int = 0  # the access clock (1/4 s units)
    demotions_clock: int = 0  # demotions ever: the refault clock
    # "pool->ssd": {"pages", "bytes", "batches"}
    pairs: dict[str, dict[str, int]] = field(default_factory=dict)
    # per tier: {"demotions", "refaults", "promotions"}
    levels: dict[str, dict[str, int]] = field(default_factory=dict)
    # per tier above the last: {"high", "low", "used"} (pool: bytes; file tiers: pages)
    watermarks: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheStats:
    pages: int = 0
    hits: int = 0
    misses: int = 0
    capacity_pages: int = 0
    inserts: int = 0
    evictions: int = 0


def _named(record: Any) -> dict[str, Any]:
    d = {f.name: getattr(record, f.name) for f in fields(record) if f.name != "name"}
    if "classes" in d:
        d["classes"] = {str(k): v for k, v in d["classes"].items()}
    return d


@dataclass(frozen=True)
class Stats:
    devices: tuple[DeviceStats, ...]
    tiers: tuple[PoolStats, ...]
    totals: TotalsStats
    writeback: WritebackStats = WritebackStats()
    cache: CacheStats = CacheStats()

    def device(self, name: str) -> DeviceStats:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def pool(self) -> PoolStats:
        for t in self.tiers:
            if t.kind == "pool":
                return t
        raise KeyError("pool")

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of the stats contract."""
        return {
            "devices": {d.name: _named(d) for d in self.devices},
            "tiers": {t.name: _named(t) for t in self.tiers},
            "totals": asdict(self.totals),
            "writeback": asdict(self.writeback),
            "cache": asdict(self.cache),
        }


def _render(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def xattr_items(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{name: ASCII value}`` for the counters of one level of a stats dict.

    Floats get four decimals, booleans 0/1.  A nested dict (the pool's
    ``classes``) is flattened with dotted names (``classes.32``).
    """
    out: dict[str, str] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(xattr_items(v, name + "."))
        else:
            out[name] = _render(v)
    return out
