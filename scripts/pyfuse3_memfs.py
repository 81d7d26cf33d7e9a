#!/usr/bin/env python3
"""The benchmark's reference: one in-memory file 'data' served by pyfuse3.

Usage: pyfuse3_memfs.py MOUNTPOINT [--size 512M] [--direct-io]; prints "ready" once
mounted, unmounts on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

DATA_INODE = pyfuse3.ROOT_INODE + 1


class MemFile(pyfuse3.Operations):
    def __init__(self, size: int, direct_io: bool = False) -> None:
        super().__init__()
        self.data = bytearray(size)
        self.direct_io = direct_io

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.entry_timeout = a.attr_timeout = 1.0
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = len(self.data)
            a.st_blocks = (len(self.data) + 511) // 512
        a.st_blksize = 4096
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, DATA_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"data":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(DATA_INODE)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"data", self._attr(DATA_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != DATA_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=False, direct_io=self.direct_io)

    async def read(self, fh, off, size):
        return bytes(self.data[off : off + size])

    async def write(self, fh, off, buf):
        self.data[off : off + len(buf)] = buf
        return len(buf)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = max(len(self.data), 1 << 30) // 4096
        s.f_bfree = s.f_bavail = s.f_blocks - len(self.data) // 4096
        s.f_namemax = 255
        return s


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1:].upper()]
    return int(text)


async def _run() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mountpoint")
    p.add_argument("--size", default="512M")
    p.add_argument("--direct-io", action="store_true", help="open files with FOPEN_DIRECT_IO")
    a = p.parse_args()
    fs = MemFile(_size(a.size), a.direct_io)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=pyfuse3_memfs")
    opts.discard("default_permissions")
    opts.add("default_permissions")
    pyfuse3.init(fs, a.mountpoint, opts)
    try:
        trio.run(_run)
    finally:
        pyfuse3.close(unmount=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
