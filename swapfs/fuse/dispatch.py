"""The FUSE request dispatcher, below both transports.

A transport (session.py: reads of /dev/fuse; uring/transport.py: io_uring
entries) moves bytes in and out and calls one :class:`Dispatcher` through a
small interface; the dispatcher owns everything between:

* **Decoding**: one ``_op_*`` handler per opcode, each taking
  ``(hdr, buf, mv, n)`` (the unpacked fuse_in_header and the request in the
  classic layout: header, arguments, payload) and returning a reply: a tuple
  of buffers (the payload), an errno, or :data:`NO_REPLY`.
* **Inline-first dispatch**: :meth:`Dispatcher.dispatch` (or
  :meth:`Dispatcher.start` for a coroutine the transport built) starts the
  handler coroutine inline with ``coro.send(None)``.  A handler that finishes
  without suspending returns its reply at once: no task, no scheduling (the
  fast path).  A handler that suspends comes back as a :class:`Suspended`
  (counted in ``suspended``); the transport hands its reading role to another
  task and awaits :meth:`Dispatcher.finish` in this one, which drives the
  coroutine to completion (:func:`drive`, a manual ``yield from``: the trap
  belongs to this task, so this task must be the one that yields it).
* **Errors**: a handler's FUSEError becomes its errno; any other exception,
  and a malformed request, is logged and answered EIO.
* **Replies**: :meth:`Dispatcher.encode` turns a reply into the iovec of one
  /dev/fuse write; :meth:`Dispatcher.errno_for` is the one errno rule of
  both transports: an errno in 1..511 is answered as is, anything else (0,
  negative, 512 and above, not an int) is logged and answered EIO.  The
  kernel refuses an out header whose error is <= -512 (-ERESTARTSYS) on
  /dev/fuse and on the ring, which would leave the request unanswered.
* **Statistics**: the counters of :class:`SessionStatistics` that do not
  belong to one transport.

Handlers run inline in the transport's task: they interleave at their awaits
and nowhere else, and any trio checkpoint (``await trio.sleep(0)``, an
uncontended ``trio.Lock``) counts as suspending.
"""

from __future__ import annotations

import errno
import logging
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .ops import EntryAttributes, ForgetItem, FUSEError, Operations, RequestContext, SetattrFields

log = logging.getLogger("swapfs.fuse")

PAGE = 4096
HEADER_ROOM = 4096  # room for fuse_in_header + the opcode's struct before a write payload
MAX_ERRNO = 511  # the largest errno a reply may carry (the kernel refuses -512 and below)

# Requests that would change the namespace: refused by the dispatcher itself.
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

_IN = wire.in_header.size
pack_out = wire.out_header.pack
_EMPTY: tuple[()] = ()


class _NoReply:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_REPLY"


NO_REPLY: Any = _NoReply()
"""A handler's result for a request that gets no reply (FORGET, BATCH_FORGET, INTERRUPT)."""


class Malformed(Exception):
    """A request too short or badly formed: logged, counted and answered EIO."""


class Suspended:
    """A handler that suspended in :meth:`Dispatcher.dispatch`: its coroutine and the trap it
    yielded, for :meth:`Dispatcher.finish`."""

    __slots__ = ("coro", "trap")

    def __init__(self, coro: Any, trap: Any) -> None:
        self.coro = coro
        self.trap = trap


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
def drive(coro: Any, trap: Any) -> Any:
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


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


Handler = Callable[[tuple[Any, ...], bytearray, memoryview, int], Awaitable[Any]]


