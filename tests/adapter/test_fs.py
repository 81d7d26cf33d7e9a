"""SwapFS, the FUSE adapter, against a fake store and a fake writeback: the
errno mapping, fallocate modes, control xattr parsing and refusals, without
a mount."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from swapfs.config import Config, DeviceConfig, PoolConfig
from swapfs.errors import BackingIOError, Corruption, NoSpace, OutOfRange, StoreError
from swapfs.fs import CTL_WRITEBACK, STATS_XATTR, SwapFS, store_errno
from swapfs.fuse import ROOT_INODE, FUSEError, RequestContext, SetattrFields
from swapfs.kernel import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
)
from swapfs.store import Store

MiB = 1 << 20
CTX = RequestContext(uid=0, gid=0, pid=1)
DEV = ROOT_INODE + 1  # the first device's inode


class FakeStore(Store):
    """A real store's devices and stats; read, write and discard recorded,
    and failing with ``fail`` when it is set."""

    def __init__(self) -> None:
        super().__init__(Config(pool=PoolConfig(max_bytes=4 * MiB),
                                devices=(DeviceConfig(name="swap0", size=MiB),
                                         DeviceConfig(name="swap1", size=MiB))))
        self.calls: list[tuple[Any, ...]] = []
        self.fail: StoreError | None = None

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    async def read(self, dev: Any, offset: int, size: int) -> bytes:
        self._call("read", dev.name, offset, size)
        return bytes(size)

    async def write(self, dev: Any, offset: int, data: object) -> int:
        self._call("write", dev.name, offset, len(memoryview(data)))  # type: ignore[arg-type]
        return len(memoryview(data))  # type: ignore[arg-type]

    async def discard(self, dev: Any, offset: int, length: int) -> None:
        self._call("discard", dev.name, offset, length)


class FakeWriteback:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def writeback_pages(self, n: int, device: Any = None) -> int:
        self.calls.append(("pages", n, device.name if device else None))
        return n

    async def writeback_idle(self, seconds: float, device: Any = None) -> int:
        self.calls.append(("idle", seconds, device.name if device else None))
        return 0


@pytest.fixture
def fake() -> tuple[SwapFS, FakeStore, FakeWriteback]:
    store = FakeStore()
    wb = FakeWriteback()
    return SwapFS(store, writeback=wb), store, wb  # type: ignore[arg-type]


def test_store_errno_is_the_one_mapping() -> None:
    assert store_errno(NoSpace("x")) == errno.ENOSPC
    assert store_errno(OutOfRange("x")) == errno.ENOSPC
    assert store_errno(Corruption("x")) == errno.EIO
    assert store_errno(BackingIOError("x")) == errno.EIO
    assert store_errno(StoreError("x")) == errno.EIO


@pytest.mark.parametrize(("exc", "op", "want"), [
    (Corruption("bad page"), "read", errno.EIO),
    (BackingIOError("disk gone"), "read", errno.EIO),
    (NoSpace("full"), "write", errno.ENOSPC),
    (OutOfRange("past the end"), "write", errno.ENOSPC),
    (BackingIOError("disk gone"), "write", errno.EIO),
    (NoSpace("full"), "discard", errno.ENOSPC),
])
async def test_store_errors_become_errnos(fake: Any, exc: StoreError, op: str, want: int) -> None:
    fs, store, _ = fake
    store.fail = exc
    with pytest.raises(FUSEError) as e:
        if op == "read":
            await fs.read(DEV, 0, 4096)
        elif op == "write":
            await fs.write(DEV, 0, memoryview(bytes(4096)))
        else:
            await fs.fallocate(DEV, 0, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
    assert e.value.errno == want


@pytest.mark.parametrize(("offset", "length", "mode", "want"), [
    (0, 8192, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ("discard", "swap0", 0, 8192)),
    (4096, 100, FALLOC_FL_ZERO_RANGE, ("discard", "swap0", 4096, 100)),
    (4096, 100, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, ("discard", "swap0", 4096, 100)),
    (MiB, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, None),  # at the end: nothing to do
    (0, MiB, 0, None),  # plain allocation inside the device: space is virtual
    (0, 2 * MiB, FALLOC_FL_KEEP_SIZE, None),
])
async def test_fallocate_modes(fake: Any, offset: int, length: int, mode: int,
                               want: tuple[Any, ...] | None) -> None:
    fs, store, _ = fake
    await fs.fallocate(DEV, offset, length, mode)
    assert store.calls == ([want] if want else [])


@pytest.mark.parametrize(("offset", "length", "mode", "err"), [
    (0, 4096, FALLOC_FL_PUNCH_HOLE, errno.EOPNOTSUPP),  # punch needs KEEP_SIZE
    (0, 4096, FALLOC_FL_COLLAPSE_RANGE, errno.EOPNOTSUPP),
    (0, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE | FALLOC_FL_COLLAPSE_RANGE,
     errno.EOPNOTSUPP),
    (0, 2 * MiB, 0, errno.EFBIG),  # the device never grows
    (-1, 4096, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, errno.EINVAL),
    (0, 0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, errno.EINVAL),
])
async def test_fallocate_refusals(fake: Any, offset: int, length: int, mode: int, err: int) -> None:
    fs, store, _ = fake
    with pytest.raises(FUSEError) as e:
        await fs.fallocate(DEV, offset, length, mode)
    assert e.value.errno == err
    assert store.calls == []


@pytest.mark.parametrize(("value", "inode", "want"), [
    (b"100", ROOT_INODE, ("pages", 100, None)),
    (b"7\n", DEV, ("pages", 7, "swap0")),
    (b"idle:300", ROOT_INODE, ("idle", 300.0, None)),
    (b"idle:2.5\n", DEV + 1, ("idle", 2.5, "swap1")),
])
async def test_ctl_writeback_requests(fake: Any, value: bytes, inode: int,
                                      want: tuple[Any, ...]) -> None:
    fs, _, wb = fake
    await fs.setxattr(inode, CTL_WRITEBACK, value, 0, CTX)
    assert wb.calls == [want]


@pytest.mark.parametrize("value", [b"", b"-1", b"idle:", b"idle:-3", b"1e3", b"12345678901",
                                   b"idle:1.1234567", b"100 ", b"\xff"])
async def test_ctl_writeback_refuses_garbage(fake: Any, value: bytes) -> None:
    fs, _, wb = fake
    with pytest.raises(FUSEError) as e:
        await fs.setxattr(ROOT_INODE, CTL_WRITEBACK, value, 0, CTX)
    assert e.value.errno == errno.EINVAL
    assert wb.calls == []


async def test_ctl_writeback_without_a_writeback_task_is_eagain() -> None:
    fs = SwapFS(FakeStore())
    with pytest.raises(FUSEError) as e:
        await fs.setxattr(ROOT_INODE, CTL_WRITEBACK, b"10", 0, CTX)
    assert e.value.errno == errno.EAGAIN


async def test_xattr_refusals_and_stats(fake: Any) -> None:
    fs, _, _ = fake
    for name, err in ((STATS_XATTR, errno.EPERM), (b"user.swapfs.totals.reads", errno.EPERM),
                      (b"user.other", errno.ENOTSUP), (b"trusted.x", errno.ENOTSUP)):
        with pytest.raises(FUSEError) as e:
            await fs.setxattr(ROOT_INODE, name, b"1", 0, CTX)
        assert e.value.errno == err, name
    for name in (b"user.swapfs.no_such_counter", b"security.selinux"):
        with pytest.raises(FUSEError) as e:
            await fs.getxattr(DEV, name, CTX)
        assert e.value.errno == errno.ENODATA
    with pytest.raises(FUSEError) as e:
        await fs.removexattr(DEV, STATS_XATTR, CTX)
    assert e.value.errno == errno.EPERM
    root = json.loads(await fs.getxattr(ROOT_INODE, STATS_XATTR, CTX))
    assert set(root["devices"]) == {"swap0", "swap1"}
    own = json.loads(await fs.getxattr(DEV, STATS_XATTR, CTX))
    assert own["size_bytes"] == MiB
    assert await fs.getxattr(DEV, b"user.swapfs.size_bytes", CTX) == str(MiB).encode()
    assert STATS_XATTR in await fs.listxattr(DEV, CTX)


async def test_names_and_attributes(fake: Any) -> None:
    fs, _, _ = fake
    for call, err in ((fs.lookup(ROOT_INODE, b"nope", CTX), errno.ENOENT),
                      (fs.lookup(DEV, b"swap0", CTX), errno.ENOTDIR),
                      (fs.getattr(ROOT_INODE + 99, CTX), errno.ENOENT),
                      (fs.read(ROOT_INODE, 0, 10), errno.EISDIR),
                      (fs.opendir(DEV, CTX), errno.ENOTDIR)):
        with pytest.raises(FUSEError) as e:
            await call
        assert e.value.errno == err
    assert (await fs.lookup(ROOT_INODE, b"swap1", CTX)).st_size == MiB
    fields = SetattrFields(update_size=True, st_size=2 * MiB)
    with pytest.raises(FUSEError) as e:
        await fs.setattr(DEV, fields, CTX)
    assert e.value.errno == errno.EPERM
    same = SetattrFields(update_size=True, st_size=MiB)
    assert (await fs.setattr(DEV, same, CTX)).st_size == MiB  # truncate to its own size: harmless
    vfs = await fs.statfs(ROOT_INODE, CTX)
    assert vfs.f_blocks == 2 * MiB // 4096


def test_the_full_answer_knob_of_bench_full() -> None:
    """SWAPFS_FULL_ANSWER (scripts/bench-full only): ENOSPC by default and for anything it
    cannot read, EIO, or ENOSPC after holding the write."""
    from swapfs.fs import _full_answer

    assert _full_answer("enospc") == (errno.ENOSPC, 0.0)
    assert _full_answer("eio") == (errno.EIO, 0.0)
    assert _full_answer("hold:2.5") == (errno.ENOSPC, 2.5)
    assert _full_answer("hold:x") == _full_answer("") == (errno.ENOSPC, 0.0)
