"""FUSE over io_uring: the kernel hands requests to ring entries instead of /dev/fuse reads.

What this module owns
---------------------
* The raw ring: ``io_uring_setup``/``io_uring_enter`` through ctypes, the SQ
  and CQ rings and the SQE array mapped into memory and read and written
  through memoryview casts (no Python object per request in any table).
* The checks that decide whether the transport may be declared at INIT
  (:func:`unavailable_reason` before mounting, :meth:`UringTransport.create`
  at INIT) and the registration of every queue after the INIT reply.
* The serving loop: completions are reaped in user space, each request's
  handler is started inline, and the replies are committed in batches of
  COMMIT_AND_FETCH commands, many per ``io_uring_enter``.

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

Dispatch: as in the classic session (inline first).  Completions are taken
one at a time from the CQ; READ and WRITE are served from the entry's
buffers (a WRITE's data is a memoryview of the payload buffer, a READ's
reply is copied into it); the other opcodes are copied into a classic-layout
buffer and given to the session's handlers.  A handler that suspends keeps
its task: the polling role passes to a new task, the handler is driven to
completion, its entry is committed, and the task polls again only if nobody
else does.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
import time
from typing import TYPE_CHECKING, Any

import trio

from . import wire
from .mount import MountError, _unescape_mountinfo

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("swapfs.fuse")

# -- io_uring ABI (include/uapi/linux/io_uring.h), x86_64 -----------------------
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427
IORING_REGISTER_EVENTFD = 4

IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_TASKRUN_FLAG = 1 << 9
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13
RING_FLAGS = (IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
              | IORING_SETUP_TASKRUN_FLAG)

IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_SQ_TASKRUN = 1 << 2
IORING_OFF_SQ_RING = 0
IORING_OFF_SQES = 0x10000000
IORING_OP_URING_CMD = 46
SQE_SIZE = 128  # with SQE128
CQE_SIZE = 16

# -- FUSE over io_uring (include/uapi/linux/fuse.h) -------------------------------
FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2
HEADER_SIZE = 288  # struct fuse_uring_req_header
HEADER_STRIDE = 512
IN_OUT = 0  # fuse_in_header / fuse_out_header
OP_IN = 128  # the opcode's first argument
ENT_IN_OUT = 256  # struct fuse_uring_ent_in_out: flags, commit_id, payload_sz
PAYLOAD_SZ = ENT_IN_OUT + 16
OP_IN_SIZE = 128
ERESTARTSYS = 512  # the kernel refuses a ring reply whose error is <= -ERESTARTSYS

ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"
IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"
POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"
FUSECTL = "/sys/fs/fuse/connections"

# Entries that end with one of these errnos end for good: the connection is going away.
_ENTRY_GONE = frozenset({errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV})
# After this many entries failed for another reason, the ring is not trusted: abort.
ENTRY_FAILURE_LIMIT = 64
PROBE_TIMEOUT = 1.0

_u32 = struct.Struct("=I")
_u64 = struct.Struct("=Q")
_cqe = struct.Struct("=QiI")
_read3 = struct.Struct("=QQI")  # fh, offset, size: the start of fuse_read_in and fuse_write_in
_write_in = wire.write_in
_read_in = wire.read_in
_unpack_in = wire.in_header.unpack_from
_pack_out_into = wire.out_header.pack_into


class TransportUnavailable(MountError):
    """The io_uring transport cannot be used (the reason is the message)."""


class RegistrationFailed(MountError):
    """Registering the ring entries failed after INIT; the connection was aborted."""


# -- what the machine says ----------------------------------------------------------

def enable_uring() -> str | None:
    """The fuse module's ``enable_uring`` parameter ("Y"/"N"), None if the kernel has none."""
    try:
        with open(ENABLE_URING) as f:
            return f.read().strip()
    except OSError:
        return None


def set_enable_uring(value: str) -> None:
    with open(ENABLE_URING, "w") as f:
        f.write(value)


def possible_cpus() -> int | None:
    """The number of possible CPUs (the kernel's queue count), None unless they are 0..n-1."""
    try:
        with open(POSSIBLE_CPUS) as f:
            text = f.read().strip()
    except OSError:
        return None
    expect = 0
    for part in text.split(","):
        lo_s, _, hi_s = part.partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s or lo_s)
        except ValueError:
            return None
        if lo != expect or hi < lo:
            return None
        expect = hi + 1
    return expect or None


