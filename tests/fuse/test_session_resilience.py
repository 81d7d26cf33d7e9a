"""The session never dies of a reply it cannot send or of a read errno it does not know.

Driven without a mount: the session reads a SOCK_SEQPACKET socketpair (one message per read,
as /dev/fuse) and this test plays the kernel on the other end.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from swapfs.fuse import Dispatcher, FUSEError, Session, wire
from swapfs.fuse import session as session_mod

from .memfs import MemFS

pytestmark = pytest.mark.timeout(30)

_IN = wire.in_header.size


class FakeKernel:
    """The kernel's end of the connection: sends requests, reads replies."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.unique = 0

    async def send(self, opcode: int, body: bytes = b"", nodeid: int = 1) -> int:
        self.unique += 2
        msg = wire.in_header.pack(_IN + len(body), opcode, self.unique, nodeid, 0, 0, 0, 0, 0) + body
        await self.sock.send(msg)
        return self.unique

    async def reply(self) -> tuple[int, int, bytes]:
        """(unique, error, payload) of the next reply."""
        with trio.fail_after(10):
            msg = await self.sock.recv(1 << 21)
        length, error, unique = wire.out_header.unpack_from(msg)
        assert length == len(msg)
        return unique, error, msg[16:]

    async def init(self) -> None:
        flags = wire.FUSE_MAX_PAGES | wire.FUSE_ASYNC_READ | wire.FUSE_INIT_EXT
        u = await self.send(wire.INIT, wire.init_in.pack(7, 38, 1 << 17, flags, 0))
        unique, error, _ = await self.reply()
        assert (unique, error) == (u, 0)

    async def getattr(self, nodeid: int = 1) -> tuple[int, int, bytes]:
        u = await self.send(wire.GETATTR, wire.getattr_in.pack(0, 0, 0), nodeid)
        r = await self.reply()
        assert r[0] == u
        return r


class Served:
    def __init__(self, session: Session, kernel: FakeKernel, done: trio.Event) -> None:
        self.session = session
        self.kernel = kernel
        self.done = done


def _serving(dispatcher_cls: type[Dispatcher] = Dispatcher, ops: Any = None,
             sndbuf: int | None = None) -> Callable[[], Any]:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def cm() -> AsyncIterator[Served]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False)
        if sndbuf is not None:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        ops_ = ops or MemFS({b"data": b"x" * 100000})
        session = Session(ops_, a.fileno(), dispatcher=dispatcher_cls(ops_))
        kernel = FakeKernel(trio.socket.from_stdlib_socket(b))
        done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                async def run() -> None:
                    try:
                        await session.run()
                    finally:
                        done.set()

                nursery.start_soon(run)
                await kernel.init()
                yield Served(session, kernel, done)
                nursery.cancel_scope.cancel()
        finally:
            a.close()
            b.close()
    return cm


async def test_reply_that_cannot_be_built_is_eio_and_serving_goes_on(caplog: Any) -> None:
    class BadReplies(Dispatcher):
        async def _op_getattr(self, hdr: tuple, buf: bytearray, mv: memoryview, n: int) -> Any:
            if hdr[3] == 7:
                return (object(),)  # not a buffer: fails in _send, outside the handler
            if hdr[3] == 8:
                return 123456  # not an errno
            return await super()._op_getattr(hdr, buf, mv, n)

    async with _serving(BadReplies)() as s:
        for nodeid in (7, 8):
            _, error, payload = await s.kernel.getattr(nodeid)
            assert error == -errno.EIO and payload == b""
        _, error, payload = await s.kernel.getattr(1)
        assert error == 0 and len(payload) == wire.attr_out.size
        stats = s.session.statistics()
        assert stats.bad_replies == 2
        assert not s.done.is_set()


class OddErrno(MemFS):
    """GETATTR of node 7 raises FUSEError(err), of node 8 returns err as its reply."""

    def __init__(self, err: int) -> None:
        super().__init__({b"data": b"x" * 100})
        self.err = err

    async def getattr(self, inode: int, ctx: Any) -> Any:
        if inode == 7:
            raise FUSEError(self.err)
        return await super().getattr(inode, ctx)


@pytest.mark.parametrize("err", [512, 600, 4095, 1 << 31, -5])
async def test_errno_outside_1_511_is_answered_eio(err: int, caplog: Any) -> None:
    async with _serving(ops=OddErrno(err))() as s:
        _, error, payload = await s.kernel.getattr(7)
        assert (error, payload) == (-errno.EIO, b"")
        assert s.session.statistics().bad_replies == 1
        assert s.session.statistics().errors == {"EIO": 1}
        _, error, _ = await s.kernel.getattr(1)
        assert error == 0
    assert any("not an errno a reply can carry" in r.getMessage() for r in caplog.records)


