"""What every command says the same way: exit codes, the error line, bytes
with units, and what to say when a mount's stats cannot be read."""

from __future__ import annotations

import errno
import sys
from typing import Any

from .. import system
from ..stats import STATS_XATTR

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


def die(message: str, code: int = EXIT_FAIL) -> int:
    print(f"swapfs: {message}", file=sys.stderr)
    return code


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def read_stats(path: str) -> dict[str, Any]:
    return system.read_stats(path)


def stats_error(path: str, exc: Exception) -> int:
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return die(f"{path} is not a swapfs mount or device file (no {STATS_XATTR} attribute)")
        if exc.errno == errno.ENOTCONN:
            return die(f"{path}: the swapfs daemon is gone (transport endpoint not connected)")
        if exc.errno == errno.ENOENT:
            return die(f"{path}: no such file or directory")
        return die(f"cannot read stats of {path}: {exc.strerror}")
    return die(f"malformed stats from {path}: {exc}")