def unavailable_reason() -> str | None:
    """Why the io_uring transport cannot be used on this machine, or None.

    Only what can be known before mounting; INIT checks what the kernel offers."""
    if platform.machine() != "x86_64":
        return f"the io_uring transport is implemented for x86_64 only, not {platform.machine()}"
    state = enable_uring()
    if state is None:
        return f"{ENABLE_URING} does not exist (kernel without FUSE over io_uring)"
    if state != "Y":
        return f"{ENABLE_URING} is {state}"
    try:
        with open(IO_URING_DISABLED) as f:
            disabled = f.read().strip()
    except OSError:
        disabled = "0"
    if disabled == "2" or (disabled == "1" and os.geteuid() != 0):
        return f"io_uring is disabled ({IO_URING_DISABLED} is {disabled})"
    if possible_cpus() is None:
        return f"cannot count the possible CPUs from {POSSIBLE_CPUS}"
    if not os.path.ismount(FUSECTL):
        return (f"fusectl is not mounted at {FUSECTL} (mount -t fusectl fusectl {FUSECTL}): "
                "the transport needs it to abort a connection")
    return None


def resolve(mountpoint: str | os.PathLike[str]) -> str:
    return os.path.realpath(mountpoint)


def connection_id(path: str) -> int | None:
    """The FUSE connection number (fusectl) of the mount at ``path`` (already resolved: a
    stat, even realpath's, of a mount that has not answered INIT waits for it): the minor
    of its st_dev, read from /proc/self/mountinfo."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split(" ")
                if len(parts) > 4 and _unescape_mountinfo(parts[4]) == path:
                    found = int(parts[2].split(":")[1])  # the last mount on top wins
    except (OSError, ValueError, IndexError):
        return None
    return found


def abort_connection(conn_id: int | None, *, quiet: bool = False) -> bool:
    """Abort FUSE connection ``conn_id`` through fusectl; True if it was written
    (``quiet``: a connection already gone is not an error)."""
    if conn_id is None:
        return False
    try:
        with open(f"{FUSECTL}/{conn_id}/abort", "w") as f:
            f.write("1")
        return True
    except FileNotFoundError:
        if not quiet:
            log.error("cannot abort FUSE connection %d: %s/%d does not exist", conn_id, FUSECTL, conn_id)
        return False
    except OSError as exc:
        log.error("cannot abort FUSE connection %d: %s", conn_id, exc)
        return False


# -- the raw ring -----------------------------------------------------------------

class _SQOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("dropped", ctypes.c_uint32), ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class _CQOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("overflow", ctypes.c_uint32),
                ("cqes", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", _SQOffsets), ("cq_off", _CQOffsets)]


assert ctypes.sizeof(_Params) == 120

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.munmap.restype = ctypes.c_int
        _libc = lib
    return _libc


_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(size: int, fd: int = -1, offset: int = 0) -> int:
    libc = _get_libc()
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if fd < 0:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    else:
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
    addr = libc.mmap(None, size, prot, flags, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap of {size} bytes failed: {os.strerror(e)}")
    return int(addr)


def _view(addr: int, size: int) -> memoryview:
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


class Ring:
    """An io_uring instance with its rings mapped: SQE128, one SQE per ring entry."""

    def __init__(self, entries: int, flags: int = RING_FLAGS) -> None:
        libc = _get_libc()
        p = _Params()
        p.flags = flags
        fd = libc.syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_uint(entries), ctypes.byref(p))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup(flags {flags:#x}) failed: {os.strerror(e)}")
        self.fd = int(fd)
        self._maps: list[tuple[int, int]] = []
        self.views: list[memoryview] = []
        try:
            if p.flags & flags != flags:
                raise OSError(errno.EINVAL, f"io_uring_setup kept flags {p.flags:#x} of {flags:#x}")
            if not p.features & IORING_FEAT_SINGLE_MMAP:
                raise OSError(errno.EINVAL, "io_uring without IORING_FEAT_SINGLE_MMAP")
            if p.sq_entries < entries or p.cq_entries < entries:
                raise OSError(errno.EINVAL, f"ring of {p.sq_entries}/{p.cq_entries} entries, need {entries}")
            sq, cq = p.sq_off, p.cq_off
            ring_size = max(sq.array + p.sq_entries * 4, cq.cqes + p.cq_entries * CQE_SIZE)
            ring_addr = _mmap(ring_size, self.fd, IORING_OFF_SQ_RING)
            self._maps.append((ring_addr, ring_size))
            sqes_size = p.sq_entries * SQE_SIZE
            sqes_addr = _mmap(sqes_size, self.fd, IORING_OFF_SQES)
            self._maps.append((sqes_addr, sqes_size))
            self.ring = _view(ring_addr, ring_size)
            self.u32 = self.ring.cast("I")
            self.sqes = _view(sqes_addr, sqes_size)
            self.views += [self.u32, self.ring, self.sqes]
        except BaseException:
            self.close()
            raise
        self.sq_entries = p.sq_entries
        self.cq_entries = p.cq_entries
        self.sq_head = sq.head // 4
        self.sq_tail = sq.tail // 4
        self.sq_mask = self.u32[sq.ring_mask // 4]
        self.sq_flags = sq.flags // 4
        self.sq_array = sq.array // 4
        self.cq_head = cq.head // 4
        self.cq_tail = cq.tail // 4
        self.cq_mask = self.u32[cq.ring_mask // 4]
        self.cqes = cq.cqes
        self._enter = libc.syscall
        # With DEFER_TASKRUN a new request is task work for this thread, which does not make
        # the ring fd readable; the kernel signals a registered eventfd when such work arrives
        # (and when completions are posted).
        self.eventfd = -1
        try:
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int(self.eventfd)
            if libc.syscall(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_EVENTFD,
                            ctypes.byref(efd), 1) < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"IORING_REGISTER_EVENTFD failed: {os.strerror(e)}")
        except BaseException:
            self.close()
            raise

    def enter(self, to_submit: int, min_complete: int = 0, flags: int = IORING_ENTER_GETEVENTS) -> int:
        """io_uring_enter; returns the number of SQEs consumed, raises OSError."""
        while True:
            r = self._enter(SYS_IO_URING_ENTER, self.fd, to_submit, min_complete, flags, None, 0)
            if r >= 0:
                return int(r)
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")

    def close(self) -> None:
        for v in reversed(self.views):
            v.release()
        self.views.clear()
        libc = _get_libc()
        for addr, size in self._maps:
            libc.munmap(addr, size)
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if getattr(self, "eventfd", -1) >= 0:
            os.close(self.eventfd)
            self.eventfd = -1


# -- the transport ----------------------------------------------------------------

class UringTransport:
    """The ring entries of one FUSE connection and the loop serving them."""

    inject_register_failure = False  # tests: the last REGISTER names a queue that does not exist

    def __init__(self, session: Session, fuse_fd: int, nr_queues: int, depth: int,
                 payload_size: int) -> None:
        from . import session as classic  # (circular at import time)

        self._drive = classic._drive
        self._Malformed = classic._Malformed
        self._namespace_opcodes = classic.NAMESPACE_OPCODES
        self.session = session
        self.fuse_fd = fuse_fd
        self.nr_queues = nr_queues
        self.depth = depth
        self.nentries = n = nr_queues * depth
        self.payload_size = payload_size = (payload_size + 4095) & ~4095
        self.ring = Ring(n + 1)  # one more SQE for the probe
        self._buf_maps: list[tuple[int, int]] = []
        try:
            hdr_addr = _mmap(n * HEADER_STRIDE)
            self._buf_maps.append((hdr_addr, n * HEADER_STRIDE))
            pay_addr = _mmap(n * payload_size)
            self._buf_maps.append((pay_addr, n * payload_size))
        except BaseException:
            self.close()
            raise
        self.hdr = [_view(hdr_addr + e * HEADER_STRIDE, HEADER_SIZE) for e in range(n)]
        self.pay = [_view(pay_addr + e * payload_size, payload_size) for e in range(n)]
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
    def create(cls, session: Session, fuse_fd: int, kernel_flags: int, max_payload: int,
               depth: int, conn_id: int | None) -> UringTransport:
        """Everything checked before INIT may declare FUSE_OVER_IO_URING; raises
        TransportUnavailable with the reason."""
        reason = unavailable_reason()
        if reason:
            raise TransportUnavailable(reason)
        # The way out of every failure: a request handed to the ring waits for this thread,
        # and only an abort through fusectl ends it while the ring lives.
        if conn_id is None:
            raise TransportUnavailable("the FUSE connection number of the mount is not known")
        if not os.path.exists(f"{FUSECTL}/{conn_id}/abort"):
            raise TransportUnavailable(
                f"{FUSECTL}/{conn_id}/abort does not exist (fusectl not mounted? "
                f"mount -t fusectl fusectl {FUSECTL}): the connection could not be aborted")
        if not kernel_flags & wire.FUSE_OVER_IO_URING:
            raise TransportUnavailable("the kernel did not offer FUSE_OVER_IO_URING at INIT")
        nr_queues = possible_cpus()
        assert nr_queues is not None
        try:
            t = cls(session, fuse_fd, nr_queues, depth, max(max_payload, wire.MIN_READ_BUFFER))
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
        session ended."""
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
        """Once the session has ended, give the entries a moment to end, then stop."""
        s = self.session
        while not s._ended and self.live > 0:  # noqa: ASYNC110 (a flag set in many places)
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
        s = self.session
        r = self.ring
        u32 = r.u32
        efd = r.eventfd
        cq_tail = r.cq_tail
        sq_flags = r.sq_flags
        poll_ns = s.poll_ns
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
            if poll_ns and not s._suspended:
                deadline = time.perf_counter_ns() + poll_ns
                while time.perf_counter_ns() < deadline:
                    if u32[sq_flags] & IORING_SQ_TASKRUN or self._cq_head != u32[cq_tail]:
                        break
                else:
                    deadline = 0
                if deadline:
                    continue
            if s._suspended:
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
        s = self.session
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
            s._requests += 1
            self.requests += 1
            hb = hdrs[e]
            hdr = _unpack_in(hb, IN_OUT)
            coro = self._start(e, hdr, hb)
            if coro is None:
                continue
            try:
                trap = coro.send(None)
            except StopIteration as stop:
                s._inline += 1
                self._commit(e, hdr, stop.value)
                continue
            except Exception as exc:
                s._inline += 1
                self._commit(e, hdr, s._failed(hdr, exc))
                continue
            # suspended: hand over the polling role, finish the handler here
            s._note_suspended()
            self._poller_active = False
            self._start_poller()
            try:
                reply = await self._drive(coro, trap)
            except Exception as exc:
                reply = s._failed(hdr, exc)
            finally:
                s._suspended -= 1
            if not self._stopped:
                self._commit(e, hdr, reply)
                self._submit()
            return False

    def _start_poller(self) -> None:
        if self._poller_active or self._stopped or self._nursery is None:
            return
        self._poller_active = True
        self._nursery.start_soon(self._poll_loop)

    def _start(self, e: int, hdr: tuple[Any, ...], hb: memoryview) -> Any:
        """The handler coroutine for the request in entry ``e``; None if already answered."""
        s = self.session
        opcode = hdr[1]
        if opcode == wire.READ:
            return self._op_read(e, hb)
        if opcode == wire.WRITE:
            return self._op_write(e, hb)
        handler = s._handlers.get(opcode)
        if handler is None:
            self._commit(e, hdr, errno.EPERM if opcode in self._namespace_opcodes else errno.ENOSYS)
            return None
        # Rare opcodes: rebuild the classic layout (header, first argument, the rest).
        in_len = hdr[0]
        psz = _u32.unpack_from(hb, PAYLOAD_SZ)[0]
        in_hdr = wire.in_header.size
        arg0 = in_len - in_hdr - psz
        if not 0 <= arg0 <= OP_IN_SIZE or psz > self.payload_size:
            s._malformed += 1
            log.error("malformed %s request on the ring: length %d, payload %d",
                      wire.OPCODE_NAMES.get(opcode, opcode), in_len, psz)
            self._commit(e, hdr, errno.EIO)
            return None
        buf = bytearray(in_len)
        buf[:in_hdr] = hb[:in_hdr]
        buf[in_hdr: in_hdr + arg0] = hb[OP_IN: OP_IN + arg0]
        buf[in_hdr + arg0:] = self.pay[e][:psz]
        return handler(hdr, buf, memoryview(buf), in_len)

    async def _op_read(self, e: int, hb: memoryview) -> Any:
        fh, offset, size = _read3.unpack_from(hb, OP_IN)
        data = await self.session._read_op(fh, offset, size)
        return (data, size)

    async def _op_write(self, e: int, hb: memoryview) -> Any:
        fh, offset, size = _read3.unpack_from(hb, OP_IN)
        psz = _u32.unpack_from(hb, PAYLOAD_SZ)[0]
        if size > psz:
            raise self._Malformed(f"WRITE payload {size} bytes, request has {psz}")
        written = await self.session._write_op(fh, offset, self.pay[e][:size])
        return (wire.write_out.pack(written, 0),)

    def _commit(self, e: int, hdr: tuple[Any, ...], reply: Any) -> None:
        """Put the reply in entry ``e`` and queue its COMMIT_AND_FETCH."""
        s = self.session
        hb = self.hdr[e]
        unique = hdr[2]
        size = 0
        err = 0
        if type(reply) is int:
            err = reply
        elif type(reply) is tuple:
            try:
                size = self._fill(e, hdr, reply)
            except Exception as exc:
                s._bad_replies += 1
                log.error("request %d: the handler's result cannot be sent (%r); answered EIO",
                          unique, exc)
                err = errno.EIO
        else:  # no reply (FORGET arrives on /dev/fuse, not here) or nonsense: answer it anyway
            err = errno.EIO
        if err:
            if type(err) is not int or not 0 < err < ERESTARTSYS:
                log.error("request %d: %r is not an errno; answered EIO", unique, err)
                s._bad_replies += 1
                err = errno.EIO
            name = errno.errorcode.get(err, str(err))
            s._errors[name] = s._errors.get(name, 0) + 1
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
            libc = _get_libc()
            for addr, size in self._buf_maps:
                libc.munmap(addr, size)
        self._buf_maps = []


TRANSPORTS = ("classic", "uring", "auto")
