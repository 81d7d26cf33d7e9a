"""Failover on real mounts: kill -9 under fio's verification, the keeper killed too, the ordering
rules, an upgrade hand-off under load (docs/failover.md)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest

from swapfs.fuse.handoff import KeeperClient, KeeperError
from swapfs.testing import harness

from .conftest import ROOT, Cluster, d_state

pytestmark = [
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed"),
]

KILLS = 20


def fio(c: Cluster, target: str, runtime: float, size: str = "32M") -> subprocess.Popen[str]:
    """Random 4k writes at depth 16 with O_DIRECT, every block read back and checked (crc32c and
    the header: offset and the seed of the latest write, so a stale block fails too)."""
    p = subprocess.Popen(
        ["fio", "--name=failover", f"--filename={target}", f"--size={size}", "--bs=4k",
         "--rw=randwrite", "--ioengine=libaio", "--iodepth=16", "--direct=1", "--loops=100000",
         f"--runtime={runtime}", "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1",
         "--do_verify=1", "--verify_state_save=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=c.tmp)
    c.procs.append(p)  # killed at cleanup if still there
    return p


def fio_result(p: subprocess.Popen[str], timeout: float = 60) -> str:
    """Stop fio (SIGINT: it exits 128 but reports its errors) and check them: none."""
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode in (0, 128), out
    assert "err= 0" in out, out
    assert not re.search(r"verify(:| failed)|bad magic|bad header", out), out
    reads = re.search(r"issued rwts: total=(\d+),", out)
    assert reads and int(reads.group(1)) > 0, out  # blocks were read back and verified
    return out


def kill_active(c: Cluster, *, standby: bool) -> None:
    """Kill -9 the active server once its successor is ready, and wait for the takeover."""
    s = c.wait(lambda s: s["active"] is not None and (s["standbys"] or not standby),
               "a standby" if standby else "an active server")
    os.kill(s["active"], signal.SIGKILL)
    c.wait(lambda t: t["generation"] > s["generation"], "the takeover")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("successor,target", [("standby", "loop"), ("restart", "file")])
def test_kill9_under_fio_verify(cluster: Cluster, successor: str, target: str) -> None:
    c = cluster
    if successor == "standby":
        c.start_keeper()
        c.start("64M", "--respawn-standby")
    else:  # no standby: the keeper starts a fresh server
        c.start_keeper(*c.server_cmd("takeover"))
        c.start("64M")
    rng = random.Random(17)
    if target == "loop":
        with harness.loop_device(c.data, direct_io=True, tune=False) as dev:
            job = fio(c, dev, runtime=150)
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.1, 0.4))
                kill_active(c, standby=successor == "standby")
            fio_result(job)
    else:
        job = fio(c, c.data, runtime=150)
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.1, 0.4))
            kill_active(c, standby=False)
        fio_result(job)
    assert c.status()["generation"] == KILLS + 1


@pytest.mark.timeout(60)
def test_keeper_and_server_killed_clients_get_errors(cluster: Cluster) -> None:
    c = cluster
    c.start_keeper()
    server = c.start("16M")
    reader = subprocess.Popen(
        ["sh", "-c", f"while dd if={c.data} of=/dev/null bs=1M iflag=direct 2>/dev/null; do :; done"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        server.kill()
        server.wait()
        time.sleep(0.3)  # the reader now waits on the connection (the keeper holds it)
        assert reader.poll() is None
        assert c.keeper is not None
        c.keeper.kill()
        c.keeper.wait()
        t0 = time.monotonic()
        reader.wait(timeout=5)  # its dd failed: the connection was aborted, nothing hangs
        assert time.monotonic() - t0 < 2
    finally:
        reader.kill()
        reader.wait()
    r = subprocess.run(["dd", f"if={c.data}", "of=/dev/null", "bs=4k", "count=1"],
                       capture_output=True, text=True, timeout=5)
    assert r.returncode != 0 and "not connected" in r.stderr, r.stderr
    assert not d_state(reader.pid)
    assert subprocess.run(["umount", str(c.mnt)], timeout=10).returncode == 0


@pytest.mark.timeout(60)
def test_claim_while_the_old_server_lives_is_refused(cluster: Cluster) -> None:
    c = cluster
    c.start_keeper()
    c.start("16M")
    with open(c.data, "r+b", buffering=0) as f:
        f.write(b"x" * 4096)
    s = c.status()
    client = KeeperClient(c.sock)
    try:
        with pytest.raises(KeeperError, match="has not exited"):
            client.claim(s["generation"])
        with pytest.raises(KeeperError, match="stale"):
            client.claim(s["generation"] - 1)
    finally:
        client.close()
    # A successor that cannot read the state refuses before the old server is asked to let go.
    r = subprocess.run(c.server_cmd("--version", "2", "takeover", "--upgrade"),
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 3 and "cannot be read" in r.stdout, r.stdout + r.stderr
    assert c.status()["active"] == s["active"] and c.status()["generation"] == s["generation"]
    with open(c.data, "rb", buffering=0) as f:  # and the old one still serves
        assert f.read(4096) == b"x" * 4096


@pytest.mark.timeout(120)
def test_upgrade_hand_off_under_fio(cluster: Cluster) -> None:
    c = cluster
    c.start_keeper()
    c.start("64M")
    job = fio(c, c.data, runtime=150)
    try:
        for version in (2, 3, 4):
            time.sleep(0.5)
            s = c.status()
            p = c.spawn("--version", str(version), "--readable", f"{version - 1},{version}",
                        "takeover", "--upgrade")
            c.wait(lambda t, s=s: t["generation"] > s["generation"], "the upgrade")
            assert c.status()["meta"]["version"] == version
            assert p.poll() is None
    finally:
        fio_result(job)


@pytest.mark.timeout(60)
def test_unmount_ends_keeper_server_and_standby(cluster: Cluster) -> None:
    c = cluster
    c.start_keeper()
    server = c.start("16M", "--respawn-standby")
    s = c.wait(lambda s: bool(s["standbys"]), "a standby")
    standby = s["standbys"][0]
    assert subprocess.run(["umount", str(c.mnt)], timeout=10).returncode == 0
    assert c.keeper is not None
    assert c.keeper.wait(timeout=10) == 0
    assert server.wait(timeout=10) == 0
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{standby}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{standby}"), c.log_text()


@pytest.mark.timeout(60)
def test_a_dead_standby_is_replaced_by_a_fresh_server(cluster: Cluster) -> None:
    c = cluster
    c.start_keeper(*c.server_cmd("--respawn-standby", "takeover"))
    c.start("16M", "--respawn-standby")
    s = c.wait(lambda s: bool(s["standbys"]), "a standby")
    os.kill(s["standbys"][0], signal.SIGKILL)
    with open(c.data, "r+b", buffering=0) as f:
        f.write(b"y" * 4096)
    os.kill(s["active"], signal.SIGKILL)
    t = c.wait(lambda t: t["generation"] > s["generation"], "a fresh server")
    assert t["active"] not in (s["active"], s["standbys"][0])
    with open(c.data, "rb", buffering=0) as f:
        assert f.read(4096) == b"y" * 4096
    c.wait(lambda t: bool(t["standbys"]), "the fresh server's standby")
