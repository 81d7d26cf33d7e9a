"""swapfs.system: mountinfo (escapes undone), loop devices, /proc/swaps, the stats xattr."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from swapfs import system
from swapfs.testing import harness

from .conftest import run_swapfs

pytestmark = pytest.mark.timeout(120)

MOUNTINFO = (
    "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n"
    r"98 29 0:50 / /tmp/a\040b\011c\012d\134e rw,nosuid,nodev master:1 shared:2 - fuse.swapfs swapfs "
    "rw,user_id=0\n"
    "99 29 0:51 / /run/x rw - fuse swapfs rw\n"
    "garbage line\n"
)


def test_parse_mountinfo_undoes_every_octal_escape_and_skips_optional_fields():
    ms = system.parse_mountinfo(MOUNTINFO)
    assert [m.mountpoint for m in ms] == ["/proc", "/tmp/a b\tc\nd\\e", "/run/x"]
    assert ms[1].fstype == "fuse.swapfs" and ms[1].source == "swapfs" and ms[1].mount_id == 98
    assert system.unescape(r"a\040b\134\040") == "a b\\ "


def test_parse_swaps():
    text = ("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
            "/dev/loop3                              partition\t65532\t\t1024\t\t100\n"
            "/tmp/with\\040space                      file\t1000\t\t0\t\t-2\n")
    swaps = system.parse_swaps(text)
    assert swaps["/dev/loop3"] == system.Swap("/dev/loop3", "partition", 65532, 1024, 100)
    assert swaps["/tmp/with space"].priority == -2


def test_a_mount_whose_path_has_spaces_is_found_and_unmounted(mount_factory):
    m = mount_factory(name="mnt with space")
    assert " " in str(m.path)
    assert str(m.path) in system.swapfs_mounts()
    assert system.is_mounted(m.path)
    assert system.mount_of(m.dev()) == str(m.path)
    assert system.mount_of(m.path) == str(m.path)
    assert system.read_stats(m.dev())["size_bytes"] == 64 << 20
    assert "swap0" in system.read_stats(m.path)["devices"]
    out = run_swapfs("unmount", str(m.path))
    assert out.returncode == 0, out.stderr
    assert not system.is_mounted(m.path)


def test_read_stats_of_something_else_fails_with_the_errno(tmp_path):
    with pytest.raises(OSError) as e:
        system.read_stats(tmp_path)
    assert e.value.errno in (errno.ENODATA, errno.ENOTSUP)


@pytest.mark.root
def test_loop_devices_backed_by_a_file_and_active_swaps(tmp_path):
    why = harness.kernel_swap_unavailable()
    if why:
        pytest.skip(why)
    f = tmp_path / "dir with space" / "area"
    f.parent.mkdir()
    with open(f, "wb") as fh:
        fh.truncate(16 << 20)
    with harness.loop_device(f) as loop:
        found = system.loops_backed_by(f)
        assert [lo.device for lo in found] == [loop] and found[0].direct_io
        assert [lo.device for lo in system.loops_backed_by(f.parent)] == [loop]
        assert system.loops_backed_by(tmp_path / "dir") == []  # a prefix of a name is not a parent
        with harness.swap_on(loop, priority=3):
            s = system.active_swaps()[loop]
            assert s.priority == 3 and s.size_kib > 0
        assert loop not in system.active_swaps()
    assert system.loops_backed_by(f) == []
    assert os.path.exists(f)


@pytest.mark.root
def test_busy_reason_names_swap_then_loop_devices_with_what_to_run(tmp_path):
    why = harness.kernel_swap_unavailable()
    if why:
        pytest.skip(why)
    f = tmp_path / "area"
    with open(f, "wb") as fh:
        fh.truncate(16 << 20)
    assert system.busy_reason(str(tmp_path)) is None
    with harness.loop_device(f) as loop:
        reason = system.busy_reason(str(tmp_path))
        assert reason == f"loop devices still use the mount: {loop}; run losetup -d {loop} first"
        assert system.busy_reason(str(tmp_path), loops_ok=True) is None
        with harness.swap_on(loop):
            reason = system.busy_reason(str(tmp_path), loops_ok=True)
            assert reason == f"swap is on {loop} (over {f}); run swapfs swapoff {f} first"
    assert system.busy_reason(str(tmp_path)) is None


@pytest.mark.root
def test_wait_unmounted_wakes_on_the_change_and_times_out_otherwise(tmp_path):
    import threading
    import time

    d = tmp_path / "m"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "swapfs-test", str(d)], check=True)
    try:
        start = time.monotonic()
        assert system.wait_unmounted(d, 0.2) is False
        assert time.monotonic() - start >= 0.2
        timer = threading.Timer(0.3, lambda: subprocess.run(["umount", str(d)], check=True))
        timer.start()
        assert system.wait_unmounted(d, 10) is True
        assert time.monotonic() - start < 5
        timer.join()
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_wait_for_exit_of_any_process():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert system.wait_for_exit(proc.pid, 0.1) is False
        proc.stdin.close()
        assert system.wait_for_exit(proc.pid, 10) is True
    finally:
        proc.kill()
        proc.wait()
    assert system.wait_for_exit(proc.pid, 0) is True  # reaped: gone
