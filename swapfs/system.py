"""What the machine says and does for swapfs: mounts, loop devices, swap.

One home for reading /proc/self/mountinfo (with its octal escapes undone),
/sys/block/loop*/loop/backing_file, /proc/swaps and the stats xattr, and
for the procedures that change the machine: attaching a direct-I/O loop
device over a device file, mkswap and swapon, swapoff, detaching, and
saying what keeps a mount busy.  The command line, the daemon and the test
and benchmark helpers (swapfs.testing) all go through here.  (libc is
swapfs.kernel's; swapfs/fuse keeps its own tiny mountinfo reader and libc
handle: the protocol layer imports nothing of swapfs.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .stats import STATS_XATTR

SWAPFS_FSTYPE = "fuse.swapfs"

T = TypeVar("T")

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


def wait_unmounted(path: str | os.PathLike[str], timeout: float) -> bool:
    """Wait until ``path`` is no longer a mount point; False if it still is
    after ``timeout`` seconds.  Waits on the mount table itself (poll(2) on
    /proc/self/mountinfo wakes at each change), not on a clock."""
    deadline = time.monotonic() + timeout
    with open("/proc/self/mountinfo", "rb") as f:
        poller = select.poll()
        poller.register(f, select.POLLPRI | select.POLLERR)
        while is_mounted(path):  # a change after the open wakes the next poll
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)
    return True


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not necessarily a child) has exited; False
    if it still runs after ``timeout`` seconds.  A pidfd becomes readable when
    the process exits: no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


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
    return bounded(lambda: os.getxattr(path, STATS_XATTR), timeout, path)


def bounded(call: Callable[[], T], timeout: float, path: str) -> T:
    """``call()`` (a system call on a swapfs mount), or TimeoutError if it has not returned
    within ``timeout`` seconds.

    A stopped or stuck daemon blocks such a call in the kernel until it answers; so it runs
    in a daemon thread that is left behind on a timeout: it ends when the daemon answers or
    dies, or with the process (a FUSE request waits killably).  Exceptions of ``call`` are
    raised here."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=run, name="swapfs-bounded-call", daemon=True)
    worker.start()
    worker.join(timeout)
    if error:
        raise error[0]
    if not result:
        raise TimeoutError(errno.ETIMEDOUT, f"no answer within {timeout:g} s", path)
    return result[0]


def mount_of(path: str | os.PathLike[str]) -> str | None:
    """The swapfs mount point holding ``path`` (the mount itself or a device
    file in it), or None."""
    p = os.path.abspath(os.fspath(path))
    for mp in swapfs_mounts():
        if p == mp or os.path.dirname(p) == mp:
            return mp
    return None


# -- procedures: loop devices and swap ---------------------------------------


class CommandFailed(RuntimeError):
    """A system command (losetup, mkswap, swapon, swapoff) or a check after it
    failed; the message names the command and what it said."""


def run(cmd: list[str], timeout: float | None = 120) -> str:
    """Run ``cmd``; its stdout, or CommandFailed with its stderr."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandFailed(f"{' '.join(cmd)} failed: {exc}") from None
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)} failed: {proc.stderr.strip() or f'status {proc.returncode}'}")
    return proc.stdout


def attach_loop(path: str | os.PathLike[str], *, direct_io: bool = True) -> str:
    """Attach a loop device over ``path`` (with direct I/O, checked: the
    kernel may silently fall back to buffered I/O, and swap through the page
    cache of a FUSE file deadlocks under pressure); returns /dev/loopN.  On
    any failure nothing stays attached and CommandFailed says why.  The
    queue is not tuned: see :func:`tune_loop_queue`."""
    cmd = ["losetup", "-f", "--show"]
    if direct_io:
        cmd.append("--direct-io=on")
    dev = run(cmd + [os.fspath(path)]).strip()
    if direct_io:
        problem = None
        try:
            with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
                if f.read().strip() != "1":
                    problem = f"the kernel did not enable direct I/O on {dev}"
        except OSError as exc:
            problem = f"cannot check direct I/O on {dev}: {exc.strerror}"
        if problem is not None:
            detach_loop(dev)
            raise CommandFailed(problem)
    return dev


def detach_loop(dev: str, *, attempts: int = 50) -> None:
    """losetup -d ``dev``, retried for a while (a device just swapped off or
    closed can stay busy briefly); CommandFailed if it never detaches."""
    for attempt in range(attempts):
        try:
            run(["losetup", "-d", dev])
            return
        except CommandFailed:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)


def swap_on(dev: str, *, priority: int | None = None, discard: str = "both",
            area_bytes: int | None = None) -> None:
    """mkswap and swapon ``dev``.  ``discard``: how freed swap slots reach
    the device: "both" (the whole area at swapon, then each freed cluster),
    "once", "pages" or "off".  ``area_bytes``: a swap area of that size at the
    device's start (None: the whole device); the kernel uses no slot past it."""
    run(["mkswap", dev] + ([] if area_bytes is None else [str(area_bytes // 1024)]))
    cmd = ["swapon"]
    if priority is not None:
        cmd += ["--priority", str(priority)]
    if discard != "off":
        cmd.append("--discard" if discard == "both" else f"--discard={discard}")
    run(cmd + [dev])


def swap_off(dev: str) -> None:
    """swapoff ``dev`` if swap is on there; it reads every page back in, so no timeout."""
    if dev in active_swaps():
        run(["swapoff", dev], timeout=None)


def swap_on_file(path: str, *, priority: int | None = None, discard: str = "both",
                 area_bytes: int | None = None) -> tuple[str, list[str]]:
    """The whole of ``swapfs swapon``: a direct-I/O loop device over the
    device file ``path``, its queue tuned, mkswap (``area_bytes``: see
    :func:`swap_on`), swapon.  Returns the loop
    device and what of the tuning could not be applied (swap works, slower).
    Refuses (CommandFailed) if a loop device already uses ``path``; on any
    failure nothing stays attached."""
    swaps = active_swaps()
    for lo in loops_backed_by(path):
        if lo.backing_file != path:
            continue
        if lo.device in swaps:
            raise CommandFailed(f"swap is already on over {path} ({lo.device}, priority "
                                f"{swaps[lo.device].priority})")
        raise CommandFailed(f"{path} is busy: loop device {lo.device} already uses it "
                            f"(losetup -d {lo.device} if nothing else does)")
    dev = attach_loop(path)
    try:
        problems = tune_loop_queue(dev)
        swap_on(dev, priority=priority, discard=discard, area_bytes=area_bytes)
    except BaseException:
        detach_loop(dev)
        raise
    return dev, problems


def busy_reason(mountpoint: str, *, loops_ok: bool = False) -> str | None:
    """What keeps the swapfs mount busy, said with what to run first; None if
    nothing known (no swap, no loop device over its files; with ``loops_ok``,
    loop devices without swap do not count: a lazy unmount may leave them)."""
    swaps = active_swaps()
    loops = loops_backed_by(mountpoint)
    on = [lo for lo in loops if lo.device in swaps]
    if on:
        devs = ", ".join(f"{lo.device} (over {lo.backing_file})" for lo in on)
        return f"swap is on {devs}; run swapfs swapoff {on[0].backing_file} first"
    if loops and not loops_ok:
        devs = " ".join(lo.device for lo in loops)
        return f"loop devices still use the mount: {devs}; run losetup -d {devs} first"
    return None
