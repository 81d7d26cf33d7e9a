"""A tier file belongs to one mount: the lock, the signature, and what is refused or reused."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from swapfs.errors import Misuse, StoreError
from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.tiers.file import CLUSTER_PAGES, DATA_OFFSET, RAW, FileTier, TierRefused
from swapfs.tiers.file.claim import try_lock
from swapfs.tiers.file.header import MAGIC, VERSION, TierHeader, recognise, unpack

CLUSTER_BYTES = CLUSTER_PAGES * PAGE


def tier_at(path: Path, **kw: object) -> FileTier:
    return FileTier("ssd", str(path), 2 * CLUSTER_BYTES, 100, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the header


def test_header_round_trip_and_damage() -> None:
    h = TierHeader.new("ssd", 5 * PAGE, "/run/swapfs/main", encrypted=True)
    page = h.pack()
    assert len(page) == PAGE and page.startswith(MAGIC)
    assert unpack(page) == h
    assert h.pid == os.getpid() and len(h.mount_id) == 16 and h.version == VERSION
    assert h.data_offset == DATA_OFFSET and DATA_OFFSET % CLUSTER_BYTES == 0
    assert "/run/swapfs/main" in h.describe() and f"pid {os.getpid()}" in h.describe()
    damaged = bytearray(page)
    damaged[100] ^= 1
    assert unpack(bytes(damaged)) is None
    assert unpack(bytes(PAGE)) is None
    assert TierHeader.new("ssd", PAGE, "", False).mount_id != h.mount_id


def test_open_signs_the_file(tmp_path: Path) -> None:
    t = tier_at(tmp_path / "t.img", mountpoint="/mnt/x")
    t.open()
    try:
        with open(t.path, "rb") as f:
            h = unpack(f.read(PAGE))
        assert h is not None and h == t.header
        assert (h.name, h.size_bytes, h.mountpoint, h.pid, h.encrypted) == (
            "ssd", 2 * CLUSTER_BYTES, "/mnt/x", os.getpid(), True)
    finally:
        t.close()


@pytest.mark.parametrize("offset,magic,what", [
    (PAGE - 10, b"SWAPSPACE2", "swap"), (1080, b"\x53\xef", "ext2/ext3/ext4"),
    (0, b"XFSB", "XFS"), (0, MAGIC, "swapfs tier")])
def test_recognise(tmp_path: Path, offset: int, magic: bytes, what: str) -> None:
    p = tmp_path / "x"
    data = bytearray(0x20000)
    data[offset:offset + len(magic)] = magic
    p.write_bytes(bytes(data))
    fd = os.open(p, os.O_RDONLY)
    try:
        assert what in recognise(fd)
    finally:
        os.close(fd)


def _head(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(PAGE)


# ---------------------------------------------------------------- foreign files


@pytest.mark.parametrize("content,found", [
    (b"precious data " * 90_000, "no known signature"),
    (bytes(PAGE - 10) + b"SWAPSPACE2" + bytes(PAGE), "a Linux swap area"),
    (bytes(1080) + b"\x53\xef" + bytes(3000), "ext2/ext3/ext4"),
    (bytes(5 * PAGE), "no known signature, first"),
])
def test_foreign_file_is_refused_and_left_intact(tmp_path: Path, content: bytes,
                                                 found: str) -> None:
    p = tmp_path / "data.bin"
    p.write_bytes(content)
    os.chmod(p, 0o644)
    before = os.stat(p)
    t = tier_at(p)
    with pytest.raises(TierRefused) as ei:
        t.open()
    e = ei.value
    assert isinstance(e, StoreError) and isinstance(e, OSError) and e.errno == errno.EEXIST
    msg = str(e)
    assert "'ssd'" in msg and str(p) in msg and f"{len(content)} bytes" in msg
    assert found in msg and "force_init" in msg
    assert p.read_bytes() == content
    after = os.stat(p)
    assert (after.st_mode, after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_mode, before.st_size, before.st_mtime_ns, before.st_ino)
    assert t._fd < 0


async def test_force_init_overwrites_a_foreign_file(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "data.bin"
    p.write_bytes(b"old" * 10_000)
    t = tier_at(p, force_init=True)
    with caplog.at_level(logging.WARNING, logger="swapfs.tiers.file"):
        t.open()
    assert "overwriting 30000 bytes (no known signature): force_init is set" in caplog.text
    try:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
        hs = t.allocate([PAGE] * 3)
        await t.write(hs, [(i, RAW, b"n" * PAGE) for i in range(3)])
        got = await t.read_objects([(h, PAGE, i) for i, h in enumerate(hs)])
        assert got == [(RAW, b"n" * PAGE)] * 3
        assert unpack(_head(p)) == t.header
    finally:
        t.close()


# ---------------------------------------------------------------- one mount a file


async def test_second_open_of_a_held_file_is_refused_naming_the_holder(tmp_path: Path) -> None:
    p = tmp_path / "t.img"
    first = tier_at(p, mountpoint="/run/swapfs/first")
    first.open()
    try:
        hs = first.allocate([PAGE] * 4)
        await first.write(hs, [(i, RAW, b"1" * PAGE) for i in range(4)])
        before = p.read_bytes()
        second = tier_at(p, mountpoint="/run/swapfs/second")
        with pytest.raises(TierRefused) as ei:
            second.open()
        assert ei.value.errno == errno.EBUSY
        msg = str(ei.value)
        assert "in use by the swapfs mount at /run/swapfs/first" in msg
        assert f"daemon pid {os.getpid()}" in msg
        # the first mount's file and pages are untouched
        assert p.read_bytes() == before
        got = await first.read_objects([(h, PAGE, i) for i, h in enumerate(hs)])
        assert got == [(RAW, b"1" * PAGE)] * 4
        assert second._fd < 0
    finally:
        first.close()
    # once the first is closed, the file is free again
    again = tier_at(p)
    again.open()
    again.close()


def test_lock_travels_with_the_descriptor(tmp_path: Path) -> None:
    """The lock is the open file description's: a copy of the descriptor (as SCM_RIGHTS hands
    to a successor) keeps the file locked after the original is closed."""
    t = tier_at(tmp_path / "t.img")
    t.open()
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        socket.send_fds(a, [b"tier"], [t._fd])
        _, (passed,), _, _ = socket.recv_fds(b, 16, 1)
        os.close(t._fd)  # the original descriptor goes; the passed copy remains
        t._fd = -1
        probe = os.open(tmp_path / "t.img", os.O_RDONLY)
        try:
            assert not try_lock(probe, shared=True)
            os.close(passed)
            assert try_lock(probe, shared=True)
        finally:
            os.close(probe)
    finally:
        a.close()
        b.close()


def test_open_twice_is_misuse(tmp_path: Path) -> None:
    t = tier_at(tmp_path / "t.img")
    t.open()
    try:
        with pytest.raises(Misuse, match="already open"):
            t.open()
    finally:
        t.close()


_DAEMON = textwrap.dedent("""
    import os, sys, trio
    from swapfs.tiers.file import RAW, FileTier
    t = FileTier("ssd", sys.argv[1], 2 * 1024 * 1024, 1, mountpoint="/run/swapfs/dead")
    t.open()
    async def main():
        hs = t.allocate([4096] * 300)
        await t.write(hs, [(i, RAW, b"secret-page-" * 341 + b"....") for i in range(len(hs))])
    trio.run(main)
    os.fsync(t._fd)
    print("ready", flush=True)
    sys.stdin.read()  # until killed
