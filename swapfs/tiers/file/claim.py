"""Opening a backing file safely and claiming it for one mount.

``open_own_file``: the daemon's own open is the check, with no window between a check and the
open (O_NOFOLLOW; O_CREAT|O_EXCL when absent; then the descriptor must be a regular file owned
by our effective uid with a single link).

``claim``: an exclusive ``flock`` on the open descriptor, held for the mount's life.  A flock
belongs to the open file description, not to the process: it travels with the descriptor when
it is passed to another process (SCM_RIGHTS) and is released only when the last descriptor of
it is closed, so a killed daemon releases it and a successor handed the descriptor keeps it.
Then the content is judged:

* empty (just created, or emptied by a clean unmount): ours to initialise;
* starts with our signature: a tier file of a mount that is gone (the lock was free); the old
  pages are unreadable anyway (the key was per mount), so it is re-initialised;
* anything else: refused, naming what it looks like and its size, and left as it was (content
  and mode), unless the configuration says ``force_init = true``.

A file whose lock is held belongs to a live mount: refused, naming that mount from its header.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat

from .errors import TierRefused
from .header import read_header, recognise

log = logging.getLogger(__name__)


def open_own_file(path: str, where: str) -> tuple[int, bool]:
    """Open ``path`` read-write as a backing file that is ours alone: ``(fd, created)``.

    Created with O_CREAT|O_EXCL (mode 0600) when absent; an existing one is opened without
    O_CREAT.  Never follows a symlink (O_NOFOLLOW), never blocks on a FIFO nor takes a terminal
    (O_NONBLOCK|O_NOCTTY, cleared after the checks).  The descriptor itself is then checked:
    a regular file, owned by our effective uid, one link.  Nothing about the file is changed
    here (``claim`` makes it mode 0600 once it is judged ours).
    """
    base = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    fd = -1
    created = False
    for _ in range(8):  # a file that appears or vanishes between the two opens: try again
        try:
            fd = os.open(path, base | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
            break
        except FileExistsError:
            pass
        except OSError as e:
            raise _open_error(e, where) from e
        try:
            fd = os.open(path, base)
            break
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _open_error(e, where) from e
    else:
        raise OSError(errno.EAGAIN, f"{where}: cannot open backing file: it keeps appearing "
                                    f"and vanishing")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{where}: not a regular file (refused)")
        uid = os.geteuid()
        if st.st_uid != uid:
            raise OSError(errno.EPERM, f"{where}: owned by uid {st.st_uid}, not by uid {uid} "
                                       f"(refused)")
        if st.st_nlink != 1:
            raise OSError(errno.EMLINK, f"{where}: has {st.st_nlink} links; a backing file "
                                        f"must have exactly one (refused)")
        os.set_blocking(fd, True)
    except BaseException as e:
        _abandon(fd, path, created)
        if isinstance(e, OSError) and not str(e).startswith(where):
            raise OSError(e.errno, f"{where}: cannot open backing file: {e.strerror}") from e
        raise
    return fd, created


def _abandon(fd: int, path: str, created: bool) -> None:
    os.close(fd)
    if created:
        try:
            os.unlink(path)
        except OSError:
            pass


def _open_error(e: OSError, where: str) -> OSError:
    if e.errno == errno.ELOOP:
        return OSError(e.errno, f"{where}: is a symbolic link (refused)")
    if e.errno == errno.EISDIR:
        return OSError(e.errno, f"{where}: not a regular file (refused)")
    return OSError(e.errno, f"{where}: cannot open backing file: {e.strerror}")


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take the tier lock on ``fd`` (exclusive, or shared to test it); False if another open
    file description holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def holder(fd: int) -> str:
    """Who holds the lock on the file open at ``fd``, for a refusal message."""
    _, header = read_header(fd)
    if header is None:
        return "another process (the file has no whole swapfs header yet)"
    said = header.describe()
    cmdline = _cmdline(header.pid)
    if cmdline is None:
        return said + "; that pid is gone: the lock is held by another process that has the file open"
    if not header.mountpoint:  # the daemon did not say where it is mounted: its command line does
        said += f": {cmdline}"
    return said


def _cmdline(pid: int) -> str | None:
    """The command line of a live process (``?`` if unreadable), None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    if not raw:  # a zombie, or a kernel thread: not the holder
        return None
    text = " ".join(raw.rstrip(b"\0").decode("utf-8", "replace").split())  # one line
    return text if len(text) <= 200 else text[:199] + "…"


def judge(fd: int, where: str, force_init: bool, *, quiet: bool = False) -> str:
    """What the existing file at ``fd`` is, or TierRefused if it is not ours to overwrite.
    Returns ``"empty"``, ``"ours"`` or ``"forced"``; logs what will be overwritten unless
    ``quiet`` (a check that overwrites nothing)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return "empty"
    signed, header = read_header(fd)
    if signed:
        was = header.describe() if header is not None else "a swapfs mount (header damaged)"
        if not quiet:
            log.info("%s: reusing the tier file of %s, which is gone", where, was)
        return "ours"
    found = recognise(fd)
    if force_init:
        if not quiet:
            log.warning("%s: overwriting %d bytes (%s): force_init is set", where, size, found)
        return "forced"
    raise TierRefused(errno.EEXIST, f"{where}: exists and holds {size} bytes without a swapfs "
                                    f"signature ({found}); refused, left as it was (set "
                                    f"force_init = true in its [[tier]] to overwrite it)")


def claim(path: str, where: str, *, force_init: bool = False) -> tuple[int, bool]:
    """Open ``path`` (see open_own_file), lock it and judge its content: ``(fd, created)``,
    the file now mode 0600 and locked for as long as ``fd`` (or a copy of it) is open.

    Raises OSError (the open's refusals) or TierRefused (held by a live mount: EBUSY;
    foreign content: EEXIST).  On any refusal the file is left as it was.
    """
    fd, created = open_own_file(path, where)
    if not try_lock(fd):
        # Never unlink here, even a file this open created: the mount that holds the lock
        # may have opened it in between.
        who = holder(fd)
        os.close(fd)
        raise TierRefused(errno.EBUSY, f"{where}: in use by {who} (refused: a tier file "
                                       f"belongs to one mount)")
    try:
        if not created:
            judge(fd, where, force_init)
        os.fchmod(fd, 0o600)
    except BaseException:
        _abandon(fd, path, created)
        raise
    return fd, created
