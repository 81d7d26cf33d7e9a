"""Stats assembly: the store's counters as one :class:`swapfs.stats.Stats`.

Reads the state layer (swapfs/state.py) only.

Read-only and await-free, so one snapshot is consistent: a tier's
``stored_pages`` counts the pages slots hold (pages written but not yet
committed, and pages whose free waits for a read, are left out), and
``totals.stored_pages`` = same-filled + every tier's = the devices' sum at
every moment.
"""

from __future__ import annotations

import dataclasses

from .kernel import PAGE_SIZE
from .state import StoreState
from .stats import CacheStats, DeviceStats, PoolStats, Stats, TotalsStats, WritebackStats


def collect(store: StoreState) -> Stats:
    pool = store.pool
    files = store.files
    # Pool objects of writes waiting for a file tier belong to no slot yet.
    staged_objects, staged_bytes = store.staged_in_pool()
    # Pages that share another page's object (dedup) count as pages, once each.
    dedup_pages, _dedup_payload, dedup_saved = store.dedup_committed()
    pool_pages = pool.objects - staged_objects + dedup_pages
    pool_cbytes = pool.compressed_bytes - staged_bytes
    devices = tuple(
        DeviceStats(
            name=d.name, size_bytes=d.size_bytes, stored_pages=d.stored_pages,
            same_filled_pages=d.same_filled_pages, pool_pages=d.pool_pages,
            huge_pages=d.huge_pages, file_pages=d.file_pages,
            compressed_bytes=d.compressed_bytes,
            pool_bytes=d.pool_bytes, metadata_bytes=d.table.metadata_bytes(),
            reads=d.reads, writes=d.writes, discards=d.discards, read_bytes=d.read_bytes,
            written_bytes=d.written_bytes, discarded_bytes=d.discarded_bytes,
            nospace_errors=d.nospace_errors, writeback=d.config.writeback)
        for d in store.devices)
    huge = sum(d.huge_pages for d in devices)
    # Headroom: the pool's free memory at its measured memory ratio (objects in use, not
    # span slack: compaction turns holes back into room), or the assumed one while empty.
    pool_ratio = (pool_pages * PAGE_SIZE / pool.used_bytes if pool_pages and pool.used_bytes
                  else store.config.pool.ratio())
    pool_room = int(max(0, pool.max_bytes - pool.used_bytes) * pool_ratio) // PAGE_SIZE
    pool_meta = pool.metadata_bytes() + (store.dedup.metadata_bytes() if store.dedup else 0)
    pstats = PoolStats(
        name="pool", kind="pool", algorithm=store.codec.name, stored_pages=pool_pages,
        huge_pages=huge, compressed_bytes=pool_cbytes,
        pool_bytes=pool.pool_bytes, max_bytes=pool.max_bytes,
        # an empty pool holds only spares: no fragmentation, no holes (not an alarm)
        fragmentation=pool.fragmentation if pool_pages else 0.0,
        metadata_bytes=pool_meta, arenas=pool.arenas,
        spare_bytes=pool.spare_bytes(), used_bytes=pool.used_bytes,
        classes=pool.class_counts(), pool_limit_hit=store.pool_limit_hit,
        reject_compress_poor=store.reject_compress_poor,
        holes=pool.holes if pool_pages else 0.0,
        compactions=pool.compactions, compacted_objects=pool.compacted_objects,
        compacted_bytes=pool.compacted_bytes,
        recompress=store.recodec.name if store.recodec is not None else "",
        recompressed_pages=store.recompressed.pages,
        recompress_saved_bytes=store.recompressed.saved_bytes,
        dedup_pages=dedup_pages, dedup_saved_bytes=dedup_saved,
        dedup_hits=store.dedup.hits if store.dedup is not None else 0,
        dedup_index_bytes=store.dedup.metadata_bytes() if store.dedup is not None else 0,
        headroom_pages=pool_room, headroom_ratio=pool_ratio)
    same = sum(d.same_filled_pages for d in devices)
    tier_stats = []
    for ti, tier in enumerate(files):
        st = tier.stats()
        owned = files.owned_pages(ti)
        # a tier stores the pool codec's objects: its measured ratio, or the pool's assumed
        ratio = st.compression_ratio or store.config.pool.ratio()
        tier_stats.append(dataclasses.replace(
            st, stored_pages=owned, headroom_pages=int(tier.room_bytes * ratio) // PAGE_SIZE))
    file_pages = sum(t.stored_pages for t in tier_stats)
    headroom = pool_room + sum(t.headroom_pages for t in tier_stats)
    device_pages = sum(d.size_bytes for d in devices) // PAGE_SIZE
    stored = same + pool_pages + file_pages
    totals = TotalsStats(
        stored_pages=stored,
        same_filled_pages=same,
        huge_pages=huge,
        compressed_bytes=pool_cbytes,
        pool_bytes=pool.pool_bytes,
        metadata_bytes=(sum(d.metadata_bytes for d in devices) + pool_meta
                        + sum(t.metadata_bytes for t in tier_stats)),
        compression_ratio=((same + pool_pages) * PAGE_SIZE / pool_cbytes
                           if pool_cbytes else 0.0),
        reads=sum(d.reads for d in devices),
        writes=sum(d.writes for d in devices),
        discards=sum(d.discards for d in devices),
        read_bytes=sum(d.read_bytes for d in devices),
        written_bytes=sum(d.written_bytes for d in devices),
        recoveries=store.header.get("recoveries"),
        recovered_leaks=store.header.get("recovered_leaks"),
        recovery_seconds=store.header.get("recovery_micros") / 1e6,
        memory_ratio=(pool_pages * PAGE_SIZE / pool.pool_bytes
                      if pool_pages and pool.pool_bytes else 0.0),
        headroom_pages=headroom,
        backed_fraction=min(1.0, (stored + headroom) / device_pages) if device_pages else 1.0)
    return Stats(devices=devices, tiers=(pstats, *tier_stats), totals=totals,
                 writeback=_writeback(store), cache=_cache(store))


def _writeback(store: StoreState) -> WritebackStats:
    c = store.moves
    files = store.files
    names = store.level_names
    page_reads = sum(d.read_bytes for d in store.devices) // PAGE_SIZE
    pairs = {f"{names[a]}_to_{names[b]}": {"pages": v[0], "bytes": v[0] * PAGE_SIZE,
                                           "batches": v[1]}
             for (a, b), v in sorted(c.pairs.items())}
    levels = {name: {"demotions": c.demotions[k], "refaults": c.refaults[k],
                     "promotions": c.promotions[k]} for k, name in enumerate(names)}
    marks = {"pool": {"high": store.pool_high_bytes, "low": store.pool_low_bytes,
                      "used": store.pool.pool_bytes}}
    for ti, (tier, tc) in enumerate(zip(files, store.config.tiers)):
        if files.has_lower(ti):
            marks[tier.name] = {"high": int(tc.high_watermark * tier.capacity_pages),
                                "low": int(tc.low_watermark * tier.capacity_pages),
                                "used": tier.used_pages}
    return WritebackStats(
        moved_pages=c.moved, aborted_moves=c.aborted,
        promotions=sum(c.promotions), refaults=sum(c.refaults), wasted_promotions=c.wasted,
        file_reads=c.file_reads,
        pool_hit_rate=max(0.0, 1.0 - c.file_reads / page_reads) if page_reads else 1.0,
        moved_bytes=c.moved * PAGE_SIZE, batches=c.batches,
        failed_batches=c.failed_batches, inflight_pages=sum(files.inflight),
        requests=c.requests, epoch=store.epoch, demotions_clock=store.demotions,
        pairs=pairs, levels=levels, watermarks=marks)


def _cache(store: StoreState) -> CacheStats:
    c = store.cache
    return CacheStats(pages=len(c), hits=c.hits, misses=c.misses, capacity_pages=c.capacity,
                      inserts=c.inserts, evictions=c.evictions)
