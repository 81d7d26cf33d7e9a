"""A remote tier on a local Redis Cluster behind a real mount: fio verify through the pool and
the cluster, the keys gone after unmount, a master killed while fio verifies, the whole cluster
stopped (EIO within the bound, no hang, nothing left after the unmount), and kill -9 of the
daemon (the successor reads every page back from the cluster)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from swapfs import system
from swapfs.testing.redis import LocalCluster, redis_server_missing

from .conftest import run_swapfs
from .test_failover_daemon import d_state_pids, kill_active

pytestmark = pytest.mark.timeout(180)


def remote_config(cluster: LocalCluster, prefix: str, *, pool: str = "1M",
                  device: str = "96M", size: str = "128M", read_deadline: str = "15s",
                  replicas: int = 1) -> str:
    seeds = ", ".join(f'"{s}"' for s in cluster.seeds[:2])
    return f"""
[pool]
algorithm = "lz4"
max_bytes = "{pool}"

[[device]]
name = "swap0"
size = "{device}"

[[tier]]
name = "far"
kind = "redis"
seeds = [{seeds}]
size = "{size}"
priority = 5
key_prefix = "{prefix}"
timeout = "500ms"
read_deadline = "{read_deadline}"
replicas = {replicas}
"""


def keys_with(cluster: LocalCluster, prefix: str) -> int:
    return sum(len(cluster.cli(p, "--scan", "--pattern", f"{prefix}*").split())
               for p in cluster.master_ports())


def fio(dev, *extra: str, json_out: bool = False, timeout: float = 150) -> subprocess.CompletedProcess:
    args = ["fio", "--name=remote", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            "--rw=randwrite", "--bs=4k", "--size=40M", "--iodepth=8",
            "--buffer_compress_percentage=50", "--refill_buffers", "--randseed=7",
            "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", *extra]
    if json_out:
        args.append("--output-format=json")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def needs_fio() -> None:
    if not shutil.which("fio"):
        pytest.skip("fio not installed")


def test_fio_verify_through_pool_and_remote(mount_factory, redis_cluster, needs_fio):
    prefix = "mnt-verify:"
    m = mount_factory(remote_config(redis_cluster, prefix))
    out = fio(m.dev(), "--do_verify=1")
    assert out.returncode == 0 and "err= 0" in out.stdout, out.stdout + out.stderr
    far = m.stats()["tiers"]["far"]
    assert far["kind"] == "redis" and far["stored_pages"] > 5000
    assert far["checksum_errors"] == 0 and far["io_errors"] == 0
    assert far["remote_requests"] > 0 and far["remote_received_bytes"] > 0
    assert sum(far["remote_pages_per_node"].values()) == far["stored_pages"]
    assert keys_with(redis_cluster, prefix) > 0
    table = run_swapfs("stats", str(m.path)).stdout
    assert "far" in table
    # A clean unmount deletes the mount's keys.
    r = run_swapfs("unmount", str(m.path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert keys_with(redis_cluster, prefix) == 0


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    why = redis_server_missing()
    if why:
        pytest.skip(why)
    with LocalCluster(masters=3, replicas=1) as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["kill", "freeze"])
def test_a_master_lost_during_fio_verify(mount_factory, own_cluster, needs_fio, failure):
    """kill -9 of a master, or SIGSTOP for 8 s (a machine that stops answering), while fio
    reads back and verifies pages held on the cluster (a replica each, node timeout 2 s): no
    wrong page, no error, the longest read under the bound."""
    cluster = own_cluster
    m = mount_factory(remote_config(cluster, f"mnt-{failure}:"))
    out = fio(m.dev(), "--do_verify=0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert m.stats()["tiers"]["far"]["stored_pages"] > 5000
    victim = cluster.master_ports()[0]
    if failure == "kill":
        timers = [threading.Timer(0.5, cluster.kill, (victim,))]
    else:
        timers = [threading.Timer(0.5, cluster.freeze, (victim,)),
                  threading.Timer(8.5, cluster.thaw, (victim,))]
    for timer in timers:
        timer.start()
    t = time.monotonic()
    try:
        out = fio(m.dev(), "--verify_only", "--iodepth=1", json_out=True)
    finally:
        for timer in timers:
            timer.join()
    took = time.monotonic() - t
    assert out.returncode == 0, out.stdout + out.stderr
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    stall = job["read"]["clat_ns"]["max"] / 1e9
    far = m.stats()["tiers"]["far"]
    print(f"{failure}: verify took {took:.1f} s, longest read {stall:.2f} s, "
          f"retries {far['remote_retries']}, failures {far['remote_failures']}")
    assert far["checksum_errors"] == 0 and far["io_errors"] == 0
    assert far["remote_retries"] > 0
    assert stall <= 6.0, f"longest read {stall:.2f} s"


# Reads pages of a device (the mount serves its files with direct I/O: every read reaches the
# daemon), each timed; run in a process of its own under timeout(1), so a hang fails the test.
READER = r"""
import errno, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
out = []
for off in map(int, sys.argv[2:]):
    t = time.monotonic()
    try:
        got = os.pread(fd, 4096, off)
        out.append([off, "ok", time.monotonic() - t, got.hex()])
    except OSError as e:
        out.append([off, errno.errorcode.get(e.errno, str(e.errno)), time.monotonic() - t, ""])
