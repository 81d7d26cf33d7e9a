"""The file tier's allocator: which pages are in use, their checksums, clusters and their states.

Pages are grouped in clusters of ``CLUSTER_PAGES`` contiguous pages (the last one may be
shorter); allocation fills one cluster (the *current* one) before it moves to another, so a
batch of pages written together lands in one extent and the disk sees sequential writes.

Bookkeeping is a handful of compact arrays, never one Python object per page:

* ``used``  one byte per page, 1 while the page is allocated;
* ``csum``  the xxh3-64 of each written page (checked on every read);
* ``count`` array('H'), pages in use per cluster;
* ``state`` bytearray, one state per cluster (free, partial, full, punch pending, punching);
* ``free_stack`` / ``partial_stack`` / ``pending``: array('I') stacks of cluster numbers.

Memory follows what is stored.  The per-page columns (``used``, ``csum``: 9 bytes a page) are
anonymous mappings reserved for the whole capacity with ``MAP_NORESERVE``: the kernel backs a
page of them only when it is first written, and the daemon's ``mlockall(MCL_ONFAULT)`` locks
only pages so backed.  When every cluster sharing a page of a column is empty, that page is
handed back to the kernel (swapfs.kernel.release_memory).  The per-cluster arrays cost 8 bytes
a cluster (8 bytes per MiB of capacity): a 2 TiB tier holds 16 MiB of them and nothing else
until pages are stored.

Everything here is pure bookkeeping: no I/O, no await (see docs/file-tier.md).
"""

from __future__ import annotations

import logging
import mmap
from array import array
from collections.abc import Iterable, Sequence

from ...errors import Misuse, StoreError
from ...kernel import PAGE_SIZE as PAGE
from ...memory import StateMemory

log = logging.getLogger(__name__)

# 256 pages = 1 MiB per cluster:
# * it is the kernel's SWAPFILE_CLUSTER on 4 KiB pages, the unit the kernel's own swap allocator
#   hands to a CPU so that its writes stay sequential;
# * it is the largest FUSE request (max_pages = 256), so one request's worth of pages, or one
#   writeback batch of that size, fits in one cluster and goes out as one pwritev;
# * punching 1 MiB aligned ranges frees whole filesystem blocks and whole extents (and matches
#   typical SSD discard granularity), while a cluster stays small enough that a few partially
#   used clusters do not pin much disk space;
# * a used count per cluster fits array('H').
CLUSTER_PAGES = 256

# cluster states
FREE = 0  # no page used, allocatable
PARTIAL = 1  # some pages used
FULL = 2  # every page used
PENDING = 3  # no page used, queued for punching, not allocatable
PUNCHING = 4  # no page used, punch in progress, not allocatable

# Bytes of per-page metadata (used byte + checksum), and of per-cluster arrays (count, state,
# partial flag, one free-stack entry).
PAGE_META_BYTES = 9
CLUSTER_META_BYTES = 8

# Python 3.11's mmap module lacks the constant; 0x4000 is Linux's value on x86, arm and riscv.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_ZERO = b"\x00"
_ONE = b"\x01"
# Clusters sharing one page of a column: a page of checksums holds 2 clusters' worth, a page
# of used bytes 16.
_CSUM_GROUP = PAGE // (8 * CLUSTER_PAGES)
_USED_GROUP = PAGE // CLUSTER_PAGES


