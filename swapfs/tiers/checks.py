"""Checks on file tiers, run by check-config and mount before anything is opened.

A backing file is written by a daemon running as root, so a path that points somewhere
surprising (a symlink, another user's file, a device node, the swapfs mount itself, the same
file as another tier) is refused with a message naming the tier and the problem
(:func:`check_tier_paths`).  Then what is at the path (:func:`check_tier_files`): a file another
live mount holds, a file holding data without a swapfs signature, a directory where no file
can be created, sizes the filesystem or the kernel cannot give.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Sequence
from typing import Protocol

from ..config import sized
from ..kernel import PAGE_SIZE as PAGE
from ..memory import reserve
from .file.claim import holder, judge, try_lock
from .file.errors import TierRefused
from .file.header import DATA_OFFSET
from .file.segments import SEGMENT_BYTES, reservation_bytes


class TierConfigError(ValueError):
    """A tier's backing path or size is unusable; the message names the tier and the problem."""


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives / relative vs absolute: not inside
        return False


def check_tier_paths(tiers: Sequence[tuple[str, str, int]], mountpoint: str | None,
                     uid: int | None = None) -> None:
    """Refuse unusable tier paths.  ``tiers`` holds ``(name, path, size_bytes)``.

    Refused: a size that is not a positive whole number of pages; a directory that does not
    exist (or is not a directory); a path that is a symlink; an existing path that is not a
    regular file; an existing file owned by a user other than ``uid`` (default: the effective
    uid); a path inside the swapfs mountpoint; two tiers with the same name or the same file
    (compared after resolving the directory, and by inode for existing files); an existing
    file with more than one link.

    These are early, friendly messages for check-config and mount: the daemon's own open
    (swapfs.tiers.file) checks the file it opened again, which is what keeps it ours.
    """
    if uid is None:
        uid = os.geteuid()
    mount_real = os.path.realpath(mountpoint) if mountpoint else None
    seen_paths: dict[str, str] = {}
    seen_inodes: dict[tuple[int, int], str] = {}
    seen_names: set[str] = set()
    linked: list[tuple[str, str, int]] = []
    for name, path, size in tiers:
        def fail(problem: str, name: str = name, path: str = path) -> TierConfigError:
            return TierConfigError(f'tier "{name}": {path}: {problem}')

        if name in seen_names:
            raise fail(f'a tier named "{name}" is already configured')
        seen_names.add(name)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PAGE:
            raise fail(f"size {size!r} is not a positive whole number of {PAGE}-byte pages")
        if not path or not isinstance(path, str):
            raise fail("empty path")
        absolute = os.path.abspath(path)
        directory, base = os.path.split(absolute)
        if not base:
            raise fail("path names a directory, not a file")
        if not os.path.exists(directory):
            raise fail(f"directory {directory} does not exist")
        if not os.path.isdir(directory):
            raise fail(f"{directory} is not a directory")
        real = os.path.join(os.path.realpath(directory), base)
        if mount_real is not None and _inside(real, mount_real):
            raise fail(f"inside the swapfs mountpoint {mountpoint}")
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise fail(f"cannot examine: {e.strerror}") from e
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise fail("is a symbolic link (refused)")
            if not stat.S_ISREG(st.st_mode):
                raise fail("exists and is not a regular file")
            if st.st_uid != uid:
                raise fail(f"owned by uid {st.st_uid}, not by uid {uid}")
            other = seen_inodes.get((st.st_dev, st.st_ino))
            if other is not None:
                raise fail(f'same file as tier "{other}"')
            seen_inodes[(st.st_dev, st.st_ino)] = name
        other = seen_paths.get(real)
        if other is not None:
            raise fail(f'same path as tier "{other}"')
        seen_paths[real] = name
        if st is not None and st.st_nlink != 1:
            linked.append((name, path, st.st_nlink))
    for name, path, nlink in linked:  # after the loop: two tiers on one file say so first
        raise TierConfigError(f'tier "{name}": {path}: has {nlink} links; a backing file must '
                              f"have exactly one")


