"""A remote tier on a local Redis Cluster behind a real mount: fio verify through the pool and
the cluster, the keys gone after unmount, and a master killed while fio verifies."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from swapfs.testing.redis import LocalCluster, redis_server_missing

from .conftest import run_swapfs

pytestmark = pytest.mark.timeout(180)


def remote_config(cluster: LocalCluster, prefix: str, *, pool: str = "1M",
                  device: str = "96M", size: str = "128M", read_deadline: str = "15s") -> str:
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
replicas = 1
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
