"""The daemon's log: where it goes, how it looks, and how much of it there is.

Under systemd stderr is the journal: lines carry sd-daemon priorities
(``<3>``) and journald adds the time.  A background daemon logs to a file
(/run/swapfs/log as root: tmpfs, so RAM) that rotates at LOG_MAX_BYTES with
LOG_BACKUPS old files; mounting removes the logs of mounts that no longer
exist.  Either way a :class:`RepeatLimiter` on the handler bounds what a
storm of one message costs: beyond REPEAT_BURST records of the same logger
and format string in a REPEAT_WINDOW, records are only counted, and one
line says how many when the window closes ("4,488 more in the last 10 s
like: ...").  So the store and the tiers log with constant %-format strings
and log freely: the limit is here, not at each call site.

A failure the daemon cannot handle is logged as one line (what, where, why:
:func:`one_line`), with the traceback only at log level debug.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import logging.handlers
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

ROOT_LOG_DIR = "/run/swapfs/log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The file log: at most (1 + LOG_BACKUPS) * LOG_MAX_BYTES on disk (tmpfs as root).
LOG_MAX_BYTES = 1 << 20
LOG_BACKUPS = 3
# A log of no live mount is removed at mount once it is this old (seconds):
# younger, its daemon may be starting.
STALE_LOG_MIN_AGE = 60.0
# Per logger and format string: REPEAT_BURST records per REPEAT_WINDOW
# seconds, then a count.
REPEAT_WINDOW = 10.0
REPEAT_BURST = 5
# Distinct messages followed at once; beyond, new ones pass unlimited.
REPEAT_GROUPS = 1024

# syslog priorities (sd-daemon(3) prefixes) of Python's levels
_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                     logging.CRITICAL: 2}


class Formatter(logging.Formatter):
    """Log lines whose exceptions (``log.exception``, ``exc_info``) are one
    more clause of the line, what, where and why (:func:`one_line`), unless
    ``tracebacks`` (log level debug) asks for the whole traceback."""

    def __init__(self, fmt: str, *, tracebacks: bool = False) -> None:
        super().__init__(fmt)
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks or not record.exc_info or record.exc_info[1] is None:
            return super().format(record)
        exc = record.exc_info[1]
        brief = logging.makeLogRecord(record.__dict__)
        brief.exc_info = brief.exc_text = None
        brief.msg, brief.args = "%s: %s", (record.getMessage(), one_line(exc))
        return super().format(brief)


class JournalFormatter(Formatter):
    """``<N>message``: journald reads N as the line's priority; it adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _JOURNAL_PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {super().format(record)}"
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald (JOURNAL_STREAM=dev:ino matches it)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


# -- repeats -------------------------------------------------------------------


@dataclass
class _Group:
    start: float  # when the window opened
    passed: int = 0
    suppressed: int = 0
    last: logging.LogRecord | None = None  # the last suppressed record


class RepeatLimiter(logging.Filter):
    """A filter on ``handler`` that lets through ``burst`` records per logger
    and format string (``record.msg``) per ``window`` seconds, counts the rest,
    and when the window closes hands the handler one summary record at the
    level of the last suppressed one: "N more in the last W s like: MESSAGE".

    A window closes at the next record of any kind after its end, at the
    timer the limiter sets for it (a daemon thread: a storm followed by
    silence is summarised within a window), or at :meth:`flush`.
    """

    def __init__(self, handler: logging.Handler, *, window: float = REPEAT_WINDOW,
                 burst: int = REPEAT_BURST, clock: Callable[[], float] = time.monotonic,
                 timer: bool = True) -> None:
        super().__init__()
        self.handler = handler
        self.window = window
        self.burst = burst
        self.clock = clock
        self.timer = timer
        self._lock = threading.Lock()
        self._groups: dict[tuple[str, str], _Group] = {}
        self._timer: threading.Timer | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "swapfs_summary", False):
            return True
        now = self.clock()
        key = (record.name, str(record.msg))
        with self._lock:
            due = self._close(now, force=False)
            group = self._groups.get(key)
            if group is None:
                if len(self._groups) >= REPEAT_GROUPS:
                    allow = True
                else:
                    group = self._groups[key] = _Group(start=now)
            if group is not None:
                group.passed += 1
                allow = group.passed <= self.burst
                if not allow:
                    group.suppressed += 1
                    group.last = record
                    self._arm(group.start + self.window - now)
        self._emit(due)
        return allow

    def flush(self, *, force: bool = True) -> None:
        """Summarise what was suppressed: every group (``force``) or those
        whose window has closed."""
        with self._lock:
            due = self._close(self.clock(), force=force)
            if force and self._timer is not None:  # nothing left to summarise
                self._timer.cancel()
                self._timer = None
        self._emit(due)

    def _close(self, now: float, *, force: bool) -> list[logging.LogRecord]:
        due = []
        for key, group in list(self._groups.items()):
            if force or now - group.start >= self.window:
                del self._groups[key]
                if group.suppressed and group.last is not None:
                    due.append(self._summary(group, min(now - group.start, self.window)))
        return due

    def _summary(self, group: _Group, seconds: float) -> logging.LogRecord:
        last = group.last
        assert last is not None
        summary = logging.LogRecord(
            last.name, last.levelno, last.pathname, last.lineno,
            "%s more in the last %.0f s like: %s", (f"{group.suppressed:,}", max(seconds, 1.0),
                                                     last.getMessage()), None)
        summary.swapfs_summary = True
        return summary

    def _arm(self, delay: float) -> None:
        if not self.timer or self._timer is not None:
            return
        timer = threading.Timer(max(delay, 0.0) + 0.01, self._fire)
        timer.daemon = True
        timer.name = "swapfs-log-repeats"
        self._timer = timer
        timer.start()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            due = self._close(self.clock(), force=False)
            pending = [g.start for g in self._groups.values() if g.suppressed]
            if pending:
                self._arm(min(pending) + self.window - self.clock())
        self._emit(due)

    def _emit(self, records: Iterable[logging.LogRecord]) -> None:
        for record in records:
            self.handler.handle(record)


