"""What the machine says about swapfs: mounts, loop devices, active swaps, stats.

One home for reading /proc/self/mountinfo (with its octal escapes undone),
/sys/block/loop*/loop/backing_file, /proc/swaps and the stats xattr, shared
by the command line, the test and benchmark harness and the tests.  Read-only:
nothing here changes the machine.  (swapfs/fuse keeps its own mountinfo
reader: the protocol layer knows nothing of swapfs.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

STATS_XATTR = "user.swapfs.stats"
SWAPFS_FSTYPE = "fuse.swapfs"

_OCTAL_RE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    r"""A mountinfo or /proc/swaps field as the path it names: the kernel writes
    space, tab, newline and backslash as ``\ooo`` (octal)."""
    return _OCTAL_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def parse_mountinfo(text: str) -> list[MountInfo]:
    """The mounts described by mountinfo text (proc(5)): ``ID PARENT MAJ:MIN ROOT
    MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS``."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mounts.append(MountInfo(
                mount_id=int(fields[0]), mountpoint=unescape(fields[4]), fstype=fields[sep + 1],
                source=unescape(fields[sep + 2]), options=fields[5]))
        except (ValueError, IndexError):
            continue  # not a mountinfo line
    return mounts


def mounts() -> list[MountInfo]:
    """Every mount of this process's mount namespace."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())
    except OSError:
        return []


def swapfs_mounts() -> list[str]:
    """Mount points of the swapfs filesystems mounted here (dead ones included)."""
    return [m.mountpoint for m in mounts()
            if m.fstype == SWAPFS_FSTYPE or (m.fstype.startswith("fuse") and m.source == "swapfs")]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (taken as absolute, not resolved: a dead FUSE mount
    cannot be stat'ed) is a mount point."""
    p = os.path.abspath(os.fspath(path))
    return any(m.mountpoint == p for m in mounts())


@dataclass(frozen=True)
class Loop:
    device: str  # /dev/loopN
    backing_file: str
    direct_io: bool


def loop_devices() -> list[Loop]:
    """Every attached loop device with its backing file."""
    found: list[Loop] = []
    try:
        names = sorted(os.listdir("/sys/block"), key=lambda n: (len(n), n))
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        base = f"/sys/block/{name}/loop"
        try:
            with open(f"{base}/backing_file", encoding="utf-8", errors="surrogateescape") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue  # not attached
        try:
            with open(f"{base}/dio") as f:
                dio = f.read().strip() == "1"
        except OSError:
            dio = False
        found.append(Loop(device=f"/dev/{name}", backing_file=backing, direct_io=dio))
    return found


# The loop device's request queue as swap through swapfs wants it (measured
# in docs/latency.md): rq_affinity 2 completes a request on the CPU that
# submitted it, where the task waiting for it sleeps -- the daemon answering
# pays an interrupt to that CPU (none while that CPU polls, see
# swapfs/wakeup.py), and the waiter wakes where it is instead of being
# pulled onto the daemon's CPU.
LOOP_QUEUE_TUNING = (("rq_affinity", "2"),)


def tune_loop_queue(device: str) -> list[str]:
    """Apply LOOP_QUEUE_TUNING to the queue of ``device`` (/dev/loopN);
    returns what could not be set (the device works either way)."""
    problems = []
    queue = f"/sys/block/{os.path.basename(device)}/queue"
    for key, value in LOOP_QUEUE_TUNING:
        try:
            with open(f"{queue}/{key}", "w") as f:
                f.write(value)
        except OSError as exc:
            problems.append(f"{queue}/{key} = {value}: {exc.strerror}")
    return problems


def loops_backed_by(path: str | os.PathLike[str]) -> list[Loop]:
    """Loop devices whose backing file is ``path`` or lies under the directory ``path``."""
    p = os.path.abspath(os.fspath(path))
    prefix = p.rstrip("/") + "/"
    return [lo for lo in loop_devices() if lo.backing_file == p or lo.backing_file.startswith(prefix)]


@dataclass(frozen=True)
class Swap:
    """One line of /proc/swaps."""

    device: str
    kind: str  # partition | file
    size_kib: int
    used_kib: int
    priority: int


def parse_swaps(text: str) -> dict[str, Swap]:
    out = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5:
            continue
        try:
            s = Swap(device=unescape(fields[0]), kind=fields[1], size_kib=int(fields[2]),
                     used_kib=int(fields[3]), priority=int(fields[4]))
        except ValueError:
            continue
        out[s.device] = s
    return out


def active_swaps() -> dict[str, Swap]:
    """{device: Swap} of the swap areas in use (/proc/swaps)."""
    try:
        with open("/proc/swaps", encoding="utf-8", errors="surrogateescape") as f:
            return parse_swaps(f.read())
    except OSError:
        return {}


def read_stats(path: str | os.PathLike[str], *, timeout: float | None = None) -> dict[str, Any]:
    """The stats object of a swapfs mount (its root) or of one device file.

    Raises OSError (ENODATA or ENOTSUP: not swapfs; ENOTCONN: the daemon is
    gone; with ``timeout``, TimeoutError when a daemon that is still there does
    not answer within it) or ValueError (malformed JSON)."""
    raw = _getxattr(os.fspath(path), timeout)
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError(f"{STATS_XATTR} of {os.fspath(path)} is not a JSON object")
    return obj


def _getxattr(path: str, timeout: float | None) -> bytes:
    if timeout is None:
        return os.getxattr(path, STATS_XATTR)
    # A stopped or stuck daemon blocks the call until it answers: wait in a
    # thread that may be left behind (it ends when the daemon answers or dies).
    result: list[bytes | OSError] = []

    def get() -> None:
        try:
            result.append(os.getxattr(path, STATS_XATTR))
        except OSError as exc:
            result.append(exc)

    worker = threading.Thread(target=get, daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise TimeoutError(errno.ETIMEDOUT, f"no answer within {timeout:g} s", path)
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def mount_of(path: str | os.PathLike[str]) -> str | None:
    """The swapfs mount point holding ``path`` (the mount itself or a device
    file in it), or None."""
    p = os.path.abspath(os.fspath(path))
    for mp in swapfs_mounts():
        if p == mp or os.path.dirname(p) == mp:
            return mp
    return None
