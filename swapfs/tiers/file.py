"""The file tier: 4 KiB pages, uncompressed, in a backing file on an ordinary filesystem.

Layout: page ``p`` of the tier lives at byte ``p * PAGE`` of the backing file; the file is
``capacity_pages * PAGE`` bytes long and sparse unless ``preallocate`` is set.  Pages are grouped
in clusters of ``CLUSTER_PAGES`` contiguous pages (the last one may be shorter); allocation
fills one cluster (the *current* one) before it moves to another, so a batch of pages written
together lands in one extent and the disk sees sequential writes.

Bookkeeping is a handful of compact arrays, never one Python object per page:

* ``_used``    bytearray, one byte per page: 1 while the page is allocated;
* ``_csum``    array('Q'), the xxh3-64 of each written page (checked on every read);
* ``_count``   array('H'), pages in use per cluster;
* ``_state``   bytearray, one state per cluster (free, partial, full, punch pending, punching);
* ``_free_stack`` / ``_partial_stack`` / ``_pending``: array('I') stacks of cluster numbers.

About 9 bytes of metadata per page of capacity.

Concurrency (one trio loop owns this object; see docs/file-tier.md): ``allocate`` and ``free``
never await, so each runs atomically between two awaits.  ``write``, ``read``, ``read_many`` and
``punch_free_clusters`` do their system calls in worker threads, at most ``max_inflight`` at
once.  The pages passed to ``write`` belong to that write until it returns; if it raises
(any exception, cancellation included) it frees them.  A cluster that becomes entirely free is
not allocatable again until it has been punched, so a punch can never hit data written after it.

Safety at rest: the backing file is opened without following symlinks, created exclusively when
absent, and refused unless the open descriptor is a regular file of ours with a single link; it
is made mode 0600.  Pages are encrypted (AES-256-XTS, a random key per ``open``, never written
anywhere; the page number is the tweak) unless ``encrypt=False``; checksums are of the plaintext
and stay in memory.  ``close`` empties the file (truncates it to zero bytes).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from array import array
from collections.abc import Iterable, Sequence

import trio
import xxhash
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import StoreError
from ..kernel import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from ..kernel import PAGE_SIZE as PAGE
from ..stats import FileTierStats

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

try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover
    _IOV_MAX = 1024
if _IOV_MAX <= 0:  # pragma: no cover
    _IOV_MAX = 1024

_xxh3 = xxhash.xxh3_64_intdigest


class TierFull(StoreError):
    """No free page in the tier, or its filesystem reported ENOSPC."""


class TierIOError(StoreError):
    """A pread/pwrite (or preadv/pwritev) on the backing file failed; ``errno`` says why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class _PageCipher:
    """AES-256-XTS, one page per call, the backing file's page number as the tweak.

    As dm-crypt's swap with a random key (``aes-xts-plain64``): the key is 64 random bytes made
    at open and held only in this object (the daemon's memory is locked); the tweak is the page
    number as 16 little-endian bytes, so equal pages at different places encrypt differently.
    A Cipher and an encryptor per page (the tweak is per page): about 4.5 us a page.
    """

    __slots__ = ("_alg",)

    def __init__(self) -> None:
        key = os.urandom(64)
        while key[:32] == key[32:]:  # XTS refuses equal halves (2**-256: never, but be exact)
            key = os.urandom(64)
        self._alg = algorithms.AES(key)

    def encrypt(self, page: int, data: memoryview) -> bytes:
        enc = Cipher(self._alg, modes.XTS(page.to_bytes(16, "little"))).encryptor()
        return enc.update(data)

    def decrypt(self, page: int, data: memoryview | bytes) -> bytes:
        dec = Cipher(self._alg, modes.XTS(page.to_bytes(16, "little"))).decryptor()
        return dec.update(data)


class ChecksumError(StoreError):
    """A page read back does not match the checksum recorded when it was written."""

    def __init__(self, page: int, message: str) -> None:
        super().__init__(message)
        self.page = page


def _nbytes(a: array[int] | bytearray) -> int:
    return len(a) * (a.itemsize if isinstance(a, array) else 1)


