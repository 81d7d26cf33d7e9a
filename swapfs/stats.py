"""Typed stats records, rendered once for xattrs, the CLI, JSON and Prometheus.

``Stats.to_dict()`` is the stats contract of the design (names never
change once they exist), plus extra counters, the zram/zswap names of the
counters that mean the same (``orig_data_size`` ...) and a ``schema``
version.  ``xattr_items`` renders one level of it as ``{name: ASCII value}``;
``prometheus_text`` renders a whole object (as read back from the xattr) in
the Prometheus text format, without the prometheus_client package.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .kernel import PAGE_SIZE as PAGE

# 1: the first contract; 2: zram names, writeback pair keys "pool_to_ssd"
# (were "pool->ssd"), this version field; 3: compression_ratio is zram's
# (orig_data_size / compr_data_size), the pool's memory ratio it was is
# memory_ratio; fragmentation and holes are 0.0 while the pool stores nothing;
# 4: file tiers hold segments: their cluster* stats became segment* stats, with
# live_bytes, dead_bytes, cleaning and write_amplification (README's migration note).
SCHEMA_VERSION = 4

# The xattr names of the interface, spelled here only (the daemon serves
# them, the command line and the scripts read and set them).
XATTR_PREFIX = "user.swapfs."
STATS_XATTR = XATTR_PREFIX + "stats"  # the whole stats object, JSON
CTL_WRITEBACK_XATTR = XATTR_PREFIX + "ctl.writeback"  # "N" or "idle:SECONDS": move pages down now
CTL_COMPACT_XATTR = XATTR_PREFIX + "ctl.compact"  # any value: compact the pool now
CTL_TRACE_XATTR = XATTR_PREFIX + "ctl.trace"  # "PATH": record requests there; "stop"


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
    pool_bytes: int  # size-class bytes of the payload (span slack not included)
    metadata_bytes: int  # the device's slot table
    reads: int  # requests
    writes: int
    discards: int
    read_bytes: int
    written_bytes: int  # bytes of successful writes
    discarded_bytes: int  # bytes of discards, clipped to the device
    nospace_errors: int  # writes refused (fully or partly) for lack of space
    writeback: bool = True  # the config's device.writeback: false keeps its pages in memory


@dataclass(frozen=True)
class PoolStats:
    name: str
    kind: str
    algorithm: str
    stored_pages: int  # compressed + huge (pages: with dedup, shared objects count per page)
    huge_pages: int
    compressed_bytes: int  # payload bytes (huge pages count 4096)
    pool_bytes: int  # memory held by spans, huge pages and spares, holes included
    max_bytes: int
    fragmentation: float  # 1 - compressed_bytes / pool_bytes (0.0 while no page is in the pool)
    metadata_bytes: int  # allocator bookkeeping
    arenas: int  # spans held (huge pages included); the name predates spans, kept for monitoring
    spare_bytes: int  # free pages kept resident for reuse (at most 256 KiB), in pool_bytes
    used_bytes: int  # size-class bytes of the objects in use (pool_bytes less free objects)
    classes: dict[int, int] = field(default_factory=dict)  # object size -> stored objects
    # pages that skipped the pool (zswap's names): it was at its limit, or
    # they compressed worse than accept_ratio and went to a file tier
    pool_limit_hit: int = 0
    reject_compress_poor: int = 0
    # share of pool_bytes no object uses (free objects, span tails, spares); 0.0 while no
    # page is in the pool (its memory is then only spares kept for reuse, not a hole to fill)
    holes: float = 0.0
    compactions: int = 0  # compaction passes
    compacted_objects: int = 0  # objects moved by compaction
    compacted_bytes: int = 0  # memory compaction released
    recompress: str = ""  # the codec idle pages are recompressed with ("": none)
    recompressed_pages: int = 0  # pages switched to it (pool.recompress)
    recompress_saved_bytes: int = 0  # pool memory those switches saved (size-class bytes)
    # same content stored once ([pool] dedup): pages that share another
    # page's object now, the class bytes they would take, writes that found
    # their content stored (since mount), and the index's size
    dedup_pages: int = 0
    dedup_saved_bytes: int = 0
    dedup_hits: int = 0
    dedup_index_bytes: int = 0
    # pages the pool can still take: its free memory (max_bytes less the objects in use) at
    # its memory ratio (headroom_ratio: measured, or the assumed one while it holds nothing)
    headroom_pages: int = 0
    headroom_ratio: float = 0.0


@dataclass(frozen=True, kw_only=True)
class FileTierStats:
    """One file tier's counters.

    ``stored_pages`` counts the objects (one page each) live in the tier, ``live_bytes`` the
    bytes they take on disk (headers and tags included), ``dead_bytes`` the bytes appended to
    segments in use that nothing live holds any more (cleaning reclaims them);
    ``compression_ratio`` is ``stored_pages * 4096 / live_bytes``.  ``cleaned_objects`` and
    ``cleaned_bytes`` count what cleaning re-appended; ``write_amplification`` is all bytes
    appended over those appended for pages written or moved down (1.0: no cleaning).
    ``reads``/``writes`` count system calls, ``read_bytes``/``written_bytes`` bytes on disk.
    """

    name: str
    kind: str = "file"
    path: str
    priority: int
    capacity_pages: int
    stored_pages: int
    free_pages: int
    disk_bytes: int
    reads: int
    writes: int
    read_bytes: int
    written_bytes: int
    checksum_errors: int
    io_errors: int
    full: bool
    metadata_bytes: int
    live_bytes: int = 0
    dead_bytes: int = 0
    segments_used: int = 0
    segments_free: int = 0  # including those waiting for their punch
    segments_punch_pending: int = 0
    punched_segments: int = 0
    segment_bytes: int = 0
    cleaned_objects: int = 0
    cleaned_bytes: int = 0
    write_amplification: float = 0.0
    compression_ratio: float = 0.0
    segment_switches: int = 0
    write_batches: int = 0  # thread hops that wrote (grouping every write queued meanwhile)
    cached_reads: int = 0  # reads served inline from the page cache (RWF_NOWAIT)
    thread_reads: int = 0  # reads that went to a worker thread
    encrypted: bool = False  # objects are stored encrypted (AES-GCM, a key per mount)
    # pages the tier can still take: the bytes it could append, cleaning included, at its
    # compression_ratio (the pool's assumed ratio while it holds nothing)
    headroom_pages: int = 0
    # kind = "redis" (docs/remote-tier.md): round trips (pipelined batches), bytes on the wire,
    # failed remote calls (by kind: timeout, unavailable, auth, full, reply), reads retried,
    # redirections followed, slot map reloads and the slots they found served by another
    # master, remote read latency (a histogram in microseconds), live objects per node as the
    # slot map places them now.  disk_bytes is the segments' server memory.
    remote_requests: int = 0
    remote_sent_bytes: int = 0
    remote_received_bytes: int = 0
    remote_errors: int = 0
    remote_retries: int = 0
    remote_redirects: int = 0
    remote_refreshes: int = 0
    remote_slot_changes: int = 0
    remote_failures: dict[str, int] = field(default_factory=dict)
    remote_read_latency_us: dict[str, int] = field(default_factory=dict)
    remote_pages_per_node: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TotalsStats:
    stored_pages: int
    same_filled_pages: int
    huge_pages: int
    compressed_bytes: int
    pool_bytes: int
    metadata_bytes: int  # slot tables + allocator bookkeeping
    # zram's: orig_data_size / compr_data_size, the uncompressed bytes of the pages in memory
    # (same-filled and pool) over their compressed payload; 0.0 while nothing is compressed
    compression_ratio: float
    reads: int
    writes: int
    discards: int
    read_bytes: int
    written_bytes: int
    recoveries: int = 0  # times a successor took this state over and recovered it
    recovered_leaks: int = 0  # pool objects and file pages no slot named, freed by recoveries
    recovery_seconds: float = 0.0  # time all recoveries took
    # the pool's memory ratio: uncompressed bytes of the pages in the pool over the memory the
    # pool holds (pool_bytes: holes and spares included); 0.0 while no page is in the pool
    memory_ratio: float = 0.0
    # pages the pool and the file tiers can still take, each at its ratio (same-filled pages
    # take no room and come on top), and the share of the devices' pages that the pages stored
    # and that headroom back (1.0: every slot the kernel may fill has room behind it)
    headroom_pages: int = 0
    backed_fraction: float = 0.0


@dataclass(frozen=True)
class WritebackStats:
    moved_pages: int = 0  # pages demoted (committed moves), all tier pairs
    aborted_moves: int = 0  # moves dropped because the slot changed under them
    promotions: int = 0  # refaulted pages moved back to the pool
    refaults: int = 0  # reads of demoted pages (pages with a shadow)
    wasted_promotions: int = 0  # promoted pages demoted again before any read
    # page reads a file tier served (the swap cache's included), and the share of page reads
    # served from memory (the pool, a fill word): 1 - file_reads / page reads; 1.0 before any
    file_reads: int = 0
    pool_hit_rate: float = 1.0
    moved_bytes: int = 0  # moved_pages * 4096
    batches: int = 0  # migrations that committed at least one page
    failed_batches: int = 0  # tier writes that failed (the pages stayed)
    inflight_pages: int = 0  # destination pages written or allocated, not committed
    requests: int = 0  # user.swapfs.ctl.writeback requests served
    epoch: int = 0  # the access clock (1/4 s units)
    demotions_clock: int = 0  # demotions ever: the refault clock
    # "pool_to_ssd": {"pages", "bytes", "batches"}
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
    tiers: tuple[PoolStats | FileTierStats, ...]
    totals: TotalsStats
    writeback: WritebackStats = WritebackStats()
    cache: CacheStats = CacheStats()
    # the pool's largest pool_bytes seen (zram's mem_used_max); 0: not tracked,
    # pool_bytes then stands in
    pool_peak_bytes: int = 0

    def device(self, name: str) -> DeviceStats:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def pool(self) -> PoolStats:
        for t in self.tiers:
            if isinstance(t, PoolStats):
                return t
        raise KeyError("pool")

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of the stats contract."""
        devices = {}
        for d in self.devices:
            dd = _named(d)
            dd.update(_zram_names(d.same_filled_pages, d.pool_pages + d.huge_pages, d.huge_pages,
                                  d.compressed_bytes, d.pool_bytes))
            devices[d.name] = dd
        totals = asdict(self.totals)
        pool_pages = sum(t.stored_pages for t in self.tiers if t.kind == "pool")
        totals.update(_zram_names(self.totals.same_filled_pages, pool_pages, self.totals.huge_pages,
                                  self.totals.compressed_bytes, self.totals.pool_bytes))
        totals["mem_used_max"] = max(self.pool_peak_bytes, self.totals.pool_bytes)
        totals["written_back_pages"] = self.writeback.moved_pages
        writeback = asdict(self.writeback)
        return {
            "schema": SCHEMA_VERSION,
            "devices": devices,
            "tiers": {t.name: _named(t) for t in self.tiers},
            "totals": totals,
            "writeback": writeback,
            "cache": asdict(self.cache),
        }


