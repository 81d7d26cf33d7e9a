"""The busy-poll's governor: the session stops spinning on /dev/fuse while tasks wait for a CPU.

The CPU pressure is read from a stand-in PSI file whose "some" total the tests move; a
session is driven without a mount (a SOCK_SEQPACKET socketpair, as in
test_session_resilience)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from swapfs.fuse import Session, wire
from swapfs.fuse.pressure import CpuPressure
from swapfs.fuse.session import POLL_SAMPLE_SECONDS

from .memfs import MemFS
from .test_session_resilience import FakeKernel

pytestmark = pytest.mark.timeout(30)


def psi(path: Path, some_total_us: int) -> None:
    path.write_text(f"some avg10=0.00 avg60=0.00 avg300=0.00 total={some_total_us}\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def test_share_of_wall_time_with_a_waiting_task(tmp_path: Path) -> None:
    path = tmp_path / "cpu"
    psi(path, 5_000_000)
    now = [0]
    p = CpuPressure(str(path), clock=lambda: now[0])
    assert p.open() is None
    now[0] += 100_000_000  # 100 ms, 25 ms of it with a task waiting
    psi(path, 5_025_000)
    assert p.sample() == pytest.approx(0.25)
    now[0] += 100_000_000  # nobody waited
    assert p.sample() == 0.0
    now[0] += 100_000_000  # more waiting than wall time (several CPUs' worth): capped
    psi(path, 6_000_000)
    assert p.sample() == 1.0
    p.close()
    assert p.fd is None and p.sample() == 0.0


def test_no_psi_says_why(tmp_path: Path) -> None:
    p = CpuPressure(str(tmp_path / "missing"))
    assert "missing" in (p.open() or "")
    assert p.fd is None and p.sample() == 0.0
    bad = tmp_path / "bad"
    bad.write_text("nothing here\n")
    assert CpuPressure(str(bad)).open()


async def test_polling_pauses_under_pressure_and_resumes_below_half(tmp_path: Path, autojump_clock) -> None:
    path = tmp_path / "cpu"
    total = 0
    psi(path, total)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        session = Session(MemFS({}), a.fileno(), poll_us=100, poll_pressure=0.2)
        assert session.polling
        pressure = CpuPressure(str(path), clock=lambda: int(trio.current_time() * 1e9))
        assert pressure.open() is None
        scope = trio.CancelScope()
        sample_us = int(POLL_SAMPLE_SECONDS * 1e6)

        async def waited(share: float, samples: int = 2) -> None:
            nonlocal total
            for _ in range(samples):
                total += int(share * sample_us)
                psi(path, total)
                await trio.sleep(POLL_SAMPLE_SECONDS)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._govern_poll, pressure, scope)
            await trio.sleep(POLL_SAMPLE_SECONDS / 2)  # between the governor's samples
            await waited(0.05)
            assert session.polling and session.poll_pauses == 0
            await waited(0.5)  # a task waits half the time: stop spinning
            assert not session.polling and session.poll_pauses == 1
            await waited(0.15)  # below the limit but not below half of it: still paused
            assert not session.polling
            await waited(0.05)
            assert session.polling and session.poll_pauses == 1
            scope.cancel()
        assert pressure.fd is None  # closed on the way out
    finally:
        a.close()
        b.close()


async def test_governed_session_pauses_and_ends_with_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "cpu"
    total = 0
    psi(path, total)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    session = Session(MemFS({b"data": b"x" * 100}), a.fileno(), poll_us=50, poll_pressure=0.1,
                      pressure_path=str(path))
    kernel = FakeKernel(trio.socket.from_stdlib_socket(b))
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            async def run() -> None:
                try:
                    await session.run()
                finally:
                    done.set()

            nursery.start_soon(run)
            await kernel.init()
            _, error, _ = await kernel.getattr()
            assert error == 0
            with trio.fail_after(10):
                while session.polling:  # every task waits all the time: the poll pauses
                    total += 10_000_000
                    psi(path, total)
                    await trio.sleep(POLL_SAMPLE_SECONDS)
            assert session.poll_pauses >= 1
            _, error, _ = await kernel.getattr()  # served all the same, without the spin
            assert error == 0
            await kernel.send(wire.DESTROY)
            with trio.fail_after(10):  # the governor does not outlive the connection
                await done.wait()
    finally:
        a.close()
        b.close()


def test_poll_pressure_out_of_range() -> None:
    r, w = os.pipe()
    try:
        for bad in (0.0, 1.5, -1.0):
            with pytest.raises(ValueError, match="poll_pressure"):
                Session(MemFS({}), r, poll_pressure=bad)
    finally:
        os.close(r)
        os.close(w)