print(json.dumps(out))
"""


def pages_for(seed: int, n: int) -> bytes:
    """Pages that compress about 3:1 and name themselves."""
    rng = random.Random(seed)
    words = [b"remote ", b"page ", b"%d " % seed, b"slot ", b"far "]
    return b"".join((b"%08d" % i + b"".join(rng.choice(words) for _ in range(800)))[:4096]
                    for i in range(n))


@pytest.mark.slow
def test_a_stopped_cluster_gives_eio_within_the_bound_and_unmount_leaves_nothing(
        mount_factory):
    """Every node of the cluster stopped under a mount: a read of a page held there fails
    with EIO within read_deadline (and a request's timeout), never hangs; pages in the pool
    still read; the unmount ends the daemon and leaves no mount and no process in D state."""
    why = redis_server_missing()
    if why:
        pytest.skip(why)
    with LocalCluster(masters=3, replicas=0) as cluster:
        m = mount_factory(remote_config(cluster, "mnt-stopped:", read_deadline="3s", replicas=0))
        data = pages_for(3, 4096)  # 16 MiB over a 1 MiB pool: most of it goes down
        fd = os.open(m.dev(), os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert m.stats()["tiers"]["far"]["stored_pages"] > 2000
        cluster.stop()
    offsets = [i * 4096 for i in range(0, 4096, 512)]
    t = time.monotonic()
    r = subprocess.run(["timeout", "120", sys.executable, "-c", READER, str(m.dev()),
                        *map(str, offsets)], capture_output=True, text=True)
    took = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    reads = json.loads(r.stdout)
    far = m.stats()["tiers"]["far"]
    print(f"stopped cluster: {[(o // 4096, what, round(s, 2)) for o, what, s, _ in reads]}, "
          f"{took:.1f} s in all, failures {far['remote_failures']}")
    failed = [(o, s) for o, what, s, _ in reads if what != "ok"]
    assert failed, "no read met the stopped cluster"
    for o, what, s, got in reads:
        if what == "ok":
            assert bytes.fromhex(got) == data[o:o + 4096], o
        else:
            assert what == "EIO", (o, what)
            assert s <= 3.0 + 0.5 + 2.0, f"page {o // 4096}: EIO after {s:.1f} s"
    assert far["io_errors"] > 0 and far["checksum_errors"] == 0
    out = run_swapfs("unmount", str(m.path), timeout=60)
    assert out.returncode == 0, out.stderr
    assert not system.is_mounted(m.path)
    assert system.wait_for_exit(m.pid, 10)
    stuck = [p for p in d_state_pids() if str(m.path) in _cmdline(p)]
    assert not stuck, stuck


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the keeper's failover)")
@pytest.mark.parametrize("successor", ["standby", "restart"])
def test_kill9_of_the_daemon_keeps_the_pages_on_the_cluster(mount_factory, redis_cluster,
                                                             successor):
    """kill -9 of the daemon: its successor adopts the remote tier (the key and the
    generations from the state memory, the segment map rebuilt from the slots) and every
    page held on the cluster reads back exact; new writes after the takeover too, and the
    unmount deletes every key, those the first daemon wrote included."""
    prefix = f"mnt-kill9-{successor}:"
    standby = successor == "standby"
    m = mount_factory(remote_config(redis_cluster, prefix),
                      args=("--standby",) if standby else ())
    data = pages_for(5, 2048)
    with open(m.dev(), "r+b") as f:
        f.write(data)
    held = m.stats()["tiers"]["far"]["stored_pages"]
    assert held > 500
    for i in range(3):
        kill_active(m, standby=standby)
        with open(m.dev(), "rb") as f:
            assert f.read(len(data)) == data, f"after kill {i + 1}"
        more = pages_for(10 + i, 256)
        with open(m.dev(), "r+b") as f:
            f.seek(len(data) + i * len(more))
            f.write(more)
        with open(m.dev(), "rb") as f:
            f.seek(len(data) + i * len(more))
            assert f.read(len(more)) == more
    far = m.stats()["tiers"]["far"]
    assert far["stored_pages"] >= held and far["checksum_errors"] == 0 and far["io_errors"] == 0
    r = run_swapfs("unmount", str(m.path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert keys_with(redis_cluster, prefix) == 0
