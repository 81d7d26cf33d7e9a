"""The daemon on the io_uring transport: chosen from the command line, refused with the
reason, fio's verification through a direct-I/O loop device, and the kernel swapping."""

from __future__ import annotations

import os

import pytest

from swapfs import system
from swapfs.fuse import uring
from swapfs.testing import harness

from ..conftest import enable_uring_set
from .conftest import SMALL_CONFIG, run_swapfs
from .test_fio import fio
from .test_kernel_swap import CONFIG as SWAP_CONFIG
from .test_kernel_swap import WORKING_SET, WORKLOAD_LIMIT

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

MiB = 1 << 20
URING = ("--transport", "uring", "--no-failover")  # a ring dies with its process


@pytest.mark.timeout(60)
def test_mount_says_which_transport_and_why(uring_enabled, mount_factory):
    m = mount_factory(SMALL_CONFIG, args=("--transport", "auto", "--no-failover"))
    assert "transport uring: FUSE over io_uring offered and every check passed" in m.log_text()
    assert "transport uring" in m.log_text().split("swapfs mounted at", 1)[1]
    with enable_uring_set("N"):
        c = mount_factory(SMALL_CONFIG, args=("--transport", "auto", "--no-failover"))
        assert f"transport classic: {uring.ENABLE_URING} is N" in c.log_text()


@pytest.mark.timeout(60)
def test_uring_with_failover_is_refused_and_auto_chooses_classic(uring_enabled, mount_factory, tmp_path):
    mnt = tmp_path / "refused"
    mnt.mkdir()
    proc = run_swapfs("mount", "--no-mlock", "--transport", "uring", str(mnt))
    assert proc.returncode == 2 and "cannot take part in failover" in proc.stderr, proc.stderr
    assert not system.is_mounted(mnt)
    m = mount_factory(SMALL_CONFIG, args=("--transport", "auto"))
    assert "transport auto: classic, because failover needs it" in m.log_text()
    assert "transport classic" in m.log_text().split("swapfs mounted at", 1)[1]


@pytest.mark.timeout(60)
def test_mount_uring_unavailable_fails_with_the_reason_and_mounts_nothing(uring_enabled, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with enable_uring_set("N"):
        proc = run_swapfs("mount", "--no-mlock", "--log-file", str(tmp_path / "log"), *URING, str(mnt))
    assert proc.returncode != 0
    assert "transport uring unavailable" in proc.stderr and "enable_uring is N" in proc.stderr, proc.stderr
    assert not system.is_mounted(mnt)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fio_verify_through_a_loop_device_on_uring(uring_enabled, mount_factory):
    m = mount_factory(SMALL_CONFIG, args=URING)
    assert "transport uring" in m.log_text()
    with harness.loop_device(str(m.dev())) as loop:
        fio(loop, "--rw=randwrite", "--bs=4k", "--size=32M", "--iodepth=16")
        fio(loop, "--rw=randrw", "--bssplit=4k/40:8k/20:64k/20:128k/20", "--size=48M",
            "--iodepth=8", "--verify_interval=4096", "--buffer_compress_percentage=60",
            "--refill_buffers")
    s = m.stats()["devices"]["swap0"]
    assert s["reads"] > 0 and s["writes"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kernel_swaps_into_swapfs_on_uring(uring_enabled, mount_factory):
    why = harness.kernel_swap_unavailable()
    if why:
        pytest.skip(f"kernel swap test: {why}")
    m = mount_factory(SWAP_CONFIG, args=URING)
    assert "transport uring" in m.log_text()
    # the transport proved itself with plain file I/O before any swap goes on it
    fio(m.dev(), "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=16")
    with harness.loop_device(str(m.dev())) as loop:
        with harness.swap_on(loop, priority=32767, discard=True):  # takes the machine-wide swap lock
            result = harness.run_swap_workload(
                working_set_bytes=WORKING_SET,
                limit_bytes=WORKLOAD_LIMIT,
                cgroup_name=f"swapfs-test-uring-{os.getpid()}",
                watch_device=loop,
            )
            assert result.bad_pages == 0, result.output
            assert result.pages == WORKING_SET // 4096
            assert result.peak_swap_kib * 1024 > 128 * MiB, result
            d = m.stats()["devices"]["swap0"]
            assert d["writes"] > 0 and d["reads"] > 0
            print(f"kernel swap on uring: {result.pages} pages, peak swapped "
                  f"{result.peak_swap_kib // 1024} MiB, {result.wall_seconds:.1f}s")
        assert loop not in harness.active_swaps()


def test_fusectl_missing_is_a_reason_given_before_mounting(uring_enabled, monkeypatch, tmp_path):
    monkeypatch.setattr(uring.probe, "FUSECTL", str(tmp_path / "no-fusectl"))
    reason = uring.unavailable_reason()
    assert reason is not None and "fusectl is not mounted" in reason


@pytest.mark.timeout(60)
async def test_daemon_refused_at_init_says_why_and_leaves_no_mount(uring_enabled, monkeypatch, tmp_path):
    """io_uring refused only at INIT (here: the ring cannot be made): serve_mount raises
    the transport's MountError itself, not a nursery's wrapper, and the mount is gone."""
    from swapfs.config import parse_config
    from swapfs.daemon import serve_mount

    def refuse(*args, **kwargs):
        raise uring.TransportUnavailable("no ring for this test")

    monkeypatch.setattr(uring.UringTransport, "create", refuse)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(uring.TransportUnavailable, match="no ring for this test"):
        await serve_mount(parse_config(SMALL_CONFIG), str(mnt), transport="uring")
    assert not system.is_mounted(mnt)
