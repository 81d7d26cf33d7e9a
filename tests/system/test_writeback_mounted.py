"""Writeback behind a real mount: the control xattr, watermarks under concurrent I/O, a large device."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from swapfs import kernel
from swapfs.codec import make_codec

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
PAGE = 4096


def config(tmp_path, pool="4M", keep_writeback=True):
    return f"""
[pool]
algorithm = "lz4"
max_bytes = "{pool}"
high_watermark = 0.5
low_watermark = 0.3

[[device]]
name = "swap0"
size = "32M"

[[device]]
name = "keep"
size = "4M"
writeback = {"true" if keep_writeback else "false"}

[[tier]]
name = "ssd"
kind = "file"
path = "{tmp_path}/ssd.img"
size = "64M"
priority = 10
"""


def text_page(i: int, k: int = 0) -> bytes:
    return (b"page %d version %d " % (i, k) * 300)[:PAGE]


def test_ctl_writeback_xattr(mount_factory, tmp_path):
    m = mount_factory(config(tmp_path, pool="16M", keep_writeback=False))
    data = b"".join(text_page(i) for i in range(256))
    keep = b"".join(text_page(i, 9) for i in range(64))
    with open(m.dev(), "r+b", buffering=0) as f:
        f.write(data)
    with open(m.dev("keep"), "r+b", buffering=0) as f:
        f.write(keep)
    # garbage never crashes nor moves anything
    for bad in (b"", b"-1", b"x", b"idle:", b"idle:-3", b"12abc", b"\xff\x00", b"1" * 20,
                b"idle:1e9", b" 5"):
        with pytest.raises(OSError) as e:
            os.setxattr(m.path, "user.swapfs.ctl.writeback", bad)
        assert e.value.errno == errno.EINVAL, bad
    assert m.stats()["writeback"]["moved_pages"] == 0
    # read-only stats names keep refusing
    with pytest.raises(OSError) as e:
        os.setxattr(m.path, "user.swapfs.writeback.moved_pages", b"0")
    assert e.value.errno == errno.EPERM
    os.setxattr(m.dev(), "user.swapfs.ctl.writeback", b"100")
    s = m.stats()
    assert s["writeback"]["moved_pages"] == 100
    assert s["tiers"]["ssd"]["stored_pages"] == 100
    assert s["writeback"]["pairs"]["pool_to_ssd"]["pages"] == 100
    # the no-writeback device keeps its pages in memory
    os.setxattr(m.dev("keep"), "user.swapfs.ctl.writeback", b"idle:0")
    os.setxattr(m.path, "user.swapfs.ctl.writeback", b"idle:0")
    s = m.stats()
    assert s["tiers"]["ssd"]["stored_pages"] == 256
    assert s["devices"]["keep"]["pool_pages"] == 64
    assert os.getxattr(m.path, "user.swapfs.writeback.moved_pages") == b"256"
    with open(m.dev(), "rb", buffering=0) as f:
        assert f.read(len(data)) == data
    with open(m.dev("keep"), "rb", buffering=0) as f:
        assert f.read(len(keep)) == keep
    s = m.stats()
    assert s["writeback"]["refaults"] == 256
    t = s["totals"]
    assert t["stored_pages"] == t["same_filled_pages"] + sum(x["stored_pages"] for x in s["tiers"].values())


def test_watermarks_under_concurrent_io(mount_factory, tmp_path):
    """Writers, readers and punchers through the mount while writeback keeps
    the 4 MiB pool under its watermarks: every read is one of the values the
    model allows."""
    m = mount_factory(config(tmp_path))
    npages = 32 * MiB // PAGE
    lock = threading.Lock()
    owner = [-1] * npages  # page -> thread currently changing it
    model = [bytes(PAGE)] * npages
    errors: list[str] = []
    fd = os.open(m.dev(), os.O_RDWR)
    # Start above the high watermark, so writeback runs while the workers do
    # (half-random pages: about 2.5 KiB each in the pool, 6 MiB for 1024).
    fill = [random.Random(i).randbytes(PAGE // 2) + text_page(i)[:PAGE // 2] for i in range(1024)]
    os.pwrite(fd, b"".join(fill), 0)
    model[:1024] = fill

    def worker(t: int) -> None:
        rng = random.Random(t)
        try:
            for k in range(400):
                i = rng.randrange(npages - 4)
                n = rng.randrange(1, 4)
                with lock:
                    if any(owner[i + j] != -1 for j in range(n)):
                        continue
                    for j in range(n):
                        owner[i + j] = t
                r = rng.random()
                if r < 0.5:
                    pages = [random.Random(i + j + 7 * k + t).randbytes(PAGE // 2)
                             + text_page(i + j, t * 1000 + k)[:PAGE // 2] for j in range(n)]
                    os.pwrite(fd, b"".join(pages), i * PAGE)
                elif r < 0.6:
                    pages = [bytes(PAGE)] * n
                    _punch(fd, i * PAGE, n * PAGE)
                else:
                    pages = None
                    got = os.pread(fd, n * PAGE, i * PAGE)
                    for j in range(n):
                        if got[j * PAGE:(j + 1) * PAGE] != model[i + j]:
                            errors.append(f"page {i + j} read wrong")
                with lock:
                    for j in range(n):
                        if pages is not None:
                            model[i + j] = pages[j]
                        owner[i + j] = -1
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors, errors[:5]
        for i in range(0, npages, 64):
            got = os.pread(fd, 64 * PAGE, i * PAGE)
            for j in range(64):
                assert got[j * PAGE:(j + 1) * PAGE] == model[i + j], f"page {i + j}"
    finally:
        os.close(fd)
    s = m.stats()
    deadline = time.monotonic() + 10  # the task runs every 0.25 s, or when kicked
    while s["writeback"]["moved_pages"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        s = m.stats()
    assert s["writeback"]["moved_pages"] > 0
    assert s["tiers"]["pool"]["pool_bytes"] <= 4 * MiB
    assert s["writeback"]["watermarks"]["pool"]["high"] == 2 * MiB


def _punch(fd: int, offset: int, length: int) -> None:
    kernel.fallocate(fd, kernel.FALLOC_FL_KEEP_SIZE | kernel.FALLOC_FL_PUNCH_HOLE, offset, length)


@pytest.mark.slow
def test_large_device_used_at_its_start_drains(mount_factory, tmp_path):
    """A 64 GiB device, 48 MiB written at its start (as the kernel fills swap
    from the start) into a 16 MiB zstd pool over a file tier: writeback
    keeps the pool near its high watermark and brings it under it soon after
    the writes, whatever the empty rest of the device; every page reads back."""
    m = mount_factory(f"""
