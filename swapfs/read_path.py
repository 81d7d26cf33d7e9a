"""The read path: a page from whatever tier holds it, refaults and
promotion's trigger.

:class:`ReadPath` is the state layer (:class:`swapfs.state.StoreState`)
with ``read`` on top; :class:`swapfs.write_path.WritePath` adds writes and
discard, and :class:`swapfs.store.Store` is the facade over both.

A read takes each page from where its slot says: a fill word, the pool
(decompressed from a memoryview of the pool's memory, within the step), the
swap cache, or a file tier (its object pinned while read, verified and
decompressed: a free of it meanwhile is deferred, docs/store.md).  A read of a demoted page is a refault: a hot
one is promoted to the pool, which is a write of the slot
(``WritePath._promote``).  The pool path never awaits.
"""

from __future__ import annotations

from .cache import file_key
from .codec import fill_page
from .config import Config
from .errors import BackingIOError, Corruption, InvariantError, OutOfRange
from .kernel import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from .memory import StateMemory
from .policy import Policy, make_policy
from .slots import (
    ALT,
    EPOCH_MASK,
    FILE0,
    HUGE,
    KIND_MASK,
    LENGTH_MASK,
    POOL,
    SAME,
    SHADOW,
    file_kind,
    in_file,
    kind_of,
    length_of,
    slot_key,
    tier_level,
    tier_of_kind,
)
from .state import CACHE_PAGES, Device, StoreState
from .tiers.file import ChecksumError, TierIOError


