"""The file tier: 4 KiB pages, uncompressed, in a backing file on an ordinary filesystem.

:class:`FileTier` is the one public entry; the package holds its parts by concern:

* :mod:`.clusters`: the allocator (pages in use, checksums, clusters and their states), whose
  memory follows what is stored;
* :mod:`.io`: the group-commit writer and the worker-thread bodies (vectored writes and reads,
  punching);
* :mod:`.cipher`: AES-256-XTS of pages at rest;
* :mod:`.header`: the signature at the start of every tier file, and the recognition of what
  else a file holds;
* :mod:`.claim`: the safe open, the lock that makes a file one mount's, and the judgement of an
  existing file's content;
* :mod:`.errors`: TierFull, TierIOError, ChecksumError, TierRefused (all StoreError).

Layout: the header cluster (``DATA_OFFSET``, 1 MiB, mostly a hole), then page ``p`` of the
tier at ``DATA_OFFSET + p * PAGE``; the file is ``DATA_OFFSET + capacity_pages * PAGE`` bytes
long and sparse unless ``preallocate`` is set.

Concurrency (one trio loop owns this object; see docs/file-tier.md): ``allocate`` and ``free``
never await, so each runs atomically between two awaits.  ``write``, ``read``, ``read_many`` and
``punch_free_clusters`` do their system calls in worker threads, at most ``max_inflight`` at
once.  The pages passed to ``write`` belong to that write until it returns; if it raises
(any exception, cancellation included) it frees them.  A cluster that becomes entirely free is
not allocatable again until it has been punched, so a punch can never hit data written after it.

Safety at rest: the backing file is opened without following symlinks, created exclusively when
absent, refused unless the open descriptor is a regular file of ours with a single link, locked
for the mount's life (a second mount is refused), and refused if it holds anything but nothing
or a tier of a mount that is gone (unless ``force_init``); then it is made mode 0600 and
signed.  Pages are encrypted (AES-256-XTS, a random key per ``open``, kept only in memory: the
region ``tier.<name>.key`` of the store's state memory; the page number is the tweak) unless
``encrypt=False``; checksums are of the plaintext and stay in memory.  ``close`` empties the
file (truncates it to zero bytes).

Surviving the daemon: the columns and the key are regions of the store's ``StateMemory`` and the
backing file's fd is registered with it (``tierfile.<name>``).  With an adopted memory, ``open``
adopts that fd (the flock travels with it; reopening the file would find it locked by our own
predecessor), checks the header names this tier, and takes the key; ``rebuild`` then makes the
pages slots name the pages in use (see swapfs/recovery.py).
"""

from __future__ import annotations

import errno
import logging
import os
from array import array
from collections.abc import Iterable, Sequence

import trio

from ...errors import Misuse, StoreError
from ...kernel import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from ...kernel import PAGE_SIZE as PAGE
from ...memory import StateMemory
from ...stats import FileTierStats
from .cipher import PageCipher, new_key
from .claim import claim
from .clusters import CLUSTER_PAGES, FREE, FULL, PARTIAL, PENDING, PUNCHING, ClusterMap, reservation_bytes
from .errors import ChecksumError, TierFull, TierIOError, TierRefused
from .header import DATA_OFFSET, TierHeader, read_header
from .io import (
    GroupWriter,
    NoWaitUnsupported,
    pread_runs,
    pread_runs_nowait,
    punch_ranges,
    punch_ranges_of,
    xxh3,
)

__all__ = ["CLUSTER_PAGES", "DATA_OFFSET", "PAGE", "ChecksumError", "FileTier", "TierFull",
           "TierIOError", "TierRefused"]

log = logging.getLogger(__name__)

KEY_BYTES = 64  # an AES-256-XTS key

# The default of ``encrypt``, as the configuration's (swapfs.config.TierConfig.encrypt).
ENCRYPT_DEFAULT = True


