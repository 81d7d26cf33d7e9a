"""The mounted swapfs, through the kernel: data, refusals, discard, xattrs."""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import stat
import subprocess

import pytest

PAGE = 4096
MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(90)


def pread_all(path, offset, size) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def pwrite_all(path, offset, data) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_layout_and_attributes(mnt):
    assert sorted(os.listdir(mnt.path)) == ["swap0", "swap1"]
    root = os.stat(mnt.path)
    assert stat.S_ISDIR(root.st_mode) and stat.S_IMODE(root.st_mode) == 0o700
    st = os.stat(mnt.dev())
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 64 * MiB
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    assert os.stat(mnt.dev("swap1")).st_size == 8 * MiB
    with pytest.raises(FileNotFoundError):
        os.stat(mnt.path / "nope")
    vfs = os.statvfs(mnt.path)
    assert vfs.f_bsize == PAGE and vfs.f_blocks == (64 + 8) * MiB // PAGE
    assert os.access(mnt.dev(), os.R_OK | os.W_OK)


def test_fresh_device_reads_zeros(mnt):
    assert pread_all(mnt.dev(), 0, 3 * PAGE) == bytes(3 * PAGE)
    assert pread_all(mnt.dev(), 64 * MiB - 100, 100) == bytes(100)


def test_aligned_round_trip_with_o_direct(mnt):
    rng = random.Random(1)
    data = bytes(rng.getrandbits(8) for _ in range(PAGE)) * 2 + b"swapfs!!" * 1024 + bytes(PAGE)
    buf = mmap.mmap(-1, len(data))  # O_DIRECT wants an aligned buffer
    buf[:] = data
    fd = os.open(mnt.dev(), os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], 16 * PAGE) == len(data)
        out = mmap.mmap(-1, len(data))
        assert os.preadv(fd, [out], 16 * PAGE) == len(data)
        assert bytes(out) == data
    finally:
        os.close(fd)
    assert pread_all(mnt.dev(), 16 * PAGE, len(data)) == data


