"""The file tier at rest: backing files that are ours alone, encryption, emptied at close,
and injected faults (EIO, ENOSPC, short reads and writes, flipped bytes) never giving wrong
bytes."""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swapfs.kernel import PAGE_SIZE as PAGE
from swapfs.tiers import file as file_mod
from swapfs.tiers.file import (
    CLUSTER_PAGES,
    DATA_OFFSET,
    RAW,
    ChecksumError,
    FileTier,
    TierFull,
    TierIOError,
)

CLUSTER_BYTES = CLUSTER_PAGES * PAGE
# A page nobody would write by chance: a marker repeated, so a search finds any copy of it.
MARK = b"swapfs-plaintext-marker-0123456789abcdef"


def marked_page(i: int) -> bytes:
    head = MARK + i.to_bytes(4, "little")
    return (head * (PAGE // len(head) + 1))[:PAGE]


def tier_at(path: Path, *, encrypt: bool = True, size: int = 2 * CLUSTER_BYTES) -> FileTier:
    return FileTier("ssd", str(path), size, 100, encrypt=encrypt)


# -------------------------------------------------------------- backing files that are ours alone


def test_existing_0644_file_becomes_0600(tmp_path: Path) -> None:
    p = tmp_path / "t.img"
    p.write_bytes(b"")  # an empty file is ours to use (one with data but no signature is not)
    os.chmod(p, 0o644)
    t = tier_at(p)
    t.open()
    try:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    finally:
        t.close()


def test_created_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        t = tier_at(tmp_path / "t.img")
        t.open()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(t.path).st_mode) == 0o600
    finally:
        t.close()


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link", "fifo", "directory",
                                  "other uid"])
