"""Request traces: the format, the daemon's recorder, the reader.

A trace is what the kernel asked of a mount's devices, one record per
request, for ``swapfs trace replay`` (swapfs/replay.py) to drive a store
through again under another policy or configuration.  The format
(docs/policy.md), little-endian throughout:

* a header, ``HEADER`` (24 bytes): the magic ``SWAPFSTR``, the format
  version (``VERSION``), the size of a record (``RECORD.size``, so a reader
  can refuse what it cannot read), the number of devices, and the wall
  clock at the start (ns since the Unix epoch);
* per device, ``DEVICE`` (72 bytes): its name (UTF-8, NUL-padded to 64
  bytes) and size in bytes; a record names a device by its index here;
* the records, ``RECORD`` (20 bytes each): the time since the start (ns),
  the first page and the number of pages the request covers, the
  operation (READ, WRITE, DISCARD), the device index, the level that held
  the first page when a read began (0: memory, that is the pool, a fill
  word or nothing; 1 + i: file tier i; NO_TIER for writes and discards)
  and flags (PARTIAL: the request does not cover whole pages).

The recorder (:class:`Tracer`) appends records to one of two buffers of
``buffer_records`` records (1.2 MiB by default) with no await and no system
call; a full buffer goes to a flusher task that writes it from a worker
thread while the other fills.  If both are full the record is dropped and
counted (``dropped``): memory stays bounded, and the trace says how much it
misses.  Off, nothing of this runs (swapfs/fs.py swaps the store it calls
for a recording wrapper only while a trace is on).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import trio
import trio.lowlevel

MAGIC = b"SWAPFSTR"
VERSION = 1
HEADER = struct.Struct("<8sHHIQ")  # magic, version, record size, devices, start (ns)
DEVICE = struct.Struct("<64sQ")  # name, size in bytes
RECORD = struct.Struct("<QIIBBBB")  # t (ns), first page, pages, op, device, tier, flags
assert HEADER.size == 24 and DEVICE.size == 72 and RECORD.size == 20

READ, WRITE, DISCARD = 1, 2, 3
OP_NAMES = {READ: "read", WRITE: "write", DISCARD: "discard"}
NO_TIER = 255
PARTIAL = 1  # flags: the request's range is not whole pages
MAX_DEVICES = 255
BUFFER_RECORDS = 65536


class TraceError(ValueError):
    """A file that is not a trace this code can read; the message says why."""


@dataclass(frozen=True)
class TraceHeader:
    version: int
    start_ns: int
    devices: tuple[tuple[str, int], ...]  # (name, size in bytes), by index


def encode_header(devices: list[tuple[str, int]], start_ns: int) -> bytes:
    if len(devices) > MAX_DEVICES:
        raise TraceError(f"{len(devices)} devices, a trace holds at most {MAX_DEVICES}")
    out = [HEADER.pack(MAGIC, VERSION, RECORD.size, len(devices), start_ns)]
    for name, size in devices:
        raw = name.encode()
        if len(raw) > 64:
            raise TraceError(f"device name {name!r} is longer than 64 bytes")
        out.append(DEVICE.pack(raw, size))
    return b"".join(out)


def decode_header(data: bytes | memoryview) -> tuple[TraceHeader, int]:
    """The header of a trace and the offset of its first record."""
    if len(data) < HEADER.size:
        raise TraceError(f"{len(data)} bytes: too short for a trace header")
    magic, version, rsize, ndev, start = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise TraceError(f"not a swapfs trace (magic {bytes(magic)!r})")
    if version != VERSION or rsize != RECORD.size:
        raise TraceError(f"trace format version {version} with {rsize}-byte records; this "
                         f"swapfs reads version {VERSION} ({RECORD.size}-byte records)")
    off = HEADER.size
    if len(data) < off + ndev * DEVICE.size:
        raise TraceError("the trace ends inside its device list")
    devices = []
    for _ in range(ndev):
        raw, size = DEVICE.unpack_from(data, off)
        devices.append((bytes(raw).rstrip(b"\0").decode(), size))
        off += DEVICE.size
    return TraceHeader(version, start, tuple(devices)), off


def load(path: str) -> tuple[TraceHeader, memoryview]:
    """A trace file: its header and its records as one buffer (iterate them
    with :func:`records`).  A record cut short at the end (a recorder
    killed mid-write) is left out."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TraceError(f"{path}: {e.strerror}") from None
    header, off = decode_header(data)
    n = (len(data) - off) // RECORD.size
    return header, memoryview(data)[off:off + n * RECORD.size]


