"""The io_uring transport: the kernel hands requests to ring entries instead of /dev/fuse reads.

What this module owns
---------------------
* The ring entries of one connection: their header and payload buffers
  (mapped once, read and written through memoryviews: no Python object per
  request in any table) and one SQE each, filled once.
* The checks made at INIT (:meth:`UringTransport.create`: the kernel offered
  the flag, the ring is set up, a REGISTER probe is refused with EAGAIN) and
  the registration of every queue after the INIT reply.
* The serving loop: completions are reaped in user space, each request is
  handed to the dispatcher inline, and the replies are committed in batches
  of COMMIT_AND_FETCH commands, many per ``io_uring_enter``.

The checks made before mounting are in ``probe``, the ring itself in ``ring``.

The kernel side
---------------
Each ring entry is a pair of buffers registered with
``IORING_OP_URING_CMD``/``FUSE_IO_URING_CMD_REGISTER`` on the /dev/fuse fd: a
288-byte header (``in_out``: the fuse_in_header of a request, then the
fuse_out_header of its reply; ``op_in``: the opcode's first argument;
``ring_ent_in_out``: the payload size both ways) and a payload buffer of at
least max_write bytes (the other arguments, e.g. a WRITE's data or LOOKUP's
name; a reply's payload).  A request completes the entry's command (CQE with
res 0); the reply is sent with ``COMMIT_AND_FETCH``, which also parks the
entry for the next request.  There is one queue per possible CPU and the
kernel queues a request on the queue of the CPU it is issued on; the ring is
used only once every queue has an entry, so every queue is registered, the
last queue last (until then requests keep going to /dev/fuse).  FORGET,
BATCH_FORGET and INTERRUPT still arrive on /dev/fuse, so the classic reader
keeps running.  At unmount (or abort) every parked entry completes with
-ENOTCONN.

Hazards, and how they are avoided: a ring without IORING_SETUP_SQE128, or a
queue left without entries once the flag was granted, makes every filesystem
call wait for the ring forever.  So everything is checked before the INIT
reply declares FUSE_OVER_IO_URING: the kernel offers the flag, the module
parameter ``enable_uring`` is Y, the ring was created with the flags asked
for, the mappings exist, and a REGISTER command sent before INIT is refused
with EAGAIN (which proves the command reaches the FUSE device, SQE128 is in
effect and io_uring is enabled for FUSE).  If registration fails after INIT,
the connection is aborted (fusectl ``abort``) and the session ends with a
clear error: never a hung mount.

Ring flags: SQE128 (the command area), SINGLE_ISSUER|DEFER_TASKRUN (task work
runs only when this thread enters the ring with GETEVENTS: no interrupting
task work, fewer wake-ups; measured faster than a plain ring at depth) and
TASKRUN_FLAG (the kernel flags pending task work in the SQ ring, so the
busy-poll window reads memory instead of entering the kernel).

Dispatch goes through the connection's Dispatcher (dispatch.py), inline
first, as for /dev/fuse.  Completions are taken one at a time from the CQ;
READ and WRITE are served from the entry's buffers (a WRITE's data is a
memoryview of the payload buffer, a READ's reply is copied into it) by
handler coroutines made here and started with ``Dispatcher.start``; the
other opcodes are copied into a classic-layout buffer and given to
``Dispatcher.dispatch``.  A handler that suspends keeps its task: the polling
role passes to a new task, the handler is finished with
``Dispatcher.finish``, its entry is committed, and the task polls again only
if nobody else does.  Error replies follow the dispatcher's errno rule.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import time
from typing import Any

import trio

from .. import wire
from ..dispatch import NO_REPLY, Dispatcher, Malformed, Suspended
from . import probe
from .abi import (
    CQE_SIZE,
    FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
    FUSE_IO_URING_CMD_REGISTER,
    HEADER_SIZE,
    HEADER_STRIDE,
    IN_OUT,
    IORING_OP_URING_CMD,
    IORING_SQ_TASKRUN,
    OP_IN,
    OP_IN_SIZE,
    PAYLOAD_SZ,
    SQE_SIZE,
    get_libc,
    map_memory,
    view,
)
from .abi import cqe as _cqe
from .abi import read3 as _read3
from .abi import u32 as _u32
from .abi import u64 as _u64
from .probe import RegistrationFailed, TransportUnavailable, abort_connection
from .ring import Ring

log = logging.getLogger("swapfs.fuse")

# Entries that end with one of these errnos end for good: the connection is going away.
_ENTRY_GONE = frozenset({errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV})
# After this many entries failed for another reason, the ring is not trusted: abort.
ENTRY_FAILURE_LIMIT = 64
PROBE_TIMEOUT = 1.0

_unpack_in = wire.in_header.unpack_from
READ = wire.READ
WRITE = wire.WRITE
_pack_out_into = wire.out_header.pack_into


class UringTransport:
    """The ring entries of one FUSE connection and the loop serving them."""

    inject_register_failure = False  # tests: the last REGISTER names a queue that does not exist

    def __init__(self, dispatcher: Dispatcher, fuse_fd: int, nr_queues: int, depth: int,
                 payload_size: int, poll_ns: int = 0) -> None:
        self.dispatcher = dispatcher
        self.poll_ns = poll_ns
        self._read_op = dispatcher.read_op
        self._write_op = dispatcher.write_op
        self.fuse_fd = fuse_fd
        self.nr_queues = nr_queues
        self.depth = depth
        self.nentries = n = nr_queues * depth
        self.payload_size = payload_size = (payload_size + 4095) & ~4095
        self.ring = Ring(n + 1)  # one more SQE for the probe
        self._buf_maps: list[tuple[int, int]] = []
        try:
            hdr_addr = map_memory(n * HEADER_STRIDE)
            self._buf_maps.append((hdr_addr, n * HEADER_STRIDE))
            pay_addr = map_memory(n * payload_size)
            self._buf_maps.append((pay_addr, n * payload_size))
        except BaseException:
            self.close()
            raise
        self.hdr = [view(hdr_addr + e * HEADER_STRIDE, HEADER_SIZE) for e in range(n)]
        self.pay = [view(pay_addr + e * payload_size, payload_size) for e in range(n)]
        self._iov = (ctypes.c_uint64 * (4 * n))()
        iov_addr = ctypes.addressof(self._iov)
        for e in range(n):
            self._iov[4 * e: 4 * e + 4] = [hdr_addr + e * HEADER_STRIDE, HEADER_SIZE,
                                           pay_addr + e * payload_size, payload_size]
            # qid: entries of queue 0 first, the last queue's last (see register()).
            self._fill_sqe(e, iov_addr + 32 * e, e // depth, e)
        self._probe_sqe = n
        self._fill_sqe(n, iov_addr, 0, n)
        self._tail = self.ring.u32[self.ring.sq_tail]
        self._pending = 0
        self._cq_head = self.ring.u32[self.ring.cq_head]
        self.live = 0  # entries parked in the kernel or being served
        self.conn_id: int | None = None
        self._poller_active = False
        self._stopped = False
        self._cancel: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        # counters
        self.requests = 0
        self.enters = 0
        self.entry_failures = 0
        self._reregistering: set[int] = set()

    def _fill_sqe(self, idx: int, iov: int, qid: int, user_data: int) -> None:
        s = self.ring.sqes
        off = idx * SQE_SIZE
        s[off: off + SQE_SIZE] = bytes(SQE_SIZE)
        s[off] = IORING_OP_URING_CMD
        struct.pack_into("=i", s, off + 4, self.fuse_fd)
        struct.pack_into("=I", s, off + 8, FUSE_IO_URING_CMD_REGISTER)  # cmd_op
        struct.pack_into("=Q", s, off + 16, iov)  # addr: the iovec pair
        struct.pack_into("=I", s, off + 24, 2)  # len: two iovecs
        struct.pack_into("=Q", s, off + 32, user_data)
        struct.pack_into("=QQH", s, off + 48, 0, 0, qid)  # struct fuse_uring_cmd_req

    @classmethod
    def create(cls, dispatcher: Dispatcher, fuse_fd: int, kernel_flags: int, max_payload: int,
               depth: int, conn_id: int | None, poll_ns: int = 0) -> UringTransport:
        """Everything checked before INIT may declare FUSE_OVER_IO_URING; raises
        TransportUnavailable with the reason."""
        reason = probe.unavailable_reason()
        if reason:
            raise TransportUnavailable(reason)
        # The way out of every failure: a request handed to the ring waits for this thread,
        # and only an abort through fusectl ends it while the ring lives.
        if conn_id is None:
            raise TransportUnavailable("the FUSE connection number of the mount is not known")
        fusectl = probe.FUSECTL
        if not os.path.exists(f"{fusectl}/{conn_id}/abort"):
            raise TransportUnavailable(
                f"{fusectl}/{conn_id}/abort does not exist (fusectl not mounted? "
                f"mount -t fusectl fusectl {fusectl}): the connection could not be aborted")
        if not kernel_flags & wire.FUSE_OVER_IO_URING:
            raise TransportUnavailable("the kernel did not offer FUSE_OVER_IO_URING at INIT")
        nr_queues = probe.possible_cpus()
        assert nr_queues is not None
        try:
            t = cls(dispatcher, fuse_fd, nr_queues, depth, max(max_payload, wire.MIN_READ_BUFFER),
                    poll_ns)
        except OSError as exc:
            raise TransportUnavailable(f"cannot set up the ring: {exc}") from None
        try:
            t._probe()
        except TransportUnavailable:
            t.close()
            raise
        return t

    def _probe(self) -> None:
        """A REGISTER before INIT must be refused with EAGAIN: then the command reaches the
        FUSE device with a 128-byte SQE and io_uring is enabled for FUSE."""
        r = self.ring
        u32 = r.u32
        u32[r.sq_array + (self._tail & r.sq_mask)] = self._probe_sqe
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        u32[r.sq_tail] = self._tail
        try:
            if r.enter(1) != 1:
                raise TransportUnavailable("the probe command was not submitted")
        except OSError as exc:
            raise TransportUnavailable(f"io_uring_enter failed: {exc.strerror}") from None
        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            got = self._pop()
            if got is not None:
                user_data, res = got
                break
            if time.monotonic() > deadline:
                raise TransportUnavailable("the probe command did not complete")
            time.sleep(0.001)
            r.enter(0)
        if user_data != self._probe_sqe:
            raise TransportUnavailable(f"unexpected completion {user_data} for the probe")
        if res == -errno.EAGAIN:
            return
        what = {
            -errno.EOPNOTSUPP: "the kernel refuses FUSE io_uring commands (enable_uring is off "
                               "or the kernel lacks CONFIG_FUSE_IO_URING)",
            -errno.EINVAL: "the kernel refused the command (no 128-byte SQEs?)",
        }.get(res, f"the probe command ended with {os.strerror(-res) if res < 0 else res}")
        raise TransportUnavailable(what)

    def _pop(self) -> tuple[int, int] | None:
        r = self.ring
        u32 = r.u32
        head = self._cq_head
        if head == u32[r.cq_tail]:
            return None
        user_data, res, _ = _cqe.unpack_from(r.ring, r.cqes + (head & r.cq_mask) * CQE_SIZE)
        self._cq_head = head = (head + 1) & 0xFFFFFFFF
        u32[r.cq_head] = head
        return user_data, res

    def _queue(self, e: int) -> None:
        r = self.ring
        r.u32[r.sq_array + (self._tail & r.sq_mask)] = e
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._pending += 1

    def _submit(self) -> None:
        """Submit what was queued and run the ring's task work (new requests become CQEs)."""
        r = self.ring
        r.u32[r.sq_tail] = self._tail
        self.enters += 1
        try:
            self._pending -= r.enter(self._pending)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                log.error("io_uring_enter failed: %s", exc)
                self.entry_failures += 1

    def register(self, conn_id: int | None) -> None:
        """Register every entry (the last queue's last, so the ring is used only once
        every queue has one).  On failure abort the connection and raise RegistrationFailed."""
        self.conn_id = conn_id
        r = self.ring
        n = self.nentries
        if self.inject_register_failure:
            struct.pack_into("=H", r.sqes, (n - 1) * SQE_SIZE + 64, 0xFFFF)
        for e in range(n):
            self._queue(e)
        problem = None
        try:
            r.u32[r.sq_tail] = self._tail
            done = r.enter(n)
            self._pending -= done
            if done != n:
                problem = f"{done} of {n} REGISTER commands submitted"
        except OSError as exc:
            problem = f"io_uring_enter: {exc.strerror}"
        # A REGISTER that succeeds completes only with a request; a failed one completes at once.
        head, tail = self._cq_head, r.u32[r.cq_tail]
        while problem is None and head != tail:
            user_data, res, _ = _cqe.unpack_from(r.ring, r.cqes + (head & r.cq_mask) * CQE_SIZE)
            if res < 0:
                problem = (f"REGISTER of entry {user_data} (queue {user_data // self.depth}) failed: "
                           f"{os.strerror(-res)}")
            head = (head + 1) & 0xFFFFFFFF
        if problem is not None:
            aborted = abort_connection(conn_id)
            self.close()
            raise RegistrationFailed(
                f"io_uring transport: {problem}; the FUSE connection was "
                + ("aborted" if aborted else "closed (fusectl abort unavailable)"))
        self.live = n
        for e in range(n):
            struct.pack_into("=I", r.sqes, e * SQE_SIZE + 8, FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
        log.info("io_uring transport: %d queue(s) x %d entries registered, payload buffers %d KiB",
                 self.nr_queues, self.depth, self.payload_size // 1024)

    # -- serving -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the ring until every entry has ended (the connection went away) or the
        connection is ending (``Dispatcher.ended``)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._watch_end)
                self._poller_active = True
                nursery.start_soon(self._poll_loop)
        finally:
            self._stopped = True
            self._nursery = None

    async def _watch_end(self) -> None:
        """Once the connection is ending, give the entries a moment to end, then stop."""
        d = self.dispatcher
        while not d.ended and self.live > 0:  # noqa: ASYNC110 (a flag set in many places)
            await trio.sleep(0.2)
        with trio.move_on_after(2.0):
            while self.live > 0:  # noqa: ASYNC110
                await trio.sleep(0.05)
        self._stopped = True
        if self._cancel is not None:
            self._cancel.cancel()

    def _entry_ended(self, e: int, res: int) -> None:
        err = -res
        if err in _ENTRY_GONE:
            self.live -= 1
            return
        self.entry_failures += 1
        log.error("io_uring entry %d (queue %d) failed: %s; registering it again",
                  e, e // self.depth, os.strerror(err))
        if self.entry_failures > ENTRY_FAILURE_LIMIT:
            log.critical("io_uring: %d entry failures: aborting the FUSE connection", self.entry_failures)
            self.live -= 1
            if not self._stopped:
                self._stopped = True
                abort_connection(self.conn_id)
            return
        struct.pack_into("=I", self.ring.sqes, e * SQE_SIZE + 8, FUSE_IO_URING_CMD_REGISTER)
        self._queue(e)
        self._reregistering.add(e)

    async def _poll_loop(self) -> None:
        """The polling role: submit, reap, serve inline; hand the role over when a handler
        suspends; busy-poll for ``poll_ns`` before sleeping on the ring fd."""
        d = self.dispatcher
        r = self.ring
        u32 = r.u32
        efd = r.eventfd
        cq_tail = r.cq_tail
        sq_flags = r.sq_flags
        while True:
            if self._pending or u32[sq_flags] & IORING_SQ_TASKRUN or self._cq_head == u32[cq_tail]:
                self._submit()
            if self._cq_head != u32[cq_tail]:
                if not await self._drain():
                    # A handler suspended: the role went to another task while this one
                    # finished it; poll again only if nobody else does.
                    if self._poller_active or self._stopped:
                        return
                    self._poller_active = True
                continue
            if self.live <= 0 or self._stopped:
                return
            poll_ns = self.poll_ns  # paused under CPU pressure by the session
            if poll_ns and not d.suspended:
                deadline = time.perf_counter_ns() + poll_ns
                while time.perf_counter_ns() < deadline:
                    if u32[sq_flags] & IORING_SQ_TASKRUN or self._cq_head != u32[cq_tail]:
                        break
                else:
                    deadline = 0
                if deadline:
                    continue
            if d.suspended:
                # a suspended handler's task commits and enters the ring itself; wake up now
                # and then so that nothing it reaped waits on a missed wake-up
                with trio.move_on_after(0.001):
                    await trio.lowlevel.wait_readable(efd)
            else:
                await trio.lowlevel.wait_readable(efd)
            try:  # reset before entering: work that arrives after the enter signals again
                os.eventfd_read(efd)
            except BlockingIOError:
                pass

    async def _drain(self) -> bool:
        """Serve every completion in the CQ (called by the polling task).  False if a
        handler suspended: the polling role was handed over, and the handler finished
        and committed here."""
        d = self.dispatcher
        start = d.start
        r = self.ring
        u32 = r.u32
        ringmv = r.ring
        cqes = r.cqes
        cq_mask = r.cq_mask
        cq_tail = r.cq_tail
        cq_head = r.cq_head
        unpack_cqe = _cqe.unpack_from
        hdrs = self.hdr
        reregistering = self._reregistering
        while True:
            head = self._cq_head
            if head == u32[cq_tail]:
                return True
            e, res, _ = unpack_cqe(ringmv, cqes + (head & cq_mask) * CQE_SIZE)
            self._cq_head = head = (head + 1) & 0xFFFFFFFF
            u32[cq_head] = head
            if e >= self.nentries:
                continue
            if res < 0:
                reregistering.discard(e)
                self._entry_ended(e, res)
                continue
            if e in reregistering:  # its REGISTER succeeded: back to COMMIT_AND_FETCH
                reregistering.discard(e)
                struct.pack_into("=I", r.sqes, e * SQE_SIZE + 8, FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
            self.requests += 1
            hb = hdrs[e]
            hdr = _unpack_in(hb, IN_OUT)
            opcode = hdr[1]
            if opcode == READ:
                reply = start(hdr, self._op_read(e, hb))
            elif opcode == WRITE:
                reply = start(hdr, self._op_write(e, hb))
            else:
                reply = self._dispatch_other(e, hdr, hb)
            if reply.__class__ is not Suspended:
                self._commit(e, hdr, reply)
                continue
            # suspended: hand over the polling role, finish the handler here
            self._poller_active = False
            self._start_poller()
            reply = await d.finish(hdr, reply)
            if not self._stopped:
                self._commit(e, hdr, reply)
                self._submit()
            return False

    def _start_poller(self) -> None:
        if self._poller_active or self._stopped or self._nursery is None:
            return
        self._poller_active = True
        self._nursery.start_soon(self._poll_loop)

    def _dispatch_other(self, e: int, hdr: tuple[Any, ...], hb: memoryview) -> Any:
        """Any opcode but READ and WRITE: copied into the classic layout (header, first
        argument, the rest) and dispatched; the reply or a Suspended."""
        in_len = hdr[0]
        psz = _u32.unpack_from(hb, PAYLOAD_SZ)[0]
        in_hdr = wire.in_header.size
        arg0 = in_len - in_hdr - psz
        if not 0 <= arg0 <= OP_IN_SIZE or psz > self.payload_size:
            return self.dispatcher.malformed_request(
                f"{wire.OPCODE_NAMES.get(hdr[1], hdr[1])} on the ring: length {in_len}, payload {psz}")
        buf = bytearray(in_len)
        buf[:in_hdr] = hb[:in_hdr]
        buf[in_hdr: in_hdr + arg0] = hb[OP_IN: OP_IN + arg0]
        buf[in_hdr + arg0:] = self.pay[e][:psz]
        return self.dispatcher.dispatch(hdr, buf, memoryview(buf), in_len)

    async def _op_read(self, e: int, hb: memoryview) -> Any:
        fh, offset, size = _read3.unpack_from(hb, OP_IN)
        data = await self._read_op(fh, offset, size)
        return (data, size)

    async def _op_write(self, e: int, hb: memoryview) -> Any:
        fh, offset, size = _read3.unpack_from(hb, OP_IN)
        psz = _u32.unpack_from(hb, PAYLOAD_SZ)[0]
        if size > psz:
            raise Malformed(f"WRITE payload {size} bytes, request has {psz}")
        written = await self._write_op(fh, offset, self.pay[e][:size])
        return (wire.write_out.pack(written, 0),)

    def _commit(self, e: int, hdr: tuple[Any, ...], reply: Any) -> None:
        """Put the reply in entry ``e`` and queue its COMMIT_AND_FETCH."""
        hb = self.hdr[e]
        unique = hdr[2]
        size = 0
        err = 0
        if type(reply) is int:
            err = self.dispatcher.errno_for(unique, reply)
        elif reply is NO_REPLY:  # FORGET and INTERRUPT arrive on /dev/fuse: answer it anyway
            err = self.dispatcher.errno_for(unique, errno.EIO)
        else:
            try:
                size = self._fill(e, hdr, reply)
            except Exception as exc:
                err = self.dispatcher.bad_reply(unique, exc)
                size = 0
        _pack_out_into(hb, IN_OUT, 16 + size, -err, unique)
        _u32.pack_into(hb, PAYLOAD_SZ, size)
        _u64.pack_into(self.ring.sqes, e * SQE_SIZE + 56, unique)  # commit_id
        self._queue(e)

    def _fill(self, e: int, hdr: tuple[Any, ...], reply: tuple[Any, ...]) -> int:
        """Copy a reply's payload into entry ``e``'s payload buffer; its size."""
        pay = self.pay[e]
        if hdr[1] == wire.READ:  # (data, size asked): at most what was asked
            data, limit = reply
            t = type(data)
            mv = memoryview(data) if t is bytes or t is bytearray else memoryview(data).cast("B")
            k: int = min(len(mv), limit)
            pay[:k] = mv[:k]
            return k
        n = 0
        for part in reply:
            mv = memoryview(part).cast("B")
            k = len(mv)
            if n + k > len(pay):
                raise ValueError(f"reply of more than {len(pay)} bytes")
            pay[n: n + k] = mv
            n += k
        return n

    def close(self) -> None:
        """Close the ring (parked entries are cancelled by the kernel) and free the buffers."""
        exported = False
        for v in [*getattr(self, "hdr", ()), *getattr(self, "pay", ())]:
            try:
                v.release()
            except BufferError:  # a handler kept a slice: keep the memory mapped
                exported = True
        self.hdr = []
        self.pay = []
        if self.ring.fd >= 0:
            self.ring.close()
        if not exported:
            libc = get_libc()
            for addr, size in self._buf_maps:
                libc.munmap(addr, size)
        self._buf_maps = []