def test_refused_backing_files(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "t.img"
    target = tmp_path / "target.img"
    if kind == "symlink":
        target.write_bytes(b"")
        p.symlink_to(target)
        message = "symbolic link"
    elif kind == "dangling symlink":  # O_CREAT would follow it and create the target
        p.symlink_to(target)
        message = "symbolic link"
    elif kind == "hard link":
        target.write_bytes(b"")
        os.link(target, p)
        message = "2 links"
    elif kind == "fifo":
        os.mkfifo(p, 0o600)
        message = "not a regular file"
    elif kind == "directory":
        p.mkdir()
        message = "not a regular file"
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another user")
        p.write_bytes(b"")
        os.chmod(p, 0o666)
        os.chown(p, 12345, 12345)
        message = "owned by uid 12345"
    before = os.lstat(p)
    t = tier_at(p)
    with pytest.raises(OSError, match=message) as ei:
        t.open()
    assert "'ssd'" in str(ei.value) and str(p) in str(ei.value)
    assert t._fd < 0
    # nothing was changed: not chmod'ed, not sized, not removed, and no target created
    after = os.lstat(p)
    assert (after.st_mode, after.st_size, after.st_ino) == (before.st_mode, before.st_size,
                                                            before.st_ino)
    if kind == "dangling symlink":
        assert not target.exists()
    if kind == "hard link":
        assert os.stat(target).st_size == 0


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    t = tier_at(tmp_path / "nope" / "t.img")
    with pytest.raises(OSError, match="'ssd'.*cannot open backing file"):
        t.open()


# -------------------------------------------------------------- encryption at rest


# The pages below are raw objects of slots 0, 1, ... (in the order written); HANDLES says
# where each landed, per tier.
HANDLES: dict[int, list[int]] = {}


async def write_pages(t: FileTier, pages: list[bytes]) -> list[int]:
    handles = HANDLES.setdefault(id(t), [])
    first = len(handles)
    hs = t.allocate([PAGE] * len(pages))
    assert len(hs) == len(pages)
    await t.write(hs, [(first + i, RAW, p) for i, p in enumerate(pages)])
    handles += hs
    return hs


async def read_pages(t: FileTier, which: list[int]) -> list[bytes]:
    hs = HANDLES[id(t)]
    return [p for _c, p in await t.read_objects([(hs[i], PAGE, i) for i in which])]


async def _write_marked(t: FileTier, n: int) -> list[bytes]:
    HANDLES.pop(id(t), None)
    pages = [marked_page(i) for i in range(n)]
    await write_pages(t, pages)
    return pages


@pytest.mark.parametrize("encrypt", [True, False])
async def test_backing_file_holds_plaintext_only_when_not_encrypted(tmp_path: Path,
                                                                    encrypt: bool) -> None:
    t = tier_at(tmp_path / "t.img", encrypt=encrypt)
    t.open()
    try:
        pages = await _write_marked(t, 300)  # across several segments
        raw = read_all(t.path)
        assert (MARK in raw) is (not encrypt)
        assert (marked_page(5) in raw) is (not encrypt)
        assert await read_pages(t, list(range(300))) == pages
        assert [(await read_pages(t, [p]))[0] for p in (0, 255, 256, 299)] == \
            [pages[p] for p in (0, 255, 256, 299)]
        assert t.read_now(HANDLES[id(t)][17], PAGE, 17) == (RAW, pages[17])
        if encrypt:
            # the place (and generation) is the nonce: equal pages encrypt differently
            same = [b"\x42" * 8 + bytes(PAGE - 8)] * 2
            a, b = await write_pages(t, same)
            assert raw_page(t, a)[16:] != raw_page(t, b)[16:]
            assert await read_pages(t, [300, 301]) == same
    finally:
        t.close()


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def raw_page(t: FileTier, handle: int) -> bytes:
    """The bytes of the raw page's object at ``handle``, as on disk."""
    with open(t.path, "rb") as f:
        f.seek(DATA_OFFSET + handle)
        return f.read(t.object_bytes(PAGE))


async def test_each_open_has_its_own_key(tmp_path: Path) -> None:
    raws = []
    for _ in range(2):
        t = tier_at(tmp_path / "t.img")
        t.open()
        try:
            await _write_marked(t, 1)
            raws.append(raw_page(t, HANDLES[id(t)][0]))
        finally:
            t.close()
    assert raws[0] != raws[1]


@pytest.mark.parametrize("encrypt", [True, False])
@pytest.mark.parametrize("where", [0, 15, 16, 2000, PAGE - 1, PAGE + 16, PAGE + 23])
async def test_flipped_byte_on_disk_is_a_checksum_error_never_wrong_bytes(
        tmp_path: Path, encrypt: bool, where: int) -> None:
    t = tier_at(tmp_path / "t.img", encrypt=encrypt)
    t.open()
    try:
        pages = await _write_marked(t, 8)
        h3 = HANDLES[id(t)][3]
        fd = os.open(t.path, os.O_RDWR)
        try:
            off = DATA_OFFSET + h3 + where  # header, page or tag: every byte counts
            b = os.pread(fd, 1, off)
            os.pwrite(fd, bytes([b[0] ^ 0x01]), off)
        finally:
            os.close(fd)
        with pytest.raises(ChecksumError) as ei:
            await read_pages(t, [3])
        assert ei.value.page == h3
        with pytest.raises(ChecksumError):
            await read_pages(t, list(range(8)))
        assert await read_pages(t, [0, 1, 2, 4, 5, 6, 7]) == [pages[i] for i in (0, 1, 2, 4, 5, 6, 7)]
    finally:
        t.close()


# -------------------------------------------------------------- nothing left at rest


@pytest.mark.parametrize("encrypt", [True, False])
async def test_close_empties_the_backing_file(tmp_path: Path, encrypt: bool) -> None:
    t = tier_at(tmp_path / "t.img", encrypt=encrypt)
    t.open()
    await _write_marked(t, 300)
    assert os.stat(t.path).st_blocks > 0
    t.close()
    st = os.stat(t.path)
    assert st.st_size == 0 and st.st_blocks == 0
    # and it is reused at the next open, as ours
    t2 = tier_at(tmp_path / "t.img", encrypt=encrypt)
    t2.open()
    try:
        assert os.stat(t2.path).st_size == DATA_OFFSET + 2 * CLUSTER_BYTES
        pages = await _write_marked(t2, 3)
        assert await read_pages(t2, [0, 1, 2]) == pages
    finally:
        t2.close()


# -------------------------------------------------------------- injected faults


class _Faults:
    """Replaces os.pwritev / os.preadv as seen by the tier's worker threads and inline reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real_pwritev = os.pwritev
        self.real_preadv = os.preadv
        self.write: Callable[..., int] | None = None
        self.read: Callable[..., int] | None = None
        monkeypatch.setattr(file_mod.os, "pwritev", self._pwritev)
        monkeypatch.setattr(file_mod.os, "preadv", self._preadv)

    def _pwritev(self, fd: int, bufs: Any, offset: int, *flags: int) -> int:
        if self.write is not None:
            return self.write(fd, bufs, offset, *flags)
        return self.real_pwritev(fd, bufs, offset, *flags)

    def _preadv(self, fd: int, bufs: Any, offset: int, *flags: int) -> int:
        if self.read is not None:
            return self.read(fd, bufs, offset, *flags)
        return self.real_preadv(fd, bufs, offset, *flags)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> _Faults:
    return _Faults(monkeypatch)


def _raise(err: int) -> Callable[..., int]:
    def f(*args: Any) -> int:
        raise OSError(err, os.strerror(err))
    return f


@pytest.mark.parametrize("encrypt", [True, False])
async def test_short_writes_are_completed(tmp_path: Path, faults: _Faults, encrypt: bool) -> None:
    t = tier_at(tmp_path / "t.img", encrypt=encrypt)
    t.open()
    rng = random.Random(1)

    def short(fd: int, bufs: Any, offset: int, *flags: int) -> int:
        # write at most a random, unaligned part of the first buffer
        first = memoryview(bufs[0])
        k = rng.randint(1, first.nbytes)
        return faults.real_pwritev(fd, [first[:k]], offset)

    faults.write = short
    try:
        pages = [rng.randbytes(PAGE) for _ in range(40)]
        HANDLES.pop(id(t), None)
        await write_pages(t, pages)
        faults.write = None
        assert await read_pages(t, list(range(40))) == pages
        assert t.writes > 40  # it really did continue short writes
    finally:
        t.close()


@pytest.mark.parametrize("encrypt", [True, False])
async def test_short_reads_are_continued_or_eio(tmp_path: Path, faults: _Faults,
                                                 encrypt: bool) -> None:
    t = tier_at(tmp_path / "t.img", encrypt=encrypt)
    t.open()
    try:
        pages = await _write_marked(t, 16)
        t._nowait = False  # through the worker thread, which continues short reads

        def short(fd: int, bufs: Any, offset: int, *flags: int) -> int:
            mv = memoryview(bufs[0])
            return faults.real_preadv(fd, [mv[:min(mv.nbytes, 1000)]], offset, *flags)

        faults.read = short
        assert await read_pages(t, list(range(16))) == pages
        faults.read = lambda *a: 0  # the file "ends early"
        with pytest.raises(TierIOError) as ei:
            await read_pages(t, [1, 2])
        assert ei.value.errno == errno.EIO
        faults.read = None
        assert await read_pages(t, list(range(16))) == pages
    finally:
        t.close()


@pytest.mark.parametrize("nowait", [True, False])
async def test_read_eio_is_an_io_error_never_bytes(tmp_path: Path, faults: _Faults,
                                                    nowait: bool) -> None:
    t = tier_at(tmp_path / "t.img")
    t.open()
    try:
        pages = await _write_marked(t, 4)
        t._nowait = nowait
        faults.read = _raise(errno.EIO)
        with pytest.raises(TierIOError) as ei:
            await read_pages(t, [0, 1, 2, 3])
        assert ei.value.errno == errno.EIO
        assert t.io_errors == 1 and t.stored_pages == 4
        faults.read = None
        assert await read_pages(t, [0, 1, 2, 3]) == pages
        t.check_invariants()
    finally:
        t.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
async def test_write_failure_frees_the_pages_and_keeps_the_others(tmp_path: Path, faults: _Faults,
                                                                   err: int) -> None:
    t = tier_at(tmp_path / "t.img")
    t.open()
    try:
        kept = await _write_marked(t, 10)
        faults.write = _raise(err)
        hs = t.allocate([PAGE] * 5)
        with pytest.raises(TierFull if err != errno.EIO else TierIOError):
            await t.write(hs, [(10 + i, RAW, bytes(PAGE)) for i in range(5)])
        assert t.stored_pages == 10
        assert t.full is (err != errno.EIO)
        faults.write = None
        assert await read_pages(t, list(range(10))) == kept
        t.check_invariants()
        if err != errno.EIO:  # a free clears the full condition
            t.free(HANDLES[id(t)][9], PAGE)
            assert not t.full
    finally:
        t.close()
