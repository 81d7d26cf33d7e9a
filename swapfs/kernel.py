"""The Linux interface swapfs relies on, in one place: the page size, the
fallocate(2) modes, and libc for the calls Python's os module lacks.

(swapfs/fuse/ loads libc for mount(2) on its own: the protocol layer depends
on nothing else of swapfs.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
from collections.abc import Callable

# The unit of every tier, and of the kernel's swap I/O.
PAGE_SIZE = 4096
PAGE_SHIFT = 12
PAGE_MASK = PAGE_SIZE - 1
assert PAGE_SIZE == 1 << PAGE_SHIFT

MADV_DONTNEED = 4
MLOCK_ONFAULT = 1

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, with errno kept for ctypes.get_errno()."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int]:
    lib = libc()
    fn = getattr(lib, "fallocate64", None) or lib.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError.  Releases the GIL (ctypes)."""
    if _fallocate()(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def buffer_address(buf: mmap.mmap) -> int:
    """The address of a writable mapping (keeps an export of it: the mapping
    can no longer be closed or resized)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def release_memory(address: int, length: int) -> None:
    """Give the pages of ``address .. + length`` (page-aligned, anonymous,
    private) back to the kernel: they read as zeros afterwards and hold no
    memory until written.  In a process that locked its memory
    (``mlockall``) the range is unlocked, dropped and locked again on fault,
    since MADV_DONTNEED refuses locked pages.  Raises OSError."""
    lib = libc()
    if lib.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_DONTNEED) == 0:
        return
    e = ctypes.get_errno()
    if e != errno.EINVAL:
        raise OSError(e, f"madvise(MADV_DONTNEED): {os.strerror(e)}")
    for call, args in (("munlock", ()), ("madvise", (MADV_DONTNEED,)), ("mlock2", (MLOCK_ONFAULT,))):
        fn = getattr(lib, call)
        if fn(ctypes.c_void_p(address), ctypes.c_size_t(length), *args) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{call}: {os.strerror(e)}")
