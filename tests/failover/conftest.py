"""A keeper and servers of tests/failover/memfd_server.py, all in the keeper's process group:
the fixture kills the whole group and unmounts, also when a test fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swapfs.fuse import unmount_quietly
from swapfs.fuse.handoff import KeeperClient

ROOT = Path(__file__).resolve().parents[2]
SERVER = [sys.executable, "-m", "tests.failover.memfd_server"]


class Cluster:
    """One mount of the memfd filesystem with its keeper."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.sock = str(tmp / "keeper.sock")
        self.keeper: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    @property
    def data(self) -> str:
        return str(self.mnt / "data")

    def server_cmd(self, *args: str) -> list[str]:
        return [*SERVER, "--keeper", self.sock, *args]

    def start_keeper(self, *restart: str, delay: float = 0.0) -> None:
        log = self.tmp / "keeper.log"
        self.logs.append(log)
        cmd = [sys.executable, "-m", "swapfs.keeper", self.sock, "--restart-delay", str(delay)]
        if restart:
            cmd += ["--restart", *restart]
        with log.open("wb") as err:
            self.keeper = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                           process_group=0)
        assert self.keeper.stdout is not None
        line = self.keeper.stdout.readline()
        self.keeper.stdout.close()
        assert line == b"ready\n", self.log_text()

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        """A server in the keeper's process group, its output in a log file."""
        assert self.keeper is not None
        log = self.tmp / f"server{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            p = subprocess.Popen(self.server_cmd(*args), cwd=ROOT, stdout=out,
                                 stderr=subprocess.STDOUT, process_group=self.keeper.pid)
        self.procs.append(p)
        return p

    def start(self, size: str = "64M", *extra: str) -> subprocess.Popen[bytes]:
        """The first server (``extra`` before the subcommand, e.g. --standby-cmd ...)."""
        p = self.spawn(*extra, "start", str(self.mnt), "--size", size)
        self.wait(lambda s: s["generation"] >= 1 and "init" in s["meta"], "the first server")
        return p

    def status(self) -> dict[str, Any]:
        c = KeeperClient(self.sock)
        try:
            return c.status()
        finally:
            c.close()

    def wait(self, cond: Any, what: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            s = self.status()
            if cond(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {s}\n{self.log_text()}")
            time.sleep(0.01)

    def log_text(self) -> str:
        out = []
        for log in self.logs:
            try:
                out.append(f"--- {log.name}\n{log.read_text()[-3000:]}")
            except OSError:
                pass
        return "\n".join(out)

    def cleanup(self) -> None:
        if self.keeper is not None:
            try:
                os.killpg(self.keeper.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.keeper.wait(timeout=10)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        # Every holder of the connection is gone: it is aborted, so the unmount cannot hang.
        unmount_quietly(self.mnt)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("mounting with mount(2) and loop devices need root")
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


def d_state(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return re.sub(r"^.*\) ", "", f.read()).startswith("D")
    except FileNotFoundError:
        return False