class FileTier:
    """A backing file holding 4 KiB pages in clusters.  See the module docstring."""

    def __init__(self, name: str, path: str, size_bytes: int, priority: int, *,
                 preallocate: bool = False, max_inflight: int = 8, encrypt: bool = False) -> None:
        # ``encrypt``: the store passes its TierConfig.encrypt, which defaults to true.
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) \
                or size_bytes <= 0 or size_bytes % PAGE:
            raise ValueError(f"tier {name!r}: size {size_bytes!r} is not a positive whole "
                             f"number of {PAGE}-byte pages")
        if max_inflight < 1:
            raise ValueError(f"tier {name!r}: max_inflight must be >= 1")
        self.name = name
        self.path = path
        self.size_bytes = size_bytes
        self.priority = priority
        self.preallocate = preallocate
        self.encrypt = encrypt
        self._cipher: _PageCipher | None = None  # made by open() when encrypt is set
        self.capacity_pages = size_bytes // PAGE
        self.nclusters = -(-self.capacity_pages // CLUSTER_PAGES)
        self._limiter = trio.CapacityLimiter(max_inflight)

        cap, ncl = self.capacity_pages, self.nclusters
        self._used = bytearray(cap)
        self._csum = array("Q", bytes(8 * cap))
        self._count = array("H", bytes(2 * ncl))
        self._state = bytearray(ncl)  # all FREE
        self._in_partial = bytearray(ncl)  # 1 while the cluster has an entry in _partial_stack
        self._free_stack = array("I", range(ncl - 1, -1, -1))  # pops cluster 0 first
        self._partial_stack = array("I")
        self._pending = array("I")
        self._cur = -1  # current cluster, -1 when none
        self._cursor = 0  # next page to look at in the current cluster
        self._stored = 0
        self._enospc = False

        self.cluster_switches = 0
        self.reads = 0
        self.writes = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.checksum_errors = 0
        self.io_errors = 0
        self.punched_clusters = 0
        self._punch_warned = False
        self._nowait = hasattr(os, "RWF_NOWAIT")  # cleared if the filesystem refuses it
        self.write_batches = 0  # thread hops for writes (each takes every queued write)
        self.cached_reads = 0  # read_many calls served inline from the page cache
        self.thread_reads = 0  # read_many calls that went to a worker thread

        self._wqueue: list[_WriteJob] = []  # writes waiting for the next batch
        self._writing = False  # a batch is in a worker thread
        self._batch_done = trio.Event()  # set when the batch in the thread is done
        self._fd = -1
        self._inflight = 0
        self._closing = False

    # ------------------------------------------------------------------ open / close

    def open(self) -> None:
        """Open (creating it if absent) and size the backing file; make a new key.

        The daemon's own open is the check, with no window between a check and the open:
        O_NOFOLLOW (a symlink is refused), O_CREAT|O_EXCL when the file is absent, no O_CREAT
        when it exists; then the open descriptor must be a regular file owned by our effective
        uid with a single link, and is made mode 0600.  An existing file is reused but its old
        content is meaningless: it is punched out entirely.  Raises OSError with a message
        naming the tier and the path.
        """
        if self._fd >= 0:
            raise RuntimeError(f"tier {self.name!r}: already open")
        where = f"tier {self.name!r}: {self.path}"
        fd, created = _open_own_file(self.path, where)
        try:
            old_size = os.fstat(fd).st_size
            try:
                os.ftruncate(fd, self.size_bytes)
            except OSError as e:
                raise OSError(e.errno, f"{where}: cannot set size to {self.size_bytes} "
                                       f"bytes: {e.strerror}") from e
            if old_size:
                try:
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, self.size_bytes)
                except OSError as e:
                    log.warning("%s: cannot punch the old content of the backing file (%s); "
                                "it is ignored anyway", where, e.strerror)
            if self.preallocate:
                self._preallocate(fd, where)
        except BaseException:
            os.close(fd)
            if created:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            raise
        self._cipher = _PageCipher() if self.encrypt else None
        self._fd = fd
        self._closing = False

    def _preallocate(self, fd: int, where: str) -> None:
        try:
            fallocate(fd, 0, 0, self.size_bytes)
            return
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(e.errno, f"{where}: cannot preallocate {self.size_bytes} bytes: "
                                       f"no space left on the filesystem") from e
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(e.errno, f"{where}: cannot preallocate: {e.strerror}") from e
        try:
            os.posix_fallocate(fd, 0, self.size_bytes)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(e.errno, f"{where}: cannot preallocate {self.size_bytes} bytes: "
                                       f"no space left on the filesystem") from e
            raise OSError(e.errno, f"{where}: cannot preallocate: {e.strerror}") from e

    def close(self) -> None:
        """Empty and close the backing file; if I/O is in flight, both happen when it ends.

        Emptying (ftruncate to zero bytes) leaves nothing of the swapped pages on disk after
        a clean unmount; the key is dropped with it.  New I/O after close raises
        TierIOError(EBADF).
        """
        if self._fd < 0:
            return
        self._closing = True
        if self._inflight == 0:
            self._really_close()

    def _really_close(self) -> None:
        fd, self._fd = self._fd, -1
        self._cipher = None
        if fd >= 0:
            try:
                os.ftruncate(fd, 0)
            except OSError as e:
                log.error("tier %r: %s: cannot empty the backing file at close: %s",
                          self.name, self.path, e.strerror)
            os.close(fd)

    def _begin(self) -> int:
        if self._fd < 0 or self._closing:
            raise TierIOError(errno.EBADF, f"tier {self.name!r}: {self.path}: tier is closed")
        self._inflight += 1
        return self._fd

    def _end(self) -> None:
        self._inflight -= 1
        if self._closing and self._inflight == 0:
            self._really_close()

    # ------------------------------------------------------------------ bookkeeping

    @property
    def stored_pages(self) -> int:
        return self._stored

    @property
    def free_pages(self) -> int:
        return self.capacity_pages - self._stored

    @property
    def punch_pending(self) -> bool:
        """Whether freed clusters wait for punch_free_clusters."""
        return bool(self._pending)

    @property
    def full(self) -> bool:
        return self._enospc or self._stored >= self.capacity_pages

    def _csize(self, c: int) -> int:
        if c == self.nclusters - 1:
            return self.capacity_pages - c * CLUSTER_PAGES
        return CLUSTER_PAGES

    def _next_cluster(self) -> int:
        """Make another cluster current: a partially used one first, else a free one."""
        st = self._state
        ps = self._partial_stack
        while ps:
            c = ps.pop()
            self._in_partial[c] = 0
            if st[c] == PARTIAL and c != self._cur:
                break
        else:
            if not self._free_stack:
                return -1
            c = self._free_stack.pop()
        self._cur = c
        self._cursor = c * CLUSTER_PAGES
        self.cluster_switches += 1
        return c

    def allocate(self, n: int) -> list[tuple[int, int]]:
        """Up to ``n`` pages as runs ``(start_page, count)``; fewer (maybe none) when out of room.

        Takes from the current cluster first, then partially used clusters, then free ones.
        Pure bookkeeping: no I/O, no await.  ``cluster_switches`` grows by one each time the
        allocation moves to another cluster (during the call that moves).
        """
        runs: list[tuple[int, int]] = []
        if n <= 0 or self._enospc:
            return runs
        used, count, st = self._used, self._count, self._state
        c = self._cur
        while n > 0:
            if c < 0 or count[c] >= self._csize(c):
                c = self._next_cluster()
                if c < 0:
                    break
            start = c * CLUSTER_PAGES
            end = start + self._csize(c)
            pos = self._cursor
            i = used.find(0, pos, end)
            if i < 0:
                i = used.find(0, start, pos)
            j = used.find(1, i, end)
            if j < 0:
                j = end
            k = min(j - i, n)
            used[i:i + k] = b"\x01" * k
            count[c] += k
            st[c] = FULL if count[c] >= end - start else PARTIAL
            self._stored += k
            self._cursor = i + k if i + k < end else start
            n -= k
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + k)
            else:
                runs.append((i, k))
        return runs

    def free(self, pages: Iterable[int]) -> None:
        """Free pages (pure bookkeeping, no await).

        Raises ValueError, freeing nothing, if a page is out of range or not in use.  A cluster
        left with no page in use is queued for punching and is not allocatable until
        ``punch_free_clusters`` has punched it (a preallocated tier does not punch: the cluster
        is allocatable at once).  Frees clear an earlier ENOSPC: the freed pages were written,
        so their blocks exist and can be rewritten in place.
        """
        pages = list(pages)
        used, cap = self._used, self.capacity_pages
        for p in pages:
            if not (0 <= p < cap) or not used[p]:
                raise ValueError(f"tier {self.name!r}: free of page {p!r}, "
                                 f"{'out of range' if not 0 <= p < cap else 'not in use'}")
        if len(set(pages)) != len(pages):
            raise ValueError(f"tier {self.name!r}: free of a page listed twice")
        self._free_pages(pages)
        if pages:
            self._enospc = False

    def free_runs(self, runs: Iterable[tuple[int, int]]) -> None:
        """``free`` for runs ``(start_page, count)``."""
        self.free(p for s, k in runs for p in range(s, s + k))

    def _free_pages(self, pages: Iterable[int]) -> None:
        used, count, st = self._used, self._count, self._state
        for p in pages:
            if not used[p]:
                continue
            used[p] = 0
            self._stored -= 1
            c = p // CLUSTER_PAGES
            left = count[c] - 1
            count[c] = left
            if left == 0:
                if c == self._cur:
                    self._cur = -1
                if self.preallocate:
                    st[c] = FREE
                    self._free_stack.append(c)
                else:
                    st[c] = PENDING
                    self._pending.append(c)
            elif st[c] == FULL:
                st[c] = PARTIAL
                if c != self._cur and not self._in_partial[c]:
                    self._in_partial[c] = 1
                    self._partial_stack.append(c)

    def _check_runs(self, runs: Sequence[tuple[int, int]]) -> int:
        total = 0
        cap, used = self.capacity_pages, self._used
        for s, k in runs:
            if k <= 0 or s < 0 or s + k > cap:
                raise ValueError(f"tier {self.name!r}: run ({s}, {k}) out of range")
            if used.count(1, s, s + k) != k:
                raise ValueError(f"tier {self.name!r}: run ({s}, {k}) holds pages not allocated")
            total += k
        return total

    # ------------------------------------------------------------------ I/O

    async def write(self, runs: list[tuple[int, int]],
                    pages: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write ``pages`` (bytes-like, PAGE bytes each, in run order) to allocated ``runs``.

        One pwritev per run (split only at IOV_MAX), in a worker thread.  Concurrent writes
        are grouped: while one batch is in the thread, later writes queue up and the next
        batch takes them all in one thread hop (a hop costs far more than a buffered
        pwritev).  Once queued, a write is not cancellable: it completes (or fails) before
        this returns, so its pages are never freed under the thread.  On ENOSPC the tier is
        marked full, the runs are freed and TierFull is raised; on another OSError io_errors
        grows, the runs are freed and TierIOError is raised.  Any other exception also frees
        the runs.
        """
        total = self._check_runs(runs)
        if len(pages) != total:
            raise ValueError(f"tier {self.name!r}: {len(pages)} pages for runs of {total}")
        views = []
        for b in pages:
            m = memoryview(b)
            if m.nbytes != PAGE:
                raise ValueError(f"tier {self.name!r}: a page of {m.nbytes} bytes")
            views.append(m if m.format == "B" and m.ndim == 1 else m.cast("B"))
        sums = [_xxh3(m) for m in views]  # ~0.3 us a page: inline costs less than a hop
        try:
            calls = await self._write_grouped(runs, views)
        except OSError as e:
            self._free_pages(p for s, k in runs for p in range(s, s + k))
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._enospc = True
                raise TierFull(f"tier {self.name!r}: {self.path}: filesystem full "
                               f"({e.strerror})") from e
            self.io_errors += 1
            log.error("tier %r: %s: write of %d pages failed: %s", self.name, self.path,
                      total, e.strerror)
            raise TierIOError(e.errno or errno.EIO, f"tier {self.name!r}: {self.path}: "
                                                    f"write failed: {e.strerror}") from e
        except BaseException:
            self._free_pages(p for s, k in runs for p in range(s, s + k))
            raise
        csum = self._csum
        i = 0
        for s, k in runs:
            csum[s:s + k] = array("Q", sums[i:i + k])
            i += k
        self.writes += calls
        self.written_bytes += total * PAGE

    async def _write_grouped(self, runs: list[tuple[int, int]], views: list[memoryview]) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled before queueing: nothing written
        job = _WriteJob(runs, views)
        self._wqueue.append(job)
        with trio.CancelScope(shield=True):
            while not job.finished:
                if self._writing:
                    await self._batch_done.wait()
                else:
                    await self._write_batch()  # takes every queued write, this one included
        if job.error is not None:
            raise job.error
        return job.calls

    async def _write_batch(self) -> None:
        batch, self._wqueue = self._wqueue, []
        self._writing = True
        done = self._batch_done = trio.Event()
        self.write_batches += 1
        try:
            fd = self._begin()
        except TierIOError as e:
            for job in batch:
                job.error = e
        else:
            try:
                await trio.to_thread.run_sync(_pwrite_batch, fd, batch, self._cipher,
                                              limiter=self._limiter)
            except BaseException as e:  # not from the writes themselves: fail the whole batch
                for job in batch:
                    if not job.finished and job.error is None:
                        job.error = e if isinstance(e, Exception) else OSError(errno.EIO, str(e))
            finally:
                self._end()
        finally:
            self._writing = False
            for job in batch:
                job.finished = True
            done.set()  # waiters whose write is not in this batch: one of them leads the next

    def _bad_page(self, page: int) -> ChecksumError:
        self.checksum_errors += 1
        log.error("tier %r: %s: checksum mismatch on page %d (offset %d)",
                  self.name, self.path, page, page * PAGE)
        return ChecksumError(page, f"tier {self.name!r}: {self.path}: page {page}: "
                                   f"checksum mismatch")

    def _io_error(self, e: OSError, what: str) -> TierIOError:
        self.io_errors += 1
        log.error("tier %r: %s: %s failed: %s", self.name, self.path, what, e.strerror)
        return TierIOError(e.errno or errno.EIO, f"tier {self.name!r}: {self.path}: "
                                                 f"{what} failed: {e.strerror}")

    @property
    def is_open(self) -> bool:
        return self._fd >= 0 and not self._closing

    def is_used(self, page: int) -> bool:
        """Page ``page`` is allocated."""
        return 0 <= page < self.capacity_pages and bool(self._used[page])

    def read_now(self, page: int) -> bytes:
        """One page, read, decrypted and verified synchronously, blocking:
        for consistency checks, never on the trio loop's serving path."""
        self._check_read(page)
        if self._fd < 0:
            raise TierIOError(errno.EBADF, f"tier {self.name!r}: {self.path}: tier is closed")
        out, sums, _ = _pread_runs(self._fd, [(page, 1)], self._cipher)
        if sums[0] != self._csum[page]:
            raise self._bad_page(page)
        return out[0]

    def _check_read(self, page: int) -> None:
        if not (0 <= page < self.capacity_pages) or not self._used[page]:
            raise ValueError(f"tier {self.name!r}: read of page {page!r}, not in use")

    async def read(self, page: int) -> bytes:
        """One page, its checksum verified (see read_many)."""
        return (await self.read_many((page,)))[0]

    async def read_many(self, pages: Sequence[int]) -> list[bytes]:
        """Pages in the order asked; consecutive page numbers are read with one preadv.

        First inline with RWF_NOWAIT, which succeeds only if every page is in the page cache
        (a couple of microseconds a page, no thread hop); otherwise in a worker thread.
        Checksums are computed where the read ran and compared here; on a mismatch every bad
        page is counted and ChecksumError names the first.
        """
        if not pages:
            return []
        for p in pages:
            self._check_read(p)
        runs: list[tuple[int, int]] = []
        s = prev = pages[0]
        for p in pages[1:]:
            if p != prev + 1:
                runs.append((s, prev - s + 1))
                s = p
            prev = p
        runs.append((s, prev - s + 1))
        fd = self._begin()
        try:
            got = None
            cipher = self._cipher
            if self._nowait:
                try:
                    got = _pread_runs_nowait(fd, runs, cipher)
                except _NoWaitUnsupported:
                    self._nowait = False
            if got is None:
                got = await trio.to_thread.run_sync(_pread_runs, fd, runs, cipher,
                                                    limiter=self._limiter)
                self.thread_reads += 1
            else:
                self.cached_reads += 1
            out, sums, calls = got
        except OSError as e:
            raise self._io_error(e, f"read of {len(pages)} pages") from e
        finally:
            self._end()
        self.reads += calls
        self.read_bytes += len(pages) * PAGE
        csum = self._csum
        bad = None
        for p, h in zip(pages, sums):
            if h != csum[p]:
                err = self._bad_page(p)
                if bad is None:
                    bad = err
        if bad is not None:
            raise bad
        return out

    async def punch_free_clusters(self) -> int:
        """Punch every cluster queued by ``free`` and make it allocatable again.

        Adjacent clusters are punched with one fallocate(PUNCH_HOLE|KEEP_SIZE).  A punch that
        fails (EOPNOTSUPP on some filesystems) is logged once; the clusters become allocatable
        anyway (their old content is never read).  Returns how many clusters were punched.
        """
        if not self._pending:
            return 0
        clusters = sorted(self._pending)
        self._pending = array("I")
        st = self._state
        for c in clusters:
            st[c] = PUNCHING
        ranges: list[list[int]] = []
        for c in clusters:
            off, ln = c * CLUSTER_PAGES * PAGE, self._csize(c) * PAGE
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1][1] += ln
            else:
                ranges.append([off, ln])
        punched = False
        try:
            fd = self._begin()
            try:
                await trio.to_thread.run_sync(_punch_ranges, fd, ranges, limiter=self._limiter)
                punched = True
            finally:
                self._end()
        except OSError as e:
            if not self._punch_warned:
                self._punch_warned = True
                log.warning("tier %r: %s: cannot punch holes (%s); freed clusters keep their "
                            "disk space", self.name, self.path, e.strerror)
        finally:
            for c in reversed(clusters):  # lowest cluster on top of the stack
                st[c] = FREE
                self._free_stack.append(c)
        if punched:
            self.punched_clusters += len(clusters)
            self._enospc = False
        return len(clusters)

    # ------------------------------------------------------------------ checks and stats

    def check_invariants(self) -> None:
        """Counts vs bitmap vs cluster states and lists; AssertionError names the discrepancy."""
        used, count, st = self._used, self._count, self._state
        n = self.name
        assert used.count(0) + used.count(1) == len(used), f"tier {n}: used map holds junk"
        total = used.count(1)
        assert total == self._stored, f"tier {n}: stored_pages {self._stored} != bitmap {total}"
        for c in range(self.nclusters):
            s = c * CLUSTER_PAGES
            size = self._csize(c)
            k = used.count(1, s, s + size)
            assert count[c] == k, f"tier {n}: cluster {c}: used count {count[c]} != bitmap {k}"
            if k == 0:
                assert st[c] in (FREE, PENDING, PUNCHING), \
                    f"tier {n}: cluster {c}: empty but state {st[c]}"
                assert c != self._cur, f"tier {n}: cluster {c}: empty but current"
            elif k == size:
                assert st[c] == FULL, f"tier {n}: cluster {c}: full but state {st[c]}"
            else:
                assert st[c] == PARTIAL, f"tier {n}: cluster {c}: partial but state {st[c]}"
                assert c == self._cur or self._in_partial[c], \
                    f"tier {n}: cluster {c}: partial, not current and not on the partial stack"
        fs = list(self._free_stack)
        assert len(set(fs)) == len(fs), f"tier {n}: free stack holds duplicates"
        assert sorted(fs) == [c for c in range(self.nclusters) if st[c] == FREE], \
            f"tier {n}: free stack != clusters in state free"
        pend = list(self._pending)
        assert sorted(pend) == [c for c in range(self.nclusters) if st[c] == PENDING], \
            f"tier {n}: punch queue != clusters in state pending"
        ps = list(self._partial_stack)
        assert len(set(ps)) == len(ps), f"tier {n}: partial stack holds duplicates"
        assert sorted(ps) == [c for c in range(self.nclusters) if self._in_partial[c]], \
            f"tier {n}: partial stack != partial flags"
        assert self._cur < 0 or st[self._cur] in (PARTIAL, FULL), \
            f"tier {n}: current cluster {self._cur} in state {st[self._cur]}"
        assert self._inflight >= 0, f"tier {n}: negative in-flight count"

    @property
    def metadata_bytes(self) -> int:
        return sum(_nbytes(a) for a in (self._used, self._csum, self._count, self._state,
                                        self._in_partial, self._free_stack,
                                        self._partial_stack, self._pending))

    def stats(self) -> FileTierStats:
        st = self._state
        disk = os.fstat(self._fd).st_blocks * 512 if self._fd >= 0 else 0
        pending = st.count(PENDING) + st.count(PUNCHING)
        return FileTierStats(
            name=self.name, path=self.path, priority=self.priority,
            capacity_pages=self.capacity_pages, stored_pages=self._stored,
            free_pages=self.free_pages,
            clusters_free=st.count(FREE) + pending, clusters_partial=st.count(PARTIAL),
            clusters_full=st.count(FULL), disk_bytes=disk,
            reads=self.reads, writes=self.writes, read_bytes=self.read_bytes,
            written_bytes=self.written_bytes, checksum_errors=self.checksum_errors,
            io_errors=self.io_errors, full=self.full, metadata_bytes=self.metadata_bytes,
            clusters_punch_pending=pending, punched_clusters=self.punched_clusters,
            cluster_switches=self.cluster_switches,
            write_batches=self.write_batches, cached_reads=self.cached_reads,
            thread_reads=self.thread_reads, encrypted=self.encrypt)


