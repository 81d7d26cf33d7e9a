"""The FUSE protocol fuzzer (the library behind scripts/fuzz): the real Session, SwapFS,
Store, file tiers and writeback, driven through a SOCK_SEQPACKET socketpair (one message per
read, as /dev/fuse).

This module plays the kernel.  It negotiates INIT, then sends valid requests, mutated ones
(valid requests with bytes flipped, fields set to extremes, truncated or extended), garbage,
and storms of FORGET, BATCH_FORGET and INTERRUPT, keeping up to ``window`` requests in flight.
It checks:

* exactly one reply per request that needs one, none for FORGET, BATCH_FORGET, INTERRUPT or a
  message shorter than a header (a reply to an unknown unique, or a second one, is a failure;
  a request unanswered for ``hang_seconds`` is a failure);
* every reply's header: its length is the message's, its error 0 or in -511..-1 (the
  dispatcher answers EIO for any other handler errno: the kernel refuses -512 and below), an error
  reply has no payload;
* success reply sizes per opcode (entry, attr, open, write, statfs, empty replies; read,
  readdir, getxattr and listxattr within the size asked);
* data: every READ against a model of what was written (WRITE payloads, punched and zeroed
  ranges, parsed from the very bytes sent, mutated requests included); a range whose write
  failed becomes unknown until rewritten;
* no EIO for a well-formed request (no fault is injected: EIO would mean a store bug);
* ``store.check_invariants`` every ``check_every`` requests with nothing in flight, and a full
  read-back of every device at the end.

Requests in flight never overlap a write or discard in flight on the same page (their order
would be undefined, as for the kernel), unless ``overlap`` is set: then concurrent writes to
disjoint sectors of one page are allowed (well defined, and a store bug if one is lost).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from swapfs.config import Config, DeviceConfig, PoolConfig, TierConfig
from swapfs.fs import SwapFS
from swapfs.fuse import Session, wire
from swapfs.fuse.dispatch import MAX_ERRNO
from swapfs.store import Store
from swapfs.writeback import Writeback

PAGE = 4096
_IN = wire.in_header.size
ROOT = 1
NO_REPLY = frozenset({wire.FORGET, wire.BATCH_FORGET, wire.INTERRUPT})
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
NAMESPACE = (wire.MKNOD, wire.MKDIR, wire.UNLINK, wire.RMDIR, wire.SYMLINK, wire.RENAME,
             wire.RENAME2, wire.LINK, wire.CREATE, wire.TMPFILE)
# Success payload sizes of the opcodes with a fixed reply.
FIXED_REPLY = {
    wire.LOOKUP: wire.entry_out.size, wire.GETATTR: wire.attr_out.size,
    wire.SETATTR: wire.attr_out.size, wire.OPEN: wire.open_out.size,
    wire.OPENDIR: wire.open_out.size, wire.WRITE: wire.write_out.size,
    wire.STATFS: wire.kstatfs.size, wire.FLUSH: 0, wire.FSYNC: 0, wire.RELEASE: 0,
    wire.RELEASEDIR: 0, wire.FSYNCDIR: 0, wire.SETXATTR: 0, wire.REMOVEXATTR: 0,
    wire.FALLOCATE: 0, wire.ACCESS: 0,
}
SIZED_REPLY = (wire.READ, wire.READDIR, wire.GETXATTR, wire.LISTXATTR)
EXTREMES = (0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1, 4096,
            4095, 1 << 20, (1 << 20) + 1, 1 << 40)


_READ_HEAD = struct.Struct("=QQI")  # fh, offset, size: the head of read_in


class FuzzFailure(Exception):
    """A check failed; the message names the request."""


@dataclass
class DevModel:
    name: str
    inode: int
    size: int
    content: bytearray = field(init=False)
    known: bytearray = field(init=False)  # 1 where content is what the device must return

    def __post_init__(self) -> None:
        self.content = bytearray(self.size)
        self.known = bytearray(b"\x01") * self.size


@dataclass
class Pending:
    unique: int
    opcode: int
    kind: str  # valid | mutated | garbage
    msg: bytes
    sent: float
    effect: str | None = None  # write | zero | read | None
    dev: DevModel | None = None
    lo: int = 0  # byte range touched (page-rounded for conflicts)
    hi: int = 0
    off: int = 0
    size: int = 0  # bytes asked (READ etc.), payload size (WRITE)
    payload: bytes = b""


@dataclass
class FuzzStats:
    requests: int = 0
    replies: int = 0
    valid: int = 0
    mutated: int = 0
    garbage: int = 0
    storm_messages: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    bytes_verified: int = 0
    invariant_checks: int = 0
    seconds: float = 0.0


def describe(msg: bytes) -> str:
    if len(msg) >= _IN:
        length, opcode, unique, nodeid, *_ = wire.in_header.unpack_from(msg)
        head = (f"{wire.OPCODE_NAMES.get(opcode, opcode)} unique={unique} nodeid={nodeid} "
                f"len={len(msg)} (header says {length})")
    else:
        head = f"{len(msg)}-byte message"
    body = msg[:160].hex()
    return f"{head}: {body}{'...' if len(msg) > 160 else ''}"


class Fuzzer:
    def __init__(self, *, seed: int, requests: int, window: int = 16, check_every: int = 500,
                 max_io: int = 256 * 1024, overlap: bool = False, hang_seconds: float = 60.0,
                 progress: Callable[[str], None] | None = None, tier_dir: str | None = None
                 ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.total = requests
        self.window = window
        self.check_every = check_every
        self.max_io = max_io
        self.overlap = overlap
        self.hang_seconds = hang_seconds
        self.progress = progress
        self.tier_dir = tier_dir
        self.stats = FuzzStats()
        self.pending: dict[int, Pending] = {}
        self.unique = 0
        self.devs: list[DevModel] = []
        self._space = trio.Condition()  # notified on every reply
        self._failure: FuzzFailure | None = None
        self._sock: trio.socket.SocketType | None = None
        self.store: Store | None = None
        self.session: Session | None = None
        self._last_progress = 0.0
        self._start = 0.0
        self._wb_scope = trio.CancelScope()
        self._wb_done = trio.Event()

    # -- setup -----------------------------------------------------------------

    def config(self, tier_dir: str) -> Config:
        return Config(
            pool=PoolConfig(max_bytes=1 << 20, algorithm="lz4", high_watermark=0.7,
                            low_watermark=0.5),
            devices=(DeviceConfig(name="swap0", size=8 << 20),
                     DeviceConfig(name="swap1", size=4 << 20, writeback=True)),
            tiers=(TierConfig(name="fast", kind="file", path=os.path.join(tier_dir, "fast.img"),
                              size=6 << 20, priority=10, high_watermark=0.9, low_watermark=0.6),
                   TierConfig(name="slow", kind="file", path=os.path.join(tier_dir, "slow.img"),
                              size=32 << 20, priority=1, high_watermark=0.95,
                              low_watermark=0.9)))

    async def run(self) -> FuzzStats:
        with tempfile.TemporaryDirectory(prefix="swapfs-fuzz-", dir=self.tier_dir) as d:
            return await self._run(d)

    async def _run(self, tier_dir: str) -> FuzzStats:
        config = self.config(tier_dir)
        store = self.store = Store(config)
        wb = Writeback(store)
        ops = SwapFS(store)
        self.devs = [DevModel(d.name, ROOT + 1 + i, d.size) for i, d in enumerate(config.devices)]
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (a, b):
            for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
                if opt is None:
                    continue
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                    break
                except OSError:
                    continue
        room = b.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 - 8192
        self.max_io = max(PAGE, min(self.max_io, room) // PAGE * PAGE)
        a.setblocking(False)
        self.session = session = Session(ops, a.fileno(), max_inflight=64)
        self._sock = trio.socket.from_stdlib_socket(b)
        try:
            async with trio.open_nursery() as nursery:
                self._wb_scope = trio.CancelScope()
                self._wb_done = trio.Event()

                async def writeback(task_status: trio.TaskStatus[Writeback] = trio.TASK_STATUS_IGNORED
                                    ) -> None:
                    try:
                        with self._wb_scope:
                            await wb.run(task_status=task_status)
                    finally:
                        self._wb_done.set()

                await nursery.start(writeback)
                session_done = trio.Event()
                stopping = False

                async def serve() -> None:
                    try:
                        await session.run()
                    except Exception as e:
                        self._fail(f"the session died: {e!r}")
                        raise
                    finally:
                        session_done.set()
                    if not stopping:
                        self._fail("the session ended by itself")

                nursery.start_soon(serve)
                await self._init()
                nursery.start_soon(self._receiver)
                try:
                    await self._drive()
                except FuzzFailure:
                    pass  # self._failure, raised below
                stopping = True
                nursery.cancel_scope.cancel()
        finally:
            self._sock.close()
            a.close()
            await store.aclose()
        if self._failure is not None:
            raise self._failure
        self.stats.seconds = time.monotonic() - self._start
        return self.stats

    async def _init(self) -> None:
        assert self._sock is not None
        flags = (wire.FUSE_ASYNC_READ | wire.FUSE_BIG_WRITES | wire.FUSE_ASYNC_DIO
                 | wire.FUSE_MAX_PAGES | wire.FUSE_PARALLEL_DIROPS | wire.FUSE_INIT_EXT)
        self.unique += 2
        msg = self._header(wire.INIT, self.unique, 0, wire.init_in.size) + wire.init_in.pack(
            7, wire.KERNEL_MINOR_VERSION, 1 << 17, flags, 0)
        await self._sock.send(msg)
        with trio.fail_after(10):
            reply = await self._sock.recv(1 << 16)
        length, error, unique = wire.out_header.unpack_from(reply)
        if error or unique != self.unique or length != len(reply) \
                or len(reply) != 16 + wire.init_out.size:
            raise FuzzFailure(f"INIT reply {reply.hex()}")

    # -- failures --------------------------------------------------------------

    def _fail(self, what: str, p: Pending | None = None, reply: bytes | None = None) -> None:
        if self._failure is not None:
            return
        text = f"seed {self.seed}, after {self.stats.requests} requests: {what}"
        if p is not None:
            text += f"\n  request ({p.kind}): {describe(p.msg)}"
        if reply is not None:
            text += f"\n  reply: {reply[:64].hex()}{'...' if len(reply) > 64 else ''}"
        self._failure = FuzzFailure(text)

    def _check_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    # -- the kernel's side -----------------------------------------------------

    @staticmethod
    def _header(opcode: int, unique: int, nodeid: int, body: int, uid: int = 0) -> bytes:
        return wire.in_header.pack(_IN + body, opcode, unique, nodeid, uid, 0, 1, 0, 0)

    async def _receiver(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            try:
                with trio.fail_after(self.hang_seconds):
                    while True:
                        try:
                            reply = await sock.recv(1 << 23)
                        except trio.TooSlowError:
                            raise
                        break
            except trio.TooSlowError:
                if self.pending:
                    oldest = min(self.pending.values(), key=lambda p: p.sent)
                    self._fail(f"no reply for {self.hang_seconds:.0f} s", oldest)
                    async with self._space:
                        self._space.notify_all()
                    return
                continue
            self._on_reply(reply)
            async with self._space:
                self._space.notify_all()
            if self._failure is not None:
                return

    def _on_reply(self, reply: bytes) -> None:
        st = self.stats
        st.replies += 1
        if len(reply) < 16:
            self._fail(f"reply of {len(reply)} bytes, shorter than a header", reply=reply)
            return
        length, error, unique = wire.out_header.unpack_from(reply)
        p = self.pending.pop(unique, None)
        if p is None:
            self._fail(f"reply to unique {unique}, which has no request waiting for one "
                       f"(needs none, or answered twice)", reply=reply)
            return
        if length != len(reply):
            self._fail(f"reply header says {length} bytes, message has {len(reply)}", p, reply)
            return
        payload = reply[16:]
        if error:
            if not -MAX_ERRNO <= error < 0:  # the one errno rule: 1..511, anything else EIO
                self._fail(f"error {error} out of range", p, reply)
                return
            if payload:
                self._fail("error reply with a payload", p, reply)
                return
            name = errno.errorcode.get(-error, str(-error))
            st.errors[name] = st.errors.get(name, 0) + 1
            if -error == errno.EIO and p.kind == "valid":
                self._fail("EIO for a well-formed request (no fault was injected)", p, reply)
                return
            if p.effect in ("write", "zero") and p.dev is not None:
                # the range may be partly changed: unknown until rewritten
                p.dev.known[p.off:p.off + p.size] = bytes(p.size)
            return
        fixed = FIXED_REPLY.get(p.opcode)
        if fixed is not None and len(payload) != fixed:
            self._fail(f"{wire.OPCODE_NAMES[p.opcode]} reply of {len(payload)} bytes, "
                       f"expected {fixed}", p, reply)
            return
        if p.opcode in SIZED_REPLY:
            asked = p.size
            if p.opcode in (wire.GETXATTR, wire.LISTXATTR) and asked == 0:
                if len(payload) != wire.getxattr_out.size:
                    self._fail("xattr size probe reply is not a getxattr_out", p, reply)
                    return
            elif len(payload) > asked:
                self._fail(f"reply of {len(payload)} bytes to a request for {asked}", p, reply)
                return
        elif fixed is None:
            self._fail(f"success reply to {wire.OPCODE_NAMES.get(p.opcode, p.opcode)}, "
                       f"which swapfs does not implement", p, reply)
            return
        if p.effect == "write" and p.dev is not None:
            (written, _) = wire.write_out.unpack(payload)
            if written != p.size:
                self._fail(f"WRITE of {p.size} bytes answered {written}", p, reply)
                return
            p.dev.content[p.off:p.off + p.size] = p.payload
            p.dev.known[p.off:p.off + p.size] = b"\x01" * p.size
            st.bytes_written += p.size
        elif p.effect == "zero" and p.dev is not None:
            p.dev.content[p.off:p.off + p.size] = bytes(p.size)
            p.dev.known[p.off:p.off + p.size] = b"\x01" * p.size
        elif p.effect == "read" and p.dev is not None:
            self._verify(p, payload, reply)

    def _verify(self, p: Pending, data: bytes, reply: bytes) -> None:
        dev = p.dev
        assert dev is not None
        end = min(p.off + p.size, dev.size) if p.off < dev.size else p.off
        want_len = max(0, end - p.off)
        if len(data) != want_len:
            self._fail(f"READ returned {len(data)} bytes, expected {want_len}", p, reply)
            return
        if not want_len:
            return
        want = dev.content[p.off:end]
        if dev.known.find(0, p.off, end) < 0:
            ok = data == want
        else:
            known = dev.known[p.off:end]
            ok = all(known[i] == 0 or data[i] == want[i] for i in range(want_len))
        if not ok:
            first = next(i for i in range(want_len) if data[i] != want[i])
            self._fail(f"READ returned wrong bytes on {dev.name} at byte {p.off + first} "
                       f"(page {(p.off + first) // PAGE}): got {data[first:first + 16].hex()}, "
                       f"expected {bytes(want[first:first + 16]).hex()}", p, reply)
            return
        self.stats.bytes_verified += want_len

    async def _send(self, p: Pending) -> None:
        assert self._sock is not None
        needs_reply = len(p.msg) >= _IN and p.opcode not in NO_REPLY
        if needs_reply:
            self.pending[p.unique] = p
        self.stats.requests += 1
        await self._sock.send(p.msg)

    async def _wait(self, cond: Callable[[], bool]) -> None:
        async with self._space:
            while not cond() and self._failure is None:
                await self._space.wait()
        self._check_failed()

    async def _drain(self) -> None:
        await self._wait(lambda: not self.pending)

    def _free_of_conflicts(self, p: Pending) -> bool:
        return not self._conflicts(p)

    def _conflicts(self, p: Pending) -> bool:
        if p.dev is None or p.effect is None:
            return False
        lo, hi = p.lo, p.hi
        for q in self.pending.values():
            if q.dev is p.dev and q.effect is not None and q.lo < hi and lo < q.hi:
                if p.effect == "read" and q.effect == "read":
                    continue
                if self.overlap and p.effect == q.effect == "write" \
                        and (q.off < p.off + p.size and p.off < q.off + q.size) is False:
                    continue  # disjoint bytes of shared pages: defined, and must both land
                return True
        return False

    # -- the driver ------------------------------------------------------------

    async def _drive(self) -> None:
        self._start = self._last_progress = time.monotonic()
        rng = self.rng
        while self.stats.requests < self.total:
            self._check_failed()
            r = rng.random()
            if r < 0.75:
                batch = [self._valid()]
                self.stats.valid += 1
            elif r < 0.90:
                batch = [self._mutated()]
                self.stats.mutated += 1
            elif r < 0.995:
                batch = [self._garbage()]
                self.stats.garbage += 1
            else:
                batch = self._storm()
                self.stats.storm_messages += len(batch)
            if self.overlap and rng.random() < 0.05:
                batch += self._subpage_burst()
            for p in batch:
                await self._wait(lambda: len(self.pending) < self.window)
                if self._conflicts(p):
                    await self._wait(partial(self._free_of_conflicts, p))
                await self._send(p)
            if self.check_every and self.stats.requests // self.check_every != \
                    (self.stats.requests - len(batch)) // self.check_every:
                await self._check_store()
            now = time.monotonic()
            if self.progress is not None and now - self._last_progress >= 5:
                self._last_progress = now
                el = now - self._start
                self.progress(f"{self.stats.requests} requests in {el:.0f} s "
                              f"({self.stats.requests / el:.0f}/s), "
                              f"{self.stats.bytes_written >> 20} MiB written, "
                              f"{self.stats.bytes_verified >> 20} MiB verified, "
                              f"{self.stats.invariant_checks} invariant checks")
        await self._drain()
        await self._verify_all()
        await self._check_store()
        # writeback stopped, nothing in flight: no page may stay pinned
        self._wb_scope.cancel()
        await self._wb_done.wait()
        await self._check_store(quiescent=True)
        await self._verify_all()
        # a last request: any stray reply sent before its answer is caught on the way
        p = self._valid_getattr(ROOT)
        await self._send(p)
        await self._drain()

    async def _check_store(self, quiescent: bool = False) -> None:
        """The store's and tiers' invariants with no request in flight; the background
        writeback may be moving pages (so pages may be pinned) unless it was stopped."""
        await self._drain()
        assert self.store is not None
        try:
            self.store.check_invariants(quiescent=quiescent)
        except AssertionError as e:
            self._fail(f"store invariant: {e}")
            self._check_failed()
        for tier in self.store.tiers:
            try:
                tier.check_invariants()
            except AssertionError as e:
                self._fail(f"tier invariant: {e}")
                self._check_failed()
        self.stats.invariant_checks += 1

    async def _verify_all(self) -> None:
        chunk = self.max_io
        for dev in self.devs:
            for off in range(0, dev.size, chunk):
                p = self._read(dev, off, min(chunk, dev.size - off))
                await self._wait(lambda: len(self.pending) < self.window)
                await self._send(p)
        await self._drain()

    # -- requests ---------------------------------------------------------------

    def _next_unique(self) -> int:
        self.unique += 2
        return self.unique

    def _mk(self, opcode: int, body: bytes, nodeid: int, kind: str = "valid") -> Pending:
        u = self._next_unique()
        return Pending(u, opcode, kind, self._header(opcode, u, nodeid, len(body)) + body,
                       time.monotonic())

    def _page_data(self, n: int) -> bytes:
        rng = self.rng
        k = rng.random()
        if k < 0.15:
            return bytes(n)
        if k < 0.3:  # same-filled with an 8-byte word
            return rng.randbytes(8) * (n // 8) + bytes(n % 8)
        if k < 0.65:  # compressible: a few words repeated, a little noise
            words = [rng.randbytes(8) for _ in range(4)]
            out = bytearray(b"".join(rng.choice(words) for _ in range(-(-n // 8)))[:n])
            for _ in range(n // 512):
                out[rng.randrange(n)] = rng.randrange(256)
            return bytes(out)
        return rng.randbytes(n)  # incompressible: goes to a file tier

    def _span(self, dev: DevModel) -> tuple[int, int]:
        rng = self.rng
        if rng.random() < 0.8:  # whole pages, as swap
            npages = rng.choice((1, 1, 1, 2, 4, 8, 16, 32, 64)) if rng.random() < 0.9 \
                else rng.randint(1, self.max_io // PAGE)
            npages = min(npages, self.max_io // PAGE, dev.size // PAGE)
            off = rng.randrange(0, dev.size // PAGE - npages + 1) * PAGE
            return off, npages * PAGE
        # 512-byte sectors, as a loop device's default
        size = rng.randint(1, 64) * 512
        off = rng.randrange(0, (dev.size - size) // 512 + 1) * 512
        if rng.random() < 0.05:  # past the end
            off = dev.size - rng.choice((0, 512, 4096))
        return off, size

    def _ranged(self, p: Pending, dev: DevModel, off: int, size: int, effect: str) -> Pending:
        p.dev, p.effect, p.off, p.size = dev, effect, off, size
        end = min(off + size, dev.size)
        p.lo = off // PAGE * PAGE
        p.hi = max(p.lo, -(-end // PAGE) * PAGE)
        if effect != "read":
            p.size = max(0, end - off) if off < dev.size else 0
        return p

    def _write(self, dev: DevModel, off: int, size: int) -> Pending:
        data = self._page_data(size)
        p = self._mk(wire.WRITE, wire.write_in.pack(dev.inode, off, size, 0, 0, 0, 0) + data,
                     dev.inode)
        p.payload = data
        self._ranged(p, dev, off, size, "write")
        if off + size > dev.size:  # refused whole (ENOSPC): nothing changes
            p.effect, p.size = None, 0
        return p

    def _read(self, dev: DevModel, off: int, size: int) -> Pending:
        p = self._mk(wire.READ, wire.read_in.pack(dev.inode, off, size, 0, 0, 0, 0), dev.inode)
        return self._ranged(p, dev, off, size, "read")

    def _valid_getattr(self, nodeid: int) -> Pending:
        return self._mk(wire.GETATTR, wire.getattr_in.pack(0, 0, 0), nodeid)

    def _valid(self) -> Pending:
        rng = self.rng
        dev = rng.choice(self.devs)
        r = rng.random()
        if r < 0.35:
            return self._write(dev, *self._span(dev))
        if r < 0.65:
            return self._read(dev, *self._span(dev))
        if r < 0.72:
            off, size = self._span(dev)
            if rng.random() < 0.3:
                size = rng.randint(1, 3 * self.max_io)
            mode = rng.choice((FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                               FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
            p = self._mk(wire.FALLOCATE, wire.fallocate_in.pack(dev.inode, off, size, mode, 0),
                         dev.inode)
            return self._ranged(p, dev, off, size, "zero") if off < dev.size else p
        nodeid = rng.choice((ROOT, dev.inode, dev.inode, 99, 0))
        choice = rng.randrange(16)
        if choice == 0:
            name = rng.choice((dev.name.encode(), b"nope", b"..", b"swap0", b"x" * 300))
            return self._mk(wire.LOOKUP, name + b"\0", ROOT)
        if choice == 1:
            return self._valid_getattr(nodeid)
        if choice == 2:
            return self._mk(wire.SETATTR, wire.setattr_in.pack(
                rng.choice((0, wire.FATTR_SIZE, wire.FATTR_MODE, wire.FATTR_ATIME_NOW)), 0, 0,
                dev.size, 0, 0, 0, 0, 0, 0, 0, 0o600, 0, 0, 0, 0), nodeid)
        if choice == 3:
            return self._mk(wire.OPEN, wire.open_in.pack(rng.choice((os.O_RDWR, os.O_RDONLY,
                                                                      os.O_TRUNC)), 0), nodeid)
        if choice == 4:
            return self._mk(rng.choice((wire.FLUSH, wire.RELEASE)),
                            wire.release_in.pack(nodeid, 0, 0, 0), nodeid)
        if choice == 5:
            return self._mk(rng.choice((wire.FSYNC, wire.FSYNCDIR)),
                            wire.fsync_in.pack(nodeid, rng.randrange(2), 0), nodeid)
        if choice == 6:
            return self._mk(wire.OPENDIR, wire.open_in.pack(0, 0), nodeid)
        if choice == 7:
            p = self._mk(wire.READDIR, wire.read_in.pack(ROOT, rng.randrange(4),
                                                         rng.choice((80, 4096)), 0, 0, 0, 0),
                         ROOT)
            p.size = wire.read_in.unpack_from(p.msg, _IN)[2]
            return p
        if choice == 8:
            return self._mk(wire.STATFS, b"", nodeid)
        if choice == 9:
            size = rng.choice((0, 0, 16, 65536))
            name = rng.choice((b"user.swapfs.stats", b"user.swapfs.stored_pages",
                               b"user.swapfs.tiers.fast.stored_pages", b"user.other",
                               b"security.selinux", b"user.swapfs."))
            p = self._mk(wire.GETXATTR, wire.getxattr_in.pack(size, 0) + name + b"\0", nodeid)
            p.size = size
            return p
        if choice == 10:
            size = rng.choice((0, 16, 65536))
            p = self._mk(wire.LISTXATTR, wire.getxattr_in.pack(size, 0), nodeid)
            p.size = size
            return p
        if choice == 11:
            name, value = rng.choice(((b"user.swapfs.ctl.writeback", b"%d" % rng.randrange(64)),
                                      (b"user.swapfs.ctl.writeback", b"idle:0"),
                                      (b"user.swapfs.ctl.writeback", b"bogus"),
                                      (b"user.swapfs.stats", b"1"), (b"user.mine", b"v")))
            return self._mk(wire.SETXATTR, wire.setxattr_in_compat.pack(len(value), 0) + name
                            + b"\0" + value, nodeid)
        if choice == 12:
            return self._mk(wire.REMOVEXATTR, rng.choice((b"user.swapfs.stats", b"user.x"))
                            + b"\0", nodeid)
        if choice == 13:
            return self._mk(wire.ACCESS, wire.access_in.pack(rng.randrange(8), 0), nodeid)
        if choice == 14:
            op = rng.choice(NAMESPACE)
            return self._mk(op, b"name\0" + bytes(rng.randrange(32)), ROOT)
        return self._mk(rng.choice((wire.READLINK, wire.GETLK, wire.BMAP, wire.IOCTL,
                                    wire.POLL, wire.LSEEK, wire.COPY_FILE_RANGE, wire.SYNCFS,
                                    wire.READDIRPLUS, 200, 4000)), bytes(rng.randrange(64)),
                        nodeid)

    def _restamp(self, msg: bytearray, kind: str) -> Pending:
        """A message as sent: unique fresh, DESTROY (the end of the connection) not sent,
        and what it will do parsed from its bytes as the session will."""
        u = self._next_unique()
        if len(msg) >= 16:
            struct.pack_into("=Q", msg, 8, u)
        opcode = -1
        if len(msg) >= _IN:
            opcode = struct.unpack_from("=I", msg, 4)[0]
            if opcode == wire.DESTROY:
                opcode = wire.GETATTR
                struct.pack_into("=I", msg, 4, opcode)
        p = Pending(u, opcode, kind, bytes(msg), time.monotonic())
        self._parse_effect(p)
        return p

    def _parse_effect(self, p: Pending) -> None:
        msg, n = p.msg, len(p.msg)
        by_inode = {d.inode: d for d in self.devs}
        if p.opcode == wire.WRITE and n >= _IN + wire.write_in.size:
            fh, off, size = wire.write_in.unpack_from(msg, _IN)[:3]
            start = _IN + wire.write_in.size
            dev = by_inode.get(fh)
            if dev is not None and start + size <= n:
                p.payload = msg[start:start + size]
                if off + size <= dev.size and size:
                    self._ranged(p, dev, off, size, "write")
        elif p.opcode == wire.READ and n >= _IN + wire.read_in.size:
            fh, off, size = _READ_HEAD.unpack_from(msg, _IN)  # all the session reads of it
            dev = by_inode.get(fh)
            p.size = size
            if dev is not None and off < 1 << 62:
                self._ranged(p, dev, off, size, "read")
        elif p.opcode == wire.FALLOCATE and n >= _IN + wire.fallocate_in.size:
            fh, off, length, mode, _ = wire.fallocate_in.unpack_from(msg, _IN)
            dev = by_inode.get(fh)
            if dev is not None and mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) \
                    and off < dev.size and length:
                self._ranged(p, dev, off, min(length, dev.size - off), "zero")
        elif p.opcode == wire.READDIR and n >= _IN + wire.read_in.size:
            p.size = _READ_HEAD.unpack_from(msg, _IN)[2]
        elif p.opcode in (wire.GETXATTR, wire.LISTXATTR) and n >= _IN + 8:
            p.size = wire.getxattr_in.unpack_from(msg, _IN)[0]

    def _mutated(self) -> Pending:
        rng = self.rng
        base = self._valid()
        self.unique -= 2  # its unique is replaced
        msg = bytearray(base.msg)
        for _ in range(rng.randint(1, 4)):
            m = rng.randrange(6)
            if m == 0 and msg:  # flip bits
                i = rng.randrange(len(msg))
                msg[i] ^= 1 << rng.randrange(8)
            elif m == 1 and len(msg) > 8:  # a field to an extreme
                width = rng.choice((4, 8))
                i = rng.randrange(0, len(msg) - width + 1) & ~(width - 1)
                v = rng.choice(EXTREMES) & ((1 << (8 * width)) - 1)
                msg[i:i + width] = v.to_bytes(width, "little")
            elif m == 2:  # truncate
                del msg[rng.randrange(len(msg) + 1):]
            elif m == 3:  # extend
                msg += rng.randbytes(rng.randrange(1, 64))
            elif m == 4 and len(msg) >= 8:  # another opcode on the same body
                msg[4:8] = rng.randrange(1, 60).to_bytes(4, "little")
            elif m == 5 and len(msg) >= 24:  # another node id
                msg[16:24] = rng.choice((0, 1, 2, 3, 4, 99, (1 << 64) - 1)).to_bytes(8, "little")
        return self._restamp(msg, "mutated")

    def _garbage(self) -> Pending:
        rng = self.rng
        n = rng.choice((0, 1, 15, 39, 40, 41, rng.randrange(200), rng.randrange(5000)))
        msg = bytearray(rng.randbytes(n))
        if n >= 8 and rng.random() < 0.7:
            msg[4:8] = rng.randrange(0, 64).to_bytes(4, "little")
        return self._restamp(msg, "garbage")

    def _subpage_burst(self) -> list[Pending]:
        """An incompressible page (so it lives in a file tier), then concurrent writes to
        each of its 512-byte sectors: each must land (as O_DIRECT AIO through a loop device)."""
        rng = self.rng
        dev = rng.choice(self.devs)
        off = rng.randrange(dev.size // PAGE) * PAGE
        out = [self._write(dev, off, PAGE)]
        out[0].payload = rng.randbytes(PAGE)
        out[0].msg = out[0].msg[:_IN + wire.write_in.size] + out[0].payload
        for sector in rng.sample(range(8), 8):
            out.append(self._write(dev, off + sector * 512, 512))
        self.stats.valid += len(out)
        return out

    def _storm(self) -> list[Pending]:
        rng = self.rng
        out = []
        kind = rng.randrange(3)
        for _ in range(rng.randint(20, 150)):
            if kind == 0:
                p = self._mk(wire.FORGET, wire.forget_in.pack(rng.choice((1, 5, 1 << 40))),
                             rng.choice((ROOT, 2, 3, 77)))
            elif kind == 1:
                count = rng.randint(0, 40)
                items = b"".join(wire.forget_one.pack(rng.randrange(6), rng.randrange(1 << 20))
                                 for _ in range(count))
                claimed = count if rng.random() < 0.8 else rng.randrange(1 << 16)
                p = self._mk(wire.BATCH_FORGET, wire.batch_forget_in.pack(claimed, 0) + items, 0)
            else:
                targets = list(self.pending) or [0]
                target = rng.choice(targets) if rng.random() < 0.8 else rng.randrange(1 << 40)
                p = self._mk(wire.INTERRUPT, wire.interrupt_in.pack(target), 0)
            out.append(p)
        return out


def quiet_logs(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING if verbose else logging.CRITICAL + 1,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        logging.getLogger("swapfs").setLevel(logging.CRITICAL + 1)


def run_fuzz(*, requests: int, seed: int, verbose: bool = False, **kw: Any) -> FuzzStats:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    fz = Fuzzer(seed=seed, requests=requests, progress=progress if verbose or requests > 20000
                else None, **kw)
    return trio.run(fz.run)
