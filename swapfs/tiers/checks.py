"""Checks on file tiers' backing paths, run before anything is opened.

A backing file is written by a daemon running as root, so a path that points somewhere
surprising (a symlink, another user's file, a device node, the swapfs mount itself, the same
file as another tier) is refused with a message naming the tier and the problem.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from ..kernel import PAGE_SIZE as PAGE


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
