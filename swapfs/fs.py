"""The swapfs filesystem: swap devices as files, stats as xattrs.

A thin adapter between the FUSE protocol layer (swapfs.fuse) and the store
(swapfs.store).  It owns inode numbers, attributes, the xattr namespace and
the one mapping from store errors to errnos; it holds no page data.

Layout of a mount::

    /           the root directory (mode 0700, owned by the mounting user)
    /swap0      one regular file per configured device (mode 0600), of the
                device's fixed size

Every file is opened with direct I/O: pages go straight to the store, never
through the kernel's page cache (swap pages cached twice would defeat the
purpose, and the loop device uses O_DIRECT anyway).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import posixpath
import re
import stat
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import trio

from . import stats as _names
from .errors import BackingIOError, Corruption, NoSpace, OutOfRange, StoreError
from .fuse import (
    ROOT_INODE,
    DirEntry,
    EntryAttributes,
    FileInfo,
    FUSEError,
    Operations,
    RequestContext,
    SetattrFields,
    StatvfsData,
)
from .kernel import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from .kernel import PAGE_SIZE as PAGE
from .slots import level_of
from .stats import Stats, xattr_items, xattr_name
from .store import Device, Store
from .trace import DISCARD, NO_TIER, PARTIAL, READ, WRITE, Tracer
from .writeback import Writeback

log = logging.getLogger(__name__)

XATTR_PREFIX = _names.XATTR_PREFIX.encode()
STATS_XATTR = _names.STATS_XATTR.encode()
CTL_WRITEBACK = _names.CTL_WRITEBACK_XATTR.encode()
# Any value: compact the pool now; reading it gives "OBJECTS BYTES", what the
# last compaction requested moved and released.
CTL_COMPACT = _names.CTL_COMPACT_XATTR.encode()
# "PATH" (absolute, not in the mount): record every request there
# (swapfs/trace.py); "stop": stop.  Reading it: "on|off PATH RECORDS DROPPED".
CTL_TRACE = _names.CTL_TRACE_XATTR.encode()
# The kernel refuses xattr values above 64 KiB (XATTR_SIZE_MAX).
XATTR_SIZE_MAX = 65536
# "N" (pages) or "idle:SECONDS"; a trailing newline (echo) is tolerated.
_CTL_WRITEBACK_RE = re.compile(rb"(?:(\d{1,10})|idle:(\d{1,10}(?:\.\d{1,6})?))\n?")

# Attributes never change behind the kernel's back except st_blocks, which
# only informs; a second of caching saves a GETATTR per stat() burst.
ATTR_TIMEOUT = 1.0


def _full_answer(text: str) -> tuple[int, float]:
    """(errno, seconds a write is held first) of a write the full store refuses, from
    SWAPFS_FULL_ANSWER: "enospc" (the default), "eio", or "hold:SECONDS" (retried every
    50 ms that long, then ENOSPC).  A knob for scripts/bench-full, which measured that the
    kernel treats them all alike (docs/operations.md, "When the store is full")."""
    if text.startswith("hold:"):
        try:
            return errno.ENOSPC, max(0.0, float(text[5:]))
        except ValueError:
            pass
    return (errno.EIO if text == "eio" else errno.ENOSPC), 0.0


FULL_ERRNO, FULL_HOLD = _full_answer(os.environ.get("SWAPFS_FULL_ANSWER", "enospc"))
ENTRY_TIMEOUT = 60.0


def store_errno(exc: StoreError) -> int:
    """The one place where store errors become errnos."""
    if isinstance(exc, OutOfRange):
        return errno.ENOSPC  # a fixed-size device: like writing past a block device's end
    if isinstance(exc, NoSpace):
        return errno.ENOSPC
    if isinstance(exc, (Corruption, BackingIOError)):
        return errno.EIO
    return errno.EIO


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested stats dict -> {"a.b": "value"}: one xattr per counter, names
    in ``[a-z0-9_.]`` only (device and tier names are free text)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{xattr_name(str(key))}."))
    leaves = {k: v for k, v in d.items() if not isinstance(v, dict)}
    for name, text in xattr_items(leaves).items():
        out[prefix + xattr_name(name)] = text
    return out


class StoreIO(Protocol):
    """What SwapFS asks of the store for I/O: the store itself, or, while a
    trace is on, a :class:`TracedIO` around it."""

    async def read(self, dev: Device, offset: int, size: int) -> bytes | bytearray: ...

    async def write(self, dev: Device, offset: int, data: object) -> int: ...

    async def discard(self, dev: Device, offset: int, length: int) -> None: ...


def _page_range(offset: int, length: int) -> tuple[int, int, int]:
    """(first page, pages, flags) of a byte range."""
    first = offset // PAGE
    end = -(-(offset + length) // PAGE)
    return first, end - first, PARTIAL if (offset | length) % PAGE else 0


class TracedIO:
    """The store's I/O with every request recorded first (swapfs/trace.py)."""

    def __init__(self, store: Store, tracer: Tracer) -> None:
        self.store = store
        self.tracer = tracer

    async def read(self, dev: Device, offset: int, size: int) -> bytes | bytearray:
        first, n, flags = _page_range(offset, size)
        held = level_of(dev.table.info[first]) if 0 <= first < dev.npages else 0
        self.tracer.record(READ, dev.index, first, n, held, flags)
        return await self.store.read(dev, offset, size)

    async def write(self, dev: Device, offset: int, data: object) -> int:
        first, n, flags = _page_range(offset, memoryview(data).nbytes)  # type: ignore[arg-type]
        self.tracer.record(WRITE, dev.index, first, n, NO_TIER, flags)
        return await self.store.write(dev, offset, data)

    async def discard(self, dev: Device, offset: int, length: int) -> None:
        first, n, flags = _page_range(offset, length)
        self.tracer.record(DISCARD, dev.index, first, n, NO_TIER, flags)
        await self.store.discard(dev, offset, length)


