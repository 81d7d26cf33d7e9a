"""Dispatch behaviour: suspension, the bound on suspended handlers, errors,
concurrency, and the end of a session."""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from functools import partial

import pytest
import trio

from swapfs.fuse import FUSEError

from .conftest import MiB, default_files, proc_mounts, sh, sync
from .memfs import MemFS

pytestmark = [pytest.mark.timeout(60), pytest.mark.root]


class GatedFS(MemFS):
    """Reads of files named slow* wait for a gate; reads of 'boom' raise."""

    def __init__(self) -> None:
        files = default_files()
        files.update({b"slow1": b"one", b"slow2": b"two", b"slow3": b"three", b"boom": b"b" * 10})
        super().__init__(files)
        self.gate = trio.Event()
        self.waiting = 0

    async def read(self, fh, offset, size):
        name = self.nodes[fh].name
        if name.startswith(b"slow"):
            self.waiting += 1
            await self.gate.wait()
            self.waiting -= 1
        elif name == b"boom":
            raise RuntimeError("boom")
        return await super().read(fh, offset, size)

    async def lookup(self, parent, name, ctx):
        if name.startswith(b"gate"):  # a synchronous request the kernel can interrupt
            self.waiting += 1
            await self.gate.wait()
            self.waiting -= 1
        return await super().lookup(parent, name, ctx)


def direct_read(path: str, size: int = 4096) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read(size)


# open(2), openat(2) and read(2), by machine: what a thread reading a FUSE
# file is blocked in while its LOOKUP, OPEN or READ request waits.
_FILE_SYSCALLS = {"x86_64": {"0", "2", "257"}, "aarch64": {"56", "63"}}


def blocked_on_file(tid: int) -> bool:
    """Thread ``tid`` of this process is blocked in open or read (/proc's view)."""
    want = _FILE_SYSCALLS.get(os.uname().machine)
    if want is None:
        pytest.skip(f"system call numbers of {os.uname().machine} not listed")
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split()[0] in want
    except (OSError, IndexError):
        return False


