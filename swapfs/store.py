"""The store: devices, slot tables and the read, write and discard paths.

Usable without FUSE: the FUSE adapter (swapfs/fs.py) translates requests to
``Store.read``, ``Store.write`` and ``Store.discard`` and maps the errors of
swapfs.errors to errnos.

Everything runs in the trio loop.  The methods are ``async def`` for the
tiers to come, but the pool path never awaits: a request is served from
start to end in one step, so the FUSE layer answers it inline.  Which state
relies on that is written down in docs/store.md.

Per page, the hot loops bind everything they need to locals and create no
objects beyond the compressor's output and a memoryview slice.
"""

from __future__ import annotations

import logging
import time

from swapfs.codec import ZERO_PAGE, fill_page, make_codec, same_fill_word
from swapfs.config import PAGE_SIZE, Config, DeviceConfig
from swapfs.errors import NoSpace, OutOfRange
from swapfs.slots import EMPTY, HUGE, KIND_MASK, KIND_NAMES, POOL, SAME, SlotTable
from swapfs.stats import DeviceStats, PoolStats, Stats, TotalsStats
from swapfs.tiers.pool import INDEX_BITS, INDEX_MASK, Pool, PoolFull, class_size

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_MASK = PAGE_SIZE - 1
_LAST_WORD = PAGE_SIZE // 8 - 1
_HUGE_INFO = PAGE_SIZE << 4 | HUGE
# Slots compared at once when a discard looks for stored pages.
_DISCARD_CHUNK = 4096
_ZERO_INFO_CHUNK = bytes(4 * _DISCARD_CHUNK)
# At most one NoSpace warning per this many seconds (the count is in stats).
_NOSPACE_LOG_INTERVAL = 10.0

assert PAGE_SIZE == 1 << PAGE_SHIFT


class Device:
    """A virtual swap device: its slot table and counters."""

    __slots__ = ("name", "index", "size_bytes", "npages", "config", "table",
                 "stored_pages", "same_filled_pages", "pool_pages", "huge_pages",
                 "compressed_bytes", "pool_bytes", "reads", "writes", "discards",
                 "read_bytes", "written_bytes", "discarded_bytes", "nospace_errors")

    def __init__(self, index: int, config: DeviceConfig) -> None:
        self.name = config.name
        self.index = index
        self.size_bytes = config.size
        self.npages = config.size // PAGE_SIZE
        self.config = config
        self.table = SlotTable(self.npages)
        self.stored_pages = 0
        self.same_filled_pages = 0
        self.pool_pages = 0
        self.huge_pages = 0
        self.compressed_bytes = 0
        self.pool_bytes = 0
        self.reads = 0
        self.writes = 0
        self.discards = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.discarded_bytes = 0
        self.nospace_errors = 0

    def __repr__(self) -> str:
        return f"<Device {self.name} {self.size_bytes} bytes>"


