"""CPU pressure: how much of the time some task waits for a CPU.

The session busy-polls /dev/fuse after a reply (Session ``poll_us``): on an
otherwise idle CPU that spares the next request a wake-up.  On a busy
machine it does the opposite: the spinning daemon holds a CPU that the
tasks producing the next request (the faulting task, the loop device's
worker) are waiting for, and every request then waits for the end of a
spin or of a scheduler slice.  The kernel measures exactly that waiting:
PSI's ``/proc/pressure/cpu`` (Linux 4.20+, ``psi=1``) counts in its
``some`` line's ``total`` the microseconds during which at least one
runnable task waited for a CPU.

:class:`CpuPressure` reads that total; :meth:`CpuPressure.sample` gives
the share of wall time with a waiting task since the previous sample.  The
session samples it a few times a second (``Session._govern_poll``, never
on the request path) and polls only while the share stays low.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

PSI_CPU = "/proc/pressure/cpu"


class CpuPressure:
    """The "some" stall total of a PSI file, sampled as a share of wall time."""

    def __init__(self, path: str = PSI_CPU, *, clock: Callable[[], int] = time.monotonic_ns) -> None:
        """``clock``: nanoseconds of wall time (the tests give trio's)."""
        self.path = path
        self.clock = clock
        self.fd: int | None = None
        self._last_total = 0
        self._last_ns = 0

    def open(self) -> str | None:
        """Open the PSI file; None, or why it cannot be used."""
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self._last_total = self._total()
        except (OSError, ValueError) as exc:
            self.close()
            return f"{self.path}: {getattr(exc, 'strerror', None) or exc}"
        self._last_ns = self.clock()
        return None

    def _total(self) -> int:
        """The "some" line's total (microseconds)."""
        assert self.fd is not None
        text = os.pread(self.fd, 512, 0)
        start = text.index(b"total=") + 6  # the first line is "some"
        end = text.find(b"\n", start)
        return int(text[start:end if end >= 0 else len(text)])

    def sample(self) -> float:
        """The share of wall time (0..1) during which some task waited for a CPU
        since the previous sample (or open); 0.0 if the file cannot be read."""
        if self.fd is None:
            return 0.0
        now = self.clock()
        try:
            total = self._total()
        except (OSError, ValueError):
            return 0.0
        waited_us = total - self._last_total
        elapsed_ns = now - self._last_ns
        self._last_total, self._last_ns = total, now
        if elapsed_ns <= 0:
            return 0.0
        return min(max(waited_us * 1000 / elapsed_ns, 0.0), 1.0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
