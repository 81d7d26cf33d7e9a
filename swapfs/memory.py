"""Where the store's state lives: the one allocator of its tables' memory.

Every table that is the truth of what the store holds (the slot tables'
columns, the pool's objects and the layout of its spans) is allocated here
and nowhere else (see the state layer, swapfs/state.py, for which state is
the truth and which is derived).

:class:`StateMemory` hands the store its memory in named *regions*, one
mapping each:

* ``StateMemory()`` -- private anonymous mappings: the memory dies with the
  process (tests and benchmarks that need no failover);
* ``StateMemory(shared=True)`` -- each region is a memory file
  (``memfd_create``) sized sparse with ``ftruncate`` and mapped
  ``MAP_SHARED``; ``fds()`` gives every region's fd (and any other fd the
  state needs, e.g. a file tier's backing file) to deposit with the keeper;
* ``StateMemory.adopt(fds)`` -- a successor's memory: ``reserve(name, n)``
  maps the existing region instead of creating one (``StoreError`` naming
  it if it is missing or of another size).

Either way a region is reserved, not populated: the kernel backs a page of
it only when it is first written, and the daemon's
``mlockall(MCL_ONFAULT)`` locks only pages so backed.  Memory is given back
with :meth:`StateMemory.release`: ``MADV_DONTNEED_LOCKED`` on a private
mapping, a hole punched in the memory file on a shared one (dropping the
mapping's pages alone would free nothing: the file holds them).

The ``"header"`` region (one page) starts with a magic and the layout
version (``STATE_VERSION``), then the scalar truth that must survive the
process: the store's clocks and its cumulative recovery counters
(:class:`StateHeader`).  A successor that finds another magic or version
refuses the state.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Mapping

from .errors import Misuse, StoreError
from .kernel import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate, release_memory

# The layout of the shared state; a successor refuses any other.
STATE_VERSION = 1
STATE_MAGIC = 0x31_45_54_41_54_53_50_53  # b"SPSTATE1", little-endian

_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
_PROT = mmap.PROT_READ | mmap.PROT_WRITE
# Region names the keeper stores under are prefixed; other fds (tier files) are not regions.
_FD_PREFIX = "mem."


def reserve(nbytes: int) -> mmap.mmap:
    """A private zero-filled mapping of at least ``nbytes`` (one page at
    least), backed page by page as it is written: memory of derived state,
    which a successor rebuilds.  OSError if the address space cannot be
    reserved."""
    return mmap.mmap(-1, max(nbytes, mmap.PAGESIZE), flags=_PRIVATE, prot=_PROT)


def _round(nbytes: int) -> int:
    return max(-(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.PAGESIZE)


class StateMemory:
    """The store's memory, in named regions (see the module docstring)."""

    def __init__(self, *, shared: bool = False) -> None:
        self.shared = shared
        self.adopted = False
        self._maps: dict[str, mmap.mmap] = {}
        self._fds: dict[str, int] = {}  # region name -> memfd (shared only)
        self._extra: dict[str, int] = {}  # other fds the state needs (tier files)
        self._given: dict[str, int] = {}  # adopted fds not claimed yet
        self._by_map: dict[int, int] = {}  # id(mapping) -> its memfd
        self.header = StateHeader(self.reserve("header", mmap.PAGESIZE))

    @classmethod
    def adopt(cls, fds: Mapping[str, int]) -> StateMemory:
        """The memory a predecessor deposited as ``fds`` (names as
        :meth:`fds` gave them).  The fds become this memory's (closed by
        :meth:`close`).  StoreError if the header is missing, of another
        layout version, or not a store's."""
        self = cls.__new__(cls)
        self.shared = True
        self.adopted = True
        self._maps = {}
        self._fds = {}
        self._extra = {}
        self._by_map = {}
        self._given = {}
        for name, fd in fds.items():
            if name.startswith(_FD_PREFIX):
                self._given[name[len(_FD_PREFIX):]] = fd
            else:
                self._extra[name] = fd
        self.header = StateHeader(self.reserve("header", mmap.PAGESIZE))
        self.header.check()
        return self

    def reserve(self, name: str, nbytes: int) -> mmap.mmap:
        """The region ``name`` of ``nbytes`` (rounded up to pages), zero
        when new.  Misuse if the name is taken; StoreError if an adopted
        memory has no such region or one of another size; OSError if the
        kernel refuses the memory."""
        if name in self._maps:
            raise Misuse(f"state memory: region {name!r} reserved twice")
        size = _round(nbytes)
        if not self.shared:
            m = reserve(size)
            self._maps[name] = m
            return m
        if self.adopted:
            fd = self._given.pop(name, -1)
            if fd < 0:
                raise StoreError(f"state memory: no region {name!r} to adopt")
            have = os.fstat(fd).st_size
            if have != size:
                os.close(fd)
                raise StoreError(f"state memory: region {name!r} holds {have} bytes, "
                                 f"this layout needs {size}")
        else:
            fd = os.memfd_create(f"swapfs.{name}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
        try:
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=_PROT)
        except OSError:
            os.close(fd)
            raise
        self._maps[name] = m
        self._fds[name] = fd
        self._by_map[id(m)] = fd
        return m

    def release(self, mapping: mmap.mmap, offset: int, length: int) -> None:
        """Give ``mapping[offset:offset + length]`` (page-aligned, a region
        of this memory) back: it reads as zeros afterwards and holds no
        memory until written.  OSError if the kernel refuses (the memory
        stays held)."""
        fd = self._by_map.get(id(mapping), -1)
        if fd < 0:
            release_memory(mapping, offset, length)
        else:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def data_ranges(self, mapping: mmap.mmap) -> list[tuple[int, int]]:
        """``(start, end)`` byte ranges of ``mapping`` (a region of this
        memory) that may hold data: the memory file's data extents when
        shared, the whole mapping otherwise."""
        fd = self._by_map.get(id(mapping), -1)
        if fd < 0:
            return [(0, len(mapping))]
        out = []
        pos, size = 0, len(mapping)
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
        return out

    def add_fd(self, name: str, fd: int) -> None:
        """Another fd the state needs (a file tier's backing file), kept
        under ``name`` among :meth:`fds`."""
        self._extra[name] = fd

    def adopted_fd(self, name: str) -> int:
        """The fd a predecessor deposited under ``name`` (not a region), or -1."""
        return self._extra.get(name, -1) if self.adopted else -1

    def fds(self) -> dict[str, int]:
        """Every fd of the state, by the name to deposit it under."""
        out = {_FD_PREFIX + name: fd for name, fd in self._fds.items()}
        out.update(self._extra)
        return out

    def regions(self) -> dict[str, int]:
        """Every region's size in bytes, by name."""
        return {name: len(m) for name, m in self._maps.items()}

    def unclaimed(self) -> list[str]:
        """Regions adopted but never reserved (the layout lost them)."""
        return sorted(self._given)

    def close(self) -> None:
        """Unmap every region and close every memfd (the keeper's copies
        keep the memory).  A region whose memory is still viewed (a store
        alive) stays mapped until the views go, and so does the fd the
        mapping holds."""
        self.header.close()
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still exported; the mapping dies with it
                pass
        for fd in list(self._fds.values()) + list(self._given.values()):
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
        self._maps.clear()
        self._fds.clear()
        self._given.clear()
        self._by_map.clear()


# The header's words, in order after the magic and the version.
HEADER_FIELDS = ("epoch", "demotions", "recoveries", "recovered_leaks", "recovery_micros")


class StateHeader:
    """The ``"header"`` region: magic, layout version, then one 64-bit word
    per name of HEADER_FIELDS."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map = mapping
        self.words = memoryview(mapping).cast("Q")
        if not self.words[0] and not self.words[1]:
            self.words[1] = STATE_VERSION
            self.words[0] = STATE_MAGIC
        self._index = {name: 2 + i for i, name in enumerate(HEADER_FIELDS)}

    def check(self) -> None:
        if self.words[0] != STATE_MAGIC:
            raise StoreError(f"state memory: header magic {self.words[0]:#x} is not a store's")
        if self.words[1] != STATE_VERSION:
            raise StoreError(f"state memory: layout version {self.words[1]}, this swapfs reads "
                             f"version {STATE_VERSION}")

    def get(self, name: str) -> int:
        return int(self.words[self._index[name]])

    def set(self, name: str, value: int) -> None:
        self.words[self._index[name]] = value & 0xFFFFFFFFFFFFFFFF

    def close(self) -> None:
        self.words.release()
