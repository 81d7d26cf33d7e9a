"""An in-memory example filesystem served by swapfs.fuse.

A root directory with a few regular files backed by bytearrays; xattrs in a
dict; fallocate punch-hole zeroes the range and every fallocate call is
recorded.  Tests subclass or configure it; ``python tests/fuse/memfs.py
MOUNTPOINT --size 512M`` serves one file ``data`` (used by scripts/bench-fuse).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import trio

from swapfs.fuse import (
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

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


@dataclass
class Node:
    ino: int
    name: bytes
    mode: int
    data: bytearray = field(default_factory=bytearray)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    mtime_ns: int = field(default_factory=time.time_ns)
    atime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)
    uid: int = 0
    gid: int = 0


class MemFS(Operations):
    """Files are given as {name: initial content or size}."""

    def __init__(self, files: dict[bytes, bytes | int] | None = None, *, direct_io: bool = False) -> None:
        self.direct_io = direct_io
        self.root = Node(ROOT_INODE, b"", stat.S_IFDIR | 0o755, uid=os.getuid(), gid=os.getgid())
        self.nodes: dict[int, Node] = {ROOT_INODE: self.root}
        self.by_name: dict[bytes, Node] = {}
        for name, content in (files or {}).items():
            self.add_file(name, content)
        self.fallocate_calls: list[tuple[int, int, int, int]] = []
        self.fsync_calls: list[tuple[int, bool]] = []
        self.forgotten: list[tuple[int, int]] = []
        self.conn = None
        self.destroyed = False

    def add_file(self, name: bytes, content: bytes | int, mode: int = 0o644) -> Node:
        data = bytearray(content) if not isinstance(content, int) else bytearray(content)
        node = Node(len(self.nodes) + 1, name, stat.S_IFREG | mode, data, uid=os.getuid(), gid=os.getgid())
        self.nodes[node.ino] = node
        self.by_name[name] = node
        return node

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def attrs(self, node: Node) -> EntryAttributes:
        size = len(node.data)
        return EntryAttributes(
            st_ino=node.ino,
            entry_timeout=1.0,
            attr_timeout=1.0,
            st_mode=node.mode,
            st_nlink=2 if node is self.root else 1,
            st_uid=node.uid,
            st_gid=node.gid,
            st_size=size,
            st_blocks=(size + 511) // 512,
            st_atime_ns=node.atime_ns,
            st_mtime_ns=node.mtime_ns,
            st_ctime_ns=node.ctime_ns,
        )

    # -- Operations ----------------------------------------------------------

    async def init(self, conn):
        self.conn = conn

    async def destroy(self):
        self.destroyed = True

    async def lookup(self, parent: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        if parent != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self.attrs(self.root)
        node = self.by_name.get(name)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return self.attrs(node)

    async def forget(self, items):
        self.forgotten.extend((i.inode, i.nlookup) for i in items)

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return self.attrs(self._node(inode))

    async def setattr(self, inode: int, attr: SetattrFields, ctx: RequestContext) -> EntryAttributes:
        node = self._node(inode)
        if attr.update_size:
            if node is self.root:
                raise FUSEError(errno.EISDIR)
            old = node.data
            new = bytearray(attr.st_size)  # a new buffer: the old one may still be exported
            new[: min(len(old), attr.st_size)] = old[: attr.st_size]
            node.data = new
            node.mtime_ns = time.time_ns()
        if attr.update_mode:
            node.mode = (node.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if attr.update_uid:
            node.uid = attr.st_uid
        if attr.update_gid:
            node.gid = attr.st_gid
        if attr.update_atime:
            node.atime_ns = attr.st_atime_ns
        if attr.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if attr.update_ctime else time.time_ns()
        return self.attrs(node)

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        node = self._node(inode)
        if node is self.root:
            raise FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:  # FUSE_ATOMIC_O_TRUNC: the truncation comes with the open
            node.data = bytearray()
        return FileInfo(fh=inode, direct_io=self.direct_io)

    async def read(self, fh: int, offset: int, size: int):
        return memoryview(self.nodes[fh].data)[offset : offset + size]

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        node = self.nodes[fh]
        end = offset + len(data)
        if end > len(node.data):
            new = bytearray(end)
            new[: len(node.data)] = node.data
            node.data = new
        node.data[offset:end] = data
        return len(data)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.fsync_calls.append((fh, datasync))

    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        if inode != ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        return 0

    async def readdir(self, fh: int, offset: int):
        entries = [(b".", self.root), (b"..", self.root)] + [(n.name, n) for n in self.by_name.values()]
        return [DirEntry(name, self.attrs(node), i + 1) for i, (name, node) in enumerate(entries) if i >= offset]

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, inode: int, ctx: RequestContext) -> StatvfsData:
        used = sum(len(n.data) for n in self.nodes.values())
        total = max(1 << 30, used)
        return StatvfsData(
            f_bsize=4096,
            f_frsize=4096,
            f_blocks=total // 4096,
            f_bfree=(total - used) // 4096,
            f_bavail=(total - used) // 4096,
            f_files=len(self.nodes),
            f_ffree=0,
            f_namemax=255,
        )

    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        try:
            return self._node(inode).xattrs[name]
        except KeyError:
            raise FUSEError(errno.ENODATA) from None

    async def setxattr(self, inode: int, name: bytes, value: bytes, flags: int, ctx: RequestContext) -> None:
        xattrs = self._node(inode).xattrs
        if flags & XATTR_CREATE and name in xattrs:
            raise FUSEError(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in xattrs:
            raise FUSEError(errno.ENODATA)
        xattrs[name] = value

    async def listxattr(self, inode: int, ctx: RequestContext):
        return list(self._node(inode).xattrs)

    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        try:
            del self._node(inode).xattrs[name]
        except KeyError:
            raise FUSEError(errno.ENODATA) from None

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        self.fallocate_calls.append((fh, offset, length, mode))
        node = self.nodes[fh]
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            end = min(offset + length, len(node.data))
            if offset < end:
                node.data[offset:end] = bytes(end - offset)
        elif mode in (0, FALLOC_FL_KEEP_SIZE):
            if mode == 0 and offset + length > len(node.data):
                new = bytearray(offset + length)
                new[: len(node.data)] = node.data
                node.data = new
        else:
            raise FUSEError(errno.EOPNOTSUPP)

    async def access(self, inode: int, mask: int, ctx: RequestContext) -> None:
        node = self._node(inode)
        if mask & os.W_OK and not node.mode & 0o222:
            raise FUSEError(errno.EACCES)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1:].upper()]
    return int(text)


async def _main(mountpoint: str, size: int, direct_io: bool, poll_us: int = 0,
                transport: str = "classic") -> None:
    from swapfs.fuse import serve

    fs = MemFS({b"data": size}, direct_io=direct_io)
    with trio.open_signal_receiver(2, 15) as signals:  # SIGINT, SIGTERM
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, fs, mountpoint, poll_us=poll_us, transport=transport))
            print("ready", flush=True)
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)


async def _cancel_on_signal(signals, scope) -> None:
    async for _ in signals:
        scope.cancel()
        return


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="serve an in-memory file 'data' with swapfs.fuse")
    p.add_argument("mountpoint")
    p.add_argument("--size", default="512M")
    p.add_argument("--direct-io", action="store_true", help="open files with FOPEN_DIRECT_IO")
    p.add_argument("--poll-us", type=int, default=0, help="busy-poll /dev/fuse before parking")
    p.add_argument("--transport", default="classic", choices=["classic", "uring", "auto"])
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    trio.run(_main, a.mountpoint, _size(a.size), a.direct_io, a.poll_us, a.transport)
    sys.exit(0)