# ---------------------------------------------------------------------- worker-thread bodies


def _pwritev_full(fd: int, bufs: list[memoryview], offset: int) -> int:
    """Write every buffer at ``offset``; completes short writes.  Returns pwritev calls made."""
    calls = 0
    i = 0
    while i < len(bufs):
        chunk = bufs[i:i + _IOV_MAX]
        want = sum(b.nbytes for b in chunk)
        n = os.pwritev(fd, chunk, offset)
        calls += 1
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        if n == want:
            i += len(chunk)
            continue
        # short write: drop what was written, go on with the rest
        while n:
            b = bufs[i]
            if n >= b.nbytes:
                n -= b.nbytes
                i += 1
            else:
                bufs[i] = b[n:]
                n = 0
    return calls


def _pwrite_runs(fd: int, runs: Sequence[tuple[int, int]], views: list[memoryview],
                 cipher: _PageCipher | None = None) -> int:
    calls = 0
    i = 0
    for s, k in runs:
        chunk = views[i:i + k]
        if cipher is not None:
            enc = cipher.encrypt
            chunk = [memoryview(enc(s + j, v)) for j, v in enumerate(chunk)]
        calls += _pwritev_full(fd, chunk, s * PAGE)
        i += k
    return calls


class _WriteJob:
    """One write() waiting in the tier's group-commit queue."""

    __slots__ = ("runs", "views", "finished", "error", "calls")

    def __init__(self, runs: list[tuple[int, int]], views: list[memoryview]) -> None:
        self.runs = runs
        self.views = views
        self.finished = False
        self.error: BaseException | None = None
        self.calls = 0


