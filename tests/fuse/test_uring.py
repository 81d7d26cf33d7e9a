"""FUSE over io_uring: choosing the transport, saying why, and ending safely when registration
fails, the daemon dies or the filesystem is unmounted (no hang, a clear error)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from swapfs.fuse import is_mount_point, serve, unmount_quietly, uring

from ..conftest import enable_uring_set
from .conftest import MiB, default_files, read_file, sh, sync
from .memfs import MemFS

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root"),
]

MEMFS = Path(__file__).with_name("memfs.py")


@pytest.fixture
def transport(uring_enabled) -> str:
    """These tests choose the transport of each mount themselves (not parametrized)."""
    return "uring"


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


async def test_ring_serves_reads_and_writes_and_counts_them(mount_memfs, uring_enabled):
    async with mount_memfs(transport="uring") as m:
        await sync(write_at, m.p("data"), 4096, b"ring" * 1024)
        assert (await sync(read_file, m.p("data"), 8192))[4096:] == b"ring" * 1024
        assert bytes(m.fs.by_name[b"data"].data[4096:8192]) == b"ring" * 1024
        st = m.session.statistics()
        assert st.transport == "uring"
        assert st.ring_requests > 0 and st.ring_enters > 0 and st.ring_entry_failures == 0
        assert st.requests >= st.ring_requests


async def test_auto_uses_the_ring_when_every_check_passes(mount_memfs, uring_enabled):
    async with mount_memfs(transport="auto") as m:
        assert m.session.transport_used == "uring"
        assert await sync(read_file, m.p("hello")) == b"hello, world\n"


async def test_auto_without_enable_uring_is_classic_and_says_why(mount_memfs, uring_enabled, caplog):
    with enable_uring_set("N"), caplog.at_level("INFO", logger="swapfs.fuse"):
        async with mount_memfs(transport="auto") as m:
            assert m.session.transport_used == "classic"
            assert m.session.statistics().transport == "classic"
            assert await sync(read_file, m.p("hello")) == b"hello, world\n"
    assert f"transport classic: {uring.ENABLE_URING} is N" in caplog.text


async def test_uring_unavailable_is_an_error_before_mounting(tmp_path, uring_enabled):
    mp = tmp_path / "mnt"
    mp.mkdir()
    with enable_uring_set("N"), pytest.raises(uring.TransportUnavailable, match="enable_uring is N"):
        await serve(MemFS(default_files()), mp, transport="uring")
    assert not is_mount_point(mp)


async def test_kernel_not_offering_the_ring_is_an_error_and_leaves_no_mount(
        tmp_path, uring_enabled, monkeypatch):
    # pass the checks made before mounting; the kernel (enable_uring N) then does not offer
    # FUSE_OVER_IO_URING at INIT, or refuses the probe: the INIT reply is never sent
    monkeypatch.setattr(uring.probe, "unavailable_reason", lambda: None)
    mp = tmp_path / "mnt"
    mp.mkdir()
    with enable_uring_set("N"), trio.fail_after(20):
        with pytest.raises(uring.TransportUnavailable, match="FUSE_OVER_IO_URING|io_uring commands"):
            await serve(MemFS(default_files()), mp, transport="uring")
    assert not await sync(is_mount_point, mp)


async def test_failed_registration_aborts_the_connection(tmp_path, uring_enabled, monkeypatch):
    monkeypatch.setattr(uring.UringTransport, "inject_register_failure", True)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        with trio.fail_after(20):
            with pytest.raises(uring.RegistrationFailed, match="REGISTER of entry .* connection was aborted"):
                await serve(MemFS(default_files()), mp, transport="uring")
            assert not await sync(is_mount_point, mp)
            await sh("stat", str(mp))  # a plain directory again: answers at once
    finally:
        await sync(unmount_quietly, mp)


def test_daemon_killed_leaves_no_hang(tmp_path, uring_enabled):
    """SIGKILL the server while a reader works through the mount: the kernel ends the
    connection (no process stuck in D state), calls fail with ENOTCONN, the mount can go."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    server = subprocess.Popen([sys.executable, str(MEMFS), str(mp), "--size", "16M", "--transport", "uring"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = None
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready", server.stderr.read() if server.stderr else ""
        reader = subprocess.Popen(["sh", "-c", f"while :; do dd if={mp}/data of=/dev/null bs=4k "
                                   "iflag=direct status=none || exit 0; done"])
        time.sleep(0.5)
        assert reader.poll() is None
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        reader.wait(timeout=10)  # its reads fail instead of hanging
        proc = subprocess.run(["stat", str(mp / "data")], capture_output=True, text=True, timeout=10)
        assert proc.returncode != 0 and "not connected" in proc.stderr, proc.stderr
    finally:
        for p in (reader, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for f in (server.stdout, server.stderr):
            if f is not None:
                f.close()
        unmount_quietly(mp)
    assert not is_mount_point(mp)


async def test_unmount_under_load_ends_every_entry(mount_memfs, uring_enabled):
    async with mount_memfs(MemFS({b"data": 8 * MiB}), transport="uring") as m:
        async def load():
            await sh("dd", f"if={m.p('data')}", "of=/dev/null", "bs=4k", "iflag=direct", "status=none",
                     check=False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await trio.sleep(0.05)
            await sh("umount", "-l", str(m.path))
        with trio.fail_after(10):
            await m.done.wait()  # the ring's entries ended with the connection: serve() returned