class ReadPath(StoreState):
    """The state and the paths that read it."""

    def __init__(self, config: Config, *, cache_pages: int = CACHE_PAGES,
                 memory: StateMemory | None = None) -> None:
        super().__init__(config, cache_pages=cache_pages, memory=memory)
        # Which refaults are promoted, which pages are demoted first.
        self.policy: Policy = make_policy(config.writeback.policy, self)

    async def read(self, dev: Device, offset: int, size: int) -> bytes | bytearray:
        """Up to ``size`` bytes at ``offset``; short (or empty) past the end.

        Never-written and discarded ranges read as zeros.
        """
        if size == PAGE_SIZE and not offset & PAGE_MASK and 0 <= offset < dev.size_bytes:
            # One compressed page, what a swap-in asks for: answered without
            # the general path's calls (a few tenths of a microsecond each);
            # a hot loop, inlining the slot encoding.
            slot = offset >> PAGE_SHIFT
            table = dev.table
            if table.info[slot] & KIND_MASK == POOL:
                dev.reads += 1
                dev.read_bytes += PAGE_SIZE
                table.epoch[slot] = self.epoch
                return self.load_page(dev, slot)
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
                return await self._page(dev, offset >> PAGE_SHIFT)
            return await self._read_pages(dev, offset >> PAGE_SHIFT, n >> PAGE_SHIFT)
        first = offset >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        head = offset & PAGE_MASK
        if first == last:
            return (await self._page(dev, first))[head:head + n]
        buf = await self._read_pages(dev, first, last - first + 1)
        del buf[head + n:]
        del buf[:head]
        return buf

    async def _page(self, dev: Device, slot: int) -> bytes:
        """The content of one slot, from whatever tier holds it."""
        if in_file(dev.table.info[slot]):
            out = bytearray(PAGE_SIZE)
            await self._read_file_pages(dev, out, [(0, slot)])
            return bytes(out)
        if dev.table.info[slot]:  # (an empty slot's cluster may hold no memory: leave it so)
            dev.table.epoch[slot] = self.epoch
        return self.load_page(dev, slot)

    async def _read_pages(self, dev: Device, first: int, npages: int) -> bytearray:
        """A hot loop: inlines the slot encoding."""
        out = bytearray(npages << PAGE_SHIFT)
        table = dev.table
        handles = table.handles
        info = table.info
        epoch = table.epoch
        ep = self.epoch
        pool = self.pool
        mem = pool.mem
        decompress = self.codec.decompress
        redecompress = self.recodec.decompress if self.recodec is not None else decompress
        on_disk: list[tuple[int, int]] | None = None
        o = 0
        for s in range(first, first + npages):
            i = info[s]
            if i:
                k = i & KIND_MASK
                h = handles[s]
                if k == POOL:
                    out[o:o + PAGE_SIZE] = (redecompress if i & ALT else decompress)(
                        mem[h:h + ((i >> 4) & LENGTH_MASK)])
                    epoch[s] = ep
                elif k == SAME:
                    if h:
                        out[o:o + PAGE_SIZE] = fill_page(h)
                elif k == HUGE:
                    out[o:o + PAGE_SIZE] = mem[h:h + PAGE_SIZE]
                    epoch[s] = ep
                elif k >= FILE0:
                    if on_disk is None:
                        on_disk = []
                    on_disk.append((o, s))
                else:
                    raise InvariantError(f"{dev.name}: slot {s} has unknown kind {k}")
            o += PAGE_SIZE
        if on_disk:
            await self._read_file_pages(dev, out, on_disk)
        return out

    async def _read_file_pages(self, dev: Device, out: bytearray,
                               where: list[tuple[int, int]]) -> None:
        """Fill ``out`` at each (offset, slot) of ``where`` from the file
        tiers.  The pages are pinned while read: a concurrent write or
        discard of their slots defers freeing them, so no other slot can
        reuse them under the pread.  A slot that changed during the read is
        read again (the newer content wins)."""
        table = dev.table
        info = table.info
        handles = table.handles
        cache = self.cache
        files = self.files
        base = slot_key(dev.index, 0)
        promoted = False
        self.moves.file_reads += len(where)
        pending = where
        while pending:
            by_tier: dict[int, list[tuple[int, int, int, int]]] = {}
            for o, s in pending:
                i = info[s]
                if not in_file(i):  # it left the file tiers meanwhile
                    out[o:o + PAGE_SIZE] = self.load_page(dev, s)
                    continue
                ti = tier_of_kind(kind_of(i))
                p = handles[s]
                hit = cache.get(file_key(ti, p))
                if hit is not None:
                    cache.hits += 1
                    out[o:o + PAGE_SIZE] = hit
                    promoted |= self._accessed(dev, s, i, ti, hit)
                    continue
                cache.misses += 1
                by_tier.setdefault(ti, []).append((o, s, p, length_of(i)))
            pending = []
            # Pin the objects of every tier before the first await: an object
            # looked up now must not be freed and its segment reused before
            # its read.
            pinned: dict[int, list[int]] = {}
            for ti, items in by_tier.items():
                items.sort(key=lambda x: x[2])
                pinned[ti] = files.pin(ti, [p for _, _, p, _ in items])
            try:
                for ti, items in by_tier.items():
                    try:
                        data = await files.read_pages(ti, [(p, n, base | s)
                                                           for _, s, p, n in items])
                    except ChecksumError as e:
                        raise Corruption(f"{dev.name}: {e}") from None
                    except TierIOError as e:
                        raise BackingIOError(f"{dev.name}: {e}") from None
                    finally:
                        files.unpin(pinned.pop(ti))
                    kind = file_kind(ti)
                    for (o, s, p, _n), page in zip(items, data):
                        i = info[s]
                        if kind_of(i) == kind and handles[s] == p:
                            out[o:o + PAGE_SIZE] = page
                            cache.put(file_key(ti, p), page)
                            promoted |= self._accessed(dev, s, i, ti, page)
                        else:
                            pending.append((o, s))
            finally:
                for keys in pinned.values():  # reads not done (an error or cancelled)
                    files.unpin(keys)
        if promoted:
            await files.punch()  # a promotion may have left a cluster entirely free

    def _accessed(self, dev: Device, s: int, i: int, ti: int, page: object) -> bool:
        """A page of file tier ``ti`` (slot ``s``, info ``i``) was just read.

        Without a shadow its access epoch is updated.  With one, the read is
        a refault: if the policy finds the distance (demotions since the page
        was demoted) short enough (swapfs/policy.py) and the pool has room,
        the page is promoted to the pool; otherwise the shadow is
        re-armed at the current demotion count, so a second read soon after
        finds a short distance.  No await: atomic.  True if promoted."""
        epoch = dev.table.epoch
        if not i & SHADOW:
            epoch[s] = self.epoch
            return False
        self.moves.refaults[tier_level(ti)] += 1
        dist = (self.demotions - epoch[s]) & EPOCH_MASK
        if self.policy.promote(dist) and self._promote(dev, s, ti, page):
            return True
        epoch[s] = self.demotions & EPOCH_MASK
        return False

    def _promote(self, dev: Device, s: int, ti: int, page: object) -> bool:
        """Move slot ``s`` (a page of file tier ``ti`` whose content is
        ``page``) to the pool if it goes there; a write of the slot, so the
        write path's (``WritePath._promote``).  No await."""
        raise NotImplementedError