def _pwrite_batch(fd: int, batch: list[_WriteJob], cipher: _PageCipher | None) -> None:
    """In a worker thread: every job's runs (encrypted first if ``cipher``); an OSError fails
    only its own job."""
    for job in batch:
        try:
            job.calls = _pwrite_runs(fd, job.runs, job.views, cipher)
        except OSError as e:
            job.error = e


def _pread_runs(fd: int, runs: Sequence[tuple[int, int]], cipher: _PageCipher | None = None
                ) -> tuple[list[bytes], list[int], int]:
    out: list[bytes] = []
    sums: list[int] = []
    calls = 0
    for s, k in runs:
        n = k * PAGE
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            r = os.preadv(fd, [mv[got:]], s * PAGE + got)
            calls += 1
            if r <= 0:
                raise OSError(errno.EIO, "short read: backing file ends early")
            got += r
        _split_pages(mv, s, cipher, out, sums)
    return out, sums, calls


def _split_pages(mv: memoryview, first: int, cipher: _PageCipher | None,
                 out: list[bytes], sums: list[int]) -> None:
    """The pages of one run read at page ``first``, decrypted if ``cipher``, and the checksums
    of their plaintext."""
    if cipher is None:
        for i in range(0, mv.nbytes, PAGE):
            page = bytes(mv[i:i + PAGE])
            out.append(page)
            sums.append(_xxh3(page))
    else:
        dec = cipher.decrypt
        for j, i in enumerate(range(0, mv.nbytes, PAGE)):
            page = dec(first + j, mv[i:i + PAGE])
            out.append(page)
            sums.append(_xxh3(page))


