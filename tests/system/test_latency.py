"""What the daemon does for latency outside its own code: the CPU wake-up
bound it asks of the kernel while requests flow (swapfs.wakeup)."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from swapfs.wakeup import PM_QOS_DEVICE

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def qos_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == PM_QOS_DEVICE:
                n += 1
        except OSError:
            pass
    return n


def effective_latency_us() -> int:
    """The bound the kernel applies now: the smallest of every process's requests."""
    fd = os.open(PM_QOS_DEVICE, os.O_RDONLY)
    try:
        return struct.unpack("=i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def _need_pm_qos():
    if os.geteuid() != 0 or not os.path.exists(PM_QOS_DEVICE):
        pytest.skip(f"needs root and {PM_QOS_DEVICE}")


def test_wakeup_bound_held_while_requests_flow(mount_factory):
    m = mount_factory(args=("--cpu-latency-us", "3"))
    assert qos_fds(m.pid) == 1
    assert "CPU wake-up latency: at most 3 us" in m.log_text()
    stop = threading.Event()
    seen: list[int] = []

    def reads() -> None:
        fd = os.open(m.dev(), os.O_RDONLY)
        try:
            while not stop.is_set():
                os.pread(fd, 4096, 0)
        finally:
            os.close(fd)

    t = threading.Thread(target=reads)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen.append(effective_latency_us())
            if seen[-1] <= 3:
                break
            time.sleep(0.02)
    finally:
        stop.set()
        t.join()
    assert seen and seen[-1] <= 3, seen[-5:]


def test_no_cpu_latency_asks_for_nothing(mount_factory):
    m = mount_factory(args=("--no-cpu-latency",))
    with open(m.dev(), "rb", buffering=0) as f:
        f.read(4096)
    assert qos_fds(m.pid) == 0
    assert "CPU wake-up latency" not in m.log_text()


def test_min_rate_is_said_and_handed_to_successors(mount_factory):
    m = mount_factory(args=("--cpu-latency-us", "3", "--cpu-latency-min-rate", "2000",
                            "--poll-cpu-pressure", "25"))
    with open(m.dev(), "rb", buffering=0) as f:
        f.read(4096)
    assert qos_fds(m.pid) == 1
    assert "at most 3 us asked of the kernel while requests flow at 2000/s or more" in m.log_text()
    with open(f"/proc/{m.pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[argv.index(b"--cpu-latency-min-rate") + 1] == b"2000"
    assert argv[argv.index(b"--poll-cpu-pressure") + 1] == b"25"
