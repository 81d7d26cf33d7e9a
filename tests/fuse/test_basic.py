"""Every supported opcode through the kernel, on a real mount of MemFS."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from swapfs.fuse import wire

from .conftest import MiB, read_file, sh, sync

pytestmark = [pytest.mark.timeout(60), pytest.mark.root]


async def test_init_negotiated(mounted, transport):
    conn = mounted.conn
    assert conn.proto_major == 7 and conn.proto_minor == 38
    assert conn.max_write == 1 * MiB and conn.max_pages == 256
    for flag in (wire.FUSE_ASYNC_READ, wire.FUSE_BIG_WRITES, wire.FUSE_ASYNC_DIO, wire.FUSE_MAX_PAGES):
        assert conn.flags & flag
    assert bool(conn.flags & wire.FUSE_OVER_IO_URING) == (transport == "uring")
    assert mounted.session.statistics().transport == transport
    assert not conn.flags & (wire.FUSE_POSIX_ACL | wire.FUSE_WRITEBACK_CACHE | wire.FUSE_SETXATTR_EXT)
    assert mounted.fs.conn is conn


async def test_stat_and_listdir(mounted):
    st = await sync(os.stat, mounted.p("hello"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 13
    assert (await sync(os.stat, mounted.p("data"))).st_size == 16 * MiB
    assert stat.S_ISDIR((await sync(os.stat, str(mounted.path))).st_mode)
    assert sorted(await sync(os.listdir, str(mounted.path))) == ["data", "hello", "small"]
    with pytest.raises(FileNotFoundError):
        await sync(os.stat, mounted.p("missing"))


async def test_read_write_offsets(mounted):
    def rw():
        fd = os.open(mounted.p("data"), os.O_RDWR)
        try:
            assert os.pread(fd, 10, 0) == bytes(range(10))
            assert os.pread(fd, 4, 1000) == bytes(range(1000 % 256, 1000 % 256 + 4))
            assert os.pwrite(fd, b"ABCDEFGH", 12345) == 8
            os.fsync(fd)
            return os.pread(fd, 12, 12341)
        finally:
            os.close(fd)

    got = await sync(rw)
    assert got == bytes(range(12341 % 256, 12345 % 256)) + b"ABCDEFGH"
    assert mounted.fs.by_name[b"data"].data[12345:12353] == b"ABCDEFGH"
    assert await sync(read_file, mounted.p("hello")) == b"hello, world\n"


async def test_dd_direct(mounted, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2 * MiB))
    await sh("dd", f"if={src}", f"of={mounted.p('data')}", "bs=1M", "seek=3", "oflag=direct", "conv=notrunc", "status=none")
    assert bytes(mounted.fs.by_name[b"data"].data[3 * MiB : 5 * MiB]) == src.read_bytes()
    out = tmp_path / "out"
    await sh("dd", f"if={mounted.p('data')}", f"of={out}", "bs=64k", "skip=48", "count=32", "iflag=direct", "status=none")
    assert out.read_bytes() == src.read_bytes()
    assert mounted.session.statistics().requests > 0


async def test_fio_verify(mounted):
    r = await sh(
        "fio", "--name=verify", f"--filename={mounted.p('data')}", "--rw=randwrite", "--bs=4k",
        "--size=8M", "--direct=1", "--ioengine=libaio", "--iodepth=8", "--verify=crc32c",
        "--do_verify=1", "--verify_state_save=0", "--fallocate=none", "--output-format=terse", check=False,
    )
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()


async def test_xattrs(mounted):
    f = mounted.p("small")
    await sh("setfattr", "-n", "user.colour", "-v", "blue", f)
    r = await sh("getfattr", "--only-values", "-n", "user.colour", f)
    assert r.stdout == b"blue"
    assert mounted.fs.by_name[b"small"].xattrs == {b"user.colour": b"blue"}
    await sh("setfattr", "-n", "user.size", "-v", "1", f)
    assert sorted(await sync(os.listxattr, f)) == ["user.colour", "user.size"]
    r = await sh("getfattr", "-d", f)
    assert b'user.colour="blue"' in r.stdout
    await sh("setfattr", "-x", "user.colour", f)
    assert await sync(os.listxattr, f) == ["user.size"]
    with pytest.raises(OSError) as ei:
        await sync(os.getxattr, f, "user.nope")
    assert ei.value.errno == errno.ENODATA
    # a value longer than the caller's buffer: ERANGE via the size probe path
    await sync(os.setxattr, f, "user.big", b"v" * 5000)
    assert await sync(os.getxattr, f, "user.big") == b"v" * 5000
    with pytest.raises(OSError) as ei:
        await sync(os.setxattr, f, "user.big", b"w", os.XATTR_CREATE)
    assert ei.value.errno == errno.EEXIST
    r = await sh("getfattr", "-n", "user.nope", f, check=False)
    assert r.returncode != 0 and b"No such attribute" in r.stderr


async def test_getxattr_erange(mounted):
    import ctypes

    f = mounted.p("small")
    await sync(os.setxattr, f, "user.long", b"y" * 100)
    libc = ctypes.CDLL(None, use_errno=True)

    def small_buffer():
        buf = ctypes.create_string_buffer(10)
        rc = libc.getxattr(f.encode(), b"user.long", buf, ctypes.c_size_t(10))
        probe = libc.getxattr(f.encode(), b"user.long", None, ctypes.c_size_t(0))
        lbuf = ctypes.create_string_buffer(5)
        lrc = libc.listxattr(f.encode(), lbuf, ctypes.c_size_t(5))
        return rc, ctypes.get_errno(), probe, lrc

    rc, err, probe, lrc = await sync(small_buffer)
    assert rc == -1 and err == errno.ERANGE
    assert probe == 100
    assert lrc == -1


async def test_fallocate_punch_hole(mounted):
    f = mounted.p("data")
    await sh("fallocate", "--punch-hole", "--offset", "8192", "--length", "16384", f)
    assert (4, 8192, 16384, 3) in mounted.fs.fallocate_calls or any(
        c[1:] == (8192, 16384, 3) for c in mounted.fs.fallocate_calls
    )
    data = await sync(read_file, f, 32768)
    assert data[8192:24576] == bytes(16384)
    assert data[:8192] == (bytes(range(256)) * 32)
    st = await sync(os.stat, f)
    assert st.st_size == 16 * MiB  # KEEP_SIZE


async def test_statfs(mounted):
    sv = await sync(os.statvfs, str(mounted.path))
    assert sv.f_bsize == 4096 and sv.f_frsize == 4096
    assert sv.f_blocks == (1 << 30) // 4096
    assert sv.f_namemax == 255


async def test_access(mounted):
    mounted.fs.add_file(b"readonly", b"r", mode=0o444)
    assert await sync(os.access, mounted.p("hello"), os.R_OK | os.W_OK)
    assert not await sync(os.access, mounted.p("readonly"), os.W_OK)
    assert await sync(os.access, mounted.p("readonly"), os.R_OK)


async def test_truncate_and_setattr(mounted):
    f = mounted.p("small")
    await sync(os.truncate, f, 10)
    assert (await sync(os.stat, f)).st_size == 10
    assert bytes(mounted.fs.by_name[b"small"].data) == b"x" * 10
    await sync(os.truncate, f, 20)
    assert bytes(mounted.fs.by_name[b"small"].data) == b"x" * 10 + bytes(10)
    await sync(os.chmod, f, 0o600)
    assert stat.S_IMODE((await sync(os.stat, f)).st_mode) == 0o600
    await sync(os.utime, f, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    st = await sync(os.stat, f)
    assert st.st_mtime_ns == 1_600_000_000_987_654_321
    assert st.st_atime_ns == 1_500_000_000_123_456_789
    await sync(os.chown, f, 1234, 5678)
    st = await sync(os.stat, f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)


@pytest.mark.parametrize(
    "op",
    [
        lambda m: os.mkdir(m.p("newdir")),
        lambda m: os.unlink(m.p("hello")),
        lambda m: os.rename(m.p("hello"), m.p("hello2")),
        lambda m: os.link(m.p("hello"), m.p("hello3")),
        lambda m: os.symlink("hello", m.p("sym")),
        lambda m: os.mkfifo(m.p("fifo")),
        lambda m: os.close(os.open(m.p("created"), os.O_CREAT | os.O_WRONLY, 0o644)),
    ],
    ids=["mkdir", "unlink", "rename", "link", "symlink", "mknod", "create"],
)
async def test_namespace_refused(mounted, op):
    # (RMDIR cannot be reached: MemFS has no subdirectory, the kernel answers ENOTDIR itself.)
    with pytest.raises(OSError) as ei:
        await sync(op, mounted)
    assert ei.value.errno == errno.EPERM
    assert sorted(await sync(os.listdir, str(mounted.path))) == ["data", "hello", "small"]


async def test_unknown_opcode_enosys(mounted):
    # READLINK on a regular file is not in the interface: ENOSYS reaches the
    # caller as EINVAL from readlink(2)?  Use lseek(SEEK_DATA) instead, which
    # the kernel sends as FUSE_LSEEK and falls back on ENOSYS.
    def seek():
        fd = os.open(mounted.p("hello"), os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_DATA)
        finally:
            os.close(fd)

    assert await sync(seek) == 0
    assert mounted.session.statistics().errors.get("ENOSYS", 0) >= 1
