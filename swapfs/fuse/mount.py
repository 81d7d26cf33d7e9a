"""Mounting and unmounting a FUSE filesystem.

As root the mount is made directly with mount(2) on a freshly opened
/dev/fuse; otherwise the setuid helper ``fusermount3`` mounts and hands the
/dev/fuse descriptor back over a socketpair (SCM_RIGHTS), the way libfuse
does.  Every check that can fail is made before anything is mounted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterable

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
FUSERMOUNT = "fusermount3"


class MountError(Exception):
    """The filesystem could not be mounted (or unmounted)."""


_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


def unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> set[str]:
    """Mount points of this process's mount namespace."""
    points = set()
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split(" ")
                if len(parts) > 4:
                    points.add(unescape_mountinfo(parts[4]))
    except OSError:
        pass
    return points


def is_mount_point(path: str | os.PathLike[str]) -> bool:
    path = os.path.realpath(path)
    if path in mount_points():
        return True
    try:
        st = os.stat(path)
        parent = os.stat(os.path.join(path, ".."))
    except OSError:
        return False
    return st.st_dev != parent.st_dev or st.st_ino == parent.st_ino


def _check_mountpoint(mountpoint: str) -> str:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point {mountpoint!r} does not exist") from None
    except OSError as e:
        raise MountError(f"mount point {mountpoint!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {mountpoint!r} is not a directory")
    path = os.path.realpath(mountpoint)
    if is_mount_point(path):
        raise MountError(f"{path!r} is already a mount point")
    return path


def _opt_list(allow_other: bool, default_permissions: bool, options: Iterable[str]) -> list[str]:
    opts = []
    if default_permissions:
        opts.append("default_permissions")
    if allow_other:
        opts.append("allow_other")
    for o in options:
        if "," in o:
            raise MountError(f"mount option {o!r} contains a comma")
        opts.append(o)
    return opts


def mount(
    mountpoint: str | os.PathLike[str],
    *,
    fsname: str = "swapfs",
    subtype: str = "swapfs",
    allow_other: bool = False,
    default_permissions: bool = True,
    options: Iterable[str] = (),
    use_fusermount: bool | None = None,
) -> int:
    """Mount a FUSE filesystem on ``mountpoint``; return the /dev/fuse fd (non-blocking).

    ``use_fusermount``: None picks mount(2) as root and fusermount3 otherwise.
    """
    mp = _check_mountpoint(os.fspath(mountpoint))
    opts = _opt_list(allow_other, default_permissions, options)
    if use_fusermount is None:
        use_fusermount = os.geteuid() != 0
    if use_fusermount:
        fd = _mount_fusermount(mp, fsname, subtype, opts)
    else:
        fd = _mount_syscall(mp, fsname, subtype, opts)
    os.set_blocking(fd, False)
    return fd


def _mount_syscall(mp: str, fsname: str, subtype: str, opts: list[str]) -> int:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open /dev/fuse: {e.strerror}") from None
    data = ",".join(
        [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}"] + opts
    )
    libc = _get_libc()
    rc = libc.mount(
        fsname.encode(),
        mp.encode(),
        ("fuse." + subtype).encode(),
        MS_NOSUID | MS_NODEV,
        data.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount({mp!r}, fuse.{subtype}, {data!r}) failed: {os.strerror(err)}")
    return fd


def _mount_fusermount(mp: str, fsname: str, subtype: str, opts: list[str]) -> int:
    helper = shutil.which(FUSERMOUNT)
    if helper is None:
        raise MountError(f"{FUSERMOUNT} not found (install fuse3)")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        optstr = ",".join(opts + [f"fsname={fsname}", f"subtype={subtype}"])
        proc = subprocess.run(
            [helper, "-o", optstr, "--", mp],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )
        theirs.close()
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip()
            raise MountError(f"{FUSERMOUNT} failed to mount {mp!r}: {msg or proc.returncode}")
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        if not fds:
            raise MountError(f"{FUSERMOUNT} did not pass back the /dev/fuse descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        theirs.close()
        ours.close()


def unmount(mountpoint: str | os.PathLike[str], lazy: bool = False, *, use_fusermount: bool | None = None) -> None:
    """Unmount; ``lazy`` detaches even if busy.  Raises MountError on failure."""
    mp = os.path.realpath(os.fspath(mountpoint))
    if use_fusermount is None:
        use_fusermount = os.geteuid() != 0
    if use_fusermount:
        cmd = [FUSERMOUNT, "-u"] + (["-z"] if lazy else []) + ["--", mp]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip()
            raise MountError(f"{FUSERMOUNT} -u {mp!r} failed: {msg}")
        return
    libc = _get_libc()
    if libc.umount2(mp.encode(), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        exc = MountError(f"umount {mp!r} failed: {os.strerror(err)}")
        exc.errno = err  # type: ignore[attr-defined]
        raise exc


def unmount_quietly(mountpoint: str | os.PathLike[str], *, use_fusermount: bool | None = None) -> bool:
    """Unmount if mounted, lazily if busy.  Never raises; True if it unmounted."""
    try:
        if not is_mount_point(mountpoint):
            return False
    except OSError:
        pass
    try:
        unmount(mountpoint, use_fusermount=use_fusermount)
        return True
    except MountError:
        pass
    try:
        unmount(mountpoint, lazy=True, use_fusermount=use_fusermount)
        return True
    except MountError:
        return False


__all__ = ["MountError", "mount", "unmount", "unmount_quietly", "is_mount_point", "mount_points"]
