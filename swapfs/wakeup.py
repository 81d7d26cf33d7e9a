"""Fast CPU wake-ups while the kernel swaps through the mount.

A swap-in through swapfs is a chain of wake-ups: the faulting task sleeps
on its page, the loop device's worker hands the request to FUSE, the
daemon answers, and the completion wakes the task again.  Where an idle
CPU sleeps deeply -- in a virtual machine an idle vCPU halts, and waking it
is a trip through the host -- each of those wake-ups can cost more than the
daemon's whole work on the request.  Measured on a 2-vCPU VM (fio, 4 KiB
random reads at depth 1 through the loop device): p50 37 us and p99 71 us
with idle CPUs halting, 10 us and 23 us with wake-ups bounded; the kernel
swap workload went from 2.2x to 1.35x zram's time (see docs/latency.md).

The kernel's PM QoS interface is the way for a process to ask for that
bound: a latency in microseconds written to /dev/cpu_dma_latency holds for
as long as the file stays open, and the kernel drops it when the file is
closed -- also when the process dies, so a crash cannot leave it behind.
0 keeps idle CPUs polling instead of halting.

The daemon holds the request only while requests flow: a watcher samples
the session's request count every SAMPLE_SECONDS, asks for the bound when
the count moved, and gives it back after IDLE_SECONDS without a request.
An idle mount costs no CPU; nothing is added to the request path.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

PM_QOS_DEVICE = "/dev/cpu_dma_latency"
# The value that constrains nothing (the kernel's PM_QOS_CPU_LATENCY_DEFAULT_VALUE).
NO_CONSTRAINT_US = 2_000_000_000
SAMPLE_SECONDS = 0.05
IDLE_SECONDS = 0.25


class WakeLatency:
    """A PM QoS CPU latency request, held while ``requests()`` keeps moving."""

    def __init__(self, latency_us: int, *, path: str = PM_QOS_DEVICE, min_rate: int = 0) -> None:
        """``min_rate``: requests per second below which the bound is not worth
        its cost (0: any request asks for it)."""
        if not 0 <= latency_us < NO_CONSTRAINT_US:
            raise ValueError(f"latency {latency_us} us out of range")
        if min_rate < 0:
            raise ValueError(f"minimum request rate {min_rate} out of range")
        self.latency_us = latency_us
        self.min_rate = min_rate
        self.path = path
        self.fd: int | None = None
        self.held = False
        self.holds = 0  # times the bound was asked for
        self.problem: str | None = None  # why the request cannot be made

    def open(self) -> str | None:
        """Open the PM QoS device, asking for nothing yet; None, or why it
        cannot be used (the daemon then runs without it)."""
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            self._write(NO_CONSTRAINT_US)
        except OSError as exc:
            self.close()
            self.problem = f"{self.path}: {exc.strerror}"
        return self.problem

    def _write(self, value: int) -> None:
        assert self.fd is not None
        os.write(self.fd, struct.pack("=i", value))

    def hold(self) -> None:
        if self.fd is None or self.held:
            return
        try:
            self._write(self.latency_us)
        except OSError as exc:
            log.error("cannot ask for CPU wake-up latency %d us: %s", self.latency_us, exc.strerror)
            return
        self.held = True
        self.holds += 1

    def release(self) -> None:
        if self.fd is None or not self.held:
            return
        try:
            self._write(NO_CONSTRAINT_US)
        except OSError as exc:  # the bound stays until the file is closed
            log.error("cannot release the CPU wake-up latency request: %s", exc.strerror)
            return
        self.held = False

    def close(self) -> None:
        """Drop the request (closing the file is what the kernel honours)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.held = False

    async def run(self, requests: Callable[[], int]) -> None:
        """Hold the bound while ``requests()`` moves at ``min_rate`` or more;
        runs until cancelled, and closes the request on the way out."""
        # requests per sample that ask for the bound (at least one)
        enough = max(1, round(self.min_rate * SAMPLE_SECONDS))
        try:
            last = requests()
            idle = 0.0
            while True:
                await trio.sleep(SAMPLE_SECONDS)
                now = requests()
                moved = now - last
                last = now
                if moved >= enough:
                    idle = 0.0
                    self.hold()
                elif self.held:
                    idle += SAMPLE_SECONDS
                    if idle >= IDLE_SECONDS:
                        self.release()
        finally:
            self.close()