""")


def _start_daemon(p: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _DAEMON, str(p)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


async def test_file_of_a_killed_mount_is_reused_safely(tmp_path: Path) -> None:
    p = tmp_path / "t.img"
    proc = _start_daemon(p)
    try:
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
        assert line.strip() == "ready"
        with pytest.raises(TierRefused, match="/run/swapfs/dead"):  # alive: refused
            tier_at(p).open()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
    assert os.stat(p).st_blocks > 0  # the dead mount's pages are still on disk
    t = tier_at(p, mountpoint="/run/swapfs/next")
    t.open()
    try:
        st = os.stat(p)
        assert st.st_blocks * 512 <= PAGE  # old pages punched: only the new header is written
        assert t.header is not None and t.header.mountpoint == "/run/swapfs/next"
        assert t.stored_pages == 0
        hs = t.allocate([PAGE] * 2)
        await t.write(hs, [(0, RAW, b"a" * PAGE), (1, RAW, b"b" * PAGE)])
        got = await t.read_objects([(h, PAGE, i) for i, h in enumerate(hs)])
        assert got == [(RAW, b"a" * PAGE), (RAW, b"b" * PAGE)]
    finally:
        t.close()


def test_holder_without_a_mount_point_is_named_by_its_command_line(tmp_path: Path) -> None:
    p = tmp_path / "t.img"
    first = tier_at(p)  # no mountpoint given: the header cannot say where
    first.open()
    try:
        with pytest.raises(TierRefused) as ei:
            tier_at(p).open()
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0].decode()
        msg = str(ei.value)
        assert f"daemon pid {os.getpid()}" in msg and f": {argv0}" in msg
        assert "\n" not in msg
    finally:
        first.close()
