"""Serving FUSE requests from /dev/fuse on trio.

Inline-first dispatch
---------------------
A *reader* task reads one request into its own buffer and starts the
handler coroutine inline with ``coro.send(None)``:

* If that raises StopIteration the handler finished without suspending: the
  reply is written at once and the same task reads the next request.  No
  task switch, no scheduling -- the fast path.
* If the handler yields, it has suspended on a trio trap issued in this
  task.  This task keeps the handler: it hands the reader role to a new task
  (started in the session's nursery with a buffer of its own from a pool --
  the suspended handler may hold memoryviews into this task's buffer), then
  drives the coroutine to completion itself, forwarding every trap to trio
  (:func:`_drive`, a manual ``yield from``; the trap belongs to this task, so
  this task must be the one that yields it), and replies.
* A task that finishes a suspended handler becomes the reader again only if
  no reader is active; otherwise it returns its buffer to the pool and ends.
  At most ``max_inflight`` handlers are suspended at once: when that many
  are, no new reader is started, so nothing more is read until one of them
  finishes and its task takes over reading.

Exactly one task reads at any time (none while the bound is reached).
Note that any trio checkpoint -- ``await trio.sleep(0)``, acquiring an
uncontended ``trio.Lock`` -- counts as suspending.

Replies are a single ``os.writev`` of the out header and the payload.
FORGET, BATCH_FORGET and INTERRUPT get no reply.  INTERRUPT is counted; the
target handler runs to completion and its late reply, rejected by the kernel
with ENOENT, is counted as interrupted (handlers are not cancelled: a cancel
scope per request would cost more than the whole fast path).

The session never dies of a reply or a read: a handler result that cannot be
sent, or a reply the kernel refuses for a reason other than an interrupt, is
logged, counted and answered EIO (so the request does not hang); a read that
fails with an unexpected errno is logged, counted and retried after a short
backoff, and only a descriptor that is gone for good (EBADF, EINVAL, EFAULT,
or READ_ERROR_LIMIT failures in a row) ends the session, with a message --
never an unhandled exception leaving a dead mount under live swap.

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
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from . import uring, wire
from .mount import mount, unmount_quietly
from .ops import (
    ConnectionInfo,
    EntryAttributes,
    ForgetItem,
    FUSEError,
    Operations,
    RequestContext,
    SetattrFields,
)

log = logging.getLogger("swapfs.fuse")

PAGE = 4096
HEADER_ROOM = 4096  # room for fuse_in_header + the opcode's struct before a write payload

# Requests that would change the namespace: refused by the session itself.
NAMESPACE_OPCODES = frozenset(
    {
        wire.MKNOD,
        wire.MKDIR,
        wire.UNLINK,
        wire.RMDIR,
        wire.SYMLINK,
        wire.RENAME,
        wire.RENAME2,
        wire.LINK,
        wire.CREATE,
        wire.TMPFILE,
    }
)

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
# Errnos after which the fd cannot be read again: the session ends at once.
_FATAL_READ_ERRNOS = frozenset({errno.EBADF, errno.EINVAL, errno.EFAULT, errno.ENOTCONN})

_NO_REPLY = object()
_EMPTY: tuple[()] = ()
_IN = wire.in_header.size
_pack_out = wire.out_header.pack


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class SessionStatistics:
    requests: int = 0
    inline_replies: int = 0  # handlers that finished without suspending
    suspended_handlers: int = 0  # handlers that suspended (ran off the fast path)
    max_suspended: int = 0  # most handlers suspended at the same time
    errors: Mapping[str, int] = field(default_factory=dict)  # error replies by errno name
    handler_exceptions: int = 0  # unexpected exceptions answered EIO
    malformed: int = 0  # requests too short or badly formed, answered EIO
    interrupts: int = 0  # INTERRUPT requests received
    interrupted_replies: int = 0  # replies the kernel refused with ENOENT
    reply_failures: int = 0  # replies refused for any other reason (answered EIO instead)
    bad_replies: int = 0  # handler results that could not be sent as a reply (answered EIO)
    read_errors: int = 0  # reads of the FUSE fd failing with an unexpected errno
    transport: str = "classic"  # how requests arrive: "classic" (/dev/fuse reads) or "uring"
    ring_requests: int = 0  # requests served from io_uring entries (part of requests)
    ring_enters: int = 0  # io_uring_enter calls (each submits every commit queued)
    ring_entry_failures: int = 0  # ring entries that failed and were registered again


@types.coroutine
def _drive(coro: Any, trap: Any) -> Any:
    """Finish ``coro``, which has just yielded ``trap``: forward every trap it
    yields to trio and every value or exception trio sends back to it."""
    while True:
        try:
            value = yield trap
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                trap = coro.send(value)
            except StopIteration as stop:
                return stop.value


def _split_timeout(t: float) -> tuple[int, int]:
    if not t > 0:  # also NaN
        return 0, 0
    if t >= 2**63:
        return 2**63 - 1, 0
    sec = int(t)
    return sec, min(int((t - sec) * 1e9), 999_999_999)


def _attr_tuple(a: EntryAttributes) -> tuple[Any, ...]:
    asec, ansec = divmod(a.st_atime_ns, 1_000_000_000)
    msec, mnsec = divmod(a.st_mtime_ns, 1_000_000_000)
    csec, cnsec = divmod(a.st_ctime_ns, 1_000_000_000)
    return (
        a.st_ino,
        a.st_size,
        a.st_blocks,
        asec,
        msec,
        csec,
        ansec,
        mnsec,
        cnsec,
        a.st_mode,
        a.st_nlink,
        a.st_uid,
        a.st_gid,
        a.st_rdev,
        a.st_blksize,
        0,
    )


def _nbytes(b: Any) -> int:
    t = type(b)
    if t is bytes or t is bytearray:
        return len(b)
    return memoryview(b).nbytes


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
        transport: str = "classic",
        uring_depth: int = 16,
        connection: int | None = None,
        resume: ConnectionInfo | None = None,
    ) -> None:
        """``transport``: "classic", "uring" (io_uring or an error) or "auto" (io_uring when
        every check passes); ``uring_depth``: ring entries per queue; ``connection``: the
        fusectl connection number, to abort the connection if the ring cannot be set up.

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
        self.fd = fd
        self.max_inflight = max_inflight
        self.max_pages = max_pages
        self.max_background = min(max_background, 65535)
        self.poll_ns = max(poll_us, 0) * 1000
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
        self._ended = False
        self._resume = resume
        self.handed_off = False  # stop_reading() was called: run() ends without destroy
        # counters
        self._requests = 0
        self._inline = 0
        self._suspended_total = 0
        self._suspended = 0
        self._max_suspended = 0
        self._errors: dict[str, int] = {}
        self._exceptions = 0
        self._malformed = 0
        self._interrupts = 0
        self._interrupted_replies = 0
        self._reply_failures = 0
        self._bad_replies = 0
        self._read_errors = 0
        self._read_errors_in_a_row = 0
        o = ops
        self._handlers: dict[int, Callable[..., Awaitable[Any]]] = {
            wire.LOOKUP: self._op_lookup,
            wire.FORGET: self._op_forget,
            wire.BATCH_FORGET: self._op_batch_forget,
            wire.GETATTR: self._op_getattr,
            wire.SETATTR: self._op_setattr,
            wire.OPEN: self._op_open,
            wire.READ: self._op_read,
            wire.WRITE: self._op_write,
            wire.FLUSH: self._op_flush,
            wire.FSYNC: self._op_fsync,
            wire.RELEASE: self._op_release,
            wire.OPENDIR: self._op_opendir,
            wire.READDIR: self._op_readdir,
            wire.RELEASEDIR: self._op_releasedir,
            wire.FSYNCDIR: self._op_fsyncdir,
            wire.STATFS: self._op_statfs,
            wire.GETXATTR: self._op_getxattr,
            wire.SETXATTR: self._op_setxattr,
            wire.LISTXATTR: self._op_listxattr,
            wire.REMOVEXATTR: self._op_removexattr,
            wire.FALLOCATE: self._op_fallocate,
            wire.ACCESS: self._op_access,
            wire.DESTROY: self._op_destroy,
        }
        self._read_op = o.read
        self._write_op = o.write

    # -- public --------------------------------------------------------------

    def statistics(self) -> SessionStatistics:
        u = self._uring
        return SessionStatistics(
            transport=self.transport_used,
            ring_requests=u.requests if u else 0,
            ring_enters=u.enters if u else 0,
            ring_entry_failures=u.entry_failures if u else 0,
            requests=self._requests,
            inline_replies=self._inline,
            suspended_handlers=self._suspended_total,
            max_suspended=self._max_suspended,
            errors=dict(self._errors),
            handler_exceptions=self._exceptions,
            malformed=self._malformed,
            interrupts=self._interrupts,
            interrupted_replies=self._interrupted_replies,
            reply_failures=self._reply_failures,
            bad_replies=self._bad_replies,
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
            if self._resume is not None:
                conn = self._resume
            else:
                conn = await self._init(buf)
            self.conn = conn
            await self.ops.init(conn)
            initialized = True
            task_status.started(conn)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._reader_active = True
                nursery.start_soon(self._serve, buf)
                if self._uring is not None:
                    nursery.start_soon(self._uring.run)
        finally:
            self._ended = True
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
        self._ended = True
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
            t = uring.UringTransport.create(self, self.fd, kflags, max_write, self.uring_depth,
                                            self.connection)
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
        if err in _FATAL_READ_ERRNOS or not isinstance(e, OSError) \
                or self._read_errors_in_a_row >= READ_ERROR_LIMIT:
            log.critical("reading the FUSE connection failed (%s), %d time(s) in a row: "
                         "ending the session; the mount stays (dead) until unmounted",
                         e, self._read_errors_in_a_row)
            self._ended = True
            return False
        log.error("reading the FUSE connection failed (%s); trying again", e)
        await trio.sleep(min(0.001 * 2 ** self._read_errors_in_a_row, 0.1))
        return not self._ended

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
        handlers = self._handlers
        unpack_header = wire.in_header.unpack_from
        fd = self.fd
        readv = os.readv
        n: int | None
        while not self._ended:
            try:
                n = readv(fd, [buf])
            except BlockingIOError:
                n = self._poll(buf) if self.poll_ns and not self._suspended else None
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
                self._ended = True
                break
            if self._ended:
                break
            self._requests += 1
            if n < _IN:
                self._malformed += 1
                log.error("short read from /dev/fuse (%d bytes)", n)
                continue
            hdr = unpack_header(buf)
            opcode = hdr[1]
            handler = handlers.get(opcode)
            if handler is None:
                if opcode == wire.INTERRUPT:
                    self._interrupts += 1
                else:
                    self._reply_error(hdr[2], errno.EPERM if opcode in NAMESPACE_OPCODES else errno.ENOSYS)
                continue
            # The handler coroutine is driven directly (no wrapper coroutine):
            # its exceptions surface here, from send() or from _drive().
            coro: Any = handler(hdr, buf, mv, n)
            try:
                trap = coro.send(None)
            except StopIteration as stop:
                self._inline += 1
                reply = stop.value
                if reply is not _NO_REPLY:
                    self._send(hdr[2], reply)
                continue
            except Exception as exc:
                self._inline += 1
                reply = self._failed(hdr, exc)
                if reply is not _NO_REPLY:
                    self._send(hdr[2], reply)
                continue
            # The handler suspended: hand over the reader role, then finish it here.
            self._note_suspended()
            self._reader_active = False
            self._start_reader()
            try:
                reply = await _drive(coro, trap)
            except Exception as exc:
                reply = self._failed(hdr, exc)
            finally:
                self._suspended -= 1
            if reply is not _NO_REPLY:
                self._send(hdr[2], reply)
            if self._ended:
                break
            if self._reader_active:
                break
            self._reader_active = True
        self._pool.append(buf)
        # Whoever ends the connection wakes nobody: no other task is reading.

    def _note_suspended(self) -> None:
        """Count a handler that suspended (either transport); the caller hands
        its role over, finishes the handler, then decrements ``_suspended``."""
        self._suspended += 1
        self._suspended_total += 1
        if self._suspended > self._max_suspended:
            self._max_suspended = self._suspended

    def _start_reader(self) -> None:
        if self._reader_active or self._ended or self._suspended >= self.max_inflight:
            return
        assert self._nursery is not None
        self._reader_active = True
        self._nursery.start_soon(self._serve, self._get_buffer())

    def _failed(self, hdr: tuple[Any, ...], exc: Exception) -> Any:
        """The reply for a handler that raised: its errno, or EIO (logged)."""
        no_reply = hdr[1] in (wire.FORGET, wire.BATCH_FORGET)
        if isinstance(exc, FUSEError):
            return _NO_REPLY if no_reply else (exc.errno or errno.EIO)
        name = wire.OPCODE_NAMES.get(hdr[1], hdr[1])
        if isinstance(exc, _Malformed):
            self._malformed += 1
            log.error("malformed %s request: %s", name, exc)
        else:
            self._exceptions += 1
            log.error("%s handler failed", name, exc_info=exc)
        return _NO_REPLY if no_reply else errno.EIO

    # -- replies ---------------------------------------------------------------

    def _send(self, unique: int, reply: Any) -> None:
        """Send a handler's reply; never raises.  A reply that cannot be built or that the
        kernel refuses (other than for an interrupt) becomes EIO, so the request never hangs."""
        if type(reply) is int:
            self._reply_error(unique, reply)
            return
        try:
            if len(reply) == 1:
                data = reply[0]
                size = _nbytes(data)
                iov = [_pack_out(16 + size, 0, unique), data]
            elif not reply:
                iov = [_pack_out(16, 0, unique)]
            else:
                size = 16 + sum(_nbytes(b) for b in reply)
                iov = [_pack_out(size, 0, unique), *reply]
        except Exception as exc:
            self._bad_replies += 1
            log.error("request %d: the handler's result cannot be sent (%r); answered EIO",
                      unique, exc)
            self._reply_error(unique, errno.EIO)
            return
        if not self._write(iov):
            self._reply_error(unique, errno.EIO)

    def _reply_error(self, unique: int, err: int) -> None:
        if type(err) is not int or not 0 < err < 4096:  # not an errno: the kernel would refuse it
            log.error("request %d: %r is not an errno; answered EIO", unique, err)
            self._bad_replies += 1
            err = errno.EIO
        name = errno.errorcode.get(err, str(err))
        self._errors[name] = self._errors.get(name, 0) + 1
        self._write([_pack_out(16, -err, unique)])

    def _write(self, iov: list[bytes | bytearray | memoryview]) -> bool:
        """Write one reply; never raises.  False if it was refused for a reason that leaves
        the request unanswered (not an interrupt, not the end of the connection)."""
        while True:
            try:
                os.writev(self.fd, iov)
                return True
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:
                    self._interrupted_replies += 1
                    return True
                if e.errno in (errno.ENODEV, errno.EBADF):
                    self._ended = True
                    return True
                self._reply_failures += 1
                log.error("reply refused by the kernel: %s", e)
                return False
            except Exception as exc:  # a payload that is not a buffer, a huge size ...
                self._reply_failures += 1
                log.error("reply cannot be written: %r", exc)
                return False

    # -- request decoding helpers ----------------------------------------------

    @staticmethod
    def _need(n: int, size: int) -> None:
        if n < _IN + size:
            raise _Malformed(f"{n} bytes, need {_IN + size}")

    @staticmethod
    def _name(buf: bytearray, start: int, n: int) -> tuple[bytes, int]:
        end = buf.find(0, start, n)
        if end < 0:
            raise _Malformed("name not NUL-terminated")
        if end == start:
            raise _Malformed("empty name")
        return bytes(buf[start:end]), end + 1

    @staticmethod
    def _ctx(hdr: tuple[Any, ...]) -> RequestContext:
        return RequestContext(hdr[4], hdr[5], hdr[6])

    @staticmethod
    def _entry(a: EntryAttributes) -> tuple[Any, ...]:
        esec, ensec = _split_timeout(a.entry_timeout)
        asec, ansec = _split_timeout(a.attr_timeout)
        return (wire.entry_out.pack(a.st_ino, a.generation, esec, asec, ensec, ansec, *_attr_tuple(a)),)

    @staticmethod
    def _attr(a: EntryAttributes) -> tuple[Any, ...]:
        asec, ansec = _split_timeout(a.attr_timeout)
        return (wire.attr_out.pack(asec, ansec, 0, *_attr_tuple(a)),)

    # -- opcode handlers ---------------------------------------------------------
    # Each takes (hdr, buf, mv, n) and returns a payload tuple, an errno, or _NO_REPLY.

    async def _op_read(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        if n < _IN + wire.read_in.size:  # shorter, the unpack would read a stale buffer tail
            raise _Malformed("READ too short")
        fh, offset, size = wire.read_in.unpack_from(buf, _IN)[:3]
        data = await self._read_op(fh, offset, size)
        t = type(data)
        if t is bytes or t is bytearray:
            if len(data) > size:
                data = memoryview(data)[:size]
        else:
            data = memoryview(data).cast("B")
            if len(data) > size:
                data = data[:size]
        return (data,)

    async def _op_write(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        if n < _IN + wire.write_in.size:
            raise _Malformed("WRITE too short")
        fh, offset, size = wire.write_in.unpack_from(buf, _IN)[:3]
        start = _IN + wire.write_in.size
        if start + size > n:
            raise _Malformed(f"WRITE payload {size} bytes, request has {n - start}")
        written = await self._write_op(fh, offset, mv[start : start + size])
        return (wire.write_out.pack(written, 0),)

    async def _op_lookup(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        name, _ = self._name(buf, _IN, n)
        return self._entry(await self.ops.lookup(hdr[3], name, self._ctx(hdr)))

    async def _op_forget(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.forget_in.size)
        (nlookup,) = wire.forget_in.unpack_from(buf, _IN)
        await self.ops.forget([ForgetItem(hdr[3], nlookup)])
        return _NO_REPLY

    async def _op_batch_forget(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.batch_forget_in.size)
        count, _ = wire.batch_forget_in.unpack_from(buf, _IN)
        off = _IN + wire.batch_forget_in.size
        if off + count * wire.forget_one.size > n:
            raise _Malformed(f"BATCH_FORGET of {count} items too short")
        items = [ForgetItem(*t) for t in wire.forget_one.iter_unpack(mv[off : off + count * 16])]
        await self.ops.forget(items)
        return _NO_REPLY

    async def _op_getattr(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        return self._attr(await self.ops.getattr(hdr[3], self._ctx(hdr)))

    async def _op_setattr(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.setattr_in.size)
        (valid, _, fh, size, _lo, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, _u4, uid, gid, _u5) = (
            wire.setattr_in.unpack_from(buf, _IN)
        )
        f = SetattrFields()
        if valid & wire.FATTR_MODE:
            f.update_mode, f.st_mode = True, mode
        if valid & wire.FATTR_UID:
            f.update_uid, f.st_uid = True, uid
        if valid & wire.FATTR_GID:
            f.update_gid, f.st_gid = True, gid
        if valid & wire.FATTR_SIZE:
            f.update_size, f.st_size = True, size
        now = None
        if valid & wire.FATTR_ATIME_NOW:
            now = time.time_ns()
            f.update_atime, f.st_atime_ns = True, now
        elif valid & wire.FATTR_ATIME:
            f.update_atime, f.st_atime_ns = True, _signed(atime) * 1_000_000_000 + atimensec
        if valid & wire.FATTR_MTIME_NOW:
            now = now or time.time_ns()
            f.update_mtime, f.st_mtime_ns = True, now
        elif valid & wire.FATTR_MTIME:
            f.update_mtime, f.st_mtime_ns = True, _signed(mtime) * 1_000_000_000 + mtimensec
        if valid & wire.FATTR_CTIME:
            f.update_ctime, f.st_ctime_ns = True, _signed(ctime) * 1_000_000_000 + ctimensec
        if valid & wire.FATTR_FH:
            f.fh = fh
        return self._attr(await self.ops.setattr(hdr[3], f, self._ctx(hdr)))

    async def _op_open(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.open_in.size)
        flags, _ = wire.open_in.unpack_from(buf, _IN)
        fi = await self.ops.open(hdr[3], flags, self._ctx(hdr))
        oflags = (
            (wire.FOPEN_DIRECT_IO if fi.direct_io else 0)
            | (wire.FOPEN_KEEP_CACHE if fi.keep_cache else 0)
            | (wire.FOPEN_NONSEEKABLE if fi.nonseekable else 0)
        )
        return (wire.open_out.pack(fi.fh, oflags, 0),)

    async def _op_flush(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.flush_in.size)
        await self.ops.flush(wire.flush_in.unpack_from(buf, _IN)[0])
        return _EMPTY

    async def _op_fsync(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.fsync_in.size)
        fh, flags, _ = wire.fsync_in.unpack_from(buf, _IN)
        await self.ops.fsync(fh, bool(flags & wire.FUSE_FSYNC_FDATASYNC))
        return _EMPTY

    async def _op_release(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.release_in.size)
        await self.ops.release(wire.release_in.unpack_from(buf, _IN)[0])
        return _EMPTY

    async def _op_opendir(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        fh = await self.ops.opendir(hdr[3], self._ctx(hdr))
        return (wire.open_out.pack(fh, 0, 0),)

    async def _op_readdir(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.read_in.size)
        fh, offset, size = wire.read_in.unpack_from(buf, _IN)[:3]
        out = bytearray()
        pack = wire.dirent.pack
        for name, attr, next_offset in await self.ops.readdir(fh, offset):
            reclen = wire.dirent_size(len(name))
            if len(out) + reclen > size:
                break
            out += pack(attr.st_ino, next_offset, len(name), (attr.st_mode >> 12) & 0xF)
            out += name
            out += bytes(reclen - wire.DIRENT_NAME_OFFSET - len(name))
        return (out,)

    async def _op_releasedir(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.release_in.size)
        await self.ops.releasedir(wire.release_in.unpack_from(buf, _IN)[0])
        return _EMPTY

    async def _op_fsyncdir(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.fsync_in.size)
        fh, flags, _ = wire.fsync_in.unpack_from(buf, _IN)
        await self.ops.fsyncdir(fh, bool(flags & wire.FUSE_FSYNC_FDATASYNC))
        return _EMPTY

    async def _op_statfs(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        s = await self.ops.statfs(hdr[3], self._ctx(hdr))
        return (
            wire.kstatfs.pack(
                s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize, 0
            ),
        )

    async def _op_getxattr(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.getxattr_in.size)
        size, _ = wire.getxattr_in.unpack_from(buf, _IN)
        name, _ = self._name(buf, _IN + wire.getxattr_in.size, n)
        value = bytes(await self.ops.getxattr(hdr[3], name, self._ctx(hdr)))
        return self._sized(value, size)

    @staticmethod
    def _sized(value: bytes, size: int) -> Any:
        if size == 0:
            return (wire.getxattr_out.pack(len(value), 0),)
        if len(value) > size:
            return errno.ERANGE
        return (value,)

    async def _op_setxattr(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        st = wire.setxattr_in_compat  # FUSE_SETXATTR_EXT is not asked for
        self._need(n, st.size)
        size, flags = st.unpack_from(buf, _IN)[:2]
        name, off = self._name(buf, _IN + st.size, n)
        if off + size > n:
            raise _Malformed(f"SETXATTR value of {size} bytes, request has {n - off}")
        await self.ops.setxattr(hdr[3], name, bytes(buf[off : off + size]), flags, self._ctx(hdr))
        return _EMPTY

    async def _op_listxattr(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.getxattr_in.size)
        size, _ = wire.getxattr_in.unpack_from(buf, _IN)
        names = await self.ops.listxattr(hdr[3], self._ctx(hdr))
        return self._sized(b"".join(bytes(x) + b"\0" for x in names), size)

    async def _op_removexattr(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        name, _ = self._name(buf, _IN, n)
        await self.ops.removexattr(hdr[3], name, self._ctx(hdr))
        return _EMPTY

    async def _op_fallocate(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.fallocate_in.size)
        fh, offset, length, mode, _ = wire.fallocate_in.unpack_from(buf, _IN)
        await self.ops.fallocate(fh, offset, length, mode)
        return _EMPTY

    async def _op_access(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.access_in.size)
        mask, _ = wire.access_in.unpack_from(buf, _IN)
        await self.ops.access(hdr[3], mask, self._ctx(hdr))
        return _EMPTY

    async def _op_destroy(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._ended = True
        return _EMPTY


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


async def serve(
    ops: Operations,
    mountpoint: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[ConnectionInfo] = trio.TASK_STATUS_IGNORED,
    max_inflight: int = 64,
    max_pages: int = 256,
    poll_us: int = 0,
    transport: str = "classic",
    uring_depth: int = 16,
    session_callback: Callable[[Session], None] | None = None,
    **mount_kwargs: Any,
) -> None:
    """Mount ``ops`` on ``mountpoint``, serve it, and unmount when the session
    ends or this task is cancelled.  ``task_status.started`` receives the
    ConnectionInfo once the mount is live; ``session_callback`` (if given)
    receives the Session before INIT, e.g. to read its statistics later."""
    use_fusermount = mount_kwargs.get("use_fusermount")
    if transport == "uring":  # what can be known before mounting: nothing mounted if not
        reason = uring.unavailable_reason()
        if reason:
            raise uring.TransportUnavailable(f"transport uring unavailable: {reason}")
    path = uring.resolve(mountpoint)  # before mounting: afterwards a stat would wait for INIT
    fd = mount(mountpoint, **mount_kwargs)
    try:
        session = Session(ops, fd, max_inflight=max_inflight, max_pages=max_pages, poll_us=poll_us,
                          transport=transport, uring_depth=uring_depth,
                          connection=uring.connection_id(path) if transport != "classic" else None)
        if session_callback is not None:
            session_callback(session)
        await session.run(task_status=task_status)
    finally:
        # Closing the fd first aborts the connection, so unmounting cannot wait
        # on a request nobody will answer any more.
        os.close(fd)
        unmount_quietly(mountpoint, use_fusermount=use_fusermount)