def _zram_names(same: int, pool_pages: int, huge: int, compr: int, mem: int) -> dict[str, int]:
    """The counters zram's mm_stat names, where they mean the same here:
    ``orig_data_size`` counts the pages held in memory (same-filled and in the
    pool; pages in file tiers are zram's written-back pages, left out),
    ``compr_data_size`` their compressed payload, ``mem_used_total`` the
    pool's memory."""
    return {"orig_data_size": (same + pool_pages) * PAGE, "compr_data_size": compr,
            "mem_used_total": mem, "same_pages": same, "huge_pages": huge}


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


# -- xattr names -------------------------------------------------------------

_XATTR_BAD = re.compile(r"[^a-z0-9_.]")


def xattr_name(key: str) -> str:
    """A stats key as an xattr name component: only ``[a-z0-9_.]`` (device and
    tier names are free text in the config; other characters become ``_``)."""
    return _XATTR_BAD.sub("_", key.lower())


# -- Prometheus text format --------------------------------------------------

# Counters (monotonic since mount) by section; every other number is a gauge.
_COUNTERS = {
    "device": {"reads", "writes", "discards", "read_bytes", "written_bytes", "discarded_bytes",
               "nospace_errors"},
    "tier": {"reads", "writes", "read_bytes", "written_bytes", "checksum_errors", "io_errors",
             "punched_segments", "segment_switches", "cleaned_objects", "cleaned_bytes",
             "write_batches", "cached_reads", "thread_reads", "remote_requests",
             "remote_sent_bytes", "remote_received_bytes", "remote_errors", "remote_retries",
             "remote_redirects", "remote_refreshes", "remote_slot_changes",
             "pool_limit_hit", "reject_compress_poor", "compactions", "compacted_objects",
             "compacted_bytes", "recompressed_pages", "recompress_saved_bytes", "dedup_hits"},
    "totals": {"reads", "writes", "discards", "read_bytes", "written_bytes", "written_back_pages",
               "recoveries", "recovered_leaks", "recovery_seconds"},
    "writeback": {"moved_pages", "aborted_moves", "promotions", "refaults", "moved_bytes", "batches",
                  "failed_batches", "requests", "file_reads"},
    "cache": {"hits", "misses", "inserts", "evictions"},
}
# Numbers that are not measurements of the store (clocks) are left out.
_SKIP = {"writeback": {"epoch", "demotions_clock"}}
# Ratios are 0.0 in the stats object while there is nothing to divide (an empty pool); the
# Prometheus text leaves them out then, so that an alert on a low ratio does not fire on an
# empty pool (the series is absent, not 0).
_ABSENT_WHEN_ZERO = {"compression_ratio", "memory_ratio"}

