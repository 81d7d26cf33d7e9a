"""What the machine says about FUSE over io_uring, and the way out of a connection.

The sysfs and procfs checks made before mounting (:func:`unavailable_reason`),
the fuse module's ``enable_uring`` parameter, the FUSE connection number of a
mount (fusectl) and :func:`abort_connection`, the one way to end a connection
whose requests wait for a ring.
"""

from __future__ import annotations

import logging
import os
import platform

from ..mount import MountError, unescape_mountinfo

log = logging.getLogger("swapfs.fuse")

ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"
IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"
POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"
FUSECTL = "/sys/fs/fuse/connections"


class TransportUnavailable(MountError):
    """The io_uring transport cannot be used (the reason is the message)."""


class RegistrationFailed(MountError):
    """Registering the ring entries failed after INIT; the connection was aborted."""


# -- what the machine says ----------------------------------------------------------

def enable_uring() -> str | None:
    """The fuse module's ``enable_uring`` parameter ("Y"/"N"), None if the kernel has none."""
    try:
        with open(ENABLE_URING) as f:
            return f.read().strip()
    except OSError:
        return None


def set_enable_uring(value: str) -> None:
    """Set the fuse module's ``enable_uring`` parameter (root)."""
    with open(ENABLE_URING, "w") as f:
        f.write(value)


def possible_cpus() -> int | None:
    """The number of possible CPUs (the kernel's queue count), None unless they are 0..n-1."""
    try:
        with open(POSSIBLE_CPUS) as f:
            text = f.read().strip()
    except OSError:
        return None
    expect = 0
    for part in text.split(","):
        lo_s, _, hi_s = part.partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s or lo_s)
        except ValueError:
            return None
        if lo != expect or hi < lo:
            return None
        expect = hi + 1
    return expect or None


def unavailable_reason() -> str | None:
    """Why the io_uring transport cannot be used on this machine, or None.

    Only what can be known before mounting; INIT checks what the kernel offers."""
    if platform.machine() != "x86_64":
        return f"the io_uring transport is implemented for x86_64 only, not {platform.machine()}"
    state = enable_uring()
    if state is None:
        return f"{ENABLE_URING} does not exist (kernel without FUSE over io_uring)"
    if state != "Y":
        return f"{ENABLE_URING} is {state}"
    try:
        with open(IO_URING_DISABLED) as f:
            disabled = f.read().strip()
    except OSError:
        disabled = "0"
    if disabled == "2" or (disabled == "1" and os.geteuid() != 0):
        return f"io_uring is disabled ({IO_URING_DISABLED} is {disabled})"
    if possible_cpus() is None:
        return f"cannot count the possible CPUs from {POSSIBLE_CPUS}"
    if not os.path.ismount(FUSECTL):
        return (f"fusectl is not mounted at {FUSECTL} (mount -t fusectl fusectl {FUSECTL}): "
                "the transport needs it to abort a connection")
    return None


def resolve(mountpoint: str | os.PathLike[str]) -> str:
    """The mount point's real path (taken before mounting: afterwards a stat waits for INIT)."""
    return os.path.realpath(mountpoint)


def connection_id(path: str) -> int | None:
    """The FUSE connection number (fusectl) of the mount at ``path`` (already resolved: a
    stat, even realpath's, of a mount that has not answered INIT waits for it): the minor
    of its st_dev, read from /proc/self/mountinfo."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split(" ")
                if len(parts) > 4 and unescape_mountinfo(parts[4]) == path:
                    found = int(parts[2].split(":")[1])  # the last mount on top wins
    except (OSError, ValueError, IndexError):
        return None
    return found


def abort_connection(conn_id: int | None, *, quiet: bool = False) -> bool:
    """Abort FUSE connection ``conn_id`` through fusectl; True if it was written
    (``quiet``: a connection already gone is not an error)."""
    if conn_id is None:
        return False
    try:
        with open(f"{FUSECTL}/{conn_id}/abort", "w") as f:
            f.write("1")
        return True
    except FileNotFoundError:
        if not quiet:
            log.error("cannot abort FUSE connection %d: %s/%d does not exist", conn_id, FUSECTL, conn_id)
        return False
    except OSError as exc:
        log.error("cannot abort FUSE connection %d: %s", conn_id, exc)
        return False
