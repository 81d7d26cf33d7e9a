"""fio's own verification on a swapfs device file, with direct I/O."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def fio(path, *args: str) -> str:
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    cmd = [
        "fio", "--name=verify", f"--filename={path}", "--direct=1", "--ioengine=libaio",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
        "--output-format=normal",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "err= 0" in proc.stdout, proc.stdout
    return proc.stdout


def test_fio_random_4k_verify(mnt):
    fio(mnt.dev(), "--rw=randwrite", "--bs=4k", "--size=32M", "--iodepth=16")
    s = mnt.stats()["devices"]["swap0"]
    assert s["stored_pages"] == 32 * 256
    assert s["reads"] > 0 and s["writes"] >= 32 * 256 // 256


def test_fio_mixed_block_sizes_verify(mnt):
    fio(mnt.dev(), "--rw=randrw", "--bssplit=4k/40:8k/20:64k/20:1m/20", "--size=48M",
        "--iodepth=8", "--verify_interval=4096", "--buffer_compress_percentage=60",
        "--refill_buffers")


def test_fio_sequential_1m_verify(mnt):
    fio(mnt.dev(), "--rw=write", "--bs=1m", "--size=64M", "--iodepth=4")