class Dispatcher:
    """Decodes requests, runs their handlers on ``ops`` inline first, encodes replies and
    counts.  Shared by the transports of one connection; it makes no system call."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.ended = False  # the connection is ending: DESTROY, or a transport saw its end
        self.suspended = 0  # handlers suspended right now
        # counters (requests = started + unstarted; inline = started - suspended_total:
        # one increment per request on the fast path)
        self.started = 0  # handlers started
        self.unstarted = 0  # requests answered without a handler (unknown, malformed)
        self.suspended_total = 0
        self.max_suspended = 0
        self.errors: dict[str, int] = {}
        self.exceptions = 0
        self.malformed = 0
        self.interrupts = 0
        self.bad_replies = 0
        self.handlers: dict[int, Handler] = {
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
        self.read_op = ops.read
        self.write_op = ops.write

    # -- the transports' interface ---------------------------------------------

    def dispatch(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        """Start the handler of the request in ``buf`` (``n`` bytes, classic layout, ``hdr``
        its unpacked fuse_in_header) inline: its reply (payload tuple, errno or NO_REPLY),
        or a :class:`Suspended` for :meth:`finish`."""
        handler = self.handlers.get(hdr[1])
        if handler is None:
            return self._unhandled(hdr[1])
        self.started += 1
        # The handler coroutine is driven directly (no wrapper coroutine): its
        # exceptions surface here, from send(), or in finish(), from drive().
        coro: Any = handler(hdr, buf, mv, n)
        try:
            trap = coro.send(None)
        except StopIteration as stop:
            return stop.value
        except Exception as exc:
            return self.failed(hdr, exc)
        return self._suspend(coro, trap)

    def start(self, hdr: tuple[Any, ...], coro: Coroutine[Any, Any, Any]) -> Any:
        """As :meth:`dispatch`, for a handler coroutine the transport made itself (io_uring's
        READ and WRITE, served from the entry's own buffers)."""
        self.started += 1
        try:
            trap = coro.send(None)
        except StopIteration as stop:
            return stop.value
        except Exception as exc:
            return self.failed(hdr, exc)
        return self._suspend(coro, trap)

    async def finish(self, hdr: tuple[Any, ...], suspended: Suspended) -> Any:
        """Drive a suspended handler to completion in the calling task (the one its trap
        came from); its reply."""
        try:
            return await drive(suspended.coro, suspended.trap)
        except Exception as exc:
            return self.failed(hdr, exc)
        finally:
            self.suspended -= 1

    def malformed_request(self, what: str) -> int:
        """A request that cannot even be decoded (the transport's word): counted, logged;
        the errno to answer (EIO)."""
        self.unstarted += 1
        self.malformed += 1
        log.error("malformed request: %s", what)
        return errno.EIO

    def failed(self, hdr: tuple[Any, ...], exc: Exception) -> Any:
        """The reply for a handler that raised: its errno, or EIO (logged)."""
        no_reply = hdr[1] in (wire.FORGET, wire.BATCH_FORGET)
        if isinstance(exc, FUSEError):
            return NO_REPLY if no_reply else (exc.errno or errno.EIO)
        name = wire.OPCODE_NAMES.get(hdr[1], hdr[1])
        if isinstance(exc, Malformed):
            self.malformed += 1
            log.error("malformed %s request: %s", name, exc)
        else:
            self.exceptions += 1
            log.error("%s handler failed", name, exc_info=exc)
        return NO_REPLY if no_reply else errno.EIO

    def errno_for(self, unique: int, err: Any) -> int:
        """The errno to answer for a handler's error result ``err`` (counted by name): ``err``
        itself if it is an int in 1..511, else EIO (logged, counted as a bad reply)."""
        e: int = err if type(err) is int else 0
        if not 0 < e <= MAX_ERRNO:
            log.error("request %d: %r is not an errno a reply can carry; answered EIO", unique, err)
            self.bad_replies += 1
            e = errno.EIO
        name = errno.errorcode.get(e, str(e))
        self.errors[name] = self.errors.get(name, 0) + 1
        return e

    def bad_reply(self, unique: int, exc: BaseException) -> int:
        """A handler result that cannot be sent (not buffers, too big ...): logged, counted;
        the errno to answer (EIO)."""
        self.bad_replies += 1
        log.error("request %d: the handler's result cannot be sent (%r); answered EIO", unique, exc)
        return self.errno_for(unique, errno.EIO)

    def encode(self, unique: int, reply: Any) -> list[Any]:
        """The iovec of one /dev/fuse write answering ``unique`` with ``reply`` (a payload
        tuple or an errno); never raises: what cannot be sent is answered EIO."""
        if type(reply) is int:
            return [pack_out(16, -self.errno_for(unique, reply), unique)]
        try:
            if len(reply) == 1:
                data = reply[0]
                t = type(data)
                size = len(data) if t is bytes or t is bytearray else memoryview(data).nbytes
                return [pack_out(16 + size, 0, unique), data]
            if not reply:
                return [pack_out(16, 0, unique)]
            return [pack_out(16 + sum(_nbytes(b) for b in reply), 0, unique), *reply]
        except Exception as exc:
            return [pack_out(16, -self.bad_reply(unique, exc), unique)]

    def encode_error(self, unique: int, err: int) -> list[Any]:
        """The iovec of an error reply (the errno rule applied)."""
        return [pack_out(16, -self.errno_for(unique, err), unique)]

    def statistics(self, **transport: Any) -> SessionStatistics:
        """The counters, with the transport's own (``transport``: SessionStatistics fields)."""
        return SessionStatistics(
            requests=self.started + self.unstarted,
            inline_replies=self.started - self.suspended_total,
            suspended_handlers=self.suspended_total,
            max_suspended=self.max_suspended,
            errors=dict(self.errors),
            handler_exceptions=self.exceptions,
            malformed=self.malformed,
            interrupts=self.interrupts,
            bad_replies=self.bad_replies,
            **transport,
        )

    def _suspend(self, coro: Any, trap: Any) -> Suspended:
        self.suspended += 1
        self.suspended_total += 1
        if self.suspended > self.max_suspended:
            self.max_suspended = self.suspended
        return Suspended(coro, trap)

    def _unhandled(self, opcode: int) -> Any:
        self.unstarted += 1
        if opcode == wire.INTERRUPT:
            self.interrupts += 1
            return NO_REPLY
        return errno.EPERM if opcode in NAMESPACE_OPCODES else errno.ENOSYS

    # -- request decoding helpers ----------------------------------------------

    @staticmethod
    def _need(n: int, size: int) -> None:
        if n < _IN + size:
            raise Malformed(f"{n} bytes, need {_IN + size}")

    @staticmethod
    def _name(buf: bytearray, start: int, n: int) -> tuple[bytes, int]:
        end = buf.find(0, start, n)
        if end < 0:
            raise Malformed("name not NUL-terminated")
        if end == start:
            raise Malformed("empty name")
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

    @staticmethod
    def _sized(value: bytes, size: int) -> Any:
        if size == 0:
            return (wire.getxattr_out.pack(len(value), 0),)
        if len(value) > size:
            return errno.ERANGE
        return (value,)

    # -- opcode handlers ---------------------------------------------------------
    # Each takes (hdr, buf, mv, n) and returns a payload tuple, an errno, or NO_REPLY.

    async def _op_read(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        if n < _IN + wire.read_in.size:  # shorter, the unpack would read a stale buffer tail
            raise Malformed("READ too short")
        fh, offset, size = wire.read_in.unpack_from(buf, _IN)[:3]
        data = await self.read_op(fh, offset, size)
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
            raise Malformed("WRITE too short")
        fh, offset, size = wire.write_in.unpack_from(buf, _IN)[:3]
        start = _IN + wire.write_in.size
        if start + size > n:
            raise Malformed(f"WRITE payload {size} bytes, request has {n - start}")
        written = await self.write_op(fh, offset, mv[start : start + size])
        return (wire.write_out.pack(written, 0),)

    async def _op_lookup(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        name, _ = self._name(buf, _IN, n)
        return self._entry(await self.ops.lookup(hdr[3], name, self._ctx(hdr)))

    async def _op_forget(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.forget_in.size)
        (nlookup,) = wire.forget_in.unpack_from(buf, _IN)
        await self.ops.forget([ForgetItem(hdr[3], nlookup)])
        return NO_REPLY

    async def _op_batch_forget(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        self._need(n, wire.batch_forget_in.size)
        count, _ = wire.batch_forget_in.unpack_from(buf, _IN)
        off = _IN + wire.batch_forget_in.size
        if off + count * wire.forget_one.size > n:
            raise Malformed(f"BATCH_FORGET of {count} items too short")
        items = [ForgetItem(*t) for t in wire.forget_one.iter_unpack(mv[off : off + count * 16])]
        await self.ops.forget(items)
        return NO_REPLY

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

    async def _op_setxattr(self, hdr: tuple[Any, ...], buf: bytearray, mv: memoryview, n: int) -> Any:
        st = wire.setxattr_in_compat  # FUSE_SETXATTR_EXT is not asked for
        self._need(n, st.size)
        size, flags = st.unpack_from(buf, _IN)[:2]
        name, off = self._name(buf, _IN + st.size, n)
        if off + size > n:
            raise Malformed(f"SETXATTR value of {size} bytes, request has {n - off}")
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
        self.ended = True
        return _EMPTY