_HELP = {
    "size_bytes": "Size of the device",
    "stored_pages": "Pages stored",
    "same_filled_pages": "Pages stored as a fill word (no storage)",
    "compressed_bytes": "Compressed payload bytes in the pool",
    "pool_bytes": "Memory held by the pool",
    "pool_limit_hit": "Pages that found the pool at its limit (zswap pool_limit_hit)",
    "holes": "Share of the pool's memory that no object uses (0 while the pool stores nothing)",
    "fragmentation": "Share of the pool's memory not holding compressed payload (0 while the pool "
                     "stores nothing)",
    "compression_ratio": "Uncompressed over compressed bytes of the pages in memory "
                         "(orig_data_size / compr_data_size; absent while nothing is compressed)",
    "memory_ratio": "Uncompressed bytes of the pages in the pool over the pool's memory "
                    "(absent while the pool stores nothing)",
    "arenas": "Spans the pool holds (huge pages included)",
    "moved_bytes": "Bytes of the pages demoted",
    "live_bytes": "Bytes on disk of the objects live in a file tier",
    "dead_bytes": "Bytes of a file tier's segments in use that no live object holds",
    "segments_used": "Segments of a file tier holding objects (or a log's head)",
    "segments_free": "Segments of a file tier free to append to",
    "cleaned_objects": "Objects a file tier's cleaning re-appended",
    "cleaned_bytes": "Bytes a file tier's cleaning re-appended",
    "write_amplification": "Bytes appended to a file tier over those appended for pages stored",
    "recoveries": "Times a successor daemon took the store's state over and recovered it",
    "recovered_leaks": "Pool objects and file-tier objects that no slot named, freed by recoveries",
    "recovery_seconds": "Seconds all recoveries of the store's state took",
    "compactions": "Pool compaction passes",
    "compacted_objects": "Objects moved by pool compaction",
    "compacted_bytes": "Pool memory released by compaction",
    "recompressed_pages": "Idle pool pages recompressed with the denser codec",
    "recompress_saved_bytes": "Pool memory saved by recompressing idle pages",
    "dedup_pages": "Pages sharing another page's pool object (same content stored once)",
    "dedup_saved_bytes": "Pool memory the shared pages would take on their own",
    "dedup_hits": "Writes that found their content already in the pool",
    "dedup_index_bytes": "Memory of the dedup hash index",
    "reject_compress_poor": "Pages that compressed too poorly for the pool (zswap reject_compress_poor)",
    "metadata_bytes": "Bytes of tables and bookkeeping",
    "orig_data_size": "Uncompressed bytes of the pages held in memory (zram orig_data_size)",
    "compr_data_size": "Compressed bytes of the pages held in memory (zram compr_data_size)",
    "mem_used_total": "Memory used by the pool (zram mem_used_total)",
    "mem_used_max": "Largest memory used by the pool since mount (zram mem_used_max)",
    "same_pages": "Same-filled pages (zram same_pages)",
    "huge_pages": "Incompressible pages stored raw (zram huge_pages)",
    "checksum_errors": "Pages whose checksum did not match on read",
    "io_errors": "Failed reads and writes of the backing file",
    "nospace_errors": "Writes refused for lack of space",
    "writeback": "1 if the device's pages may move down to file tiers (device.writeback)",
    "headroom_pages": "Pages the store can still take at the current ratio (same-filled pages "
                      "come on top)",
    "headroom_ratio": "Pool memory ratio the pool's headroom assumes (measured, or the "
                      "configured expected_ratio while the pool holds nothing)",
    "file_reads": "Page reads served by a file tier (the misses of memory)",
    "pool_hit_rate": "Share of page reads served from memory: the pool or a fill word",
    "backed_fraction": "Share of the devices' pages that stored pages and headroom back "
                       "(below 1: the kernel sees slots the store cannot fill)",
}


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