[pool]
algorithm = "zstd"
max_bytes = "16M"
high_watermark = 0.5
low_watermark = 0.3

[[device]]
name = "swap0"
size = "64G"

[[tier]]
name = "disk"
kind = "file"
path = "{tmp_path}/disk.img"
size = "256M"
priority = 1
""")
    npages = 48 * MiB // PAGE
    pages = [random.Random(i).randbytes(PAGE // 4) + text_page(i)[:3 * PAGE // 4] for i in range(npages)]
    fd = os.open(m.dev(), os.O_RDWR | os.O_DIRECT)
    try:
        buf = bytearray(b"".join(pages))
        view = memoryview(buf)
        for off in range(0, len(buf), MiB):
            assert os.pwrite(fd, view[off:off + MiB], off) == MiB
        high = 8 * MiB
        deadline = time.monotonic() + 10
        s = m.stats()
        while s["tiers"]["pool"]["pool_bytes"] > high and time.monotonic() < deadline:
            time.sleep(0.05)
            s = m.stats()
        assert s["tiers"]["pool"]["pool_bytes"] <= high, s["tiers"]["pool"]
        assert s["writeback"]["moved_pages"] > 0
        assert s["tiers"]["disk"]["stored_pages"] > 0
        for off in range(0, len(buf), MiB):
            got = os.pread(fd, MiB, off)
            for j in range(MiB // PAGE):
                assert got[j * PAGE:(j + 1) * PAGE] == pages[off // PAGE + j], f"page {off // PAGE + j}"
    finally:
        os.close(fd)


def test_recompress_through_the_mount(mount_factory):
    """pool.recompress = "zstd" with recompress_after = 0: the daemon's
    writeback task recompresses what was written, the pool holds less, and
    every page reads back exact through the mount."""
    m = mount_factory("""
[pool]
algorithm = "lz4"
max_bytes = "64M"
recompress = "zstd"
recompress_after = 0

[[device]]
name = "swap0"
size = "64M"
""")
    npages = 2048
    data = b"".join(text_page(i) for i in range(npages))
    fd = os.open(m.dev(), os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        # what the pool held in lz4, computed here: the writeback task may have recompressed
        # pages before a first look at the stats could see them
        lz4 = make_codec("lz4")
        as_lz4 = sum(len(lz4.compress(data[i * PAGE:(i + 1) * PAGE])) for i in range(npages))
        deadline = time.monotonic() + 20
        pool = m.stats()["tiers"]["pool"]
        while pool["recompressed_pages"] < npages // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            pool = m.stats()["tiers"]["pool"]
        assert pool["recompress"] == "zstd"
        assert pool["recompressed_pages"] >= npages // 2, pool
        assert pool["recompress_saved_bytes"] > 0
        assert pool["compressed_bytes"] < as_lz4
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