def test_unaligned_random_io_matches_model(mnt):
    size = 2 * MiB
    model = bytearray(size)
    rng = random.Random(7)
    fd = os.open(mnt.dev(), os.O_RDWR)
    try:
        for i in range(300):
            off = rng.randrange(0, size - 1)
            length = rng.randrange(1, min(3 * PAGE, size - off) + 1)
            kind = rng.choice(["random", "text", "zero", "fill"])
            if kind == "random":
                chunk = rng.randbytes(length)
            elif kind == "text":
                chunk = (b"page %d " % i * (length // 6 + 1))[:length]
            elif kind == "zero":
                chunk = bytes(length)
            else:
                chunk = (rng.randbytes(8) * (length // 8 + 1))[:length]
            assert os.pwrite(fd, chunk, off) == length
            model[off:off + length] = chunk
            if i % 10 == 0:
                roff = rng.randrange(0, size)
                rlen = rng.randrange(1, 5 * PAGE)
                assert os.pread(fd, rlen, roff) == bytes(model[roff:roff + rlen])
        got = bytearray()
        for off in range(0, size, 256 * 1024):
            got += os.pread(fd, 256 * 1024, off)
        assert got == model
    finally:
        os.close(fd)
    mnt_stats = mnt.stats()
    assert mnt_stats["devices"]["swap0"]["writes"] >= 300


def test_same_filled_pages_use_no_pool(mnt):
    before = mnt.stats()
    page_a = b"\xab\xcd\xef\x01\x23\x45\x67\x89" * 512
    data = bytes(PAGE) * 4 + page_a * 4
    pwrite_all(mnt.dev(), 0, data)
    after = mnt.stats()
    d = after["devices"]["swap0"]
    assert d["same_filled_pages"] == 8 and d["stored_pages"] == 8
    assert after["totals"]["pool_bytes"] == before["totals"]["pool_bytes"]
    assert pread_all(mnt.dev(), 0, len(data)) == data


def test_io_at_and_past_the_end(mnt):
    end = 64 * MiB
    assert pread_all(mnt.dev(), end, PAGE) == b""
    assert pread_all(mnt.dev(), end - 10, PAGE) == bytes(10)
    with pytest.raises(OSError) as e:
        pwrite_all(mnt.dev(), end, b"x" * PAGE)
    assert e.value.errno in (errno.ENOSPC, errno.EFBIG)
    with pytest.raises(OSError) as e:
        pwrite_all(mnt.dev(), end - 100, b"y" * 200)  # straddles the end: nothing written
    assert e.value.errno in (errno.ENOSPC, errno.EFBIG)
    assert pread_all(mnt.dev(), end - 100, 100) == bytes(100)
    assert os.stat(mnt.dev()).st_size == end


def test_namespace_and_metadata_changes_are_refused(mnt):
    before = sorted(os.listdir(mnt.path))
    refused = {
        "create": lambda: os.open(mnt.path / "new", os.O_CREAT | os.O_WRONLY, 0o600),
        "mkdir": lambda: os.mkdir(mnt.path / "dir"),
        "unlink": lambda: os.unlink(mnt.dev()),
        "rename": lambda: os.rename(mnt.dev(), mnt.path / "swapX"),
        "truncate": lambda: os.truncate(mnt.dev(), 4096),
        "truncate_to_zero": lambda: os.truncate(mnt.dev(), 0),
        "truncate_grow": lambda: os.truncate(mnt.dev(), 128 * MiB),
        "ftruncate": lambda: _ftruncate(mnt.dev(), 0),
        "chmod": lambda: os.chmod(mnt.dev(), 0o666),
        "symlink": lambda: os.symlink("swap0", mnt.path / "link"),
        "link": lambda: os.link(mnt.dev(), mnt.path / "hard"),
        "mknod": lambda: os.mknod(mnt.path / "node", 0o600 | stat.S_IFREG),
        "rmdir": lambda: os.rmdir(mnt.path / "swap1"),
    }
    for name, op in refused.items():
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES, errno.ENOTDIR), name
    if os.geteuid() == 0:
        with pytest.raises(OSError) as e:
            os.chown(mnt.dev(), 1234, 1234)
        assert e.value.errno == errno.EPERM
    assert sorted(os.listdir(mnt.path)) == before
    st = os.stat(mnt.dev())
    assert st.st_size == 64 * MiB and stat.S_IMODE(st.st_mode) == 0o600


def _ftruncate(path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def test_o_trunc_is_ignored_like_a_block_device_and_dd_works(mnt):
    """A fixed-size device ignores O_TRUNC (a plain `dd of=DEV` opens with it);
    the size and the stored pages stay."""
    pwrite_all(mnt.dev(), 8 * MiB, b"kept" * 1024)
    fd = os.open(mnt.dev(), os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(mnt.dev()).st_size == 64 * MiB
    data = os.urandom(4 * MiB)
    src = mnt.path.parent / "dd-src"
    src.write_bytes(data)
    out = subprocess.run(["dd", f"if={src}", f"of={mnt.dev()}", "bs=1M", "count=4"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert os.stat(mnt.dev()).st_size == 64 * MiB
    fd = os.open(mnt.dev(), os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * MiB, 0) == data
        assert os.pread(fd, 4096, 8 * MiB) == b"kept" * 1024
    finally:
        os.close(fd)


def test_fsync_and_flush_succeed(mnt):
    """fsync, fdatasync and close (FLUSH) answer success on a device and on
    the mount's directory, and change nothing: the page written before is
    stored once (direct I/O: it reached the store before pwrite returned) and
    reads back byte for byte from a new descriptor."""
    page = (b"fsync keeps me " * 300)[:PAGE]
    before = mnt.stats()["devices"]["swap0"]
    logged = len(mnt.log_text())
    fd = os.open(mnt.dev(), os.O_RDWR)
    try:
        assert os.pwrite(fd, page, 3 * PAGE) == PAGE
        stored = mnt.stats()["devices"]["swap0"]
        assert stored["stored_pages"] == before["stored_pages"] + 1
        assert stored["writes"] == before["writes"] + 1
        assert os.fsync(fd) is None
        assert os.fdatasync(fd) is None
    finally:
        os.close(fd)  # FLUSH, then RELEASE
    fd = os.open(mnt.dev(), os.O_RDONLY)
    try:
        os.fsync(fd)  # on a read-only descriptor too
        assert os.pread(fd, PAGE, 3 * PAGE) == page
    finally:
        os.close(fd)
    dfd = os.open(mnt.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # FSYNCDIR
    finally:
        os.close(dfd)
    after = mnt.stats()["devices"]["swap0"]
    assert after["stored_pages"] == stored["stored_pages"]
    assert after["writes"] == stored["writes"]  # nothing written again
    assert after["discards"] == before["discards"]
    since = mnt.log_text()[logged:]
    assert " ERROR " not in since and " WARNING " not in since, since


def test_punch_hole_discards_and_frees(mnt):
    data = (b"discard me please " * 300)[:PAGE]
    pwrite_all(mnt.dev(), 0, data * 16)
    s1 = mnt.stats()
    assert s1["devices"]["swap0"]["stored_pages"] == 16
    # whole pages 2..9, plus a partial page at each end
    subprocess.run(
        ["fallocate", "--punch-hole", "--keep-size", "-o", str(2 * PAGE - 100), "-l", str(8 * PAGE + 200), str(mnt.dev())],
        check=True,
    )
    expect = bytearray(data * 16)
    expect[2 * PAGE - 100:10 * PAGE + 100] = bytes(8 * PAGE + 200)
    assert pread_all(mnt.dev(), 0, 16 * PAGE) == bytes(expect)
    s2 = mnt.stats()
    d = s2["devices"]["swap0"]
    assert d["discards"] >= 1
    assert d["stored_pages"] == 8  # 16 - 8 whole pages freed; the partial ones stay stored
    assert s2["totals"]["compressed_bytes"] < s1["totals"]["compressed_bytes"]
    assert os.stat(mnt.dev()).st_size == 64 * MiB


def test_stats_xattrs(mnt):
    names = os.listxattr(mnt.dev())
    assert "user.swapfs.stats" in names
    for counter in ("size_bytes", "stored_pages", "same_filled_pages", "compressed_bytes", "pool_bytes",
                    "metadata_bytes", "reads", "writes", "discards", "read_bytes", "written_bytes"):
        assert f"user.swapfs.{counter}" in names, counter
    root_names = os.listxattr(mnt.path)
    assert "user.swapfs.compression_ratio" in root_names
    writes0 = int(os.getxattr(mnt.dev(), "user.swapfs.writes"))
    wbytes0 = int(os.getxattr(mnt.dev(), "user.swapfs.written_bytes"))
    pwrite_all(mnt.dev(), 0, b"q" * 3 + os.urandom(PAGE - 3))
    assert int(os.getxattr(mnt.dev(), "user.swapfs.writes")) == writes0 + 1
    assert int(os.getxattr(mnt.dev(), "user.swapfs.written_bytes")) == wbytes0 + PAGE
    reads0 = int(os.getxattr(mnt.dev(), "user.swapfs.reads"))
    pread_all(mnt.dev(), 0, 2 * PAGE)
    assert int(os.getxattr(mnt.dev(), "user.swapfs.reads")) == reads0 + 1
    assert int(os.getxattr(mnt.dev(), "user.swapfs.read_bytes")) >= 2 * PAGE

    full = json.loads(os.getxattr(mnt.path, "user.swapfs.stats"))
    assert set(full) >= {"devices", "tiers", "totals", "writeback", "cache"}
    assert full["devices"]["swap0"]["stored_pages"] == 1
    t = full["totals"]
    tier_pages = sum(x["stored_pages"] for x in full["tiers"].values())
    assert t["stored_pages"] == t["same_filled_pages"] + tier_pages
    assert t["stored_pages"] == sum(d["stored_pages"] for d in full["devices"].values())
    dev_json = json.loads(os.getxattr(mnt.dev(), "user.swapfs.stats"))
    assert dev_json["stored_pages"] == 1

    out = subprocess.run(["getfattr", "-d", "-m", "-", str(mnt.dev())], capture_output=True, text=True, check=True).stdout
    assert 'user.swapfs.stored_pages="1"' in out
    assert "user.swapfs.stats=" in out


def test_xattr_refusals(mnt):
    with pytest.raises(OSError) as e:
        os.getxattr(mnt.dev(), "user.swapfs.no_such_counter")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(mnt.dev(), "user.swapfs.stored_pages", b"0")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.setxattr(mnt.dev(), "user.other", b"\x00\xffgarbage")
    assert e.value.errno in (errno.ENOTSUP, errno.EPERM)
    with pytest.raises(OSError) as e:
        os.removexattr(mnt.dev(), "user.swapfs.stats")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.removexattr(mnt.dev(), "user.nothing")
    assert e.value.errno == errno.ENODATA
    assert "user.other" not in os.listxattr(mnt.dev())


POOL_FULL_CONFIG = """
[pool]
max_bytes = "2M"
[[device]]
name = "swap0"
size = "16M"
"""


def test_pool_full_gives_enospc_and_keeps_data(mount_factory):
    m = mount_factory(POOL_FULL_CONFIG)
    stored = {}
    fd = os.open(m.dev(), os.O_RDWR)
    try:
        err = None
        for i in range(16 * MiB // PAGE):
            page = os.urandom(PAGE)
            try:
                os.pwrite(fd, page, i * PAGE)
            except OSError as exc:
                err = exc
                break
            stored[i] = page
        assert err is not None and err.errno == errno.ENOSPC
        assert 0 < len(stored) <= 2 * MiB // PAGE
        for i, page in stored.items():
            assert os.pread(fd, PAGE, i * PAGE) == page
        # the page whose write failed still reads as before: zeros
        assert os.pread(fd, PAGE, len(stored) * PAGE) == bytes(PAGE)
        # a same-filled page needs no pool space and still goes in
        os.pwrite(fd, bytes(PAGE), (len(stored) + 1) * PAGE)
    finally:
        os.close(fd)
    s = m.stats()
    assert s["tiers"]["pool"]["pool_bytes"] <= 2 * MiB
    assert "ENOSPC" in m.log_text() or "full" in m.log_text()


def test_many_concurrent_processes(mnt):
    """Several processes write and read disjoint regions at once through the kernel."""
    script = (
        "import os, sys, random\n"
        "k = int(sys.argv[1]); path = sys.argv[2]; PAGE = 4096\n"
        "fd = os.open(path, os.O_RDWR | os.O_DIRECT)\n"
        "import mmap\n"
        "rng = random.Random(k)\n"
        "base = k * 2 * 1024 * 1024\n"
        "pages = {}\n"
        "buf = mmap.mmap(-1, PAGE)\n"
        "for r in range(400):\n"
        "    i = rng.randrange(512)\n"
        "    data = rng.randbytes(PAGE) if r % 3 else (b'%d-%d ' % (k, r)) * 400 + bytes(PAGE)\n"
        "    buf[:] = data[:PAGE]\n"
        "    os.pwritev(fd, [buf], base + i * PAGE)\n"
        "    pages[i] = data[:PAGE]\n"
        "    j = rng.choice(list(pages))\n"
        "    os.preadv(fd, [buf], base + j * PAGE)\n"
        "    assert bytes(buf) == pages[j], (k, j)\n"
        "print('ok')\n"
    )
    procs = [
        subprocess.Popen(["python3", "-c", script, str(k), str(mnt.dev())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(8)
    ]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.strip() == "ok", err


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(120)
def test_a_1_tib_device_mounts_at_once_and_holds_what_is_stored(mount_factory):
    # The slot table of 2**28 slots is reserved, not allocated: the daemon
    # holds what is stored (here 25k pages spread over the whole device).
    m = mount_factory('[pool]\nmax_bytes = "256M"\n[[device]]\nname = "big"\nsize = "1T"\n')
    assert os.stat(m.dev("big")).st_size == 1 << 40
    rng = random.Random(3)
    chunk = b"".join(bytes(rng.choice(b"swapfs ") for _ in range(64)) * 64 for _ in range(256))
    fd = os.open(m.dev("big"), os.O_RDWR)
    try:
        for i in range(100):  # 100 x 1 MiB = 25,600 pages, one run every 10 GiB
            assert os.pwrite(fd, chunk, i * (10 << 30)) == len(chunk)
        for i in (0, 37, 99):
            assert os.pread(fd, len(chunk), i * (10 << 30)) == chunk
    finally:
        os.close(fd)
    dev = m.stats()["devices"]["big"]
    assert dev["stored_pages"] == 25_600
    assert dev["metadata_bytes"] <= 25_600 * 16 + 2 * 1024 * 16 * 100 + (1 << 20)
    assert _rss_bytes(m.pid) <= 128 << 20, _rss_bytes(m.pid)