def reservation_bytes(capacity_pages: int) -> int:
    """Address space the per-page columns of a tier of ``capacity_pages`` reserve."""
    nclusters = -(-capacity_pages // CLUSTER_PAGES)
    return nclusters * CLUSTER_PAGES * PAGE_META_BYTES


class ClusterMap:
    """Pages and clusters of one tier.  See the module docstring."""

    def __init__(self, name: str, capacity_pages: int, *, recycle_at_once: bool,
                 memory: StateMemory | None = None) -> None:
        # ``recycle_at_once``: an emptied cluster is allocatable at once (a preallocated tier
        # never punches) instead of waiting in ``pending`` for its punch.
        self.name = name
        self.capacity_pages = capacity_pages
        self.nclusters = ncl = -(-capacity_pages // CLUSTER_PAGES)
        self.recycle_at_once = recycle_at_once
        span = ncl * CLUSTER_PAGES
        # The columns are regions of the store's state memory (``tier.<name>.used`` and
        # ``.csum``): a successor maps them again and rebuilds the rest (``rebuild``).
        self._memory = memory if memory is not None else StateMemory()
        self._maps = (self._memory.reserve(f"tier.{name}.used", span),
                      self._memory.reserve(f"tier.{name}.csum", 8 * span))
        self.used = self._maps[0]
        self.csum = memoryview(self._maps[1]).cast("Q")
        self.count = array("H", bytes(2 * ncl))
        self.state = bytearray(ncl)  # all FREE
        self.in_partial = bytearray(ncl)  # 1 while the cluster has an entry in partial_stack
        self.free_stack = array("I", range(ncl - 1, -1, -1))  # pops cluster 0 first
        self.partial_stack = array("I")
        self.pending = array("I")
        self.cur = -1  # current cluster, -1 when none
        self.cursor = 0  # next page to look at in the current cluster
        self.stored = 0
        self.cluster_switches = 0
        self.release_errors = 0  # pages of the columns the kernel would not take back

    def close(self) -> None:
        """Give the columns' memory back (the map is unusable afterwards)."""
        self.csum.release()
        for m in self._maps:
            m.close()

    def csize(self, c: int) -> int:
        if c == self.nclusters - 1:
            return self.capacity_pages - c * CLUSTER_PAGES
        return CLUSTER_PAGES

    def is_used(self, page: int) -> bool:
        return 0 <= page < self.capacity_pages and self.used[page] == 1

    def _next_cluster(self) -> int:
        """Make another cluster current: a partially used one first, else a free one."""
        st = self.state
        ps = self.partial_stack
        while ps:
            c = ps.pop()
            self.in_partial[c] = 0
            if st[c] == PARTIAL and c != self.cur:
                break
        else:
            if not self.free_stack:
                return -1
            c = self.free_stack.pop()
        self.cur = c
        self.cursor = c * CLUSTER_PAGES
        self.cluster_switches += 1
        return c

    def allocate(self, n: int) -> list[tuple[int, int]]:
        """Up to ``n`` pages as runs ``(start_page, count)``: the current cluster first, then
        partially used clusters, then free ones."""
        runs: list[tuple[int, int]] = []
        used, count, st = self.used, self.count, self.state
        c = self.cur
        while n > 0:
            if c < 0 or count[c] >= self.csize(c):
                c = self._next_cluster()
                if c < 0:
                    break
            start = c * CLUSTER_PAGES
            end = start + self.csize(c)
            pos = self.cursor
            i = used.find(_ZERO, pos, end)
            if i < 0:
                i = used.find(_ZERO, start, pos)
            j = used.find(_ONE, i, end)
            if j < 0:
                j = end
            k = min(j - i, n)
            used[i:i + k] = _ONE * k
            count[c] += k
            st[c] = FULL if count[c] >= end - start else PARTIAL
            self.stored += k
            self.cursor = i + k if i + k < end else start
            n -= k
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + k)
            else:
                runs.append((i, k))
        return runs

    def check_free(self, pages: list[int]) -> None:
        """Raise Misuse unless every page is in use and listed once."""
        cap, used = self.capacity_pages, self.used
        for p in pages:
            if not (0 <= p < cap) or not used[p]:
                raise Misuse(f"tier {self.name!r}: free of page {p!r}, "
                             f"{'out of range' if not 0 <= p < cap else 'not in use'}")
        if len(set(pages)) != len(pages):
            raise Misuse(f"tier {self.name!r}: free of a page listed twice")

    def free_pages(self, pages: Iterable[int]) -> None:
        """Free pages in use (others are skipped); an emptied cluster is queued for its punch
        (or is free at once with ``recycle_at_once``) and its columns' memory given back."""
        used, count, st = self.used, self.count, self.state
        for p in pages:
            if not used[p]:
                continue
            used[p] = 0
            self.stored -= 1
            c = p // CLUSTER_PAGES
            left = count[c] - 1
            count[c] = left
            if left == 0:
                if c == self.cur:
                    self.cur = -1
                if self.recycle_at_once:
                    st[c] = FREE
                    self.free_stack.append(c)
                else:
                    st[c] = PENDING
                    self.pending.append(c)
                self._release(c)
            elif st[c] == FULL:
                st[c] = PARTIAL
                if c != self.cur and not self.in_partial[c]:
                    self.in_partial[c] = 1
                    self.partial_stack.append(c)

    def _release(self, c: int) -> None:
        """Cluster ``c`` emptied: hand back the pages of the columns no cluster uses now."""
        count = self.count
        for m, group, width in ((self._maps[1], _CSUM_GROUP, 8), (self._maps[0], _USED_GROUP, 1)):
            first = c - c % group
            if any(count[first:first + group]):
                continue
            try:
                self._memory.release(m, first * CLUSTER_PAGES * width, PAGE)
            except OSError:
                self.release_errors += 1

    def rebuild(self, pages: set[int]) -> int:
        """After adopting the columns: ``pages`` (the pages slots name) are the pages in use;
        every other page marked used is freed (returned: the leaks).  Counts, states and stacks
        are rebuilt; a cluster a leak leaves empty is queued for its punch.  StoreError if a
        slot names a page out of range or not marked used (its checksum was never recorded)."""
        used, cap = self.used, self.capacity_pages
        for p in pages:
            if not 0 <= p < cap or used[p] != 1:
                raise StoreError(f"tier {self.name!r}: a slot names page {p}, which is "
                                 f"{'out of range' if not 0 <= p < cap else 'not in use'}")
        leaked_in: set[int] = set()
        leaked = 0
        for start, end in self._memory.data_ranges(self._maps[0]):
            i = used.find(_ONE, start, min(end, cap))
            while i >= 0:
                if i not in pages:
                    used[i] = 0
                    leaked += 1
                    leaked_in.add(i // CLUSTER_PAGES)
                i = used.find(_ONE, i + 1, min(end, cap))
        count = self.count
        for c in range(self.nclusters):
            count[c] = 0
        for p in pages:
            count[p // CLUSTER_PAGES] += 1
        self.free_stack = array("I")
        self.partial_stack = array("I")
        self.pending = array("I")
        for c in range(self.nclusters - 1, -1, -1):  # free ones pop lowest first
            self.in_partial[c] = 0
            if count[c] >= self.csize(c):
                self.state[c] = FULL
            elif count[c]:
                self.state[c] = PARTIAL
                self.in_partial[c] = 1
                self.partial_stack.append(c)
            elif c in leaked_in and not self.recycle_at_once:
                self.state[c] = PENDING
                self.pending.append(c)
            else:
                self.state[c] = FREE
                self.free_stack.append(c)
        for c in leaked_in:
            if not count[c]:
                self._release(c)
        self.cur = -1
        self.cursor = 0
        self.stored = len(pages)
        return leaked

    def check_runs(self, runs: Sequence[tuple[int, int]]) -> int:
        """Pages in ``runs``; Misuse unless every run is in range and allocated."""
        total = 0
        cap, used = self.capacity_pages, self.used
        for s, k in runs:
            if k <= 0 or s < 0 or s + k > cap:
                raise Misuse(f"tier {self.name!r}: run ({s}, {k}) out of range")
            if used.find(_ZERO, s, s + k) >= 0:
                raise Misuse(f"tier {self.name!r}: run ({s}, {k}) holds pages not allocated")
            total += k
        return total

    def take_pending(self) -> list[int]:
        """The clusters queued for punching, sorted, now PUNCHING."""
        clusters = sorted(self.pending)
        self.pending = array("I")
        st = self.state
        for c in clusters:
            st[c] = PUNCHING
        return clusters

    def recycle(self, clusters: Sequence[int]) -> None:
        """Punched (or not punchable) clusters become allocatable, the lowest on top."""
        st = self.state
        for c in reversed(clusters):
            st[c] = FREE
            self.free_stack.append(c)

    @property
    def clusters_in_use(self) -> int:
        st = self.state
        return self.nclusters - st.count(FREE) - st.count(PENDING) - st.count(PUNCHING)

    @property
    def metadata_bytes(self) -> int:
        """Memory the bookkeeping holds: the per-cluster arrays, and the per-page columns of
        the clusters in use (a cluster's columns are backed while it holds a page)."""
        fixed = (2 + 1 + 1) * self.nclusters + 4 * (len(self.free_stack) + len(self.partial_stack)
                                                    + len(self.pending))
        return fixed + self.clusters_in_use * CLUSTER_PAGES * PAGE_META_BYTES

    def check_invariants(self) -> None:
        """Counts vs used bytes vs cluster states and lists; AssertionError names the
        discrepancy.  Cost: one pass over the clusters."""
        used, count, st = self.used, self.count, self.state
        n = self.name

        def fail(what: str) -> None:
            raise AssertionError(f"tier {n}: {what}")

        total = 0
        for c in range(self.nclusters):
            s = c * CLUSTER_PAGES
            size = self.csize(c)
            if count[c] == 0 and used.find(_ONE, s, s + size) < 0:
                k = 0
                if used[s:s + size].strip(_ZERO):
                    fail(f"cluster {c}: used bytes hold junk")
            else:
                chunk = used[s:s + size]
                k = chunk.count(1)
                if k + chunk.count(0) != size:
                    fail(f"cluster {c}: used bytes hold junk")
            total += k
            if count[c] != k:
                fail(f"cluster {c}: used count {count[c]} != used bytes {k}")
            if k == 0:
                if st[c] not in (FREE, PENDING, PUNCHING):
                    fail(f"cluster {c}: empty but state {st[c]}")
                if c == self.cur:
                    fail(f"cluster {c}: empty but current")
            elif k == size:
                if st[c] != FULL:
                    fail(f"cluster {c}: full but state {st[c]}")
            else:
                if st[c] != PARTIAL:
                    fail(f"cluster {c}: partial but state {st[c]}")
                if c != self.cur and not self.in_partial[c]:
                    fail(f"cluster {c}: partial, not current and not on the partial stack")
        if total != self.stored:
            fail(f"stored_pages {self.stored} != used bytes {total}")
        fs = list(self.free_stack)
        if len(set(fs)) != len(fs):
            fail("free stack holds duplicates")
        if sorted(fs) != [c for c in range(self.nclusters) if st[c] == FREE]:
            fail("free stack != clusters in state free")
        if sorted(self.pending) != [c for c in range(self.nclusters) if st[c] == PENDING]:
            fail("punch queue != clusters in state pending")
        ps = list(self.partial_stack)
        if len(set(ps)) != len(ps):
            fail("partial stack holds duplicates")
        if sorted(ps) != [c for c in range(self.nclusters) if self.in_partial[c]]:
            fail("partial stack != partial flags")
        if self.cur >= 0 and st[self.cur] not in (PARTIAL, FULL):
            fail(f"current cluster {self.cur} in state {st[self.cur]}")