async def test_errno_in_1_511_is_answered_as_is() -> None:
    for err in (1, errno.ENODATA, 511):
        async with _serving(ops=OddErrno(err))() as s:
            _, error, _ = await s.kernel.getattr(7)
            assert error == -err
            assert s.session.statistics().bad_replies == 0


def test_encoder_applies_the_errno_rule() -> None:
    d = Dispatcher(MemFS({}))
    for err, sent in ((5, -5), (511, -511), (512, -errno.EIO), (600, -errno.EIO), (4095, -errno.EIO),
                      (0, -errno.EIO), (-5, -errno.EIO), (True, -errno.EIO), ("5", -errno.EIO)):
        (header,) = d.encode(9, err)
        assert wire.out_header.unpack(header) == (16, sent, 9), err
        assert d.errno_for(9, err) == -sent, err
    assert d.bad_replies == 2 * 7
    (header, payload) = d.encode(9, (b"abc",))
    assert wire.out_header.unpack(header) == (19, 0, 9) and payload == b"abc"
    (header,) = d.encode(9, (object(),))  # not a buffer
    assert wire.out_header.unpack(header) == (16, -errno.EIO, 9)


async def test_reply_refused_by_the_kernel_becomes_eio() -> None:
    # A reply bigger than the socket's send buffer is refused (EMSGSIZE), as the kernel
    # refuses a malformed one (EINVAL): the request must still get an answer.
    async with _serving(sndbuf=16384)() as s:
        u = await s.kernel.send(wire.OPEN, wire.open_in.pack(os.O_RDONLY, 0), 2)
        unique, error, payload = await s.kernel.reply()
        assert (unique, error) == (u, 0)
        fh = wire.open_out.unpack(payload)[0]
        u = await s.kernel.send(wire.READ, wire.read_in.pack(fh, 0, 100000, 0, 0, 0, 0), 2)
        unique, error, payload = await s.kernel.reply()
        assert (unique, error, payload) == (u, -errno.EIO, b"")
        assert s.session.statistics().reply_failures == 1
        _, error, _ = await s.kernel.getattr()
        assert error == 0


async def test_unexpected_read_errno_is_counted_and_serving_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.readv
    failures = {"left": 0}

    def flaky(fd: int, bufs: Any) -> int:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.EIO, "injected")
        return real(fd, bufs)

    monkeypatch.setattr(session_mod.os, "readv", flaky)
    async with _serving()() as s:
        failures["left"] = 5
        _, error, _ = await s.kernel.getattr()
        assert error == 0
        assert s.session.statistics().read_errors == 5
        assert not s.done.is_set()


@pytest.mark.parametrize("err", [errno.EBADF, errno.ENOTCONN])
async def test_fd_gone_for_good_ends_the_session_cleanly(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: Any, err: int) -> None:
    real = os.readv
    broken = {"on": False}

    def readv(fd: int, bufs: Any) -> int:
        if broken["on"]:
            raise OSError(err, "injected")
        return real(fd, bufs)

    monkeypatch.setattr(session_mod.os, "readv", readv)
    async with _serving()() as s:
        _, error, _ = await s.kernel.getattr()
        assert error == 0
        broken["on"] = True
        await s.kernel.send(wire.GETATTR, wire.getattr_in.pack(0, 0, 0))  # wakes the reader
        with trio.fail_after(10):
            await s.done.wait()  # run() returned: no exception escaped the session
        assert s.session.statistics().read_errors == 1
    assert any("ending the session" in r.getMessage() for r in caplog.records)


async def test_persistent_read_errors_end_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.readv
    broken = {"on": False}

    def readv(fd: int, bufs: Any) -> int:
        if broken["on"]:
            raise OSError(errno.ENOMEM, "injected")
        return real(fd, bufs)

    monkeypatch.setattr(session_mod.os, "readv", readv)
    monkeypatch.setattr(session_mod, "READ_ERROR_LIMIT", 4)
    async with _serving()() as s:
        broken["on"] = True
        await s.kernel.send(wire.GETATTR, wire.getattr_in.pack(0, 0, 0))
        with trio.fail_after(10):
            await s.done.wait()
        assert s.session.statistics().read_errors == 4


async def test_short_read_request_is_malformed_not_read_from_a_stale_buffer() -> None:
    async with _serving()() as s:
        full = wire.read_in.pack(2, 0, 10, 0, 0, 0, 0)
        u = await s.kernel.send(wire.READ, full, 2)
        unique, error, payload = await s.kernel.reply()
        assert (unique, error, payload) == (u, 0, b"x" * 10)
        u = await s.kernel.send(wire.READ, full[:24], 2)  # fh, offset, size: no flags, no lock owner
        unique, error, payload = await s.kernel.reply()
        assert (unique, error) == (u, -errno.EIO)
        assert s.session.statistics().malformed == 1