class FileTier:
    """A backing file holding 4 KiB pages in clusters.  See the package docstring."""

    def __init__(self, name: str, path: str, size_bytes: int, priority: int, *,
                 preallocate: bool = False, max_inflight: int = 8,
                 encrypt: bool = ENCRYPT_DEFAULT, force_init: bool = False,
                 mountpoint: str = "", memory: StateMemory | None = None) -> None:
        # ``mountpoint``: recorded in the file's header, so that a second mount is refused
        # naming this one.  ``force_init``: overwrite an existing file without our signature.
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) \
                or size_bytes <= 0 or size_bytes % PAGE:
            raise Misuse(f"tier {name!r}: size {size_bytes!r} is not a positive whole "
                         f"number of {PAGE}-byte pages")
        if max_inflight < 1:
            raise Misuse(f"tier {name!r}: max_inflight must be >= 1")
        self.name = name
        self.path = path
        self.size_bytes = size_bytes
        self.priority = priority
        self.preallocate = preallocate
        self.encrypt = encrypt
        self.force_init = force_init
        self.mountpoint = mountpoint
        self.header: TierHeader | None = None  # written by open()
        self._cipher: PageCipher | None = None  # made by open() when encrypt is set
        self.capacity_pages = size_bytes // PAGE
        # Where the tier's truth lives (its columns, its key), and the backing file's fd is
        # registered (``tierfile.<name>``); a successor adopts all three (``open``).
        self._memory = memory if memory is not None else StateMemory()
        self._limiter = trio.CapacityLimiter(max_inflight)
        try:
            self._map = ClusterMap(name, self.capacity_pages, recycle_at_once=preallocate,
                                   memory=self._memory)
        except OSError as e:
            raise OSError(e.errno, f"tier {name!r}: {path}: cannot reserve "
                                   f"{_reservation(self.capacity_pages)} of address space for "
                                   f"the metadata of {size_bytes} bytes: {e.strerror}") from e
        self.nclusters = self._map.nclusters
        self._enospc = False

        self.reads = 0
        self.writes = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.checksum_errors = 0
        self.io_errors = 0
        self.punched_clusters = 0
        self._punch_warned = False
        self._nowait = hasattr(os, "RWF_NOWAIT")  # cleared if the filesystem refuses it
        self.cached_reads = 0  # read_many calls served inline from the page cache
        self.thread_reads = 0  # read_many calls that went to a worker thread

        self._writer = GroupWriter(self._begin, self._end, lambda: self._cipher, DATA_OFFSET,
                                   self._limiter)
        self._fd = -1
        self._inflight = 0
        self._closing = False

    # ------------------------------------------------------------------ open / close

    def open(self) -> None:
        """Open (creating it if absent), claim, size and sign the backing file; make a new key.

        See swapfs.tiers.file.claim for the checks and the lock.  An existing file of ours is
        reused but its old content is meaningless: it is punched out entirely.  Raises OSError
        (TierRefused for a file held by a live mount or holding foreign data) with a message
        naming the tier and the path; a refused file is left as it was.
        """
        if self._fd >= 0:
            raise Misuse(f"tier {self.name!r}: already open")
        where = f"tier {self.name!r}: {self.path}"
        key_map = self._memory.reserve(f"tier.{self.name}.key", KEY_BYTES)
        adopted = self._memory.adopted_fd(f"tierfile.{self.name}")
        if self._memory.adopted:
            self._adopt(adopted, bytes(key_map[:KEY_BYTES]), where)
            return
        fd, created = claim(self.path, where, force_init=self.force_init)
        total = DATA_OFFSET + self.size_bytes
        header = TierHeader.new(self.name, self.size_bytes, self.mountpoint, self.encrypt)
        try:
            old_size = os.fstat(fd).st_size
            try:
                os.ftruncate(fd, total)
            except OSError as e:
                raise OSError(e.errno, f"{where}: cannot set size to {total} bytes: "
                                       f"{e.strerror}") from e
            if old_size:
                try:
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, total)
                except OSError as e:
                    log.warning("%s: cannot punch the old content of the backing file (%s); "
                                "it is ignored anyway", where, e.strerror)
            try:
                if os.pwrite(fd, header.pack(), 0) != PAGE:
                    raise OSError(errno.EIO, "short write")
            except OSError as e:
                raise OSError(e.errno, f"{where}: cannot write the tier header: "
                                       f"{e.strerror}") from e
            if self.preallocate:
                self._preallocate(fd, where, total)
        except BaseException:
            if created:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            else:  # ours (it was empty or signed): leave it empty rather than half-made
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
            os.close(fd)
            raise
        self.header = header
        if self.encrypt:
            key = new_key()
            key_map[:KEY_BYTES] = key
            self._cipher = PageCipher(key)
        self._fd = fd
        self._closing = False
        if self._memory.shared:
            self._memory.add_fd(f"tierfile.{self.name}", fd)

    def _adopt(self, fd: int, key: bytes, where: str) -> None:
        """Take over the backing file a predecessor held (its fd, lock included: never reopen
        it, or the file would be locked against ourselves) with the key it left; StoreError
        if the fd is missing or the file is not the tier the configuration names."""
        if fd < 0:
            raise StoreError(f"{where}: the state has no backing file to adopt")
        _signed, header = read_header(fd)
        if header is None or header.name != self.name or header.size_bytes != self.size_bytes \
                or header.encrypted != self.encrypt:
            raise StoreError(f"{where}: the adopted backing file is not this tier's "
                             f"({header.describe() if header else 'no header'})")
        if self.encrypt and key == bytes(KEY_BYTES):
            raise StoreError(f"{where}: the state holds no key for the tier")
        self.header = header
        self._cipher = PageCipher(key) if self.encrypt else None
        self._fd = fd
        self._closing = False

    def rebuild(self, pages: set[int]) -> int:
        """After adopting: the pages slots name are in use; returns the leaks freed."""
        return self._map.rebuild(pages)

    def _preallocate(self, fd: int, where: str, total: int) -> None:
        try:
            fallocate(fd, 0, DATA_OFFSET, self.size_bytes)
            return
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(e.errno, f"{where}: cannot preallocate {self.size_bytes} bytes: "
                                       f"no space left on the filesystem") from e
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(e.errno, f"{where}: cannot preallocate: {e.strerror}") from e
        try:
            os.posix_fallocate(fd, DATA_OFFSET, self.size_bytes)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(e.errno, f"{where}: cannot preallocate {self.size_bytes} bytes: "
                                       f"no space left on the filesystem") from e
            raise OSError(e.errno, f"{where}: cannot preallocate: {e.strerror}") from e

    def close(self) -> None:
        """Empty and close the backing file; if I/O is in flight, both happen when it ends.

        Emptying (ftruncate to zero bytes) leaves nothing of the swapped pages on disk after
        a clean unmount, nor the header (an empty file is reused by the next mount); the key
        is dropped with it, and the lock with the last descriptor.  New I/O after close raises
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
        return self._map.stored

    @property
    def free_pages(self) -> int:
        return self.capacity_pages - self._map.stored

    @property
    def punch_pending(self) -> bool:
        """Whether freed clusters wait for punch_free_clusters."""
        return bool(self._map.pending)

    @property
    def full(self) -> bool:
        return self._enospc or self._map.stored >= self.capacity_pages

    @property
    def cluster_switches(self) -> int:
        return self._map.cluster_switches

    @property
    def write_batches(self) -> int:
        """Thread hops for writes (each takes every write queued meanwhile)."""
        return self._writer.batches

    def allocate(self, n: int) -> list[tuple[int, int]]:
        """Up to ``n`` pages as runs ``(start_page, count)``; fewer (maybe none) when out of room.

        Takes from the current cluster first, then partially used clusters, then free ones.
        Pure bookkeeping: no I/O, no await.  ``cluster_switches`` grows by one each time the
        allocation moves to another cluster (during the call that moves).
        """
        if n <= 0 or self._enospc:
            return []
        return self._map.allocate(n)

    def free(self, pages: Iterable[int]) -> None:
        """Free pages (pure bookkeeping, no await).

        Raises Misuse (a ValueError), freeing nothing, if a page is out of range or not in
        use.  A cluster left with no page in use is queued for punching and is not allocatable
        until ``punch_free_clusters`` has punched it (a preallocated tier does not punch: the
        cluster is allocatable at once).  Frees clear an earlier ENOSPC: the freed pages were
        written, so their blocks exist and can be rewritten in place.
        """
        pages = list(pages)
        self._map.check_free(pages)
        self._map.free_pages(pages)
        if pages:
            self._enospc = False

    def free_runs(self, runs: Iterable[tuple[int, int]]) -> None:
        """``free`` for runs ``(start_page, count)``."""
        self.free(p for s, k in runs for p in range(s, s + k))

    def is_used(self, page: int) -> bool:
        """Page ``page`` is allocated."""
        return self._map.is_used(page)

    # ------------------------------------------------------------------ I/O

    async def write(self, runs: list[tuple[int, int]],
                    pages: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write ``pages`` (bytes-like, PAGE bytes each, in run order) to allocated ``runs``.

        One pwritev per run (split only at IOV_MAX), in a worker thread, grouped with the
        writes queued meanwhile (swapfs.tiers.file.io.GroupWriter).  Once queued, a write is
        not cancellable: it completes (or fails) before this returns, so its pages are never
        freed under the thread.  On ENOSPC the tier is marked full, the runs are freed and
        TierFull is raised; on another OSError io_errors grows, the runs are freed and
        TierIOError is raised.  Any other exception also frees the runs.
        """
        total = self._map.check_runs(runs)
        if len(pages) != total:
            raise Misuse(f"tier {self.name!r}: {len(pages)} pages for runs of {total}")
        views = []
        for b in pages:
            m = memoryview(b)
            if m.nbytes != PAGE:
                raise Misuse(f"tier {self.name!r}: a page of {m.nbytes} bytes")
            views.append(m if m.format == "B" and m.ndim == 1 else m.cast("B"))
        sums = [xxh3(m) for m in views]  # ~0.3 us a page: inline costs less than a hop
        try:
            calls = await self._writer.write(runs, views)
        except OSError as e:
            self._map.free_pages(p for s, k in runs for p in range(s, s + k))
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
            self._map.free_pages(p for s, k in runs for p in range(s, s + k))
            raise
        csum = self._map.csum
        i = 0
        for s, k in runs:
            csum[s:s + k] = array("Q", sums[i:i + k])
            i += k
        self.writes += calls
        self.written_bytes += total * PAGE

    def _bad_page(self, page: int) -> ChecksumError:
        self.checksum_errors += 1
        log.error("tier %r: %s: checksum mismatch on page %d (offset %d)",
                  self.name, self.path, page, DATA_OFFSET + page * PAGE)
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

    def read_now(self, page: int) -> bytes:
        """One page, read, decrypted and verified synchronously, blocking:
        for consistency checks, never on the trio loop's serving path."""
        self._check_read(page)
        if self._fd < 0:
            raise TierIOError(errno.EBADF, f"tier {self.name!r}: {self.path}: tier is closed")
        out, sums, _ = pread_runs(self._fd, [(page, 1)], self._cipher, DATA_OFFSET)
        if sums[0] != self._map.csum[page]:
            raise self._bad_page(page)
        return out[0]

    def _check_read(self, page: int) -> None:
        if not self._map.is_used(page):
            raise Misuse(f"tier {self.name!r}: read of page {page!r}, not in use")

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
                    got = pread_runs_nowait(fd, runs, cipher, DATA_OFFSET)
                except NoWaitUnsupported:
                    self._nowait = False
            if got is None:
                got = await trio.to_thread.run_sync(pread_runs, fd, runs, cipher, DATA_OFFSET,
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
        csum = self._map.csum
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
        if not self._map.pending:
            return 0
        m = self._map
        clusters = m.take_pending()
        ranges = punch_ranges_of(clusters, lambda c: m.csize(c) * PAGE, CLUSTER_PAGES * PAGE,
                                 DATA_OFFSET)
        punched = False
        try:
            fd = self._begin()
            try:
                await trio.to_thread.run_sync(punch_ranges, fd, ranges, limiter=self._limiter)
                punched = True
            finally:
                self._end()
        except OSError as e:
            if not self._punch_warned:
                self._punch_warned = True
                log.warning("tier %r: %s: cannot punch holes (%s); freed clusters keep their "
                            "disk space", self.name, self.path, e.strerror)
        finally:
            m.recycle(clusters)
        if punched:
            self.punched_clusters += len(clusters)
            self._enospc = False
        return len(clusters)

    # ------------------------------------------------------------------ checks and stats

    def check_invariants(self) -> None:
        """Counts vs used bytes vs cluster states and lists; AssertionError names the
        discrepancy."""
        self._map.check_invariants()
        if self._inflight < 0:
            raise AssertionError(f"tier {self.name}: negative in-flight count")

    @property
    def metadata_bytes(self) -> int:
        return self._map.metadata_bytes

    def stats(self) -> FileTierStats:
        st = self._map.state
        disk = os.fstat(self._fd).st_blocks * 512 if self._fd >= 0 else 0
        pending = st.count(PENDING) + st.count(PUNCHING)
        return FileTierStats(
            name=self.name, path=self.path, priority=self.priority,
            capacity_pages=self.capacity_pages, stored_pages=self._map.stored,
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


def _reservation(capacity_pages: int) -> str:
    n = reservation_bytes(capacity_pages)
    return f"{n} bytes ({n / (1 << 30):.1f} GiB)"
