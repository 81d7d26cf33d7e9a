"""The /dev/fuse transport: one FUSE connection served on trio.

A :class:`Session` reads requests from the /dev/fuse fd and writes replies to
it; everything between (decoding, handlers, errors, the errno rule, counters)
is its :class:`~swapfs.fuse.dispatch.Dispatcher`'s.  The session also
negotiates INIT and, when asked, sets up the io_uring transport
(swapfs/fuse/uring/), which serves beside it through the same dispatcher.

Inline-first dispatch
---------------------
A *reader* task reads one request into its own buffer and hands it to
``Dispatcher.dispatch``, which starts the handler coroutine inline:

* A handler that finished without suspending gives its reply at once: it is
  written and the same task reads the next request.  No task switch, no
  scheduling -- the fast path.
* A handler that suspended (a :class:`~swapfs.fuse.dispatch.Suspended`) has
  yielded a trio trap issued in this task.  This task keeps the handler: it
  hands the reader role to a new task (started in the session's nursery with
  a buffer of its own from a pool -- the suspended handler may hold
  memoryviews into this task's buffer), then finishes the handler with
  ``Dispatcher.finish`` and replies.
* A task that finishes a suspended handler becomes the reader again only if
  no reader is active; otherwise it returns its buffer to the pool and ends.
  At most ``max_inflight`` handlers are suspended at once: when that many
  are, no new reader is started, so nothing more is read until one of them
  finishes and its task takes over reading.

Exactly one task reads at any time (none while the bound is reached).

Replies are a single ``os.writev`` of the out header and the payload
(``Dispatcher.encode``).  FORGET, BATCH_FORGET and INTERRUPT get no reply.
INTERRUPT is counted; the target handler runs to completion and its late
reply, rejected by the kernel with ENOENT, is counted as interrupted (handlers
are not cancelled: a cancel scope per request would cost more than the whole
fast path).

The session never dies of a reply or a read: a handler result that cannot be
sent, or a reply the kernel refuses for a reason other than an interrupt, is
logged, counted and answered EIO (so the request does not hang); a read that
fails with an unexpected errno is logged, counted and retried after a short
backoff, and only a descriptor that is gone for good (EBADF, EINVAL, EFAULT,
ENOTCONN, or READ_ERROR_LIMIT failures in a row) ends the session, with a
message -- never an unhandled exception leaving a dead mount under live swap.
ENODEV (the connection was unmounted or aborted) ends it quietly.

Two hooks let another process take a live connection over (docs/failover.md):
``Session(resume=conn)`` serves a connection negotiated earlier (no INIT is read),
and :meth:`Session.stop_reading` ends ``run()`` for a hand-off, without destroy,
abort or unmount.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from . import uring, wire
from .dispatch import HEADER_ROOM, NO_REPLY, PAGE, Dispatcher, SessionStatistics, Suspended
from .mount import mount, unmount_quietly
from .ops import ConnectionInfo, Operations
from .pressure import PSI_CPU, CpuPressure
from .uring import probe

log = logging.getLogger("swapfs.fuse")

REQUESTED_FLAGS = (
    wire.FUSE_ASYNC_READ
    | wire.FUSE_BIG_WRITES
    | wire.FUSE_ASYNC_DIO
    | wire.FUSE_MAX_PAGES
    | wire.FUSE_PARALLEL_DIROPS
    | wire.FUSE_ATOMIC_O_TRUNC  # O_TRUNC arrives with OPEN, not as a separate SETATTR
    | wire.FUSE_INIT_EXT
)

# A read of the FUSE fd failing this many times in a row ends the session.
READ_ERROR_LIMIT = 100
# How often the busy-poll's governor samples the CPU pressure (Session._govern_poll).
POLL_SAMPLE_SECONDS = 0.05

# Errnos after which the fd cannot be read again: the session ends at once.
FATAL_READ_ERRNOS = frozenset({errno.EBADF, errno.EINVAL, errno.EFAULT, errno.ENOTCONN})

_IN = wire.in_header.size
_pack_out = wire.out_header.pack

__all__ = ["POLL_SAMPLE_SECONDS", "READ_ERROR_LIMIT", "REQUESTED_FLAGS", "Session", "SessionStatistics", "serve"]


class Session:
    """One FUSE connection: ``await Session(ops, fd).run()`` serves it until
    the kernel ends it.  The fd is not closed by the session."""

    def __init__(
        self,
        ops: Operations,
        fd: int,
        *,
        max_inflight: int = 64,
        max_pages: int = 256,
        max_background: int = 64,
        poll_us: int = 0,
        poll_pressure: float = 1.0,
        pressure_path: str = PSI_CPU,
        transport: str = "classic",
        uring_depth: int = 16,
        connection: int | None = None,
        dispatcher: Dispatcher | None = None,
        resume: ConnectionInfo | None = None,
    ) -> None:
        """``transport``: "classic", "uring" (io_uring or an error) or "auto" (io_uring when
        every check passes); ``uring_depth``: ring entries per queue; ``connection``: the
        fusectl connection number, to abort the connection if the ring cannot be set up;
        ``dispatcher``: the requests' Dispatcher (default: a Dispatcher over ``ops``).

        ``poll_pressure``: busy-poll (``poll_us``) only while tasks wait for a CPU less than this
        share of the time (PSI, read from ``pressure_path``; see swapfs/fuse/pressure.py); polling
        pauses when the share reaches it and resumes below half of it.  1.0: poll regardless.

        ``resume``: serve a connection that another process already negotiated, with the INIT
        parameters it saved (docs/failover.md): no INIT is read, ``max_pages`` is the
        negotiated one, and only the classic transport can take over a connection."""
        if resume is not None:
            if transport != "classic":
                raise ValueError("resuming a connection requires the classic transport")
            max_pages = resume.max_pages
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if not 1 <= max_pages <= 65535:
            raise ValueError("max_pages must be in 1..65535")
        self.ops = ops
        self.dispatcher = dispatcher if dispatcher is not None else Dispatcher(ops)
        self.fd = fd
        self.max_inflight = max_inflight
        self.max_pages = max_pages
        self.max_background = min(max_background, 65535)
        self.poll_ns = max(poll_us, 0) * 1000
        if not 0.0 < poll_pressure <= 1.0:
            raise ValueError("poll_pressure must be in (0, 1]")
        self.poll_pressure = poll_pressure
        self.pressure_path = pressure_path
        self.polling = self.poll_ns > 0  # the governor pauses the busy-poll under CPU pressure
        self.poll_pauses = 0  # times it did
        self._governor: trio.CancelScope | None = None
        self.conn: ConnectionInfo | None = None
        if transport not in uring.TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(uring.TRANSPORTS)}")
        self.transport = transport
        self.uring_depth = uring_depth
        self.connection = connection
        self.transport_used = "classic"
        self.transport_reason = ""
        self._uring: uring.UringTransport | None = None
        self._bufsize = max_pages * PAGE + HEADER_ROOM
        self._pool: list[bytearray] = []
        self._nursery: trio.Nursery | None = None
        self._reader_active = False
        self.served = False  # INIT done and ops.init returned: the mount has been live
        self._resume = resume
        self.handed_off = False  # stop_reading() was called: run() ends without destroy
        # the transports' counters (the dispatcher counts the rest)
        self._interrupted_replies = 0
        self._reply_failures = 0
        self._read_errors = 0
        self._read_errors_in_a_row = 0

    # -- public --------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """The connection has ended or is ending (DESTROY, ENODEV, a fatal read error)."""
        return self.dispatcher.ended

    def statistics(self) -> SessionStatistics:
        u = self._uring
        return self.dispatcher.statistics(
            transport=self.transport_used,
            ring_requests=u.requests if u else 0,
            ring_enters=u.enters if u else 0,
            ring_entry_failures=u.entry_failures if u else 0,
            interrupted_replies=self._interrupted_replies,
            reply_failures=self._reply_failures,
            read_errors=self._read_errors,
        )

    async def run(self, *, task_status: trio.TaskStatus[ConnectionInfo] = trio.TASK_STATUS_IGNORED) -> None:
        """Negotiate INIT (a resumed session takes the saved parameters instead), call
        ``ops.init``, report the ConnectionInfo through ``task_status.started``, then serve
        until the kernel ends the connection (or the task is cancelled); ``ops.destroy`` is
        called last, except after :meth:`stop_reading`."""
        buf = self._get_buffer()
        initialized = False
        try:
            conn = self._resume if self._resume is not None else await self._init(buf)
            self.conn = conn
            await self.ops.init(conn)
            initialized = True
            self.served = True
            task_status.started(conn)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._reader_active = True
                nursery.start_soon(self._serve, buf)
                if self._uring is not None:
                    nursery.start_soon(self._uring.run)
                if self.poll_ns and self.poll_pressure < 1.0:
                    self._start_governor(nursery)
        finally:
            self.dispatcher.ended = True
            self._nursery = None
            if self._uring is not None:
                # Abort first: closing the fd does not end the connection while the ring holds
                # it, and a request handed to the ring waits for this thread's task work.
                uring.abort_connection(self.connection, quiet=True)
                self._uring.close()
            if initialized and not self.handed_off:
                with trio.CancelScope(shield=True):
                    try:
                        await self.ops.destroy()
                    except Exception:
                        log.exception("destroy handler failed")

    def stop_reading(self) -> None:
        """End ``run()`` for a hand-off to another process (docs/failover.md): read no more
        requests, let the handlers in flight reply, then return without ``ops.destroy`` and
        without closing, aborting or unmounting anything.  A request read but not answered
        (one read as this is called) is resent to the successor once this process has exited.
        Classic transport only."""
        if self._uring is not None:
            raise RuntimeError("a session on io_uring cannot hand its connection off")
        self.handed_off = True
        self.dispatcher.ended = True
        trio.lowlevel.notify_closing(self.fd)  # wakes the parked reader (ClosedResourceError)

    # -- INIT ----------------------------------------------------------------

    async def _init(self, buf: bytearray) -> ConnectionInfo:
        """Read INIT (answering anything before it EIO) and negotiate."""
        while True:
            n = await self._read(buf)
            if n is None:
                raise OSError(errno.ENODEV, "FUSE connection ended before INIT")
            if n < _IN:
                continue
            length, opcode, unique, *_ = wire.in_header.unpack_from(buf)
            if opcode == wire.INIT:
                break
            log.warning("request %d before INIT, answered EIO", opcode)
            self._reply_error(unique, errno.EIO)
        conn = self._negotiate(buf, n, unique)
        if self._uring is not None:
            self._uring.register(self.connection)  # at once: requests wait for the ring
        return conn

    def _negotiate(self, buf: bytearray, n: int, unique: int) -> ConnectionInfo:
        if n < _IN + wire.init_in_compat.size:
            self._reply_error(unique, errno.EIO)
            raise OSError(errno.EPROTO, "INIT request too short")
        major, minor, max_readahead, flags = wire.init_in_compat.unpack_from(buf, _IN)
        if major < 7 or (major == 7 and minor < 23):
            self._reply_error(unique, errno.EPROTO)
            raise OSError(errno.EPROTO, f"kernel FUSE protocol {major}.{minor} is too old")
        if major > 7:
            # Tell the kernel our major version; it re-sends INIT with 7.x.
            self._write([_pack_out(16 + 8, 0, unique), wire.open_in.pack(7, wire.KERNEL_MINOR_VERSION)])
            raise OSError(errno.EPROTO, f"kernel FUSE major {major} unsupported")
        flags2 = 0
        if flags & wire.FUSE_INIT_EXT and n >= _IN + wire.init_in.size:
            flags2 = wire.init_in.unpack_from(buf, _IN)[4]
        kflags = flags | (flags2 << 32)
        granted = REQUESTED_FLAGS & kflags
        minor_out = min(minor, wire.KERNEL_MINOR_VERSION)
        max_pages = self.max_pages if granted & wire.FUSE_MAX_PAGES else min(self.max_pages, 32)
        max_write = max_pages * PAGE
        if self.transport != "classic":
            self._uring = self._choose_uring(kflags, max_write)
            if self._uring is not None:
                granted |= wire.FUSE_OVER_IO_URING
        else:
            self.transport_reason = "asked for"
        log.info("transport %s: %s", self.transport_used, self.transport_reason)
        max_bg = self.max_background
        out = wire.init_out.pack(
            7,
            minor_out,
            max_readahead,
            granted & 0xFFFFFFFF,
            max_bg,
            max(1, max_bg * 3 // 4),
            max_write,
            1,  # time_gran: nanoseconds
            max_pages,
            0,
            (granted >> 32) & 0xFFFFFFFF,
        )
        self._write([_pack_out(16 + len(out), 0, unique), out])
        return ConnectionInfo(
            proto_major=7,
            proto_minor=minor_out,
            max_write=max_write,
            max_read=max_write,
            max_pages=max_pages,
            max_readahead=max_readahead,
            flags=granted,
        )

    def _choose_uring(self, kflags: int, max_write: int) -> uring.UringTransport | None:
        """The io_uring transport if every check passes (before the INIT reply declares it);
        None (classic) under "auto", TransportUnavailable under "uring"."""
        try:
            t = uring.UringTransport.create(self.dispatcher, self.fd, kflags, max_write,
                                            self.uring_depth, self.connection, self.poll_ns)
        except uring.TransportUnavailable as exc:
            if self.transport == "uring":
                raise uring.TransportUnavailable(f"transport uring unavailable: {exc}") from None
            self.transport_reason = str(exc)
            return None
        self.transport_used = "uring"
        self.transport_reason = (f"FUSE over io_uring offered and every check passed "
                                 f"({t.nr_queues} queue(s) x {t.depth} entries)")
        return t

    # -- reading and dispatch ------------------------------------------------

    def _get_buffer(self) -> bytearray:
        if self._pool:
            return self._pool.pop()
        return bytearray(self._bufsize)

    async def _read(self, buf: bytearray) -> int | None:
        """One request into ``buf``; None when the connection has ended (or the fd
        cannot be read any more: see the module docstring)."""
        fd = self.fd
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (OSError, trio.ClosedResourceError, trio.BusyResourceError) as e:
                    if self.handed_off or not await self._read_failed(e):
                        return None
            except InterruptedError:
                pass
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return None
                if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if not await self._read_failed(e):
                    return None
            else:
                self._read_errors_in_a_row = 0
                return n

    async def _read_failed(self, e: BaseException) -> bool:
        """An unexpected failure reading the FUSE fd: log and count it; True to try again
        (after a short backoff), False to end the session."""
        self._read_errors += 1
        self._read_errors_in_a_row += 1
        err = getattr(e, "errno", None)
        if err in FATAL_READ_ERRNOS or not isinstance(e, OSError) \
                or self._read_errors_in_a_row >= READ_ERROR_LIMIT:
            log.critical("reading the FUSE connection failed (%s), %d time(s) in a row: "
                         "ending the session; the mount stays (dead) until unmounted",
                         e, self._read_errors_in_a_row)
            self.dispatcher.ended = True
            return False
        log.error("reading the FUSE connection failed (%s); trying again", e)
        await trio.sleep(min(0.001 * 2 ** self._read_errors_in_a_row, 0.1))
        return not self.dispatcher.ended

    def _start_governor(self, nursery: trio.Nursery) -> None:
        pressure = CpuPressure(self.pressure_path)
        problem = pressure.open()
        if problem:
            log.info("busy-poll not governed by CPU pressure (%s): it polls regardless", problem)
            return
        self._governor = trio.CancelScope()
        nursery.start_soon(self._govern_poll, pressure, self._governor)

    async def _govern_poll(self, pressure: CpuPressure, scope: trio.CancelScope) -> None:
        """Pause the busy-poll while tasks wait for a CPU (see swapfs/fuse/pressure.py): a
        spinning daemon would hold the CPU that the next request's producers wait for.  Runs
        until the connection ends (the last reader cancels ``scope``)."""
        limit = self.poll_pressure
        with scope:
            try:
                while not self.dispatcher.ended:
                    await trio.sleep(POLL_SAMPLE_SECONDS)
                    share = pressure.sample()
                    if self.polling:
                        if share >= limit:
                            self._set_polling(False)
                    elif share < limit / 2:
                        self._set_polling(True)
            finally:
                pressure.close()

    def _set_polling(self, on: bool) -> None:
        self.polling = on
        if not on:
            self.poll_pauses += 1
        if self._uring is not None:
            self._uring.poll_ns = self.poll_ns if on else 0

    def _poll(self, buf: bytearray) -> int | None:
        """Busy-poll /dev/fuse for up to ``poll_ns`` before parking in epoll:
        on a machine where waking an idle CPU is slow (a VM), a request that
        arrives within the window skips that wake-up.  Only while no handler
        is suspended (nothing else for the loop to do) and no other task is
        runnable."""
        stats = trio.lowlevel.current_statistics()
        if stats.tasks_runnable or stats.run_sync_soon_queue_size:
            return None
        fd = self.fd
        readv = os.readv
        deadline = time.perf_counter_ns() + self.poll_ns
        while time.perf_counter_ns() < deadline:
            try:
                return readv(fd, [buf])
            except BlockingIOError:
                continue
            except OSError:
                return None  # let _read sort out EINTR, ENOENT and ENODEV
        return None

    async def _serve(self, buf: bytearray) -> None:
        """The reader loop (see the module docstring)."""
        mv = memoryview(buf)
        d = self.dispatcher
        dispatch = d.dispatch
        send = self._send
        unpack_header = wire.in_header.unpack_from
        fd = self.fd
        readv = os.readv
        n: int | None
        while not d.ended:
            try:
                n = readv(fd, [buf])
            except BlockingIOError:
                n = self._poll(buf) if self.polling and not d.suspended else None
                if n is None:
                    n = await self._read(buf)
            except OSError as e:
                if e.errno == errno.ENODEV:
                    n = None
                elif e.errno in (errno.EINTR, errno.ENOENT) or await self._read_failed(e):
                    n = await self._read(buf)
                else:
                    n = None
            if n is None:
                d.ended = True
                break
            if d.ended:
                break
            if n < _IN:
                d.malformed_request(f"short read from /dev/fuse ({n} bytes)")  # no unique: no reply
                continue
            hdr = unpack_header(buf)
            reply = dispatch(hdr, buf, mv, n)
            if reply.__class__ is not Suspended:
                if reply is not NO_REPLY:
                    send(hdr[2], reply)
                continue
            # The handler suspended: hand over the reader role, then finish it here.
            self._reader_active = False
            self._start_reader()
            reply = await d.finish(hdr, reply)
            if reply is not NO_REPLY:
                send(hdr[2], reply)
            if d.ended:
                break
            if self._reader_active:
                break
            self._reader_active = True
        self._pool.append(buf)
        if d.ended and self._governor is not None:
            self._governor.cancel()
        # Whoever ends the connection wakes nobody: no other task is reading.

    def _start_reader(self) -> None:
        if self._reader_active or self.dispatcher.ended or self.dispatcher.suspended >= self.max_inflight:
            return
        assert self._nursery is not None
        self._reader_active = True
        self._nursery.start_soon(self._serve, self._get_buffer())

    # -- replies ---------------------------------------------------------------

    def _send(self, unique: int, reply: Any) -> None:
        """Send a handler's reply; never raises.  A reply that cannot be built or that the
        kernel refuses (other than for an interrupt) becomes EIO, so the request never hangs."""
        iov = self.dispatcher.encode(unique, reply)
        try:  # the common case without a call of _write
            os.writev(self.fd, iov)
        except Exception as exc:
            if not self._write_failed(iov, exc):
                self._reply_error(unique, errno.EIO)

    def _reply_error(self, unique: int, err: int) -> None:
        self._write(self.dispatcher.encode_error(unique, err))

    def _write(self, iov: list[Any]) -> bool:
        """Write one reply; never raises.  False if it was refused for a reason that leaves
        the request unanswered (not an interrupt, not the end of the connection)."""
        try:
            os.writev(self.fd, iov)
            return True
        except Exception as exc:
            return self._write_failed(iov, exc)

    def _write_failed(self, iov: list[Any], exc: Exception) -> bool:
        """A write of ``iov`` raised ``exc``: retried if interrupted by a signal; counted and
        logged if refused.  As :meth:`_write`."""
        while True:
            if isinstance(exc, InterruptedError):
                try:
                    os.writev(self.fd, iov)
                    return True
                except Exception as again:
                    exc = again
                    continue
            if isinstance(exc, OSError):
                if exc.errno == errno.ENOENT:  # its request was interrupted
                    self._interrupted_replies += 1
                    return True
                if exc.errno in (errno.ENODEV, errno.EBADF):
                    self.dispatcher.ended = True
                    return True
                self._reply_failures += 1
                log.error("reply refused by the kernel: %s", exc)
                return False
            self._reply_failures += 1  # a payload that is not a buffer, a huge size ...
            log.error("reply cannot be written: %r", exc)
            return False

async def serve(
    ops: Operations,
    mountpoint: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[ConnectionInfo] = trio.TASK_STATUS_IGNORED,
    max_inflight: int = 64,
    max_pages: int = 256,
    poll_us: int = 0,
    poll_pressure: float = 1.0,
    transport: str = "classic",
    uring_depth: int = 16,
    session_callback: Callable[[Session], None] | None = None,
    unmount_after_serving: bool = True,
    **mount_kwargs: Any,
) -> None:
    """Mount ``ops`` on ``mountpoint``, serve it, and unmount when the session
    ends or this task is cancelled.  ``task_status.started`` receives the
    ConnectionInfo once the mount is live; ``session_callback`` (if given)
    receives the Session before INIT, e.g. to read its statistics later.

    ``unmount_after_serving=False`` leaves a mount that has served (INIT done)
    in place when the session ends or the task is cancelled: a dead mount
    answers ENOTCONN where an empty directory would lie, and whoever stops the
    server (a signal handler) unmounts first.  A mount that never served is
    always unmounted.  Raises MountError (TransportUnavailable for ``transport``
    "uring" on a machine that cannot) before anything is mounted when it can."""
    use_fusermount = mount_kwargs.get("use_fusermount")
    if transport == "uring":  # what can be known before mounting: nothing mounted if not
        reason = probe.unavailable_reason()
        if reason:
            raise uring.TransportUnavailable(f"transport uring unavailable: {reason}")
    path = uring.resolve(mountpoint)  # before mounting: afterwards a stat would wait for INIT
    fd = mount(mountpoint, **mount_kwargs)
    session: Session | None = None
    try:
        session = Session(ops, fd, max_inflight=max_inflight, max_pages=max_pages, poll_us=poll_us,
                          poll_pressure=poll_pressure, transport=transport, uring_depth=uring_depth,
                          connection=uring.connection_id(path) if transport != "classic" else None)
        if session_callback is not None:
            session_callback(session)
        await session.run(task_status=task_status)
    finally:
        # Closing the fd first aborts the connection, so unmounting cannot wait
        # on a request nobody will answer any more.
        try:
            os.close(fd)
        except OSError:
            pass
        if unmount_after_serving or session is None or not session.served:
            unmount_quietly(mountpoint, use_fusermount=use_fusermount)

