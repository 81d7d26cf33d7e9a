"""The real kernel swaps into swapfs: loop device, mkswap, swapon, a memory cgroup."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from swapfs import system
from swapfs.testing import harness

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]

MiB = 1024 * 1024
# The workload's memory cgroup and working set.  In cgroups of 64 and 96 MiB
# (the interpreter and its verify loop included), once swap-ins were fast, the
# kernel sometimes OOM-killed the workload while charging a swapped-in page
# (zram's too, at 64 MiB): its every page active, most of them in the swap
# cache.  The 128 MiB cgroups of scripts/bench never did.
WORKLOAD_LIMIT = 128 * MiB
WORKING_SET = 384 * MiB

CONFIG = """
[pool]
algorithm = "lz4"
max_bytes = "512M"

[[device]]
name = "swap0"
size = "1G"
"""


@pytest.fixture
def swap_ready():
    why = harness.kernel_swap_unavailable()
    if why:
        pytest.skip(f"kernel swap test: {why}")


def test_kernel_swaps_into_swapfs_and_reads_back(swap_ready, mount_factory):
    m = mount_factory(CONFIG)
    dev_file = str(m.dev())
    with harness.loop_device(dev_file) as loop:
        name = os.path.basename(loop)
        with open(f"/sys/block/{name}/loop/dio") as f:
            assert f.read().strip() == "1"
        with open(f"/sys/block/{name}/queue/discard_max_bytes") as f:
            assert int(f.read()) > 0, "loop device over swapfs advertises no discard"
        with harness.swap_on(loop, priority=32767, discard=True):
            result = harness.run_swap_workload(
                working_set_bytes=WORKING_SET,
                limit_bytes=WORKLOAD_LIMIT,
                cgroup_name=f"swapfs-test-{os.getpid()}",
                watch_device=loop,
            )
            assert result.bad_pages == 0, result.output
            assert result.pages == WORKING_SET // 4096
            # at least the part above the cgroup's limit went through swap
            assert result.peak_swap_kib * 1024 > 128 * MiB, result
            s = m.stats()
            d = s["devices"]["swap0"]
            assert d["writes"] > 0 and d["reads"] > 0
            assert d["written_bytes"] >= 128 * MiB
            print(
                f"kernel swap: {result.pages} pages, peak swapped {result.peak_swap_kib // 1024} MiB, "
                f"{result.wall_seconds:.1f}s; swapfs stored {d['stored_pages']} pages, "
                f"ratio {s['totals']['compression_ratio']:.2f}"
            )
        # swapoff read every page back and, with --discard, freed the slots
        assert loop not in harness.active_swaps()
    s = m.stats()
    assert s["totals"]["stored_pages"] == s["devices"]["swap0"]["stored_pages"]
    assert s["devices"]["swap0"]["discards"] > 0


def test_kernel_swap_with_pool_far_smaller_than_working_set(swap_ready, mount_factory, tmp_path):
    """A 16 MiB pool under a 256 MiB working set: most pages land in the file tier."""
    m = mount_factory(f"""
[pool]
algorithm = "lz4"
max_bytes = "16M"

[[device]]
name = "swap0"
size = "1G"

[[tier]]
name = "disk"
kind = "file"
path = "{tmp_path}/disk.img"
size = "1G"
priority = 10
""")
    with harness.loop_device(str(m.dev())) as loop, harness.swap_on(loop):
        peak: dict = {}

        def sample() -> None:
            s = m.stats()
            if s["tiers"]["disk"]["stored_pages"] > peak.get("disk", -1):
                peak["disk"] = s["tiers"]["disk"]["stored_pages"]
                peak["pool"] = s["tiers"]["pool"]["stored_pages"]

        result = harness.run_swap_workload(
            working_set_bytes=WORKING_SET, limit_bytes=WORKLOAD_LIMIT,
            cgroup_name=f"swapfs-test-tier-{os.getpid()}", watch_device=loop, on_poll=sample,
        )
        assert result.bad_pages == 0, result.output
        assert peak["disk"] * 4096 > 64 * MiB, peak
        assert peak["pool"] > 0, peak
        s = m.stats()
        assert s["tiers"]["disk"]["checksum_errors"] == 0 and s["tiers"]["disk"]["io_errors"] == 0
        print(f"kernel swap with a 16 MiB pool: {result.wall_seconds:.1f}s, peak {peak}")


def test_kernel_swap_pages_flow_down_and_back_up(swap_ready, mount_factory, tmp_path):
    """A 16 MiB pool with low watermarks under a 192 MiB working set: writeback
    moves cold pages to the file tier and refaults promote hot ones back.

    Under the classic policy, which promotes on every near refault: the promotion path
    itself under real kernel swap is what this checks. The default policy (workingset)
    promotes hardly ever in this workload, on purpose (docs/policy.md); its decisions are
    tested on traces in tests/store/test_policy.py."""
    m = mount_factory(f"""
