"""The file tier's system calls: the group-commit writer and the bodies that run in worker
threads (vectored writes and reads, decryption, checksums of what was read, punching).

Offsets: page ``p`` of a tier is at byte ``base + p * PAGE`` of its backing file (``base`` is
the header cluster, swapfs.tiers.file.header.DATA_OFFSET).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

import trio
import xxhash

from ...kernel import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from ...kernel import PAGE_SIZE as PAGE
from .cipher import PageCipher

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024

xxh3 = xxhash.xxh3_64_intdigest


# ---------------------------------------------------------------------- group commit


class WriteJob:
    """One write waiting in a tier's group-commit queue."""

    __slots__ = ("runs", "views", "finished", "error", "calls")

    def __init__(self, runs: list[tuple[int, int]], views: list[memoryview]) -> None:
        self.runs = runs
        self.views = views
        self.finished = False
        self.error: BaseException | None = None
        self.calls = 0


class GroupWriter:
    """Concurrent writes grouped into thread hops: while one batch is in a worker thread,
    later writes queue up, and the next batch takes them all (a hop costs far more than a
    buffered pwritev).

    ``begin()`` returns the descriptor for a batch (raising if the tier is closed) and
    ``end()`` is called when the batch is done; ``cipher()`` gives the current cipher.
    """

    def __init__(self, begin: Callable[[], int], end: Callable[[], None],
                 cipher: Callable[[], PageCipher | None], base: int,
                 limiter: trio.CapacityLimiter) -> None:
        self._begin = begin
        self._end = end
        self._cipher = cipher
        self._base = base
        self._limiter = limiter
        self._queue: list[WriteJob] = []  # writes waiting for the next batch
        self._writing = False  # a batch is in a worker thread
        self._batch_done = trio.Event()  # set when the batch in the thread is done
        self.batches = 0  # thread hops for writes (each takes every queued write)

    async def write(self, runs: list[tuple[int, int]], views: list[memoryview]) -> int:
        """Write ``views`` to ``runs``; returns the pwritev calls made, raises the OSError of
        this write.  Once queued the write is not cancellable: it completes (or fails) before
        this returns."""
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled before queueing: nothing written
        job = WriteJob(runs, views)
        self._queue.append(job)
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
        batch, self._queue = self._queue, []
        self._writing = True
        done = self._batch_done = trio.Event()
        self.batches += 1
        try:
            try:
                fd = self._begin()
            except Exception as e:
                for job in batch:
                    job.error = e
            else:
                try:
                    await trio.to_thread.run_sync(pwrite_batch, fd, batch, self._cipher(),
                                                  self._base, limiter=self._limiter)
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


# ---------------------------------------------------------------------- worker-thread bodies


def pwritev_full(fd: int, bufs: list[memoryview], offset: int) -> int:
    """Write every buffer at ``offset``; completes short writes.  Returns pwritev calls made."""
    calls = 0
    i = 0
    while i < len(bufs):
        chunk = bufs[i:i + IOV_MAX]
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


def pwrite_runs(fd: int, runs: Sequence[tuple[int, int]], views: list[memoryview],
                cipher: PageCipher | None, base: int) -> int:
    calls = 0
    i = 0
    for s, k in runs:
        chunk = views[i:i + k]
        if cipher is not None:
            enc = cipher.encrypt
            chunk = [memoryview(enc(s + j, v)) for j, v in enumerate(chunk)]
        calls += pwritev_full(fd, chunk, base + s * PAGE)
        i += k
    return calls


def pwrite_batch(fd: int, batch: list[WriteJob], cipher: PageCipher | None, base: int) -> None:
    """Every job's runs (encrypted first if ``cipher``); an OSError fails only its own job."""
    for job in batch:
        try:
            job.calls = pwrite_runs(fd, job.runs, job.views, cipher, base)
        except OSError as e:
            job.error = e


def pread_runs(fd: int, runs: Sequence[tuple[int, int]], cipher: PageCipher | None, base: int
               ) -> tuple[list[bytes], list[int], int]:
    """The pages of ``runs`` (decrypted if ``cipher``), their checksums, the preadv calls."""
    out: list[bytes] = []
    sums: list[int] = []
    calls = 0
    for s, k in runs:
        n = k * PAGE
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            r = os.preadv(fd, [mv[got:]], base + s * PAGE + got)
            calls += 1
            if r <= 0:
                raise OSError(errno.EIO, "short read: backing file ends early")
            got += r
        split_pages(mv, s, cipher, out, sums)
    return out, sums, calls


def split_pages(mv: memoryview, first: int, cipher: PageCipher | None,
                out: list[bytes], sums: list[int]) -> None:
    """The pages of one run read at page ``first``, decrypted if ``cipher``, and the checksums
    of their plaintext."""
    if cipher is None:
        for i in range(0, mv.nbytes, PAGE):
            page = bytes(mv[i:i + PAGE])
            out.append(page)
            sums.append(xxh3(page))
    else:
        dec = cipher.decrypt
        for j, i in enumerate(range(0, mv.nbytes, PAGE)):
            page = dec(first + j, mv[i:i + PAGE])
            out.append(page)
            sums.append(xxh3(page))


class NoWaitUnsupported(Exception):
    """The filesystem refuses RWF_NOWAIT reads."""


def pread_runs_nowait(fd: int, runs: Sequence[tuple[int, int]], cipher: PageCipher | None,
                      base: int) -> tuple[list[bytes], list[int], int] | None:
    """pread_runs without blocking: None unless every byte came from the page cache."""
    out: list[bytes] = []
    sums: list[int] = []
    for s, k in runs:
        n = k * PAGE
        buf = bytearray(n)
        try:
            r = os.preadv(fd, [buf], base + s * PAGE, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                raise NoWaitUnsupported() from e
            raise
        if r != n:
            return None
        split_pages(memoryview(buf), s, cipher, out, sums)
    return out, sums, len(runs)


# ---------------------------------------------------------------------- punching


def punch_ranges_of(clusters: Sequence[int], cluster_bytes: Callable[[int], int],
                    cluster_stride: int, base: int) -> list[list[int]]:
    """Byte ranges ``[offset, length]`` covering sorted ``clusters``, adjacent ones merged."""
    ranges: list[list[int]] = []
    for c in clusters:
        off, ln = base + c * cluster_stride, cluster_bytes(c)
        if ranges and ranges[-1][0] + ranges[-1][1] == off:
            ranges[-1][1] += ln
        else:
            ranges.append([off, ln])
    return ranges


def punch_ranges(fd: int, ranges: Sequence[Sequence[int]]) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE) each range; raises the last error (at once if the
    filesystem cannot punch at all)."""
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
