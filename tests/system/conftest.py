"""Fixtures that mount swapfs for real: the daemon runs as `swapfs mount` in
its own process, exactly as a user starts it, and is always unmounted."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from swapfs import system

SMALL_CONFIG = """
[pool]
algorithm = "lz4"
max_bytes = "64M"

[[device]]
name = "swap0"
size = "64M"

[[device]]
name = "swap1"
size = "8M"
"""


def swapfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "swapfs", *args]


def run_swapfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(swapfs_cmd(*args), capture_output=True, text=True, timeout=timeout)


def fuse_available() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "not root and no fusermount3"
    return None


@dataclass
class Mount:
    path: Path
    log: Path
    pid: int

    def dev(self, name: str = "swap0") -> Path:
        return self.path / name

    def stats(self) -> dict:
        return system.read_stats(self.path)

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = 10) -> bool:
        """Wait until the daemon's log says ``text`` (the log is a file: read it
        again at each 50 ms, the one polling left here)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def _is_mounted(path: Path) -> bool:
    return system.is_mounted(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def detach_loops_under(path: Path) -> None:
    """swapoff and detach every loop device over a file in ``path``."""
    for lo in system.loops_backed_by(path):
        with contextlib.suppress(system.CommandFailed):
            system.swap_off(lo.device)
        with contextlib.suppress(system.CommandFailed):
            system.detach_loop(lo.device, attempts=1)


def failover_pids(path: Path) -> list[int]:
    """Keeper, active daemon and standbys of a failover mount ([] without a keeper)."""
    from swapfs.cli.mount import _failover_processes

    return _failover_processes(str(path))


def stop_mount(m: Mount) -> None:
    """Unmount and make sure the daemon (and its keeper and standby) are gone, whatever
    state things are in."""
    if os.geteuid() == 0:
        detach_loops_under(m.path)
    others = failover_pids(m.path)
    if _is_mounted(m.path):
        proc = run_swapfs("unmount", str(m.path), timeout=30)
        if proc.returncode != 0 and _is_mounted(m.path):
            subprocess.run(["umount", "-l", str(m.path)], capture_output=True)
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True)
    for pid in [m.pid, *others]:
        if not system.wait_for_exit(pid, 10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if _is_mounted(m.path):  # every holder killed: the connection is aborted, this cannot hang
        subprocess.run(["umount", "-l", str(m.path)], capture_output=True)


def start_mount(tmp_path: Path, config: str | None = SMALL_CONFIG, name: str = "mnt",
                args: tuple[str, ...] = (), *, mlock: bool = False) -> Mount:
    """``mlock``: lock the daemon's memory as a real mount does (the default here is
    ``--no-mlock``).  A mount the kernel swaps into while its daemon is killed needs it: an
    unlocked standby's pages, and the state memory's, can be paged out (by reclaim, or a
    proactive pageout such as DAMON's) to the very device that only they can serve."""
    mnt = tmp_path / name
    mnt.mkdir()
    log = tmp_path / f"{name}.log"
    args = ["mount", *(() if mlock else ("--no-mlock",)), "--log-file", str(log),
            "--log-level", "debug", *args]
    if config is not None:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(config)
        args += ["--config", str(cfg)]
    proc = run_swapfs(*args, str(mnt))
    if proc.returncode != 0:
        raise AssertionError(f"swapfs mount failed: {proc.stderr}\nlog:\n{log.read_text() if log.exists() else ''}")
    match = re.search(r"daemon pid (\d+)", proc.stdout)
    assert match, proc.stdout
    return Mount(path=mnt, log=log, pid=int(match.group(1)))


@pytest.fixture
def mount_factory(tmp_path):
    """mount_factory(config_text=SMALL_CONFIG, name=None, args=(), mlock=False) -> Mount
    (``args``: more ``swapfs mount`` options; ``mlock``: see start_mount); all unmounted at
    the end."""
    why = fuse_available()
    if why:
        pytest.skip(why)
    mounts: list[Mount] = []

    def make(config: str | None = SMALL_CONFIG, name: str | None = None, args: tuple[str, ...] = (),
             mlock: bool = False) -> Mount:
        m = start_mount(tmp_path, config, name or f"mnt{len(mounts)}", args, mlock=mlock)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        stop_mount(m)
    for m in mounts:
        text = m.log_text()
        assert "Traceback" not in text, f"daemon logged a traceback:\n{text}"


@pytest.fixture
def mnt(mount_factory) -> Mount:
    return mount_factory()
