"""One io_uring instance, set up with raw system calls and its rings mapped.

No binding can fill the command area of a 128-byte SQE, so the ring is made
with ``io_uring_setup``/``io_uring_enter`` through ctypes; the SQ and CQ rings
and the SQE array are mapped and read through memoryview casts (``u32`` for
the ring indexes, ``ring`` for CQEs, ``sqes``).  The eventfd registered with
the ring is what the transport sleeps on: with DEFER_TASKRUN, new work does
not make the ring fd readable.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .abi import (
    CQE_SIZE,
    IORING_ENTER_GETEVENTS,
    IORING_FEAT_SINGLE_MMAP,
    IORING_OFF_SQ_RING,
    IORING_OFF_SQES,
    IORING_REGISTER_EVENTFD,
    RING_FLAGS,
    SQE_SIZE,
    SYS_IO_URING_ENTER,
    SYS_IO_URING_REGISTER,
    SYS_IO_URING_SETUP,
    Params,
    get_libc,
    map_memory,
    view,
)


class Ring:
    """An io_uring instance with its rings mapped: SQE128, one SQE per ring entry."""

    def __init__(self, entries: int, flags: int = RING_FLAGS) -> None:
        libc = get_libc()
        p = Params()
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
            ring_addr = map_memory(ring_size, self.fd, IORING_OFF_SQ_RING)
            self._maps.append((ring_addr, ring_size))
            sqes_size = p.sq_entries * SQE_SIZE
            sqes_addr = map_memory(sqes_size, self.fd, IORING_OFF_SQES)
            self._maps.append((sqes_addr, sqes_size))
            self.ring = view(ring_addr, ring_size)
            self.u32 = self.ring.cast("I")
            self.sqes = view(sqes_addr, sqes_size)
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
        libc = get_libc()
        for addr, size in self._maps:
            libc.munmap(addr, size)
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if getattr(self, "eventfd", -1) >= 0:
            os.close(self.eventfd)
            self.eventfd = -1
