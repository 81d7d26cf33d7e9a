"""The pieces of a takeover without a mount: the keeper's protocol and ordering rules (a real
keeper process, memfds and pipes as the held fds), and the session's hooks driven through a
SOCK_SEQPACKET socketpair playing /dev/fuse."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from swapfs.fuse import ConnectionInfo, Session, wire
from swapfs.fuse.handoff import (
    FUSE_NOTIFY_RESEND,
    FUSE_UNIQUE_RESEND,
    KeeperClient,
    KeeperError,
    conn_from_json,
    conn_to_json,
    notify_resend,
)

from ..fuse.memfs import MemFS
from ..fuse.test_session_resilience import FakeKernel

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def keeper(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "k.sock")
    p = subprocess.Popen([sys.executable, "-m", "swapfs.keeper", path], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        p.stdout.close()
        yield path
    finally:
        p.kill()
        p.wait()


def memfd(content: bytes) -> int:
    fd = os.memfd_create("t")
    os.write(fd, content)
    return fd


def test_keeper_holds_and_hands_out_fds(keeper: str) -> None:
    c = KeeperClient(keeper)
    r, w = os.pipe()
    state = memfd(b"state")
    try:
        c.put({"fuse": r, "state": state}, {"version": 3})
        c.put({}, {"init": {"max_pages": 32}})
    finally:
        for fd in (r, state):
            os.close(fd)  # the keeper has its own
    h = c.get()
    try:
        assert sorted(h.fds) == ["fuse", "state"] and h.meta == {"version": 3, "init": {"max_pages": 32}}
        assert h.generation == 0 and h.active is None and h.active_pidfd is None
        assert os.pread(h.fds["state"], 5, 0) == b"state"  # the same memfd
        os.write(w, b"p")
        assert os.read(h.fds["fuse"], 1) == b"p"  # the same pipe
    finally:
        h.close()
    assert c.claim(0) == 1
    h = c.get()
    try:
        assert h.active == os.getpid() and h.active_pidfd is not None
        # This process (the active server) is alive: nobody may claim, and a stale look is refused.
        with pytest.raises(KeeperError, match="has not exited"):
            c.claim(1)
        with pytest.raises(KeeperError, match="stale"):
            c.claim(0)
    finally:
        h.close()
    os.close(w)
    c.close()


def test_claim_waits_for_the_old_server_to_exit(keeper: str) -> None:
    r, w = os.pipe()
    c = KeeperClient(keeper)
    c.put({"fuse": r})
    os.close(r)
    # An "old server": another process claims, then lives until told to exit.
    old = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from swapfs.fuse.handoff import KeeperClient\n"
         f"k = KeeperClient({keeper!r}); print(k.claim(0), flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout is not None and old.stdout.readline() == "1\n"
        h = c.get()
        assert h.active == old.pid and h.active_pidfd is not None
        with pytest.raises(KeeperError, match="has not exited"):
            c.claim(h.generation)
        assert old.stdin is not None
        old.stdin.close()
        old.wait()
        from swapfs.fuse.handoff import exited
        assert exited(h.active_pidfd, timeout=5)
        assert c.claim(h.generation) == 2
        h.close()
    finally:
        old.kill()
        old.wait()
        for f in (old.stdin, old.stdout):
            if f is not None:
                f.close()
        os.close(w)
        c.close()


def test_keeper_exits_when_the_connection_ends(tmp_path: Path) -> None:
    path = str(tmp_path / "k.sock")
    p = subprocess.Popen([sys.executable, "-m", "swapfs.keeper", path], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        p.stdout.close()
        r, w = os.pipe()
        c = KeeperClient(path)
        c.put({"fuse": r})
        os.close(r)
        c.close()
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=0.3)  # holding
        os.close(w)  # the "connection" ends: POLLHUP, as /dev/fuse says POLLERR once aborted
        assert p.wait(timeout=5) == 0
        assert not os.path.exists(path)
    finally:
        p.kill()
        p.wait()


def test_saved_init_parameters_round_trip() -> None:
    conn = ConnectionInfo(7, 38, 1 << 20, 1 << 20, 256, 1 << 17, (1 << 40) | 3)
    assert conn_from_json(conn_to_json(conn)) == conn


def test_notify_resend_is_a_bare_header() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        notify_resend(a.fileno())
        assert wire.out_header.unpack(b.recv(100)) == (16, FUSE_NOTIFY_RESEND, 0)


class Recorder(MemFS):
    def __init__(self) -> None:
        super().__init__({b"data": b"abcdefgh" * 512})
        self.inits = 0

    async def init(self, conn: Any) -> None:
        self.inits += 1
        self.conn = conn


async def test_resumed_session_reads_no_init_and_answers_resent_requests() -> None:
    fs = Recorder()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    conn = ConnectionInfo(7, 38, 32 * 4096, 32 * 4096, 32, 1 << 17, wire.FUSE_MAX_PAGES)
    session = Session(fs, a.fileno(), resume=conn)
    kernel = FakeKernel(trio.socket.from_stdlib_socket(b))
    try:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(session.run)
            assert started == conn and fs.conn == conn and fs.inits == 1
            # A request the dead server read and never answered, resent: the reply keeps the bit.
            kernel.unique = FUSE_UNIQUE_RESEND | 40
            u = await kernel.send(wire.READ, wire.read_in.pack(2, 8, 8, 0, 0, 0, 0), 2)
            assert u & FUSE_UNIQUE_RESEND
            assert await kernel.reply() == (u, 0, b"abcdefgh")
            # A write larger than max_pages would allow is refused by the kernel, not here;
            # the buffer holds the negotiated max_write.
            data = b"z" * (32 * 4096)
            u = await kernel.send(wire.WRITE, wire.write_in.pack(2, 0, len(data), 0, 0, 0, 0) + data, 2)
            unique, error, payload = await kernel.reply()
            assert (unique, error, wire.write_out.unpack(payload)[0]) == (u, 0, len(data))
            nursery.cancel_scope.cancel()
    finally:
        a.close()
        b.close()


async def test_stop_reading_ends_the_session_without_destroy_and_reads_nothing_more() -> None:
    fs = Recorder()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    session = Session(fs, a.fileno())
    kernel = FakeKernel(trio.socket.from_stdlib_socket(b))
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def run() -> None:
                    await session.run()
                    done.set()

                nursery.start_soon(run)
                await kernel.init()
                assert (await kernel.getattr(1))[1] == 0
                await trio.testing.wait_all_tasks_blocked()  # the reader is parked
                session.stop_reading()
                await done.wait()
        assert session.handed_off and not fs.destroyed
        # A request sent now stays unread, for the successor (the kernel resends it to it).
        u = await kernel.send(wire.GETATTR, wire.getattr_in.pack(0, 0, 0), 1)
        msg = a.recv(1 << 16)
        assert wire.in_header.unpack_from(msg)[2] == u
        with pytest.raises(BlockingIOError):
            b.recv(100, socket.MSG_DONTWAIT)  # and nothing was answered
    finally:
        a.close()
        b.close()


async def test_stop_reading_lets_handlers_in_flight_reply() -> None:
    class Gated(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.gate = trio.Event()

        async def getattr(self, inode: int, ctx: Any) -> Any:
            await self.gate.wait()
            return await super().getattr(inode, ctx)

    fs = Gated()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    session = Session(fs, a.fileno())
    kernel = FakeKernel(trio.socket.from_stdlib_socket(b))
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                await kernel.init()
                u = await kernel.send(wire.GETATTR, wire.getattr_in.pack(0, 0, 0), 1)
                await trio.testing.wait_all_tasks_blocked()
                session.stop_reading()
                fs.gate.set()
                unique, error, _ = await kernel.reply()
                assert (unique, error) == (u, 0)
        assert not fs.destroyed
    finally:
        a.close()
        b.close()


def test_resume_refuses_io_uring() -> None:
    with pytest.raises(ValueError, match="classic"):
        Session(MemFS(), 0, resume=ConnectionInfo(max_pages=32), transport="uring")


def test_errno_of_a_missing_keeper(tmp_path: Path) -> None:
    with pytest.raises(KeeperError, match="No such file"):
        KeeperClient(tmp_path / "nothing.sock")

