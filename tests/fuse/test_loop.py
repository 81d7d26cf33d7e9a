"""A loop device with direct I/O on a file in the mount: discard reaches FALLOCATE."""

from __future__ import annotations

import os
import shutil

import pytest

from .conftest import MiB, sh, sync
from .memfs import MemFS

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup (util-linux) not installed"),
]


def read_sys(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def read_direct(dev: str, offset: int, size: int) -> bytes:
    import mmap

    buf = mmap.mmap(-1, size)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


async def test_loop_discard_reaches_fallocate(mount_memfs):
    pattern = bytes(range(1, 256)) + b"\xff"
    fs = MemFS({b"disk": pattern * (64 * MiB // 256)})
    async with mount_memfs(fs) as m:
        r = await sh("losetup", "--direct-io=on", "-f", "--show", m.p("disk"))
        dev = r.stdout.decode().strip()
        name = os.path.basename(dev)
        try:
            assert read_sys(f"/sys/block/{name}/loop/dio") == "1"
            assert int(read_sys(f"/sys/block/{name}/queue/discard_max_bytes")) > 0
            assert await sync(read_direct, dev, 2 * MiB, 4096) == pattern * 16
            fs.fallocate_calls.clear()
            await sh("blkdiscard", "-o", str(2 * MiB), "-l", str(MiB), dev)
            assert fs.fallocate_calls, "no FALLOCATE reached the filesystem"
            assert {c[3] for c in fs.fallocate_calls} == {3}  # PUNCH_HOLE | KEEP_SIZE
            covered = sorted((c[1], c[1] + c[2]) for c in fs.fallocate_calls)
            assert covered[0][0] == 2 * MiB and covered[-1][1] == 3 * MiB
            assert bytes(fs.by_name[b"disk"].data[2 * MiB : 3 * MiB]) == bytes(MiB)
            assert await sync(read_direct, dev, 2 * MiB, MiB) == bytes(MiB)
            assert await sync(read_direct, dev, 3 * MiB, 4096) == pattern * 16
            assert len(fs.by_name[b"disk"].data) == 64 * MiB
        finally:
            await sh("losetup", "-d", dev, check=False)
