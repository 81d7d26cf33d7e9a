"""The file tier: a log of segments of compressed objects in a backing file.

:class:`FileTier` is the one public entry; the package holds its parts by concern:

* :mod:`.segments`: the segment map (the heads of its two logs, live bytes, generations and
  ages per segment, cleaning's choice of victims), whose memory is a few bytes per segment;
* :mod:`.objects`: the object format (header naming the slot, payload as the pool held it,
  integrity tag) and the parse of a segment for cleaning;
* :mod:`.io`: the group-commit writer and the worker-thread bodies (sealing and vectored writes,
  reads of byte ranges, punching);
* :mod:`.cipher`: AES-256-GCM of objects at rest;
* :mod:`.header`: the signature at the start of every tier file, and the recognition of what
  else a file holds;
* :mod:`.claim`: the safe open, the lock that makes a file one mount's, and the judgement of an
  existing file's content;
* :mod:`.errors`: TierFull, TierIOError, ChecksumError, TierRefused (all StoreError).

Layout: the header cluster (``DATA_OFFSET``, 1 MiB, mostly a hole), then the data area cut
into segments; the object at handle ``h`` is at ``DATA_OFFSET + h``.  The file is
``DATA_OFFSET + size`` bytes long and sparse unless ``preallocate`` is set.

Concurrency (one trio loop owns this object; see docs/file-tier.md): ``allocate`` and ``free``
never await, so each runs atomically between two awaits.  ``write``, ``read_objects``,
``read_segment`` and ``punch_free_segments`` do their system calls in worker threads, at most
``max_inflight`` at once.  The handles passed to ``write`` belong to that write until it
returns; if it raises (any exception, cancellation included) it frees them.  A segment left
without live objects is not reusable until it has been punched, and is reused under a new
generation, so nothing read from it before can pass for something written after.

Safety at rest: the backing file is opened without following symlinks, created exclusively when
absent, refused unless the open descriptor is a regular file of ours with a single link, locked
for the mount's life (a second mount is refused), and refused if it holds anything but nothing
or a tier of a mount that is gone (unless ``force_init``); then it is made mode 0600 and
signed.  Objects are encrypted and authenticated (AES-256-GCM, a random key per ``open``, kept
only in memory: the region ``tier.<name>.key`` of the store's state memory) unless
``encrypt=False``, when an xxh3-64 tag guards them.  ``close`` empties the file.

Surviving the daemon: the generations, the object counts and the key are regions of the store's
``StateMemory`` and the backing file's fd is registered with it (``tierfile.<name>``).  With an
adopted memory, ``open`` adopts that fd (the flock travels with it; reopening the file would
find it locked by our own predecessor), checks the header names this tier, and takes the key;
``rebuild`` then makes the objects slots name the live ones (see swapfs/recovery.py).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Sequence

import trio

from ...errors import Misuse, StoreError
from ...kernel import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from ...kernel import PAGE_SIZE as PAGE
from ...memory import StateMemory
from ...stats import FileTierStats
from .cipher import KEY_BYTES, ObjectCipher, new_key
from .claim import claim
from .errors import ChecksumError, TierFull, TierIOError, TierRefused
from .header import DATA_OFFSET, VERSION, TierHeader, read_header
from .io import (
    GroupWriter,
    NoWaitUnsupported,
    pread_full,
    pread_ranges,
    pread_ranges_nowait,
    punch_ranges,
    punch_ranges_of,
)
from .objects import RAW, Bad, object_bytes, parse, unseal
from .segments import (
    CLEAN_MAX_LIVE,
    HEAD,
    SEALED,
    SEGMENT_BYTES,
    SegmentedTier,
    SegmentMap,
    reservation_bytes,
)

__all__ = ["CLUSTER_PAGES", "DATA_OFFSET", "PAGE", "RAW", "SEGMENT_BYTES", "ChecksumError",
           "FileTier", "TierFull", "TierIOError", "TierRefused"]

# Pages per writeback batch (one FUSE request's worth, 1 MiB raw).
CLUSTER_PAGES = 256
# Segments kept back for cleaning: other appends stop when only these are free.
CLEAN_RESERVE = 2
# A tier has at least this many segments where it can (a small tier gets smaller segments, down
# to MIN_SEGMENT_BYTES): cleaning needs segments to choose from, and the segments that cannot
# hold data at a given moment (the reserve, the two heads, the free ones cleaning keeps) must
# be a small share of the tier, or it is that much fuller than its occupancy says: at 32
# segments they were a sixth of it, and cleaning at 80% occupancy appended 3.8 bytes a byte.
MIN_SEGMENTS = 256
MIN_SEGMENT_BYTES = 16 * PAGE


def effective_segment_bytes(size_bytes: int, segment_bytes: int) -> int:
    """The segment size of a tier of ``size_bytes`` configured with ``segment_bytes``: halved
    until the tier has MIN_SEGMENTS segments, but not below MIN_SEGMENT_BYTES."""
    seg = max(min(segment_bytes, size_bytes) // PAGE * PAGE, PAGE)
    while seg // 2 >= MIN_SEGMENT_BYTES and size_bytes // seg < MIN_SEGMENTS:
        seg = seg // 2 // PAGE * PAGE
    return seg


log = logging.getLogger(__name__)

# The default of ``encrypt``, as the configuration's (swapfs.config.TierConfig.encrypt).
ENCRYPT_DEFAULT = True


class FileTier(SegmentedTier):
    """A backing file holding compressed objects in log-structured segments.  See the package
    docstring."""

    def __init__(self, name: str, path: str, size_bytes: int, priority: int, *,
                 preallocate: bool = False, max_inflight: int = 8,
                 encrypt: bool = ENCRYPT_DEFAULT, force_init: bool = False,
                 mountpoint: str = "", memory: StateMemory | None = None,
                 segment_bytes: int = SEGMENT_BYTES, recompress: str = "") -> None:
        # ``mountpoint``: recorded in the file's header, so that a second mount is refused
        # naming this one.  ``force_init``: overwrite an existing file without our signature.
        # ``recompress``: the codec the store recompresses objects with on their way down to
        # this tier ("" for none); the tier itself stores whatever it is given.
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
        self.recompress = recompress
        self.header: TierHeader | None = None  # written by open()
        self._cipher: ObjectCipher | None = None  # made by open() when encrypt is set
        self.capacity_pages = size_bytes // PAGE
        self.segment_bytes = effective_segment_bytes(size_bytes, segment_bytes)
        # Where the tier's truth lives (generations, object counts, its key), and the backing
        # file's fd is registered (``tierfile.<name>``); a successor adopts them (``open``).
        self._memory = memory if memory is not None else StateMemory()
        self._limiter = trio.CapacityLimiter(max_inflight)
        try:
            self._map = SegmentMap(name, size_bytes, self.segment_bytes, reserve=CLEAN_RESERVE,
                                   recycle_at_once=preallocate, memory=self._memory)
        except OSError as e:
            raise OSError(e.errno, f"tier {name!r}: {path}: cannot reserve "
                                   f"{reservation_bytes(size_bytes, self.segment_bytes)} bytes "
                                   f"of address space for the metadata of {size_bytes} bytes: "
                                   f"{e.strerror}") from e
        self.nsegments = self._map.nsegments
        self._enospc = False

        self.reads = 0
        self.writes = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.checksum_errors = 0
        self.io_errors = 0
        self.punched_segments = 0
        self._punch_warned = False
        self._nowait = hasattr(os, "RWF_NOWAIT")  # cleared if the filesystem refuses it
        self.cached_reads = 0  # reads served inline from the page cache
        self.thread_reads = 0  # reads that went to a worker thread
        # Bytes appended, all of them and those cleaning appended (write amplification).
        self.appended_bytes = 0
        self.cleaned_objects = 0
        self.cleaned_bytes = 0
        # Pages stored, as pages (stored_pages * PAGE over live bytes: the compression ratio).

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
            self._cipher = ObjectCipher(key)
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
                or header.encrypted != self.encrypt or header.version != VERSION:
            raise StoreError(f"{where}: the adopted backing file is not this tier's, in this "
                             f"format (version {VERSION}): "
                             f"{header.describe() + f', version {header.version}' if header else 'no header'}")
        if self.encrypt and key == bytes(KEY_BYTES):
            raise StoreError(f"{where}: the state holds no key for the tier")
        self.header = header
        self._cipher = ObjectCipher(key) if self.encrypt else None
        self._fd = fd
        self._closing = False

    def rebuild(self, objects: Iterable[tuple[int, int]]) -> int:
        """After adopting: the objects slots name, ``(handle, payload length)``, are the live
        ones; returns the objects no slot names any more (leaks of writes cut short)."""
        enc = self.encrypt
        return self._map.rebuild((h, object_bytes(n, enc)) for h, n in objects)

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
    def room_bytes(self) -> int:
        """Bytes of objects the tier could still append, cleaning included (0 once the
        filesystem under it said ENOSPC): what the stats' headroom counts."""
        return 0 if self._enospc else self._map.room_bytes(CLEAN_MAX_LIVE)

    @property
    def punch_pending(self) -> bool:
        """Whether emptied segments wait for punch_free_segments."""
        return bool(self._map.pending)

    @property
    def full(self) -> bool:
        """No room to append, even after cleaning: the filesystem said ENOSPC, or no segment
        is free and cleaning cannot free one (none is ``CLEAN_MAX_LIVE`` live or less)."""
        return self._enospc or self._segments_full()

    @property
    def write_batches(self) -> int:
        """Thread hops for writes (each takes every write queued meanwhile)."""
        return self._writer.batches

    def allocate(self, lengths: Sequence[int], *, cleaning: bool = False,
                 survivors_of: int = -1) -> list[int]:
        """Handles for objects of ``lengths`` payload bytes (1..4096), appended at the log's
        head in order; fewer (a prefix, maybe none) when out of room.

        Pure bookkeeping: no I/O, no await.  The objects count as live from here on; a write
        that fails frees them.  ``cleaning``: survivors of cleaning, appended to the cleaning
        log's head (apart from fresh pages), which may use the segments kept back for it;
        ``survivors_of``: the segment they leave (its age passes to where they go).
        """
        if not lengths or self._enospc:
            return []
        if not 0 < min(lengths) or not max(lengths) <= PAGE:
            bad = next(n for n in lengths if not 0 < n <= PAGE)
            raise Misuse(f"tier {self.name!r}: an object of {bad!r} bytes")
        extra = object_bytes(0, self.encrypt)
        return self._map.allocate([n + extra for n in lengths], cleaning, survivors_of)

    def free(self, handle: int, length: int) -> None:
        """Free the object at ``handle`` of ``length`` payload bytes (pure bookkeeping).

        Raises Misuse, freeing nothing, if no such object can be live there.  A segment left
        with no live object is queued for punching and is not reusable until
        ``punch_free_segments`` has punched it (a preallocated tier does not punch: the
        segment is free at once).  Frees clear an earlier ENOSPC.
        """
        self._map.free(handle, object_bytes(length, self.encrypt))
        self._enospc = False

    # ------------------------------------------------------------------ I/O

    async def write(self, handles: Sequence[int],
                    objects: Sequence[tuple[int, int, bytes]]) -> None:
        """Write ``objects``, each ``(slot key, codec id, payload)``, at ``handles`` (allocated
        for their lengths, in order).

        Sealed and written in a worker thread, objects that follow each other in one pwritev,
        grouped with the writes queued meanwhile (swapfs.tiers.file.io.GroupWriter).  Once
        queued, a write is not cancellable.  On ENOSPC the tier is marked full, the handles are
        freed and TierFull is raised; on another OSError io_errors grows, the handles are freed
        and TierIOError is raised.  Any other exception also frees the handles.
        """
        if len(handles) != len(objects):
            raise Misuse(f"tier {self.name!r}: {len(objects)} objects for {len(handles)} handles")
        m = self._map
        items = []
        total = 0
        extra = object_bytes(0, self.encrypt)
        seg, nseg, state, fill, gen = m.segment_bytes, m.nsegments, m.state, m.fill, m.gen
        for h, (key, codec, payload) in zip(handles, objects):
            size = len(payload) + extra
            s = h // seg
            # allocated: in a segment appended to, within what was appended (is_live, inline)
            if not (0 <= s < nseg and (state[s] == HEAD or state[s] == SEALED)
                    and h - s * seg + size <= fill[s] and m.live[s] >= size):
                raise Misuse(f"tier {self.name!r}: write of {size - extra} bytes at {h}, "
                             f"not allocated")
            items.append((h, gen[s], key, codec, payload))
            total += size
        try:
            calls = await self._writer.write(items)
        except OSError as e:
            self._free_written(handles, objects)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._enospc = True
                raise TierFull(f"tier {self.name!r}: {self.path}: filesystem full "
                               f"({e.strerror})") from e
            self.io_errors += 1
            log.error("tier %r: %s: write of %d objects failed: %s", self.name, self.path,
                      len(items), e.strerror)
            raise TierIOError(e.errno or errno.EIO, f"tier {self.name!r}: {self.path}: "
                                                    f"write failed: {e.strerror}") from e
        except BaseException:
            self._free_written(handles, objects)
            raise
        self.writes += calls
        self.written_bytes += total
        self.appended_bytes += total

    def _bad(self, handle: int, why: str) -> ChecksumError:
        self.checksum_errors += 1
        log.error("tier %r: %s: checksum mismatch on the object at %d (offset %d): %s",
                  self.name, self.path, handle, DATA_OFFSET + handle, why)
        return ChecksumError(handle, f"tier {self.name!r}: {self.path}: object at {handle}: "
                                     f"checksum mismatch ({why})")

    def _io_error(self, e: OSError, what: str) -> TierIOError:
        self.io_errors += 1
        log.error("tier %r: %s: %s failed: %s", self.name, self.path, what, e.strerror)
        return TierIOError(e.errno or errno.EIO, f"tier {self.name!r}: {self.path}: "
                                                 f"{what} failed: {e.strerror}")

    @property
    def is_open(self) -> bool:
        return self._fd >= 0 and not self._closing

    def open_object(self, handle: int, length: int, key: int, buf: bytes | memoryview,
                    cipher: ObjectCipher | None = None) -> tuple[int, bytes]:
        """Verify (and decrypt) the bytes ``buf`` of the object at ``handle``, which must be
        slot ``key``'s, of ``length`` payload bytes, in its segment's current generation:
        ``(codec id, payload)``, or ChecksumError (counted and logged).  ``cipher``: the one
        the read began with (a close meanwhile drops the tier's)."""
        m = self._map
        if cipher is None:
            cipher = self._cipher
        try:
            return unseal(cipher, handle, m.gen[m.segment_of(handle)], key, length, buf)
        except Bad as e:
            raise self._bad(handle, str(e)) from None

    def read_now(self, handle: int, length: int, key: int) -> tuple[int, bytes]:
        """One object, read and verified synchronously, blocking: for consistency checks,
        never on the trio loop's serving path."""
        size = self._check_read(handle, length)
        if self._fd < 0:
            raise TierIOError(errno.EBADF, f"tier {self.name!r}: {self.path}: tier is closed")
        return self.open_object(handle, length, key, pread_full(self._fd, size,
                                                                 DATA_OFFSET + handle))

    async def read_objects(self, items: Sequence[tuple[int, int, int]]
                           ) -> list[tuple[int, bytes]]:
        """``(codec id, payload)`` of each object ``(handle, length, slot key)``, in the order
        asked; one pread each (at most two 4 KiB blocks).

        First inline with RWF_NOWAIT, which succeeds only if every byte is in the page cache
        (no thread hop); otherwise in a worker thread.  Every object is verified; on a
        mismatch every bad one is counted and ChecksumError names the first.
        """
        if not items:
            return []
        ranges = [(h, self._check_read(h, n)) for h, n, _k in items]
        cipher = self._cipher
        fd = self._begin()
        try:
            got = None
            if self._nowait:
                try:
                    got = pread_ranges_nowait(fd, ranges, DATA_OFFSET)
                except NoWaitUnsupported:
                    self._nowait = False
            if got is None:
                got = await trio.to_thread.run_sync(pread_ranges, fd, ranges, DATA_OFFSET,
                                                    limiter=self._limiter)
                self.thread_reads += 1
            else:
                self.cached_reads += 1
        except OSError as e:
            raise self._io_error(e, f"read of {len(items)} objects") from e
        finally:
            self._end()
        self.reads += len(ranges)
        self.read_bytes += sum(n for _h, n in ranges)
        out: list[tuple[int, bytes]] = []
        bad = None
        for (h, n, k), buf in zip(items, got):
            try:
                out.append(self.open_object(h, n, k, buf, cipher))
            except ChecksumError as e:
                if bad is None:
                    bad = e
        if bad is not None:
            raise bad
        return out

    # ------------------------------------------------------------------ cleaning

    async def read_segment(self, seg: int) -> list[tuple[int, int, int, bytes]]:
        """The objects segment ``seg`` appears to hold, read in one pread in a worker thread:
        ``(handle, slot key, length, object bytes)``, unverified (the caller checks a slot
        names the handle, then verifies with ``open_object``)."""
        m = self._map
        if m.state[seg] not in (HEAD, SEALED):
            return []
        n = m.fill[seg]
        base = seg * m.segment_bytes
        gen = m.gen[seg]
        fd = self._begin()
        try:
            data = await trio.to_thread.run_sync(pread_full, fd, n, DATA_OFFSET + base,
                                                 limiter=self._limiter)
        except OSError as e:
            raise self._io_error(e, f"read of segment {seg}") from e
        finally:
            self._end()
        self.reads += 1
        self.read_bytes += n
        if m.gen[seg] != gen or m.state[seg] not in (HEAD, SEALED):
            return []  # emptied and reused meanwhile: nothing of what was read is live
        extra = object_bytes(0, self.encrypt)
        return [(h, k, ln, data[pos:pos + ln + extra])
                for h, k, ln, pos in parse(data, base, gen, self.encrypt)]

    async def punch_free_segments(self) -> int:
        """Punch every segment that frees emptied and make it reusable.

        Adjacent segments are punched with one fallocate(PUNCH_HOLE|KEEP_SIZE).  A punch that
        fails (EOPNOTSUPP on some filesystems) is logged once; the segments become reusable
        anyway (their old objects fail the tag under the next generation).  Returns how many
        segments were punched.
        """
        if not self._map.pending:
            return 0
        m = self._map
        segs = m.take_pending()
        ranges = punch_ranges_of(segs, m.seg_size, m.segment_bytes, DATA_OFFSET)
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
                log.warning("tier %r: %s: cannot punch holes (%s); emptied segments keep their "
                            "disk space", self.name, self.path, e.strerror)
        finally:
            m.recycle(segs)
        if punched:
            self.punched_segments += len(segs)
            self._enospc = False
        return len(segs)

    # ------------------------------------------------------------------ checks and stats

    def check_invariants(self) -> None:
        """Live bytes and objects vs segment states and lists; AssertionError names the
        discrepancy."""
        self._map.check_invariants()
        if self._inflight < 0:
            raise AssertionError(f"tier {self.name}: negative in-flight count")

    @property
    def metadata_bytes(self) -> int:
        return self._map.metadata_bytes

    def stats(self) -> FileTierStats:
        m = self._map
        disk = os.fstat(self._fd).st_blocks * 512 if self._fd >= 0 else 0
        free = m.free_segments
        user = self.appended_bytes - self.cleaned_bytes
        return FileTierStats(
            name=self.name, path=self.path, priority=self.priority,
            capacity_pages=self.capacity_pages, stored_pages=m.stored,
            free_pages=self.free_pages, disk_bytes=disk,
            reads=self.reads, writes=self.writes, read_bytes=self.read_bytes,
            written_bytes=self.written_bytes, checksum_errors=self.checksum_errors,
            io_errors=self.io_errors, full=self.full, metadata_bytes=self.metadata_bytes,
            live_bytes=m.live_bytes, dead_bytes=m.dead_bytes,
            segments_used=m.nsegments - free, segments_free=free,
            segments_punch_pending=m.punch_queued, punched_segments=self.punched_segments,
            segment_bytes=m.segment_bytes,
            cleaned_objects=self.cleaned_objects, cleaned_bytes=self.cleaned_bytes,
            write_amplification=round(self.appended_bytes / user, 4) if user > 0 else 0.0,
            compression_ratio=round(m.stored * PAGE / m.live_bytes, 4) if m.live_bytes else 0.0,
            segment_switches=self.segment_switches,
            write_batches=self.write_batches, cached_reads=self.cached_reads,
            thread_reads=self.thread_reads, encrypted=self.encrypt)


