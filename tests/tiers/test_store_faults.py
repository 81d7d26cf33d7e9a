"""Faults injected under the store (backing-file EIO and ENOSPC on read and write, short
writes): no wrong bytes returned, nothing lost in the healthy tiers."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swapfs.errors import BackingIOError, NoSpace, StoreError
from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.store import Store
from swapfs.tiers import file as file_mod

from ..conftest import MakeStore, tier

MiB = 1 << 20


TwoTiers = Callable[..., Store]


@pytest.fixture
def two_tiers(make_store: MakeStore, tmp_path: Path) -> TwoTiers:
    """A store over file tiers a and b (8 MiB each, priorities ``prios``).
    Ask for it before monkeypatch: its teardown check then runs after the
    faults are undone."""
    def make(prios: tuple[int, int] = (100, 100)) -> Store:
        return make_store([tier(n, tmp_path / f"{n}.img", 8 * MiB, p)
                           for n, p in zip(("a", "b"), prios)],
                          pool_bytes=MiB, devices=(("swap0", 16 * MiB),))
    return make


class SickFd:
    """os.pwritev / os.preadv failing (or short) on one descriptor only."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fd = -1
        self.write_err: int | None = None
        self.read_err: int | None = None
        self.short_writes = False
        self._pwritev, self._preadv = os.pwritev, os.preadv
        monkeypatch.setattr(file_mod.os, "pwritev", self.pwritev)
        monkeypatch.setattr(file_mod.os, "preadv", self.preadv)

    def pwritev(self, fd: int, bufs: Any, offset: int, *flags: int) -> int:
        if fd == self.fd and self.write_err is not None:
            raise OSError(self.write_err, os.strerror(self.write_err))
        if fd == self.fd and self.short_writes:
            first = memoryview(bufs[0])
            return self._pwritev(fd, [first[:max(1, first.nbytes // 3)]], offset)
        return self._pwritev(fd, bufs, offset, *flags)

    def preadv(self, fd: int, bufs: Any, offset: int, *flags: int) -> int:
        if fd == self.fd and self.read_err is not None:
            raise OSError(self.read_err, os.strerror(self.read_err))
        return self._preadv(fd, bufs, offset, *flags)


async def fill(store: Store, rng: random.Random, first: int, n: int,
               model: dict[int, bytes]) -> None:
    dev = store.devices[0]
    for i in range(first, first + n, 8):
        pages = [rng.randbytes(PAGE) for _ in range(8)]  # incompressible: file tiers
        try:
            await store.write(dev, i * PAGE, b"".join(pages))
        except StoreError:
            for k in range(8):
                model.pop(i + k, None)  # may or may not be stored: not checked
            continue
        for k, p in enumerate(pages):
            model[i + k] = p


async def check(store: Store, model: dict[int, bytes]) -> None:
    dev = store.devices[0]
    for i, want in model.items():
        assert await store.read(dev, i * PAGE, PAGE) == want, f"page {i}"


async def test_enospc_on_one_tier_moves_on_to_the_other(two_tiers: TwoTiers, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = two_tiers()
    sick = SickFd(monkeypatch)
    rng = random.Random(1)
    model: dict[int, bytes] = {}
    try:
        await fill(store, rng, 0, 256, model)
        sick.fd = store.tiers[0]._fd
        sick.write_err = errno.ENOSPC
        await fill(store, rng, 256, 1024, model)
        assert len(model) == 256 + 1024  # every write found room in tier b
        assert store.tiers[0].full
        sick.write_err = None
        await check(store, model)
        store.check_invariants()
    finally:
        await store.aclose()


@pytest.mark.parametrize("prios", [(100, 100), (100, 10)])
async def test_write_eio_on_one_tier_loses_nothing_stored(two_tiers: TwoTiers, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          prios: tuple[int, int]) -> None:
    store = two_tiers(prios)
    sick = SickFd(monkeypatch)
    rng = random.Random(2)
    model: dict[int, bytes] = {}
    try:
        await fill(store, rng, 0, 512, model)
        before = dict(model)
        sick.fd = store.tiers[0]._fd
        sick.write_err = errno.EIO
        await fill(store, rng, 512, 512, model)  # some may fail: BackingIOError, not wrong data
        assert store.tiers[0].io_errors > 0
        sick.write_err = None
        await check(store, before)  # what was stored is intact ...
        await check(store, model)  # ... and so is everything written since that succeeded
        store.check_invariants()
    finally:
        await store.aclose()


async def test_read_eio_on_one_tier_is_eio_for_its_pages_only(two_tiers: TwoTiers, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    store = two_tiers()
    sick = SickFd(monkeypatch)
    rng = random.Random(3)
    model: dict[int, bytes] = {}
    dev = store.devices[0]
    try:
        await fill(store, rng, 0, 1024, model)
        assert all(t.stored_pages > 0 for t in store.tiers)
        for t in store.tiers:
            t._nowait = False
        sick.fd = store.tiers[0]._fd
        sick.read_err = errno.EIO
        failed = ok = 0
        for i, want in model.items():
            try:
                got = await store.read(dev, i * PAGE, PAGE)
            except BackingIOError:
                failed += 1
                continue
            assert got == want, f"page {i}: wrong bytes"
            ok += 1
        assert failed > 0 and ok > 0
        sick.read_err = None
        await check(store, model)  # the failure lost nothing
        store.check_invariants()
    finally:
        await store.aclose()


async def test_short_writes_under_the_store(two_tiers: TwoTiers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    store = two_tiers()
    sick = SickFd(monkeypatch)
    rng = random.Random(4)
    model: dict[int, bytes] = {}
    try:
        sick.fd = store.tiers[0]._fd
        sick.short_writes = True
        await fill(store, rng, 0, 512, model)
        assert len(model) == 512
        sick.short_writes = False
        await check(store, model)
    finally:
        await store.aclose()


async def test_every_tier_failing_is_an_error_never_wrong_bytes(two_tiers: TwoTiers, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    store = two_tiers()
    rng = random.Random(5)
    model: dict[int, bytes] = {}
    real = os.pwritev
    fds = {t._fd for t in store.tiers}

    def enospc(fd: int, bufs: Any, offset: int, *flags: int) -> int:
        if fd in fds:
            raise OSError(errno.ENOSPC, "injected")
        return real(fd, bufs, offset, *flags)

    try:
        await fill(store, rng, 0, 128, model)
        monkeypatch.setattr(file_mod.os, "pwritev", enospc)
        dev = store.devices[0]
        with pytest.raises(NoSpace):
            for i in range(128, 2048, 8):
                await store.write(dev, i * PAGE, rng.randbytes(8 * PAGE))
        monkeypatch.setattr(file_mod.os, "pwritev", real)
        await check(store, model)
        store.check_invariants()
    finally:
        await store.aclose()