# -- set-up --------------------------------------------------------------------


def setup_logging(level: str, log_file: str | None) -> RepeatLimiter:
    """The root logger at ``level``, to ``log_file`` (rotated) or stderr (in
    the journal's format when stderr is the journal), repeats limited;
    returns the limiter (flush it before exiting)."""
    handler: logging.Handler
    tracebacks = level.lower() == "debug"
    if log_file:
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_MAX_BYTES,
                                                       backupCount=LOG_BACKUPS)
        handler.setFormatter(Formatter(LOG_FORMAT, tracebacks=tracebacks))
    else:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            handler.setFormatter(JournalFormatter("%(message)s", tracebacks=tracebacks))
        else:
            handler.setFormatter(Formatter(LOG_FORMAT, tracebacks=tracebacks))
    limiter = RepeatLimiter(handler)
    handler.addFilter(limiter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    return limiter


def log_dir() -> str:
    """Where background daemons log: /run/swapfs/log as root, else
    $XDG_RUNTIME_DIR or /tmp."""
    if os.geteuid() == 0:
        return ROOT_LOG_DIR
    return os.environ.get("XDG_RUNTIME_DIR") or "/tmp"


def _log_name(mountpoint: str) -> str:
    escaped = os.path.abspath(mountpoint).strip("/").replace("/", "-") or "root"
    return f"swapfs-{escaped}.log"


def default_log_file(mountpoint: str) -> str:
    """Where the background daemon of ``mountpoint`` logs: swapfs-MOUNT.log in :func:`log_dir`."""
    return os.path.join(log_dir(), _log_name(mountpoint))


def remove_stale_logs(directory: str, live_mounts: Iterable[str], *,
                      min_age: float = STALE_LOG_MIN_AGE) -> list[str]:
    """Remove the swapfs-*.log files (and their rotated .N copies) in
    ``directory`` that belong to none of ``live_mounts`` and were not written
    for ``min_age`` seconds; returns what was removed.  A dead mount (its
    daemon crashed) is still in the mount table, so its log stays until the
    mount is gone; a daemon starting at the same time (its log open, its
    mount not there yet) keeps its log by the age."""
    keep = {_log_name(m) for m in live_mounts}
    now = time.time()
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "swapfs-*.log*"))):
        name = os.path.basename(path)
        base, dot, suffix = name.rpartition(".")
        if suffix == "log":
            base = name
        elif not (suffix.isdigit() and base.endswith(".log")):
            continue  # not ours
        if base in keep:
            continue
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime >= min_age:
                os.unlink(path)
                removed.append(path)
    return removed


# -- failures ------------------------------------------------------------------


def last_error(log_file: str) -> str | None:
    """The message of the last ERROR or CRITICAL line of a file log (its last
    64 KiB), for a daemon that died without saying why to its parent."""
    try:
        with open(log_file, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        for level in (" ERROR ", " CRITICAL "):
            if level in line:
                return line.split(level, 1)[1]
    return None


def one_line(exc: BaseException) -> str:
    """A failure as one line: what (the exception's type), where (the
    innermost swapfs frame, else the innermost one), why (its message).
    Exception groups of one exception are unwrapped, as trio wraps them."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(package + os.sep)]
    where = ""
    if ours or frames:
        f = (ours or frames)[-1]
        filename = os.path.relpath(f.filename, os.path.dirname(package)) if ours else f.filename
        where = f" at {filename}:{f.lineno} in {f.name}"
    why = str(exc).replace("\n", " ") or "(no message)"
    return f"{type(exc).__name__}{where}: {why}"