def records(body: memoryview) -> Iterator[tuple[int, int, int, int, int, int, int]]:
    """(t_ns, first page, pages, op, device, tier, flags) per record."""
    return RECORD.iter_unpack(body)


def write_trace(path: str, devices: list[tuple[str, int]],
                recs: list[tuple[int, int, int, int, int, int, int]], start_ns: int = 0) -> int:
    """Write a whole trace (generators, tests); returns its size in bytes."""
    body = bytearray(RECORD.size * len(recs))
    for k, r in enumerate(recs):
        RECORD.pack_into(body, k * RECORD.size, *r)
    data = encode_header(devices, start_ns) + bytes(body)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


class Tracer:
    """Records requests into ``fd`` (opened by the caller, positioned at 0);
    :meth:`start` writes the header and starts the flusher, :meth:`close`
    writes what is buffered and closes ``fd``."""

    def __init__(self, fd: int, devices: list[tuple[str, int]], *,
                 buffer_records: int = BUFFER_RECORDS, path: str = "") -> None:
        self.fd = fd
        self.path = path
        self.devices = devices
        self.capacity = buffer_records * RECORD.size
        self._bufs = [bytearray(self.capacity), bytearray(self.capacity)]
        self._active = 0
        self._fill = 0  # bytes used in the active buffer
        self._full: int | None = None  # a full buffer waiting for the flusher
        self._kick = trio.Event()
        self._closed = False
        self._flushing = False
        self._flushed = trio.Event()  # set (and replaced) at the end of each flush
        self.recorded = 0
        self.dropped = 0
        self.written_bytes = 0
        self.start_ns = time.time_ns()
        self._t0 = time.monotonic_ns()
        self._pack = RECORD.pack_into

    async def start(self) -> None:
        header = encode_header(self.devices, self.start_ns)
        await trio.to_thread.run_sync(self._write, header)
        trio.lowlevel.spawn_system_task(self._flusher, name="swapfs trace flusher")

    def record(self, op: int, dev: int, first: int, npages: int, tier: int, flags: int) -> None:
        """One request (no await, no system call)."""
        if self._fill + RECORD.size > self.capacity:
            if self._full is not None:  # the flusher is behind: drop
                self.dropped += 1
                return
            self._full = self._active
            self._active ^= 1
            self._fill = 0
            self._kick.set()
        self._pack(self._bufs[self._active], self._fill, time.monotonic_ns() - self._t0,
                   first, npages, op, dev, tier, flags)
        self._fill += RECORD.size
        self.recorded += 1

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written_bytes += n

    async def _flusher(self) -> None:
        try:
            while not self._closed:
                await self._kick.wait()
                self._kick = trio.Event()
                await self._flush_full()
        finally:
            if not self._closed:  # the daemon stops with the trace on: keep what it holds
                self._closed = True
                try:
                    if self._full is not None:
                        self._write(self._bufs[self._full])
                    self._write(self._bufs[self._active][:self._fill])
                except OSError:
                    pass
                os.close(self.fd)

    async def _flush_full(self) -> None:
        if self._full is None or self._flushing:
            return
        self._flushing = True
        try:
            await trio.to_thread.run_sync(self._write, self._bufs[self._full])
        except OSError:
            self.dropped += self.capacity // RECORD.size
        finally:
            self._full = None
            self._flushing = False
            self._flushed.set()
            self._flushed = trio.Event()

    async def close(self) -> None:
        """Write what is buffered, close the file; idempotent."""
        if self._closed:
            return
        while self._flushing:
            await self._flushed.wait()
        await self._flush_full()
        self._closed = True
        self._kick.set()
        rest = bytes(self._bufs[self._active][:self._fill])
        self._fill = 0

        def finish() -> None:
            try:
                self._write(rest)
            finally:
                os.close(self.fd)

        await trio.to_thread.run_sync(finish)
