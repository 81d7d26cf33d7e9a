"""The real daemon survives its own death (docs/failover.md): kill -9 under fio's verification
through a direct-I/O loop device and under kernel swap, an upgrade under kernel swap, the limit
(keeper and daemon both dead: errors, no hang), unmount ending every process of the mount."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from swapfs import system
from swapfs.cli.mount import keeper_socket
from swapfs.fuse.handoff import KeeperClient
from swapfs.testing import harness

from .conftest import SMALL_CONFIG, Mount, run_swapfs
from .test_kernel_swap import CONFIG as SWAP_CONFIG
from .test_kernel_swap import WORKING_SET, WORKLOAD_LIMIT

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def status(m: Mount) -> dict[str, Any]:
    c = KeeperClient(keeper_socket(str(m.path)))
    try:
        return c.status()
    finally:
        c.close()


def wait_status(m: Mount, cond: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = status(m)
        if cond(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {s}\n{m.log_text()[-4000:]}")
        time.sleep(0.02)


def ready(s: dict[str, Any], standby: bool) -> bool:
    return s["active"] is not None and bool(s["standbys"] or not standby)


def kill_active(m: Mount, *, standby: bool) -> None:
    """Kill -9 the active daemon once its successor is ready; wait for the takeover."""
    s = wait_status(m, lambda s: ready(s, standby), "a standby" if standby else "an active daemon")
    os.kill(s["active"], signal.SIGKILL)
    wait_status(m, lambda t: t["generation"] > s["generation"], "the takeover", timeout=60)


def d_state_pids() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if re.sub(r"^.*\) ", "", f.read()).startswith("D"):
                        out.append(int(pid))
            except OSError:
                pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
@pytest.mark.parametrize("successor", ["standby", "restart"])
def test_kill9_of_the_daemon_under_fio_verify_through_a_loop_device(mount_factory, successor):
    """20 kills while fio writes 4k at depth 16 with O_DIRECT through a direct-I/O loop device and
    reads every block back (crc32c and a header naming the offset and the write): 0 errors."""
    standby = successor == "standby"
    m = mount_factory(SMALL_CONFIG, args=("--standby",) if standby else ())
    rng = random.Random(17)
    with harness.loop_device(str(m.dev()), direct_io=True, tune=False) as dev:
        job = subprocess.Popen(
            ["fio", "--name=failover", f"--filename={dev}", "--size=32M", "--bs=4k",
             "--rw=randwrite", "--ioengine=libaio", "--iodepth=16", "--direct=1", "--loops=100000",
             "--runtime=300", "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1",
             "--do_verify=1", "--verify_state_save=0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=m.path.parent)
        try:
            for _ in range(20):
                time.sleep(rng.uniform(0.2, 0.5))
                kill_active(m, standby=standby)
            job.send_signal(signal.SIGINT)
            out, _ = job.communicate(timeout=60)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert job.returncode in (0, 128), out
    assert "err= 0" in out, out
    assert not re.search(r"verify(:| failed)|bad magic|bad header", out), out
    assert status(m)["generation"] == 21
    assert "taken over" in m.log_text()


def _swap_workload_with(m: Mount, action: Any, seed: int) -> harness.WorkloadResult:
    # swap_on holds the harness's machine-wide swap lock
    with harness.loop_device(str(m.dev())) as loop, harness.swap_on(loop, priority=32767, discard=True):
        return harness.run_swap_workload(working_set_bytes=WORKING_SET, limit_bytes=WORKLOAD_LIMIT,
                                         cgroup_name=f"swapfs-failover-{os.getpid()}", seed=seed,
                                         watch_device=loop, on_poll=action)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill9_of_the_daemon_under_kernel_swap(mount_factory):
    """10 kills while the kernel swaps the verifying workload (384 MiB in 128 MiB) into the mount:
    the workload finishes and every page is exact."""
    why = harness.kernel_swap_unavailable()
    if why:
        pytest.skip(f"kernel swap test: {why}")
    m = mount_factory(SWAP_CONFIG, args=("--standby",), mlock=True)
    kills: list[float] = []
    started = time.monotonic()

    def maybe_kill() -> None:
        if len(kills) >= 10 or time.monotonic() - (kills[-1] if kills else started) < 1.0:
            return
        s = status(m)
        if ready(s, True):
            os.kill(s["active"], signal.SIGKILL)
            kills.append(time.monotonic())

    result = _swap_workload_with(m, maybe_kill, seed=3)
    assert result.bad_pages == 0, result.output
    assert result.pages == WORKING_SET // 4096
    assert result.peak_swap_kib * 1024 > 128 << 20, result
    assert len(kills) == 10, f"only {len(kills)} kills during the workload ({result.wall_seconds:.1f} s)"
    assert wait_status(m, lambda s: s["generation"] == 11, "the last takeover")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_upgrade_under_kernel_swap(mount_factory):
    why = harness.kernel_swap_unavailable()
    if why:
        pytest.skip(f"kernel swap test: {why}")
    m = mount_factory(SWAP_CONFIG, mlock=True)
    upgrades: list[subprocess.CompletedProcess[str]] = []
    started = time.monotonic()

    def maybe_upgrade() -> None:
        if not upgrades and time.monotonic() - started > 3.0:
            upgrades.append(run_swapfs("upgrade", str(m.path), timeout=120))

    result = _swap_workload_with(m, maybe_upgrade, seed=5)
    assert result.bad_pages == 0, result.output
    assert result.pages == WORKING_SET // 4096
    assert upgrades and upgrades[0].returncode == 0, upgrades
    assert "upgraded in" in upgrades[0].stdout
    assert status(m)["generation"] == 2


@pytest.mark.timeout(120)
def test_upgrade_that_cannot_read_the_state_refuses_and_the_old_daemon_serves(mount_factory):
    m = mount_factory(SMALL_CONFIG)
    data = os.urandom(1 << 20)
    with open(m.dev(), "r+b") as f:
        f.write(data)
    before = status(m)
    c = KeeperClient(keeper_socket(str(m.path)))
    try:
        c.put({}, {"version": 999})  # a layout newer than this code reads
    finally:
        c.close()
    out = run_swapfs("upgrade", str(m.path), timeout=120)
    assert out.returncode != 0 and "refused" in out.stderr and "version 999" in out.stderr, out
    after = status(m)
    assert after["active"] == before["active"] and after["generation"] == before["generation"]
    with open(m.dev(), "rb") as f:
        assert f.read(1 << 20) == data


@pytest.mark.timeout(120)
def test_upgrade_hands_the_mount_over(mount_factory):
    m = mount_factory(SMALL_CONFIG)
    data = os.urandom(4 << 20)
    with open(m.dev(), "r+b") as f:
        f.write(data)
    old = status(m)["active"]
    out = run_swapfs("upgrade", str(m.path), timeout=120)
    assert out.returncode == 0, out.stderr + m.log_text()[-3000:]
    assert system.wait_for_exit(old, 10)
    s = status(m)
    assert s["active"] != old and s["generation"] == 2
    with open(m.dev(), "rb") as f:
        assert f.read(4 << 20) == data
    assert "handed off" in m.log_text() and "taken over (upgrade)" in m.log_text()


@pytest.mark.timeout(120)
def test_keeper_killed_with_the_daemon_gives_errors_no_hang_and_unmount_works(mount_factory):
    m = mount_factory(SMALL_CONFIG)
    s = status(m)
    reader = subprocess.Popen(
        ["sh", "-c", f"while dd if={m.dev()} of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null; do :; done"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        os.kill(s["pid"], signal.SIGKILL)  # the keeper first: nobody restarts the daemon
        os.kill(s["active"], signal.SIGKILL)
        t0 = time.monotonic()
        reader.wait(timeout=10)  # its dd failed: the connection was aborted
        assert time.monotonic() - t0 < 5
        assert system.wait_for_exit(s["active"], 5) and system.wait_for_exit(s["pid"], 5)
        assert not [p for p in d_state_pids() if p == reader.pid]
        with pytest.raises(OSError):
            os.stat(m.dev())
        out = run_swapfs("unmount", str(m.path))
        assert out.returncode == 0, out.stderr
        assert not system.is_mounted(m.path)
    finally:
        reader.kill()
        reader.wait()


@pytest.mark.timeout(120)
def test_unmount_ends_keeper_daemon_and_standby(mount_factory):
    m = mount_factory(SMALL_CONFIG, args=("--standby",))
    s = wait_status(m, lambda s: ready(s, True), "a standby")
    pids = [s["pid"], s["active"], *s["standbys"]]
    names = set()
    for pid in pids:
        with open(f"/proc/{pid}/comm") as f:
            names.add(f.read().strip())
    assert names == {"swapfs-keeper", "swapfs", "swapfs-standby"}, names
    out = run_swapfs("unmount", str(m.path))
    assert out.returncode == 0, out.stderr
    for pid in pids:
        assert system.wait_for_exit(pid, 10), pid
    assert not os.path.exists(keeper_socket(str(m.path)))
    assert not Path(m.path / "swap0").exists()


@pytest.mark.timeout(120)
def test_a_state_that_cannot_be_served_is_refused_and_the_mount_waits(mount_factory):
    """A successor that cannot read the state serves nothing (never an empty store): the mount
    waits, and once the state is readable again the keeper's next successor serves every byte."""
    import mmap

    m = mount_factory(SMALL_CONFIG)
    data = os.urandom(1 << 20)
    with open(m.dev(), "r+b") as f:
        f.write(data)
    s = status(m)
    c = KeeperClient(keeper_socket(str(m.path)))
    try:
        held = c.get()
    finally:
        c.close()
    try:
        header = mmap.mmap(held.fds["mem.header"], mmap.PAGESIZE)
        magic = bytes(header[:8])
        header[:8] = bytes(8)  # no longer a store's header
        os.kill(s["active"], signal.SIGKILL)
        assert m.wait_log("takeover of", 30) and "refused: the state cannot be served" in m.log_text()
        t = status(m)
        assert t["generation"] == s["generation"] and t["active"] == s["active"]  # nobody claimed
        header[:8] = magic  # readable again: the keeper's next attempt (after a back-off) serves
        wait_status(m, lambda t: t["generation"] > s["generation"], "the takeover", timeout=60)
        with open(m.dev(), "rb") as f:
            assert f.read(1 << 20) == data
        header.close()
    finally:
        held.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("successor", ["standby", "restart"])
def test_kill9_keeps_the_pages_of_a_file_tier(mount_factory, tmp_path, successor):
    """Incompressible pages go to the file tier; its backing file is adopted (never reopened:
    its lock travels with the fd) and every page reads back after each kill."""
    config = ('[pool]\nmax_bytes = "16M"\n[[device]]\nname = "swap0"\nsize = "64M"\n'
              f'[[tier]]\nname = "ssd"\nkind = "file"\npath = "{tmp_path}/ssd.img"\nsize = "64M"\n'
              'priority = 10\n')
    standby = successor == "standby"
    m = mount_factory(config, args=("--standby",) if standby else ())
    data = os.urandom(16 << 20)
    with open(m.dev(), "r+b") as f:
        f.write(data)
    assert m.stats()["tiers"]["ssd"]["stored_pages"] > 0
    for _ in range(3):
        kill_active(m, standby=standby)
        with open(m.dev(), "rb") as f:
            assert f.read(16 << 20) == data
    assert m.stats()["tiers"]["ssd"]["stored_pages"] > 0