[pool]
algorithm = "lz4"
max_bytes = "16M"
high_watermark = 0.6
low_watermark = 0.4

[writeback]
policy = "classic"

[[device]]
name = "swap0"
size = "1G"

[[tier]]
name = "disk"
kind = "file"
path = "{tmp_path}/disk.img"
size = "1G"
priority = 10
""")
    with harness.loop_device(str(m.dev())) as loop, harness.swap_on(loop):
        result = harness.run_swap_workload(
            working_set_bytes=WORKING_SET, limit_bytes=WORKLOAD_LIMIT,
            cgroup_name=f"swapfs-test-wb-{os.getpid()}", watch_device=loop,
        )
        assert result.bad_pages == 0, result.output
        s = m.stats()
    wb = s["writeback"]
    assert wb["moved_pages"] > 0 and wb["pairs"]["pool_to_disk"]["pages"] == wb["moved_pages"]
    assert wb["refaults"] > 0
    assert wb["promotions"] > 0, wb
    assert s["tiers"]["disk"]["checksum_errors"] == 0 and s["tiers"]["disk"]["io_errors"] == 0
    print(f"kernel swap, 16 MiB pool: {result.wall_seconds:.1f}s, moved {wb['moved_pages']}, "
          f"refaults {wb['refaults']}, promotions {wb['promotions']}, aborted {wb['aborted_moves']}, "
          f"cache hits {s['cache']['hits']}")


def test_no_loop_device_left_behind(tmp_path_factory):
    """Runs after the swap test: no loop device over a file of this run's tests
    may stay attached (other checkouts' runs may have theirs attached now)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    base = tmp_path_factory.getbasetemp()
    left = system.loops_backed_by(base)
    assert left == [], (base, left)


def test_a_store_smaller_than_its_device_ends_in_the_oom_killer_not_a_thrash(
        swap_ready, mount_factory, tmp_path):
    """A 1 GiB device over a 16 MiB pool and a 32 MiB file tier, under a workload needing
    about 256 MiB of swap.  Over the whole device the kernel kept swapping into slots the
    store had no room for, every write refused, for as long as anyone waited
    (scripts/bench-full); swapfs swapon's area stops at what the store can back, so the
    kernel sees its swap full and the cgroup's OOM killer ends the workload: within the
    bound, with no wrong page, the daemon serving."""
    m = mount_factory(f"""
[pool]
max_bytes = "16M"

[[device]]
name = "swap0"
size = "1G"

[[tier]]
name = "disk"
path = "{tmp_path}/disk.img"
size = "32M"
""")
    dev_file = str(m.dev())
    with harness.swap_lock(), harness.vm_page_cluster(0):
        out = subprocess.run([sys.executable, "-m", "swapfs", "swapon", dev_file],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        loop = out.stdout.strip()
        try:
            area = system.active_swaps()[loop].size_kib * 1024
            assert area < 120 * MiB
            result = harness.run_swap_workload(
                working_set_bytes=WORKING_SET, limit_bytes=WORKLOAD_LIMIT,
                cgroup_name=f"swapfs-test-full-{os.getpid()}", watch_device=loop,
                timeout=180, oom_ok=True)
            assert result.bad_pages == 0, result.output
            assert result.oom_killed, result.output  # 256 MiB of swap cannot fit
            # the store's area took pages before the end (sampled: the OOM may come before a
            # sample sees the area near full)
            assert result.peak_swap_kib > 0
            st = system.read_stats(m.path, timeout=10)  # the daemon serves
            assert st["devices"]["swap0"]["writes"] > 0
        finally:
            system.swap_off(loop)
            system.detach_loop(loop)
