"""The io_uring and FUSE-over-io_uring ABI: constants, structures and system calls.

From include/uapi/linux/io_uring.h and include/uapi/linux/fuse.h, x86_64 only
(the system call numbers; the probe refuses other machines).  The rings and
buffers are raw mappings read and written through memoryview casts.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

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


class SQOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("dropped", ctypes.c_uint32), ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class CQOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("overflow", ctypes.c_uint32),
                ("cqes", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", SQOffsets), ("cq_off", CQOffsets)]


assert ctypes.sizeof(Params) == 120

_libc: ctypes.CDLL | None = None


def get_libc() -> ctypes.CDLL:
    """libc through ctypes, with the signatures of syscall, mmap and munmap set."""
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


def map_memory(size: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2): anonymous private memory (``fd`` < 0) or a shared, populated mapping of
    ``fd``; its address."""
    libc = get_libc()
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


def view(addr: int, size: int) -> memoryview:
    """A byte memoryview of ``size`` bytes of mapped memory at ``addr``."""
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


# Packed fields read and written in the rings and entry headers.
u32 = struct.Struct("=I")
u64 = struct.Struct("=Q")
cqe = struct.Struct("=QiI")  # user_data, res, flags
read3 = struct.Struct("=QQI")  # fh, offset, size: the start of fuse_read_in and fuse_write_in
