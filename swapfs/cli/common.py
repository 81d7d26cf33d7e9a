"""What every command says the same way: exit codes, the error line, bytes
with units, text that lines up in a terminal, and what to say when a
mount's stats cannot be read.

Every call that talks to a daemon is bounded: a stopped or stuck daemon
blocks a getxattr on its mount in the kernel, so :func:`read_stats` (and
:func:`swapfs.system.bounded` under it) waits in a thread that is left
behind after ``--timeout`` seconds, and the command exits with
EXIT_NOT_ANSWERING.  The exit codes are documented in docs/operations.md
and in every command's ``--help``."""

from __future__ import annotations

import errno
import sys
import unicodedata
from typing import Any

from .. import system
from ..stats import STATS_XATTR

EXIT_OK = 0
EXIT_FAIL = 1  # the command failed; the message says why
EXIT_USAGE = 2  # bad arguments or configuration: nothing was done
EXIT_GONE = 3  # the daemon of a mount is gone (the mount answers ENOTCONN)
EXIT_NOT_ANSWERING = 4  # the daemon did not answer within --timeout (stopped, stuck)

# How long a command waits for a daemon's answer unless --timeout says otherwise.
DEFAULT_TIMEOUT = 5.0

# The exit statuses each command can return, for its --help and docs/operations.md.
_DAEMON = "3 the daemon is gone (the mount answers ENOTCONN); 4 the daemon did not answer within --timeout"
_DAEMON_FIXED = _DAEMON.replace("--timeout", f"{DEFAULT_TIMEOUT:g} s")
EXIT_CODES = {
    "mount": "0 the mount is live; 1 the daemon failed before mounting (its error is printed); "
             "2 bad arguments, configuration or mountpoint (nothing was mounted)",
    "upgrade": "0 the new daemon serves; 1 refused (the old daemon keeps serving); 4 the "
               "mount's keeper did not answer within 5 s (nothing was changed)",
    "unmount": "0 unmounted; 1 not a swapfs mount, busy (swap or loop devices on it), or a "
               "process of the mount still running",
    "swapon": f"0 swap is on; 1 refused or failed (nothing stays attached); {_DAEMON} (the "
              "mount's stats size the swap area; nothing was attached)",
    "swapoff": "0 swap is off (or was not on) and the loop device detached; 1 swapoff or the "
               "detach failed",
    "status": "0 every mount answered (or there is none); 1 a MOUNT given is not a swapfs "
              "mount; 3 the daemon of a mount is gone "
              "(ENOTCONN); 4 none is gone but the daemon of a mount did not answer within "
              "--timeout (each is listed either way)",
    "stats": f"0 printed; 1 not a swapfs mount or device, or unreadable stats; {_DAEMON}",
    "writeback": f"0 the request was served (the pages moved are printed); 1 refused or failed "
                 f"(no file tier, a device with writeback = false); 2 bad arguments; {_DAEMON}",
    "compact": f"0 compacted; 1 not a swapfs mount, or the request failed; {_DAEMON}",
    "top": f"0 quit; 1 not a swapfs mount; 2 bad arguments; {_DAEMON_FIXED}",
    "record": f"0 done; 1 not a swapfs mount, or the output cannot be written; 2 bad arguments; "
              f"{_DAEMON_FIXED}",
    "plot": "0 the image was written; 1 unreadable samples, no matplotlib, or the image cannot "
            "be written",
    "metrics": "0 every mount answered; 1 a mount did not answer (its swapfs_up is 0; the "
               "output is written all the same) or the output cannot be written; 2 bad arguments",
    "trace": "0 done (replay: every page read back was the page written); 1 record: not a "
             "swapfs mount, or the file exists or cannot be made; replay: a wrong page, or an "
             "unreadable trace or configuration; 2 bad arguments; 3 (record) the daemon is gone; "
             f"4 (record) the daemon did not answer within {DEFAULT_TIMEOUT:g} s",
    "check-config": "0 the configuration is valid on this machine (what was understood is "
                    "printed); 2 invalid (the message names the key)",
    "install-units": "0 installed; 1 failed",
    "generate-units": "0 units written; 1 failed",
}


def exit_codes_epilog(command: str) -> str:
    """The exit statuses of ``command``, as its --help ends."""
    codes = EXIT_CODES.get(command, "0 done; 1 failed; 2 bad arguments")
    return f"Exit status: {codes}."


def die(message: str, code: int = EXIT_FAIL) -> int:
    print(f"swapfs: {message}", file=sys.stderr)
    return code


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def text_width(text: str) -> int:
    """The columns ``text`` takes in a terminal: wide characters (CJK, emoji) take two,
    combining marks none."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def ljust(text: str, width: int) -> str:
    """``text`` padded on the right to ``width`` terminal columns (str.ljust counts characters)."""
    return text + " " * max(0, width - text_width(text))


def rjust(text: str, width: int) -> str:
    return " " * max(0, width - text_width(text)) + text


def read_stats(path: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The stats object of a mount or device file; TimeoutError when its daemon does not
    answer within ``timeout`` seconds (see :func:`stats_error`)."""
    return system.read_stats(path, timeout=timeout)


def daemon_problem(exc: BaseException) -> tuple[str, int] | None:
    """What an error of a call to a daemon says about it, and the exit status: gone
    (ENOTCONN) or not answering (TimeoutError); None for any other error."""
    if isinstance(exc, TimeoutError):
        return "not answering", EXIT_NOT_ANSWERING
    if isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:
        return "gone", EXIT_GONE
    return None


def stats_error(path: str, exc: Exception) -> int:
    if isinstance(exc, TimeoutError):
        return die(f"{path}: the swapfs daemon is not answering ({exc.strerror}; stopped or "
                   "stuck? see swapfs status)", EXIT_NOT_ANSWERING)
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return die(f"{path} is not a swapfs mount or device file (no {STATS_XATTR} attribute)")
        if exc.errno == errno.ENOTCONN:
            return die(f"{path}: the swapfs daemon is gone (transport endpoint not connected)",
                       EXIT_GONE)
        if exc.errno == errno.ENOENT:
            return die(f"{path}: no such file or directory")
        return die(f"cannot read stats of {path}: {exc.strerror}")
    return die(f"malformed stats from {path}: {exc}")


def add_timeout_option(parser: Any) -> None:
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="wait at most this long for a daemon's answer (default "
                        f"{DEFAULT_TIMEOUT:g}); a daemon that does not answer exits {EXIT_NOT_ANSWERING}")


def positive_seconds(text: str) -> float:
    """argparse type of --timeout and --interval: a number of seconds above zero (argparse
    names the option in its message and exits with status 2)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number of seconds")
    return value