class SwapFS(Operations):
    """FUSE operations over a :class:`Store`."""

    def __init__(self, store: Store, *, writeback: Writeback | None = None,
                 uid: int | None = None, gid: int | None = None,
                 mountpoint: str | None = None) -> None:
        self.store = store
        # Where reads, writes and discards go: the store, or a recorder
        # around it while a trace is on (nothing is recorded otherwise).
        self.io: StoreIO = store
        self.tracer: Tracer | None = None
        self._last_trace = "off"
        # (a trace file is never opened in the mount: the daemon would call itself)
        self.mountpoint = os.path.normpath(mountpoint) if mountpoint else None
        # Serves user.swapfs.ctl.writeback; without it the request is EAGAIN.
        self.writeback = writeback
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.started_ns = time.time_ns()
        # zram's mem_used_max: the pool only grows while serving a request
        # (a write, or a read that promotes), so a look after each one sees
        # every peak that outlasts a request.
        self.pool_peak_bytes = 0
        self._ctl_results: dict[int, int] = {}  # inode -> pages moved by its last writeback request
        self._compacted = (0, 0)  # (objects moved, bytes released) by the last compaction request
        self._by_inode: dict[int, Device] = {ROOT_INODE + 1 + d.index: d for d in store.devices}
        self._by_name: dict[bytes, Device] = {d.name.encode(): d for d in store.devices}
        # fh == inode of the device: opening needs no state of its own
        self._dir_entries = [
            DirEntry(b".", self._root_attr(), 1),
            DirEntry(b"..", self._root_attr(), 2),
        ] + [DirEntry(d.name.encode(), self._device_attr(d), 3 + i) for i, d in enumerate(store.devices)]

    # -- attributes -------------------------------------------------------

    def _root_attr(self) -> EntryAttributes:
        return EntryAttributes(
            st_ino=ROOT_INODE,
            st_mode=stat.S_IFDIR | 0o700,
            st_nlink=2,
            st_uid=self.uid,
            st_gid=self.gid,
            st_size=0,
            st_atime_ns=self.started_ns,
            st_mtime_ns=self.started_ns,
            st_ctime_ns=self.started_ns,
            attr_timeout=ATTR_TIMEOUT,
            entry_timeout=ENTRY_TIMEOUT,
        )

    def _device_attr(self, dev: Device) -> EntryAttributes:
        stored = self.store.device_stored_pages(dev)
        return EntryAttributes(
            st_ino=ROOT_INODE + 1 + dev.index,
            st_mode=stat.S_IFREG | 0o600,
            st_nlink=1,
            st_uid=self.uid,
            st_gid=self.gid,
            st_size=dev.size_bytes,
            st_blocks=stored * (PAGE // 512),
            st_atime_ns=self.started_ns,
            st_mtime_ns=self.started_ns,
            st_ctime_ns=self.started_ns,
            attr_timeout=ATTR_TIMEOUT,
            entry_timeout=ENTRY_TIMEOUT,
        )

    def _attr(self, inode: int) -> EntryAttributes:
        if inode == ROOT_INODE:
            return self._root_attr()
        return self._device_attr(self._device(inode))

    def _device(self, inode: int) -> Device:
        try:
            return self._by_inode[inode]
        except KeyError:
            if inode == ROOT_INODE:
                raise FUSEError(errno.EISDIR) from None
            raise FUSEError(errno.ENOENT) from None

    # -- names and attributes ---------------------------------------------

    async def lookup(self, parent: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        if parent != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        if name == b"." or name == b"..":
            return self._root_attr()
        dev = self._by_name.get(name)
        if dev is None:
            raise FUSEError(errno.ENOENT)
        return self._device_attr(dev)

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return self._attr(inode)

    async def setattr(self, inode: int, attr: SetattrFields, ctx: RequestContext) -> EntryAttributes:
        current = self._attr(inode)
        if attr.update_size and inode != ROOT_INODE and attr.st_size == current.st_size:
            attr.update_size = False  # O_TRUNC-free "truncate to the same size" is harmless
        if attr.update_size or attr.update_mode or attr.update_uid or attr.update_gid:
            # devices have a fixed size and fixed ownership
            raise FUSEError(errno.EPERM)
        return current  # time updates are accepted and forgotten

    async def access(self, inode: int, mask: int, ctx: RequestContext) -> None:
        self._attr(inode)  # existence; permissions are checked by the kernel (default_permissions)

    async def statfs(self, inode: int, ctx: RequestContext) -> StatvfsData:
        total = sum(d.npages for d in self.store.devices)
        used = sum(self.store.device_stored_pages(d) for d in self.store.devices)
        free = max(total - used, 0)
        return StatvfsData(
            f_bsize=PAGE,
            f_frsize=PAGE,
            f_blocks=total,
            f_bfree=free,
            f_bavail=free,
            f_files=len(self.store.devices) + 1,
            f_ffree=0,
            f_namemax=255,
        )

    # -- directory --------------------------------------------------------

    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        if inode != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        return ROOT_INODE

    async def readdir(self, fh: int, offset: int) -> Iterable[DirEntry]:
        return [e for e in self._dir_entries if e.next_offset > offset]

    # -- data -------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        self._device(inode)
        # O_TRUNC (passed here only with FUSE_ATOMIC_O_TRUNC) is ignored: the
        # size of a device never changes, as with a block device.
        return FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        dev = self._device(fh)
        try:
            data = await self.io.read(dev, offset, size)
            self._note_pool_peak()
            return data
        except StoreError as exc:
            log.error("read %s offset %d size %d: %s", dev.name, offset, size, exc)
            raise FUSEError(store_errno(exc)) from None

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        dev = self._device(fh)
        deadline = trio.current_time() + FULL_HOLD if FULL_HOLD else 0.0
        while True:
            try:
                written = await self.io.write(dev, offset, data)
                self._note_pool_peak()
                return written
            except NoSpace as exc:
                if trio.current_time() < deadline:
                    await trio.sleep(0.05)
                    continue
                log.error("write %s offset %d size %d: %s", dev.name, offset, len(data), exc)
                raise FUSEError(FULL_ERRNO) from None
            except StoreError as exc:
                if not isinstance(exc, OutOfRange):  # (the kernel's own probing past the end)
                    log.error("write %s offset %d size %d: %s", dev.name, offset, len(data), exc)
                raise FUSEError(store_errno(exc)) from None

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        dev = self._device(fh)
        if offset < 0 or length <= 0:
            raise FUSEError(errno.EINVAL)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
                raise FUSEError(errno.EOPNOTSUPP)  # punch-hole requires KEEP_SIZE (fallocate(2))
            if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise FUSEError(errno.EOPNOTSUPP)
            if offset >= dev.size_bytes:
                return
            try:
                await self.io.discard(dev, offset, length)
            except StoreError as exc:
                log.error("discard %s offset %d length %d: %s", dev.name, offset, length, exc)
                raise FUSEError(store_errno(exc)) from None
            return
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise FUSEError(errno.EOPNOTSUPP)  # collapse/insert range would move data
        if offset + length > dev.size_bytes and not mode & FALLOC_FL_KEEP_SIZE:
            raise FUSEError(errno.EFBIG)  # the device never grows
        # plain allocation inside the device: space is virtual, nothing to do

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._device(fh)  # every completed write is already in the store

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    # -- xattrs: stats and control ----------------------------------------

    def _note_pool_peak(self) -> None:
        pool_bytes = self.store.pool.pool_bytes
        if pool_bytes > self.pool_peak_bytes:
            self.pool_peak_bytes = pool_bytes

    def stats(self) -> Stats:
        """The store's stats with what this layer tracks (the pool's peak)."""
        self._note_pool_peak()
        return dataclasses.replace(self.store.stats(), pool_peak_bytes=self.pool_peak_bytes)

    def _stats_for(self, inode: int) -> tuple[dict, dict[str, str]]:
        """(the JSON object, {counter: text}) describing this inode."""
        full = self.stats().to_dict()
        if inode == ROOT_INODE:
            counters = flatten({k: v for k, v in full.items() if k not in ("devices", "totals")})
            counters.update(flatten(full["totals"]))
            return full, counters
        dev = self._device(inode)
        own = full["devices"][dev.name]
        return own, flatten(own)

    async def listxattr(self, inode: int, ctx: RequestContext) -> Sequence[bytes]:
        _, counters = self._stats_for(inode)
        ctl = [CTL_WRITEBACK, CTL_COMPACT, CTL_TRACE] if inode == ROOT_INODE else [CTL_WRITEBACK]
        return [STATS_XATTR, *ctl] + [XATTR_PREFIX + k.encode() for k in counters]

    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        if not name.startswith(XATTR_PREFIX):
            self._attr(inode)
            raise FUSEError(errno.ENODATA)
        if name == CTL_WRITEBACK:
            self._attr(inode)
            # reading it: the pages its last request on this file moved
            return str(self._ctl_results.get(inode, 0)).encode()
        if name == CTL_COMPACT and inode == ROOT_INODE:
            return f"{self._compacted[0]} {self._compacted[1]}".encode()
        if name == CTL_TRACE and inode == ROOT_INODE:
            return self._trace_status().encode()
        obj, counters = self._stats_for(inode)
        if name == STATS_XATTR:
            blob = json.dumps(obj, separators=(",", ":")).encode()
            if len(blob) > XATTR_SIZE_MAX:
                log.error("%s is %d bytes, above the kernel's xattr limit", STATS_XATTR.decode(), len(blob))
                raise FUSEError(errno.E2BIG)
            return blob
        text = counters.get(name[len(XATTR_PREFIX):].decode("utf-8", "replace"))
        if text is None:
            raise FUSEError(errno.ENODATA)
        return text.encode()

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, flags: int, ctx: RequestContext
    ) -> None:
        self._attr(inode)
        if name == CTL_WRITEBACK:
            await self._ctl_writeback(inode, value)
            return
        if name == CTL_COMPACT and inode == ROOT_INODE:
            if self.writeback is None:
                raise FUSEError(errno.EAGAIN)
            self._compacted = await self.writeback.compact()
            log.info("compaction request: %d objects moved, %d bytes released", *self._compacted)
            return
        if name == CTL_TRACE and inode == ROOT_INODE:
            await self._ctl_trace(bytes(value))
            return
        if name.startswith(XATTR_PREFIX):
            log.warning("setxattr %r refused: swapfs statistics are read-only", name)
            raise FUSEError(errno.EPERM)
        raise FUSEError(errno.ENOTSUP)  # swapfs stores no user xattrs

    async def _ctl_writeback(self, inode: int, value: bytes) -> None:
        """user.swapfs.ctl.writeback: ``N`` moves up to N of the pool's coldest
        pages down now, ``idle:SECONDS`` every pool page not accessed for that
        long; on the root for every device, on a device file for that one.
        Returns when the pages are moved."""
        m = _CTL_WRITEBACK_RE.fullmatch(bytes(value))
        wb = self.writeback
        if m is None:
            raise FUSEError(errno.EINVAL)
        if wb is None:
            raise FUSEError(errno.EAGAIN)
        dev = None if inode == ROOT_INODE else self._device(inode)
        try:
            if m.group(1) is not None:
                moved = await wb.writeback_pages(int(m.group(1)), dev)
            else:
                moved = await wb.writeback_idle(float(m.group(2)), dev)
        except StoreError as exc:
            log.error("writeback request failed: %s", exc)
            raise FUSEError(store_errno(exc)) from None
        self._ctl_results[inode] = moved
        log.info("writeback request %s on %s: %d pages moved", bytes(value).decode("ascii").strip(),
                 dev.name if dev else "all devices", moved)

    # -- traces (swapfs/trace.py) -----------------------------------------

    def _trace_status(self) -> str:
        t = self.tracer
        if t is None:
            return self._last_trace
        return f"on {t.path} {t.recorded} {t.dropped}"

    async def _ctl_trace(self, value: bytes) -> None:
        """user.swapfs.ctl.trace: ``PATH`` starts recording every request
        into a new file at PATH (absolute, not in this mount, not existing:
        O_EXCL); ``stop`` writes what is buffered and closes it."""
        text = value.rstrip(b"\n")
        if text == b"stop":
            await self.stop_trace()
            return
        if self.tracer is not None:
            raise FUSEError(errno.EBUSY)
        path = os.fsdecode(text)
        if not path.startswith("/") or "\0" in path:
            raise FUSEError(errno.EINVAL)
        path = posixpath.normpath(path)  # (a string operation: no system call)
        mp = self.mountpoint
        if mp is not None and (path == mp or path.startswith(mp.rstrip("/") + "/")):
            log.warning("trace file %s refused: it is in the mount", path)
            raise FUSEError(errno.EINVAL)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = await trio.to_thread.run_sync(os.open, path, flags, 0o600)
        except OSError as exc:
            log.warning("trace file %s: %s", path, exc.strerror)
            raise FUSEError(exc.errno or errno.EIO) from None
        tracer = Tracer(fd, [(d.name, d.size_bytes) for d in self.store.devices], path=path)
        try:
            await tracer.start()
        except OSError as exc:
            await tracer.close()
            raise FUSEError(exc.errno or errno.EIO) from None
        self.tracer = tracer
        self.io = TracedIO(self.store, tracer)
        log.info("tracing requests into %s", path)

    async def stop_trace(self) -> None:
        """Stop recording (if on): write what is buffered, close the file."""
        tracer = self.tracer
        if tracer is None:
            return
        self.io = self.store
        self.tracer = None
        try:
            await tracer.close()
        finally:
            self._last_trace = f"off {tracer.path} {tracer.recorded} {tracer.dropped}"
            log.info("trace %s: %d requests recorded, %d dropped", tracer.path,
                     tracer.recorded, tracer.dropped)

    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        self._attr(inode)
        if name.startswith(XATTR_PREFIX):
            raise FUSEError(errno.EPERM)
        raise FUSEError(errno.ENODATA)