class _TierLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def preallocate(self) -> bool: ...
    @property
    def force_init(self) -> bool: ...


def check_tier_files(tiers: Sequence[_TierLike]) -> list[str]:
    """What mount would find at each tier's path, checked without changing anything there
    (paths checked first by check_tier_paths).  Returns warnings; raises TierConfigError.

    Refused: an existing file that cannot be opened for writing (immutable or append-only,
    a read-only filesystem, permissions); an existing file held by a live mount (its lock is taken; the message names the
    mount from the file's header); an existing non-empty file without a swapfs signature
    unless ``force_init`` (the message says what it looks like); a missing file that cannot be
    created in its directory (read-only filesystem, ``chattr +i``, permissions: a probe file of
    that name is created and removed); a preallocated tier larger than the free space of its
    filesystem; metadata whose address-space reservation the kernel refuses.

    Warned: a sparse tier larger than the free space of its filesystem.  Sparse files are
    legitimate (space is taken as pages are written, and a tier whose filesystem fills counts
    as full and pages go on to the next tier), so it is not refused: the warning says how far
    the tier can really fill.
    """
    warnings: list[str] = []
    maps: list[mmap.mmap] = []
    try:
        for t in tiers:
            where = f'tier "{t.name}": {t.path}'
            reclaim = _check_file(t, where)
            _check_space(t, where, reclaim, warnings)
            meta = reservation_bytes(t.size, getattr(t, "segment_bytes", SEGMENT_BYTES))
            try:
                maps.append(reserve(meta))
            except OSError as e:
                raise TierConfigError(
                    f"{where}: size {sized(t.size)}: the kernel refuses to reserve "
                    f"{sized(meta)} of address space for its metadata ({e.strerror}); "
                    f"use a smaller tier") from e
    finally:
        for m in maps:
            m.close()
    return warnings


def _check_file(t: _TierLike, where: str) -> int:
    """Lock and signature of an existing file, creatability of a missing one; returns the
    bytes the existing file takes (given back when mount re-initialises it)."""
    # Opened for writing, as the daemon opens it (opening changes nothing): an immutable or
    # append-only file (chattr +i, +a) or a read-only filesystem is refused here, not by the
    # daemon after it started.
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(t.path, flags)
    except FileNotFoundError:
        _probe_create(t.path, where)
        return 0
    except OSError as e:
        raise TierConfigError(f"{where}: cannot open for writing: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TierConfigError(f"{where}: exists and is not a regular file")
        if not try_lock(fd, shared=True):
            raise TierConfigError(f"{where}: in use by {holder(fd)} (a tier file belongs to "
                                  f"one mount)")
        try:
            judge(fd, where, t.force_init, quiet=True)
        except TierRefused as e:
            raise TierConfigError(str(e)) from e
        return int(st.st_blocks) * 512
    finally:
        os.close(fd)  # and with it the shared lock


def _probe_create(path: str, where: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:  # appeared meanwhile: mount will judge it
        return
    except OSError as e:
        raise TierConfigError(f"{where}: cannot create the backing file in {directory}: "
                              f"{e.strerror}") from e
    os.close(fd)
    try:
        os.unlink(path)
    except OSError as e:
        raise TierConfigError(f"{where}: cannot remove a probe file from {directory}: "
                              f"{e.strerror}") from e


def _check_space(t: _TierLike, where: str, reclaim: int, warnings: list[str]) -> None:
    directory = os.path.dirname(os.path.abspath(t.path))
    try:
        vfs = os.statvfs(directory)
    except OSError:
        return
    free = vfs.f_bavail * vfs.f_frsize + reclaim
    need = DATA_OFFSET + t.size
    if need <= free:
        return
    if t.preallocate:
        raise TierConfigError(f"{where}: preallocating {sized(t.size)} needs more than the "
                              f"{sized(free)} free on its filesystem")
    warnings.append(f"{where}: {sized(t.size)} is more than the {sized(free)} free on its "
                    f"filesystem; the file is sparse, so the tier fills only until the "
                    f"filesystem does, then counts as full")
