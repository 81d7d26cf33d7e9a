"""The file tier's system calls: the group-commit writer and the bodies that run in worker
threads (sealing and vectored writes of objects, reads of byte ranges, punching).

Offsets: the object at handle ``h`` of a tier is at byte ``base + h`` of its backing file
(``base`` is the header cluster, swapfs.tiers.file.header.DATA_OFFSET).
"""

from __future__ import annotations

import errno
import operator
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from ...kernel import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from ...kernel import PAGE_SIZE as PAGE
from .cipher import ObjectCipher
from .objects import object_bytes, seal

if TYPE_CHECKING:
    from typing_extensions import Buffer

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024

# ---------------------------------------------------------------------- group commit


class WriteJob:
    """One write waiting in a tier's group-commit queue: objects to seal and write, each
    ``(handle, generation, slot key, codec, payload)``."""

    __slots__ = ("items", "finished", "error", "calls")

    def __init__(self, items: list[tuple[int, int, int, int, bytes]]) -> None:
        self.items = items
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
                 cipher: Callable[[], ObjectCipher | None], base: int,
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

    async def write(self, items: list[tuple[int, int, int, int, bytes]]) -> int:
        """Seal and write ``items``; returns the pwritev calls made, raises the OSError of
        this write.  Once queued the write is not cancellable: it completes (or fails) before
        this returns."""
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled before queueing: nothing written
        job = WriteJob(items)
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


def pwritev_full(fd: int, bufs: list[Buffer], offset: int, total: int = -1) -> int:
    """Write every buffer at ``offset`` (``total`` bytes in all, if the caller knows);
    completes short writes.  Returns pwritev calls made."""
    views = bufs
    calls = 0
    i = 0
    while i < len(views):
        chunk = views[i:i + IOV_MAX]
        if total >= 0 and i == 0 and len(chunk) == len(views):
            want = total
        else:
            want = sum(memoryview(b).nbytes for b in chunk)
        n = os.pwritev(fd, chunk, offset)
        calls += 1
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        if n == want:
            i += len(chunk)
            continue
        # short write: drop what was written, go on with the rest
        if views is bufs:
            views = [memoryview(b) for b in bufs]
        while n:
            b = views[i]
            nb = memoryview(b).nbytes
            if n >= nb:
                n -= nb
                i += 1
            else:
                views[i] = memoryview(b)[n:]
                n = 0
    return calls


_ZEROS = bytes(PAGE)
_HANDLE = operator.itemgetter(0)


def write_objects(fd: int, items: Sequence[tuple[int, int, int, int, bytes]],
                  cipher: ObjectCipher | None, base: int) -> int:
    """Seal ``items`` and write them, objects that follow each other (the padding to a block
    boundary between them written as zeros) in one pwritev.  Returns the pwritev calls made."""
    calls = 0
    bufs: list[Buffer] = []
    start = end = -1
    extra = object_bytes(0, cipher is not None)
    for handle, gen, key, codec, payload in sorted(items, key=_HANDLE):
        parts = seal(cipher, handle, gen, key, codec, payload)
        size = len(payload) + extra
        # Only the padding that placement put before an object (to the next block boundary)
        # is written as zeros: a gap that is not padding may hold another write's objects
        # (a job's objects span segments, and a later segment can lie just before an
        # earlier one's objects in the file).
        if bufs and (handle == end or handle == (end + PAGE - 1) & ~(PAGE - 1)):
            if handle > end:
                bufs.append(_ZEROS[:handle - end])
        else:
            if bufs:
                calls += pwritev_full(fd, bufs, base + start, end - start)
            bufs = []
            start = handle
        bufs += parts
        end = handle + size
    if bufs:
        calls += pwritev_full(fd, bufs, base + start, end - start)
    return calls


def pwrite_batch(fd: int, batch: list[WriteJob], cipher: ObjectCipher | None, base: int) -> None:
    """Every job's objects; an OSError fails only its own job."""
    for job in batch:
        try:
            job.calls = write_objects(fd, job.items, cipher, base)
        except OSError as e:
            job.error = e


def pread_full(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (preadv, completed if short); OSError(EIO) if the file ends
    first."""
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        r = os.preadv(fd, [mv[got:]], offset + got)
        if r <= 0:
            raise OSError(errno.EIO, "short read: backing file ends early")
        got += r
    return bytes(buf)


def pread_ranges(fd: int, ranges: Sequence[tuple[int, int]], base: int) -> list[bytes]:
    """The bytes of each ``(handle, length)`` range."""
    return [pread_full(fd, n, base + h) for h, n in ranges]


class NoWaitUnsupported(Exception):
    """The filesystem refuses RWF_NOWAIT reads."""


def pread_ranges_nowait(fd: int, ranges: Sequence[tuple[int, int]], base: int
                        ) -> list[bytes] | None:
    """pread_ranges without blocking: None unless every byte came from the page cache."""
    out: list[bytes] = []
    for h, n in ranges:
        buf = bytearray(n)
        try:
            r = os.preadv(fd, [buf], base + h, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                raise NoWaitUnsupported() from e
            raise
        if r != n:
            return None
        out.append(bytes(buf))
    return out


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
