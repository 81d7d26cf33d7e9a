"""`swapfs upgrade --all`, what the package's postinst runs: it hands over the mounts whose
daemon runs this installation's code (a process whose argv[0] is under sys.prefix) and no
other; MOUNTPOINT and --all exclude each other."""

from __future__ import annotations

import os
import re
import sys

import pytest

from swapfs import system
from swapfs.cli.mount import _processes_of_this_installation, _runs_this_installation

from ..system.conftest import fuse_available, run_swapfs, start_mount, stop_mount

pytestmark = pytest.mark.timeout(120)


def test_this_installation_is_told_by_argv0() -> None:
    assert sys.executable.startswith(sys.prefix)  # this test runs the checkout's .venv
    assert _runs_this_installation(os.getpid())
    assert not _runs_this_installation(1)  # init runs no swapfs
    assert not _runs_this_installation(1 << 30)  # no such process


def test_mountpoint_or_all() -> None:
    for args in (("upgrade",), ("upgrade", "--all", "/run/swapfs")):
        out = run_swapfs(*args)
        assert out.returncode == 2 and "give MOUNTPOINT or --all" in out.stderr, out.stderr


def test_all_hands_over_the_mounts_of_this_installation(tmp_path) -> None:
    why = fuse_available()
    if why:
        pytest.skip(why)
    # --all hands over every mount of this installation: a benchmark's or a soak's mount
    # running from this checkout beside the suite would be handed over too (its counters
    # start again), so the test runs only where it is the sole such mount.
    others = [mp for mp in system.swapfs_mounts() if _processes_of_this_installation(mp)]
    if others:
        pytest.skip(f"other mounts of this installation are live ({', '.join(others)}): "
                    "--all would hand them over too")
    m = start_mount(tmp_path)
    try:
        with open(m.dev(), "r+b") as f:
            f.write(b"kept across the upgrade".ljust(4096, b"."))
        out = run_swapfs("upgrade", "--all")
        assert out.returncode == 0, out.stderr
        match = re.search(rf"swapfs at {re.escape(str(m.path))} upgraded .* handed off to pid (\d+)",
                          out.stdout)
        assert match, out.stdout + out.stderr
        assert system.wait_for_exit(m.pid, 10)
        m.pid = int(match.group(1))
        with open(m.dev(), "rb") as f:
            assert f.read(4096) == b"kept across the upgrade".ljust(4096, b".")
    finally:
        stop_mount(m)