class _Families:
    """Samples grouped by metric name, in first-seen order, each family once."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict[str, str], value: Any) -> None:
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            return
        if kind == "counter":
            name += "_total"
        fam = self.families.setdefault(name, (kind, help_text, []))
        fam[2].append((labels, value))

    def render(self) -> str:
        out = []
        for name, (kind, help_text, samples) in self.families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
                if isinstance(value, float) and not math.isfinite(value):
                    text = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
                else:
                    text = repr(value) if isinstance(value, float) else str(value)
                out.append(f"{name}{{{lab}}} {text}" if lab else f"{name} {text}")
        return "\n".join(out) + "\n"


def _section(fams: _Families, prefix: str, section: str, values: dict[str, Any],
             labels: dict[str, str]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) or key in _SKIP.get(section, ()):
            continue
        if key in _ABSENT_WHEN_ZERO and not value:
            continue
        kind = "counter" if key in _COUNTERS.get(section, ()) else "gauge"
        name = f"swapfs_{prefix}{_metric_name(key)}"
        help_text = _HELP.get(key, key.replace("_", " ").capitalize())
        fams.add(name, kind, f"{help_text} ({section})", labels, value)


def prometheus_text(stats: dict[str, Any], mount: str, *, device: str | None = None) -> str:
    """A stats object (``Stats.to_dict()``, as read from ``user.swapfs.stats``)
    in the Prometheus text format (version 0.0.4), for node_exporter's textfile
    collector: ``swapfs_*`` names, labels ``mount``, ``device``, ``tier``,
    counters ending in ``_total``.  With ``device``, ``stats`` is that device's
    own object and only its metrics are written."""
    fams = _Families()
    base = {"mount": mount}
    if device is not None:
        _section(fams, "device_", "device", stats, {**base, "device": device})
        return fams.render()
    for name, d in stats.get("devices", {}).items():
        _section(fams, "device_", "device", d, {**base, "device": name})
    for name, t in stats.get("tiers", {}).items():
        labels = {**base, "tier": name}
        info = {k: str(v) for k, v in t.items() if isinstance(v, str)}
        fams.add("swapfs_tier_info", "gauge", "A tier's kind and settings (value 1)",
                 {**labels, **{_metric_name(k): v for k, v in info.items()}}, 1)
        _section(fams, "tier_", "tier", t, labels)
    _section(fams, "", "totals", stats.get("totals", {}), base)
    wb = stats.get("writeback", {})
    _section(fams, "writeback_", "writeback", wb, base)
    for pair, c in wb.get("pairs", {}).items():
        src, _, dst = pair.partition("_to_")
        for key, value in c.items():
            fams.add(f"swapfs_writeback_pair_{_metric_name(key)}", "counter",
                     f"Writeback moves from tier from_tier to tier, {key}",
                     {**base, "tier": dst, "from_tier": src}, value)
    for tier, c in wb.get("levels", {}).items():
        for key, value in c.items():
            fams.add(f"swapfs_writeback_tier_{_metric_name(key)}", "counter",
                     f"Writeback {key} per tier", {**base, "tier": tier}, value)
    for tier, c in wb.get("watermarks", {}).items():
        for key, value in c.items():
            fams.add(f"swapfs_writeback_watermark_{_metric_name(key)}", "gauge",
                     f"Writeback watermark {key} (pool: bytes, file tiers: pages)",
                     {**base, "tier": tier}, value)
    _section(fams, "cache_", "cache", stats.get("cache", {}), base)
    return fams.render()
