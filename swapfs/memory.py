"""Where the store's state lives: the one allocator of its tables' memory.

Every table that is the truth of what the store holds (the slot tables'
columns, the pool's objects) is allocated here and nowhere else, so that
the place the memory comes from can change in one function: today an
anonymous private mapping; for a daemon that survives its own restart, a
shared mapping of a memory file its successor maps again (see the state
layer, swapfs/state.py, for which state is the truth and which is derived).

The mapping is reserved, not populated (``MAP_NORESERVE``): the kernel
backs a page of it only when it is first written, and the daemon's
``mlockall(MCL_ONFAULT)`` locks only pages so backed.
"""

from __future__ import annotations

import mmap

_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)


def reserve(nbytes: int) -> mmap.mmap:
    """A zero-filled mapping of at least ``nbytes`` (one page at least),
    readable and writable, backed page by page as it is written.  OSError
    if the address space cannot be reserved."""
    return mmap.mmap(-1, max(nbytes, mmap.PAGESIZE), flags=_FLAGS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
