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

# madvise(2): drop pages, locked ones too (Linux 5.18+)
MADV_DONTNEED_LOCKED = 24
_advice = [MADV_DONTNEED_LOCKED]

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


def release_memory(mapping: mmap.mmap, offset: int, length: int) -> None:
    """Give the pages of ``mapping[offset:offset + length]`` (page-aligned,
    anonymous, private) back to the kernel: they read as zeros afterwards and
    hold no memory until written.  MADV_DONTNEED_LOCKED (Linux 5.18) also
    drops pages that the daemon's ``mlockall`` locked, which MADV_DONTNEED
    refuses; a kernel without it falls back to MADV_DONTNEED.  Raises
    OSError (an older kernel and a locked process: the memory stays held)."""
    advice = _advice[0]
    try:
        mapping.madvise(advice, offset, length)
    except OSError as e:
        if advice != MADV_DONTNEED_LOCKED or e.errno != errno.EINVAL:
            raise
        _advice[0] = mmap.MADV_DONTNEED  # a kernel before 5.18
        mapping.madvise(mmap.MADV_DONTNEED, offset, length)