class Store:
    """Devices over a compressed memory pool."""

    def __init__(self, config: Config, *, arena_bytes: int | None = None) -> None:
        self.config = config
        self.codec = make_codec(config.pool.algorithm, config.pool.level)
        self.pool = Pool(config.pool.max_bytes, **({"arena_bytes": arena_bytes}
                                                    if arena_bytes else {}))
        # A page is kept compressed only if it compresses to at most this.
        self.accept_limit = int(config.pool.accept_ratio * PAGE_SIZE)
        self.devices = [Device(i, dc) for i, dc in enumerate(config.devices)]
        self._by_name = {d.name: d for d in self.devices}
        self._last_nospace_log = -_NOSPACE_LOG_INTERVAL

    def device(self, name: str) -> Device:
        return self._by_name[name]

    def device_stored_pages(self, dev: Device) -> int:
        """Slots of ``dev`` holding a page (same-filled ones included)."""
        return dev.stored_pages

    async def aclose(self) -> None:
        """Nothing to stop yet (no background tasks)."""

    # -- write ------------------------------------------------------------

    async def write(self, dev: Device, offset: int, data: object) -> int:
        """Store ``data`` at ``offset``; return its length.

        OutOfRange (nothing written) if it does not fit in the device.
        NoSpace if the pool fills: the pages before the failing one are
        stored, it and the ones after keep their old content.
        """
        mv = memoryview(data)  # type: ignore[arg-type]
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        if offset < 0 or offset + n > dev.size_bytes:
            raise OutOfRange(f"{dev.name}: write of {n} bytes at {offset} past the end "
                             f"({dev.size_bytes} bytes)")
        dev.writes += 1
        if n == 0:
            return 0
        try:
            if not (offset | n) & PAGE_MASK:
                self._store_pages(dev, offset >> PAGE_SHIFT, mv, n >> PAGE_SHIFT)
            else:
                self._write_unaligned(dev, offset, mv)
        except PoolFull as e:
            dev.nospace_errors += 1
            self._log_nospace(dev, e)
            raise NoSpace(f"{dev.name}: no space for write at {offset}: {e}") from None
        dev.written_bytes += n
        return n

    def _log_nospace(self, dev: Device, e: PoolFull) -> None:
        now = time.monotonic()
        if now - self._last_nospace_log >= _NOSPACE_LOG_INTERVAL:
            self._last_nospace_log = now
            log.warning("%s: write refused, no space: %s (no lower tier configured)", dev.name, e)

    def _write_unaligned(self, dev: Device, offset: int, mv: memoryview) -> None:
        n = mv.nbytes
        end = offset + n
        slot = offset >> PAGE_SHIFT
        pos = 0
        head = offset & PAGE_MASK
        if head or n < PAGE_SIZE:
            # The first page is partial: read, modify, write.
            take = min(PAGE_SIZE - head, n)
            page = bytearray(self._load_page(dev, slot))
            page[head:head + take] = mv[:take]
            self._store_pages(dev, slot, memoryview(page), 1)
            pos = take
            slot += 1
        nfull = (end >> PAGE_SHIFT) - slot
        if nfull > 0:
            self._store_pages(dev, slot, mv[pos:pos + (nfull << PAGE_SHIFT)], nfull)
            pos += nfull << PAGE_SHIFT
            slot += nfull
        if pos < n:
            # The last page is partial.
            page = bytearray(self._load_page(dev, slot))
            page[:n - pos] = mv[pos:]
            self._store_pages(dev, slot, memoryview(page), 1)

    def _store_pages(self, dev: Device, first: int, mv: memoryview, npages: int) -> None:
        """Store ``npages`` whole pages of ``mv`` in slots ``first``...

        For each page the new location is allocated and written before the
        old one is freed and the handle replaced, all without an await, so a
        PoolFull leaves the slot as it was.
        """
        table = dev.table
        handles = table.handles
        info = table.info
        compress = self.codec.compress
        pool = self.pool
        alloc = pool.alloc
        free = pool.free_object
        limit = self.accept_limit
        q = mv.cast("Q")
        d_stored = d_same = d_pool = d_huge = d_cbytes = d_pbytes = 0
        o = 0
        try:
            for s in range(first, first + npages):
                qi = o >> 3
                if q[qi] == q[qi + _LAST_WORD] and (
                        (w := same_fill_word(mv[o:o + PAGE_SIZE])) is not None):
                    new_h = w
                    new_i = SAME
                    d_same += 1
                else:
                    page = mv[o:o + PAGE_SIZE]
                    c = compress(page)
                    n = len(c)
                    if n > limit:
                        new_h = alloc(page, PAGE_SIZE)
                        new_i = _HUGE_INFO
                        d_huge += 1
                        d_cbytes += PAGE_SIZE
                        d_pbytes += PAGE_SIZE
                    else:
                        new_h = alloc(c, n)
                        new_i = n << 4 | POOL
                        d_pool += 1
                        d_cbytes += n
                        d_pbytes += (n + 31) & ~31
                old = info[s]
                if old == EMPTY:
                    d_stored += 1
                elif old == SAME:
                    d_same -= 1
                else:
                    n = old >> 4
                    free(handles[s], n)
                    d_cbytes -= n
                    d_pbytes -= (n + 31) & ~31
                    if old & KIND_MASK == POOL:
                        d_pool -= 1
                    else:
                        d_huge -= 1
                handles[s] = new_h
                info[s] = new_i
                o += PAGE_SIZE
        finally:
            dev.stored_pages += d_stored
            dev.same_filled_pages += d_same
            dev.pool_pages += d_pool
            dev.huge_pages += d_huge
            dev.compressed_bytes += d_cbytes
            dev.pool_bytes += d_pbytes

    # -- read -------------------------------------------------------------

    async def read(self, dev: Device, offset: int, size: int) -> bytes | bytearray:
        """Up to ``size`` bytes at ``offset``; short (or empty) past the end.

        Never-written and discarded ranges read as zeros.
        """
        if offset < 0 or size < 0:
            raise OutOfRange(f"{dev.name}: read of {size} bytes at {offset}")
        dev.reads += 1
        end = min(offset + size, dev.size_bytes)
        if end <= offset:
            return b""
        n = end - offset
        dev.read_bytes += n
        if not (offset | n) & PAGE_MASK:
            if n == PAGE_SIZE:
                return self._load_page(dev, offset >> PAGE_SHIFT)
            return self._read_pages(dev, offset >> PAGE_SHIFT, n >> PAGE_SHIFT)
        first = offset >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        head = offset & PAGE_MASK
        if first == last:
            return self._load_page(dev, first)[head:head + n]
        buf = self._read_pages(dev, first, last - first + 1)
        del buf[head + n:]
        del buf[:head]
        return buf

    def _load_page(self, dev: Device, slot: int) -> bytes:
        """The content of one slot, as bytes."""
        i = dev.table.info[slot]
        k = i & KIND_MASK
        if k == EMPTY:
            return ZERO_PAGE
        h = dev.table.handles[slot]
        if k == SAME:
            return fill_page(h)
        if k == POOL:
            return self.codec.decompress(self.pool.view(h, i >> 4))
        if k == HUGE:
            return bytes(self.pool.view(h, PAGE_SIZE))
        raise AssertionError(f"{dev.name}: slot {slot} has unknown kind {k}")

    def _read_pages(self, dev: Device, first: int, npages: int) -> bytearray:
        out = bytearray(npages << PAGE_SHIFT)
        table = dev.table
        handles = table.handles
        info = table.info
        pool = self.pool
        views = pool.views
        osize = pool.osize
        decompress = self.codec.decompress
        o = 0
        for s in range(first, first + npages):
            i = info[s]
            if i:
                k = i & KIND_MASK
                h = handles[s]
                if k == POOL:
                    aid = h >> INDEX_BITS
                    off = (h & INDEX_MASK) * osize[aid]
                    out[o:o + PAGE_SIZE] = decompress(views[aid][off:off + (i >> 4)])  # type: ignore[index]
                elif k == SAME:
                    if h:
                        out[o:o + PAGE_SIZE] = fill_page(h)
                elif k == HUGE:
                    aid = h >> INDEX_BITS
                    off = (h & INDEX_MASK) * PAGE_SIZE
                    out[o:o + PAGE_SIZE] = views[aid][off:off + PAGE_SIZE]  # type: ignore[index]
                else:
                    raise AssertionError(f"{dev.name}: slot {s} has unknown kind {k}")
            o += PAGE_SIZE
        return out

    # -- discard ----------------------------------------------------------

    async def discard(self, dev: Device, offset: int, length: int) -> None:
        """Punch a hole: the range reads as zeros afterwards.

        Whole pages are freed at once; partial pages at the ends are zeroed
        in place (read, modify, write; NoSpace is possible there in theory,
        if the zeroed page compresses worse).  The range is clipped to the
        device.
        """
        dev.discards += 1
        start = max(offset, 0)
        end = min(offset + length, dev.size_bytes)
        if end <= start:
            return
        dev.discarded_bytes += end - start
        first_full = (start + PAGE_MASK) >> PAGE_SHIFT
        end_full = end >> PAGE_SHIFT
        try:
            if first_full > end_full:
                # Inside one page, touching neither of its ends.
                self._zero_part(dev, start >> PAGE_SHIFT, start & PAGE_MASK, end & PAGE_MASK)
                return
            if start & PAGE_MASK:
                self._zero_part(dev, start >> PAGE_SHIFT, start & PAGE_MASK, PAGE_SIZE)
            if end_full > first_full:
                self._free_slots(dev, first_full, end_full)
            if end & PAGE_MASK:
                self._zero_part(dev, end_full, 0, end & PAGE_MASK)
        except PoolFull as e:
            dev.nospace_errors += 1
            self._log_nospace(dev, e)
            raise NoSpace(f"{dev.name}: no space to zero part of a page: {e}") from None

    def _zero_part(self, dev: Device, slot: int, a: int, b: int) -> None:
        if dev.table.info[slot] == EMPTY:
            return
        page = bytearray(self._load_page(dev, slot))
        page[a:b] = bytes(b - a)
        self._store_pages(dev, slot, memoryview(page), 1)

    def _free_slots(self, dev: Device, first: int, end: int) -> None:
        table = dev.table
        handles = table.handles
        info = table.info
        info_bytes = memoryview(info).cast("B")
        free = self.pool.free_object
        d_stored = d_same = d_pool = d_huge = d_cbytes = d_pbytes = 0
        for c0 in range(first, end, _DISCARD_CHUNK):
            c1 = min(c0 + _DISCARD_CHUNK, end)
            # Skip runs of empty slots with one memcmp.
            if info_bytes[c0 * 4:c1 * 4] == _ZERO_INFO_CHUNK[:(c1 - c0) * 4]:
                continue
            for s in range(c0, c1):
                old = info[s]
                if old == EMPTY:
                    continue
                d_stored -= 1
                if old == SAME:
                    d_same -= 1
                else:
                    n = old >> 4
                    free(handles[s], n)
                    d_cbytes -= n
                    d_pbytes -= (n + 31) & ~31
                    if old & KIND_MASK == POOL:
                        d_pool -= 1
                    else:
                        d_huge -= 1
                handles[s] = 0
                info[s] = 0
        info_bytes.release()
        dev.stored_pages += d_stored
        dev.same_filled_pages += d_same
        dev.pool_pages += d_pool
        dev.huge_pages += d_huge
        dev.compressed_bytes += d_cbytes
        dev.pool_bytes += d_pbytes

    # -- stats and checks -------------------------------------------------

    def stats(self) -> Stats:
        pool = self.pool
        devices = tuple(
            DeviceStats(
                name=d.name, size_bytes=d.size_bytes, stored_pages=d.stored_pages,
                same_filled_pages=d.same_filled_pages, pool_pages=d.pool_pages,
                huge_pages=d.huge_pages, compressed_bytes=d.compressed_bytes,
                pool_bytes=d.pool_bytes, metadata_bytes=d.table.metadata_bytes(),
                reads=d.reads, writes=d.writes, discards=d.discards, read_bytes=d.read_bytes,
                written_bytes=d.written_bytes, discarded_bytes=d.discarded_bytes,
                nospace_errors=d.nospace_errors)
            for d in self.devices)
        huge = sum(d.huge_pages for d in devices)
        pool_meta = pool.metadata_bytes()
        pstats = PoolStats(
            name="pool", kind="pool", algorithm=self.codec.name, stored_pages=pool.objects,
            huge_pages=huge, compressed_bytes=pool.compressed_bytes,
            pool_bytes=pool.pool_bytes, max_bytes=pool.max_bytes,
            fragmentation=pool.fragmentation, metadata_bytes=pool_meta, arenas=pool.arenas,
            spare_bytes=pool.spare_bytes(), classes=pool.class_counts())
        same = sum(d.same_filled_pages for d in devices)
        totals = TotalsStats(
            stored_pages=same + pool.objects,
            same_filled_pages=same,
            huge_pages=huge,
            compressed_bytes=pool.compressed_bytes,
            pool_bytes=pool.pool_bytes,
            metadata_bytes=sum(d.metadata_bytes for d in devices) + pool_meta,
            compression_ratio=(pool.objects * PAGE_SIZE / pool.pool_bytes
                               if pool.pool_bytes else 0.0),
            reads=sum(d.reads for d in devices),
            writes=sum(d.writes for d in devices),
            discards=sum(d.discards for d in devices),
            read_bytes=sum(d.read_bytes for d in devices),
            written_bytes=sum(d.written_bytes for d in devices))
        return Stats(devices=devices, tiers=(pstats,), totals=totals)

    def check_invariants(self) -> None:
        """Walk every table; AssertionError naming the first discrepancy."""
        pool = self.pool
        live: dict[int, list[int]] = {}
        total_cbytes = 0
        for dev in self.devices:
            table = dev.table
            if not (len(table.handles) == len(table.info) == len(table.epoch) == dev.npages):
                raise AssertionError(f"{dev.name}: slot table columns are not {dev.npages} long")
            counts = {EMPTY: 0, SAME: 0, POOL: 0, HUGE: 0}
            cbytes = pbytes = 0
            for s, (i, h) in enumerate(zip(table.info, table.handles)):
                if i == EMPTY:
                    if h:
                        raise AssertionError(f"{dev.name}: empty slot {s} has handle {h:#x}")
                    counts[EMPTY] += 1
                    continue
                k = i & KIND_MASK
                n = i >> 4
                if k == SAME:
                    if n:
                        raise AssertionError(f"{dev.name}: same-filled slot {s} has length {n}")
                elif k == POOL or k == HUGE:
                    if k == POOL and not 0 < n <= self.accept_limit:
                        raise AssertionError(f"{dev.name}: pool slot {s} has length {n}, "
                                             f"accept limit {self.accept_limit}")
                    if k == HUGE and n != PAGE_SIZE:
                        raise AssertionError(f"{dev.name}: huge slot {s} has length {n}")
                    aid = h >> INDEX_BITS
                    if not 0 <= aid < len(pool.bufs) or pool.osize[aid] != class_size(n):
                        raise AssertionError(f"{dev.name}: slot {s} ({KIND_NAMES[k]}, {n} bytes) "
                                             f"points at arena {aid} of another size class")
                    live.setdefault(aid, []).append(h & INDEX_MASK)
                    cbytes += n
                    pbytes += class_size(n)
                else:
                    raise AssertionError(f"{dev.name}: slot {s} has unknown kind {k}")
                counts[k] += 1
            total_cbytes += cbytes
            want = {
                "stored_pages": dev.npages - counts[EMPTY],
                "same_filled_pages": counts[SAME],
                "pool_pages": counts[POOL],
                "huge_pages": counts[HUGE],
                "compressed_bytes": cbytes,
                "pool_bytes": pbytes,
            }
            for name, value in want.items():
                if getattr(dev, name) != value:
                    raise AssertionError(f"{dev.name}: {name} counts {getattr(dev, name)}, "
                                         f"slot table holds {value}")
        pool.check_invariants(live, total_cbytes)
        st = self.stats()
        t = st.totals
        tier_pages = sum(tier.stored_pages for tier in st.tiers)
        dev_pages = sum(d.stored_pages for d in st.devices)
        if not t.stored_pages == t.same_filled_pages + tier_pages == dev_pages:
            raise AssertionError(f"accounting: totals.stored_pages {t.stored_pages}, same-filled "
                                 f"{t.same_filled_pages} + tiers {tier_pages}, devices {dev_pages}")
        if sum(d.compressed_bytes for d in st.devices) != st.pool.compressed_bytes:
            raise AssertionError("accounting: devices' compressed_bytes do not sum to the pool's")
        if sum(d.pool_bytes for d in st.devices) > st.pool.pool_bytes:
            raise AssertionError("accounting: devices' class bytes exceed the pool's memory")