class _NoWaitUnsupported(Exception):
    pass


def _pread_runs_nowait(fd: int, runs: Sequence[tuple[int, int]], cipher: _PageCipher | None = None
                       ) -> tuple[list[bytes], list[int], int] | None:
    """_pread_runs without blocking: None unless every byte came from the page cache."""
    out: list[bytes] = []
    sums: list[int] = []
    for s, k in runs:
        n = k * PAGE
        buf = bytearray(n)
        try:
            r = os.preadv(fd, [buf], s * PAGE, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                raise _NoWaitUnsupported() from e
            raise
        if r != n:
            return None
        _split_pages(memoryview(buf), s, cipher, out, sums)
    return out, sums, len(runs)


def _punch_ranges(fd: int, ranges: Sequence[Sequence[int]]) -> None:
    err = None
    for off, ln in ranges:
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln)
        except OSError as e:
            err = e
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                break
    if err is not None:
        raise err


def _open_own_file(path: str, where: str) -> tuple[int, bool]:
    """Open ``path`` read-write as a backing file that is ours alone: ``(fd, created)``.

    Created with O_CREAT|O_EXCL (mode 0600) when absent; an existing one is opened without
    O_CREAT.  Never follows a symlink (O_NOFOLLOW), never blocks on a FIFO nor takes a terminal
    (O_NONBLOCK|O_NOCTTY, cleared after the checks).  The descriptor itself is then checked:
    a regular file, owned by our effective uid, one link; and made mode 0600.
    """
    base = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    fd = -1
    created = False
    for _ in range(8):  # a file that appears or vanishes between the two opens: try again
        try:
            fd = os.open(path, base | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
            break
        except FileExistsError:
            pass
        except OSError as e:
            raise _open_error(e, where) from e
        try:
            fd = os.open(path, base)
            break
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _open_error(e, where) from e
    else:
        raise OSError(errno.EAGAIN, f"{where}: cannot open backing file: it keeps appearing "
                                    f"and vanishing")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{where}: not a regular file (refused)")
        uid = os.geteuid()
        if st.st_uid != uid:
            raise OSError(errno.EPERM, f"{where}: owned by uid {st.st_uid}, not by uid {uid} "
                                       f"(refused)")
        if st.st_nlink != 1:
            raise OSError(errno.EMLINK, f"{where}: has {st.st_nlink} links; a backing file "
                                        f"must have exactly one (refused)")
        os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
    except BaseException as e:
        os.close(fd)
        if created:
            try:
                os.unlink(path)
            except OSError:
                pass
        if isinstance(e, OSError) and not str(e).startswith(where):
            raise OSError(e.errno, f"{where}: cannot open backing file: {e.strerror}") from e
        raise
    return fd, created


def _open_error(e: OSError, where: str) -> OSError:
    if e.errno == errno.ELOOP:
        return OSError(e.errno, f"{where}: is a symbolic link (refused)")
    if e.errno == errno.EISDIR:
        return OSError(e.errno, f"{where}: not a regular file (refused)")
    return OSError(e.errno, f"{where}: cannot open backing file: {e.strerror}")