async def wait_until(cond, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_suspended_handler_does_not_block_others(mount_memfs):
    fs = GatedFS()
    async with mount_memfs(fs) as m:
        results = {}

        async def slow():
            results["slow"] = await sync(direct_read, m.p("slow1"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await wait_until(lambda: fs.waiting == 1)
            # the handler is suspended; other requests are answered meanwhile
            assert await sync(direct_read, m.p("hello")) == b"hello, world\n"
            assert sorted(await sync(os.listdir, str(m.path)))[0] == "boom"
            assert "slow" not in results
            stats = m.session.statistics()
            assert stats.suspended_handlers >= 1 and stats.max_suspended >= 1
            assert stats.inline_replies > 0
            fs.gate.set()
        assert results["slow"] == b"one"


async def test_handler_with_trio_sleep(mount_memfs):
    class SleepyFS(MemFS):
        def __init__(self, files):
            super().__init__(files)
            self.sleeping = False
            self.wake = trio.Event()

        async def lookup(self, parent, name, ctx):
            if name == b"small":
                self.sleeping = True
                await self.wake.wait()  # a handler parked in trio, as a sleep would be
            return await super().lookup(parent, name, ctx)

    fs = SleepyFS(default_files())
    async with mount_memfs(fs) as m:
        done = []

        async def slow_stat():
            await sync(os.stat, m.p("small"))
            done.append("small")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_stat)
            await wait_until(lambda: fs.sleeping)
            for _ in range(20):
                await sync(direct_read, m.p("hello"))
            assert done == []  # 20 reads were answered while the lookup was parked
            fs.wake.set()
        assert done == ["small"]


async def test_max_inflight_bound(mount_memfs, transport):
    if transport == "uring":
        pytest.skip("on the ring the kernel bounds requests in flight by the entries per queue")
    fs = GatedFS()
    async with mount_memfs(fs, max_inflight=2) as m:
        out = {}

        tids = {}

        def read_noting_thread(name):
            tids[name] = threading.get_native_id()
            return direct_read(m.p(name))

        async def reader(name):
            out[name] = await sync(read_noting_thread, name)

        async with trio.open_nursery() as nursery:
            for name in ("slow1", "slow2", "slow3"):
                nursery.start_soon(reader, name)
            await wait_until(lambda: fs.waiting == 2)
            # every reader thread is parked in the kernel waiting for FUSE:
            # the third one's request sits in the queue, unread
            try:
                await wait_until(lambda: len(tids) == 3 and all(
                    blocked_on_file(tid) for tid in tids.values()))
                assert fs.waiting == 2  # the third request is not read while two are suspended
            finally:
                fs.gate.set()  # never leave the readers hanging on the mount
            assert m.session.statistics().max_suspended == 2
        assert out == {"slow1": b"one", "slow2": b"two", "slow3": b"three"}
        # reading resumed afterwards
        assert await sync(direct_read, m.p("hello")) == b"hello, world\n"


class OddErrnoFS(MemFS):
    """Reads of 'odd' and the xattr user.odd raise FUSEError(err)."""

    def __init__(self, err: int) -> None:
        files = default_files()
        files[b"odd"] = b"o" * 10
        super().__init__(files)
        self.err = err

    async def read(self, fh, offset, size):
        if self.nodes[fh].name == b"odd":
            raise FUSEError(self.err)
        return await super().read(fh, offset, size)

    async def getxattr(self, inode, name, ctx):
        if name == b"user.odd":
            raise FUSEError(self.err)
        return await super().getxattr(inode, name, ctx)


async def answered(fn, *args):
    """``fn(*args)`` in a thread, failing the test (not hanging it) if its request is never
    answered."""
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)


@pytest.mark.parametrize("err", [512, 600, 4095])
async def test_errno_no_reply_can_carry_is_answered_eio(mount_memfs, err, caplog):
    # The kernel refuses an error reply <= -512: the request would wait forever.
    # READ is served from the ring's buffers, GETXATTR through the classic layout.
    async with mount_memfs(OddErrnoFS(err)) as m:
        with caplog.at_level(logging.ERROR, logger="swapfs.fuse"):
            with pytest.raises(OSError) as ei:
                await answered(direct_read, m.p("odd"))
            assert ei.value.errno == errno.EIO
            with pytest.raises(OSError) as ei:
                await answered(os.getxattr, m.p("hello"), "user.odd")
            assert ei.value.errno == errno.EIO
        assert any(f"{err} is not an errno a reply can carry" in r.getMessage() for r in caplog.records)
        stats = m.session.statistics()
        assert stats.bad_replies >= 2 and stats.reply_failures == 0
        assert await sync(direct_read, m.p("hello")) == b"hello, world\n"


async def test_errno_511_is_answered_as_is(mount_memfs):
    async with mount_memfs(OddErrnoFS(511)) as m:
        with pytest.raises(OSError) as ei:
            await answered(direct_read, m.p("odd"))
        assert ei.value.errno == 511
        assert m.session.statistics().bad_replies == 0


async def test_exception_is_eio_and_serving_continues(mount_memfs, caplog):
    fs = GatedFS()
    async with mount_memfs(fs) as m:
        with caplog.at_level(logging.ERROR, logger="swapfs.fuse"):
            with pytest.raises(OSError) as ei:
                await sync(direct_read, m.p("boom"))
        assert ei.value.errno == errno.EIO
        assert any("READ handler failed" in r.getMessage() for r in caplog.records)
        assert m.session.statistics().handler_exceptions >= 1
        assert await sync(direct_read, m.p("hello")) == b"hello, world\n"


async def test_concurrent_threads_exact_data(mount_memfs):
    size = 32 * MiB
    fs = MemFS({b"big": size})
    nthreads, region = 8, size // 8
    async with mount_memfs(fs) as m:

        def worker(i: int, errors: list) -> None:
            rnd = random.Random(i)
            fd = os.open(m.p("big"), os.O_RDWR | os.O_DIRECT)
            try:
                import mmap

                buf = mmap.mmap(-1, 65536)
                base = i * region
                shadow = bytearray(region)
                for _ in range(150):
                    off = rnd.randrange(0, region // 4096 - 16) * 4096
                    n = rnd.choice([4096, 8192, 65536])
                    if rnd.random() < 0.5:
                        payload = rnd.randbytes(n)
                        buf[:n] = payload
                        assert os.pwritev(fd, [memoryview(buf)[:n]], base + off) == n
                        shadow[off : off + n] = payload
                    else:
                        got = os.preadv(fd, [memoryview(buf)[:n]], base + off)
                        if got != n or buf[:n] != shadow[off : off + n]:
                            errors.append((i, off, n))
                buf.close()
            except Exception as e:  # reported to the test
                errors.append(e)
            finally:
                os.close(fd)

        errors: list = []
        threads = [threading.Thread(target=worker, args=(i, errors)) for i in range(nthreads)]

        def run_all():
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        await sync(run_all)
        assert errors == []


async def test_unmount_with_open_file_ends_session(mount_memfs):
    fs = MemFS(default_files())
    async with mount_memfs(fs) as m:
        fd = await sync(os.open, m.p("hello"), os.O_RDONLY)
        await sh("umount", "-l", str(m.path))
        assert await sync(os.pread, fd, 5, 0) == b"hello"  # still served after the lazy detach
        await sync(os.close, fd)
        with trio.fail_after(10):
            await m.done.wait()  # the kernel ended the connection: serve() returned by itself
        assert fs.destroyed


async def test_cancel_with_open_file(mount_memfs):
    fs = MemFS(default_files())
    async with mount_memfs(fs) as m:
        fd = await sync(os.open, m.p("hello"), os.O_RDONLY)
        m.cancel_scope.cancel()
        with trio.fail_after(10):
            await m.done.wait()
    assert fs.destroyed
    with pytest.raises(OSError):
        await sync(os.pread, fd, 5, 0)
    with pytest.raises(OSError):  # FLUSH on a dead connection; the fd is closed anyway
        await sync(os.close, fd)
    assert str(m.path) not in proc_mounts()


async def test_interrupt_is_counted_and_serving_continues(mount_memfs):
    fs = GatedFS()
    async with mount_memfs(fs) as m:
        proc = await trio.lowlevel.open_process(
            ["stat", m.p("gated")]
        )
        try:
            await wait_until(lambda: fs.waiting == 1)
            proc.kill()
            await wait_until(lambda: m.session.statistics().interrupts >= 1)
        finally:
            fs.gate.set()
            await proc.wait()
        # (a sent request is waited out by the kernel, so this late reply is accepted)
        assert m.session.statistics().reply_failures == 0
        assert await sync(direct_read, m.p("hello")) == b"hello, world\n"
