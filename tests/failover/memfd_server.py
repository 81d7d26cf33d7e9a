"""A test filesystem whose state survives its server: one file ``data`` whose bytes are a shared
mapping of a memfd held by the keeper (swapfs.keeper), served with swapfs.fuse.handoff.

    python -m tests.failover.memfd_server --keeper SOCK start MOUNTPOINT --size 64M
    python -m tests.failover.memfd_server --keeper SOCK takeover [--standby | --upgrade]

``--respawn-standby`` starts a new standby once this server serves.  The server
prints ``serving <monotonic seconds when it started reading>`` once it serves.
"""

from __future__ import annotations

import argparse
import errno
import logging
import mmap
import os
import stat
import sys
import time
from collections.abc import Mapping

import trio

from swapfs.fuse import (
    ROOT_INODE,
    DirEntry,
    EntryAttributes,
    FileInfo,
    FUSEError,
    Operations,
    RequestContext,
    StatvfsData,
)
from swapfs.fuse.handoff import FailoverServer, TakeoverRefused

DATA_INO = 2
VERSION = 1


class MemfdFS(Operations):
    """Root plus ``data``; every byte of ``data`` lives in the memfd (nothing in the process)."""

    def __init__(self, memfd: int) -> None:
        self.size = os.fstat(memfd).st_size
        self.map = mmap.mmap(memfd, self.size, mmap.MAP_SHARED)
        self.mv = memoryview(self.map)
        self.resent = 0

    def attrs(self, ino: int) -> EntryAttributes:
        if ino == ROOT_INODE:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        elif ino == DATA_INO:
            mode, size, nlink = stat.S_IFREG | 0o644, self.size, 1
        else:
            raise FUSEError(errno.ENOENT)
        return EntryAttributes(st_ino=ino, st_mode=mode, st_nlink=nlink, st_size=size,
                               st_blocks=(size + 511) // 512, entry_timeout=60, attr_timeout=60)

    async def lookup(self, parent: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        if parent == ROOT_INODE and name == b"data":
            return self.attrs(DATA_INO)
        raise FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return self.attrs(inode)

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        if inode != DATA_INO:
            raise FUSEError(errno.EISDIR)
        return FileInfo(fh=DATA_INO, direct_io=True)  # fh needs no state: any server knows it

    async def read(self, fh: int, offset: int, size: int) -> memoryview:
        return self.mv[offset: min(offset + size, self.size)]

    async def write(self, fh: int, offset: int, data: memoryview) -> int:
        end = offset + len(data)
        if end > self.size:
            raise FUSEError(errno.ENOSPC)
        self.mv[offset:end] = data
        return len(data)

    async def release(self, fh: int) -> None:
        pass

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        return 0

    async def readdir(self, fh: int, offset: int) -> list[DirEntry]:
        entries = [(b".", ROOT_INODE), (b"..", ROOT_INODE), (b"data", DATA_INO)]
        return [DirEntry(n, self.attrs(i), k + 1) for k, (n, i) in enumerate(entries) if k >= offset]

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, inode: int, ctx: RequestContext) -> StatvfsData:
        blocks = self.size // 4096
        return StatvfsData(f_bsize=4096, f_frsize=4096, f_blocks=blocks, f_bfree=0, f_bavail=0,
                           f_files=2, f_ffree=0, f_namemax=255)

    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        raise FUSEError(errno.ENODATA)

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        if mode not in (0, 1, 3):
            raise FUSEError(errno.EOPNOTSUPP)
        if mode == 3:  # punch hole, keep size
            end = min(offset + length, self.size)
            if offset < end:
                self.mv[offset:end] = bytes(end - offset)

    async def access(self, inode: int, mask: int, ctx: RequestContext) -> None:
        pass


def factory(size: int):
    def make(fds: Mapping[str, int] | None) -> tuple[Operations, dict[str, int]]:
        if fds is None:
            memfd = os.memfd_create("swapfs-test-data")
            os.ftruncate(memfd, size)
            return MemfdFS(memfd), {"data": memfd}
        return MemfdFS(fds["data"]), {}
    return make


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else int(text)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--keeper", required=True)
    p.add_argument("--version", type=int, default=VERSION)
    p.add_argument("--readable", help="state versions this server reads, comma-separated")
    p.add_argument("--respawn-standby", action="store_true",
                   help="once serving, start a standby (which does the same when it takes over)")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("start")
    s.add_argument("mountpoint")
    s.add_argument("--size", default="64M")
    t = sub.add_parser("takeover")
    t.add_argument("--standby", action="store_true")
    t.add_argument("--upgrade", action="store_true")
    t.add_argument("--lock", action="store_true", help="lock memory (a standby)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[{os.getpid()}] %(name)s %(levelname)s %(message)s")
    standby_cmd = None
    if a.respawn_standby:
        standby_cmd = [sys.executable, "-m", "tests.failover.memfd_server", "--keeper", a.keeper,
                       "--version", str(a.version), "--respawn-standby",
                       *(["--readable", a.readable] if a.readable else []),
                       "takeover", "--standby", "--lock"]
    server = FailoverServer(factory(_size(getattr(a, "size", "0"))), a.keeper, version=a.version,
                            readable=[int(v) for v in a.readable.split(",")] if a.readable else None,
                            standby_cmd=standby_cmd)

    if a.mode == "takeover" and a.lock:
        from swapfs.keeper import lock_memory
        problems = lock_memory()
        if problems:
            logging.warning("standby: %s", problems)
    refused: list[str] = []
    try:
        trio.run(_main, server, a)
    except* TakeoverRefused as group:
        refused.append(str(group.exceptions[0]))
    if refused:
        print(f"refused: {refused[0]}", flush=True)
        return 3
    if server.session is not None and server.session.handed_off:
        sys.stdout.flush()
        os._exit(0)  # the successor waits for this exit: no interpreter teardown
    return 0


async def _main(server: FailoverServer, a: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        if a.mode == "start":
            await nursery.start(lambda task_status: server.start(
                a.mountpoint, default_permissions=False, task_status=task_status))
        else:
            await nursery.start(lambda task_status: server.take_over(
                standby=a.standby, upgrade=a.upgrade, task_status=task_status))
        print(f"serving {server.resumed_at or time.monotonic():.6f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
