"""The operations interface a filesystem implements to be served by swapfs.fuse.

This module is the whole contract between the protocol layer (session.py,
which parses requests from /dev/fuse and writes replies) and a filesystem.
It knows nothing of swap.

Every handler is an ``async def``.  The session starts each handler inline,
in the task that read the request: a handler that finishes without
suspending (no ``await`` that actually blocks) is answered at once, before
the next request is read -- the fast path.  A handler that suspends (disk
I/O, a lock) keeps running in that task while another task takes over
reading /dev/fuse, up to a bound on suspended handlers.  So handlers may
interleave at every ``await`` and nowhere else.

A handler reports failure only by raising :class:`FUSEError` with an errno.
Any other exception is logged with its traceback and answered with EIO; the
daemon keeps serving.

Buffers: the ``data`` memoryview given to :meth:`Operations.write` points
into the request buffer and is valid only until the handler returns (copy
what must outlive it).  :meth:`Operations.read` may return any object
supporting the buffer protocol; it is written to the kernel before the
next request is read by that task.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

ROOT_INODE = 1


class FUSEError(Exception):
    """Raised by a handler: the request is answered with this errno (1..511; any other
    value is logged and answered EIO: the kernel refuses -512 and below)."""

    def __init__(self, errno_: int, message: str = "") -> None:
        super().__init__(errno_, message or errno.errorcode.get(errno_, str(errno_)))
        self.errno = errno_


class RequestContext(NamedTuple):
    """Who asked: from fuse_in_header."""

    uid: int
    gid: int
    pid: int


@dataclass(slots=True)
class ConnectionInfo:
    """What INIT negotiated; given to :meth:`Operations.init`."""

    proto_major: int = 7
    proto_minor: int = 0
    max_write: int = 0
    max_read: int = 0
    max_pages: int = 0
    max_readahead: int = 0
    flags: int = 0  # granted FUSE_* capability flags (flags | flags2 << 32)


@dataclass(slots=True)
class EntryAttributes:
    """Attributes of an inode, as returned by lookup, getattr and setattr."""

    st_ino: int = 0
    generation: int = 0
    entry_timeout: float = 0.0  # seconds the kernel may cache the name
    attr_timeout: float = 0.0  # seconds the kernel may cache the attributes
    st_mode: int = 0
    st_nlink: int = 1
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blksize: int = 4096
    st_blocks: int = 0  # in 512-byte units
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0


@dataclass(slots=True)
class SetattrFields:
    """What a SETATTR request asks to change: a field is set only if its flag is."""

    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    st_mode: int = 0
    st_uid: int = 0
    st_gid: int = 0
    st_size: int = 0
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0
    fh: int | None = None  # set when the kernel passed a file handle (FATTR_FH)

    def any(self) -> bool:
        return (
            self.update_mode
            or self.update_uid
            or self.update_gid
            or self.update_size
            or self.update_atime
            or self.update_mtime
            or self.update_ctime
        )


@dataclass(slots=True)
class FileInfo:
    """Returned by open: the handle and how the kernel should treat the file."""

    fh: int = 0
    direct_io: bool = False  # FOPEN_DIRECT_IO: bypass the page cache
    keep_cache: bool = False  # FOPEN_KEEP_CACHE
    nonseekable: bool = False  # FOPEN_NONSEEKABLE


@dataclass(slots=True)
class StatvfsData:
    f_bsize: int = 4096
    f_frsize: int = 4096
    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_namemax: int = 255


class DirEntry(NamedTuple):
    """One directory entry.  ``next_offset`` is the cookie that readdir is
    called with to continue after this entry (must be > 0 and strictly
    increasing within one listing)."""

    name: bytes
    attr: EntryAttributes
    next_offset: int


@dataclass(slots=True)
class ForgetItem:
    inode: int
    nlookup: int = field(default=1)


def _nosys() -> FUSEError:
    return FUSEError(errno.ENOSYS)


class Operations:
    """Base class: override what the filesystem supports.

    Defaults answer ENOSYS (the kernel then stops asking for some of them,
    for example FLUSH, FSYNC, xattrs, FALLOCATE, ACCESS), except that
    release, releasedir, flush and forget succeed doing nothing.  Requests
    outside this interface that would change the namespace (mknod, mkdir,
    unlink, rmdir, symlink, rename, link, create) are answered EPERM by the
    session itself; any other unknown opcode gets ENOSYS.
    """

    async def init(self, conn: ConnectionInfo) -> None:
        """Called once INIT is answered, before any other request."""

    async def destroy(self) -> None:
        """Called when the kernel sends DESTROY or the connection ends."""

    async def lookup(self, parent: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        raise FUSEError(errno.ENOENT)

    async def forget(self, items: Sequence[ForgetItem]) -> None:
        """FORGET and BATCH_FORGET: never answered."""

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        raise _nosys()

    async def setattr(
        self, inode: int, attr: SetattrFields, ctx: RequestContext
    ) -> EntryAttributes:
        raise _nosys()

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        raise _nosys()

    async def read(self, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        raise _nosys()

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        raise _nosys()

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        raise _nosys()

    async def release(self, fh: int) -> None:
        pass

    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        raise _nosys()

    async def readdir(self, fh: int, offset: int) -> Iterable[DirEntry]:
        """Entries after cookie ``offset`` (0: from the start).  The session
        packs as many as fit in the kernel's buffer and stops early."""
        raise _nosys()

    async def releasedir(self, fh: int) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        raise _nosys()

    async def statfs(self, inode: int, ctx: RequestContext) -> StatvfsData:
        raise _nosys()

    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        """The whole value; the session answers size probes and ERANGE."""
        raise _nosys()

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, flags: int, ctx: RequestContext
    ) -> None:
        raise _nosys()

    async def listxattr(self, inode: int, ctx: RequestContext) -> Sequence[bytes]:
        """Names without terminating NULs; the session joins them."""
        raise _nosys()

    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        raise _nosys()

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        raise _nosys()

    async def access(self, inode: int, mask: int, ctx: RequestContext) -> None:
        raise _nosys()
