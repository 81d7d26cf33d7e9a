"""The command line as a user meets it: help, config errors, mount, stats, unmount, signals."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from swapfs import cli, system

from .conftest import Mount, _is_mounted, run_swapfs, stop_mount

pytestmark = pytest.mark.timeout(90)


def test_help_explains_each_command(capsys):
    top = run_swapfs("--help")  # the entry point itself; the rest in this process
    assert top.returncode == 0
    commands = ("mount", "unmount", "swapon", "swapoff", "status", "stats", "writeback", "top",
                "check-config", "install-units", "generate-units")
    for word in (*commands, "loop device", "/etc/swapfs"):
        assert word in top.stdout, word

    def help_of(cmd: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            cli.main([cmd, "--help"])
        assert exit_.value.code == 0
        return capsys.readouterr().out

    for cmd in commands:
        assert "usage: swapfs " + cmd in help_of(cmd)
    assert "--foreground" in help_of("mount")
    stats_help = help_of("stats")
    assert "--json" in stats_help and "prometheus" in stats_help
    assert "--priority" in help_of("swapon")
    assert cli.main([]) == 2


def test_default_config_is_valid_and_printable():
    out = run_swapfs("check-config")
    assert out.returncode == 0, out.stderr
    assert "1 device" in out.stdout
    text = run_swapfs("check-config", "--print-default").stdout
    assert "[pool]" in text and "swap0" in text


@pytest.mark.parametrize(
    "text, key",
    [
        ("[pool]\nalgorithm = 'lzma'\n", "algorithm"),
        ("[pool]\nbogus = 1\n", "bogus"),
        ("[[device]]\nname = 'a'\nsize = '1000'\n", "size"),
        ("[[device]]\nname = 'a'\nsize = '1M'\n[[device]]\nname = 'a'\nsize = '1M'\n", "name"),
        ("[pool]\nmax_bytes = 'lots'\n", "max_bytes"),
        ("this is not toml", "TOML"),
    ],
)
def test_bad_config_refused_before_mounting(tmp_path, text, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = run_swapfs("mount", "--config", str(cfg), str(mnt))
    assert out.returncode == 2
    assert key in out.stderr, out.stderr
    assert not _is_mounted(mnt)
    assert run_swapfs("check-config", str(cfg)).returncode == 2


def test_missing_config_file(tmp_path):
    out = run_swapfs("check-config", str(tmp_path / "absent.toml"))
    assert out.returncode == 2 and "absent.toml" in out.stderr


def test_bad_mountpoints(tmp_path, mnt):
    out = run_swapfs("mount", str(tmp_path / "absent"))
    assert out.returncode != 0 and "does not exist" in out.stderr
    f = tmp_path / "file"
    f.write_text("")
    out = run_swapfs("mount", str(f))
    assert out.returncode != 0 and "not a directory" in out.stderr
    out = run_swapfs("mount", str(mnt.path))
    assert out.returncode != 0 and "already a mount" in out.stderr
    out = run_swapfs("unmount", str(tmp_path))
    assert out.returncode != 0 and "not a swapfs mount" in out.stderr
    out = run_swapfs("stats", str(tmp_path))
    assert out.returncode != 0 and "not a swapfs mount" in out.stderr


def test_default_config_mount_stats_unmount(mount_factory):
    m = mount_factory(config=None)
    assert os.listdir(m.path) == ["swap0"]
    assert os.stat(m.dev()).st_size == 1 << 30
    fd = os.open(m.dev(), os.O_RDWR)
    try:
        os.pwrite(fd, b"hello swapfs " * 315, 4096)
    finally:
        os.close(fd)
    out = run_swapfs("stats", str(m.path))
    assert out.returncode == 0, out.stderr
    assert "swap0" in out.stdout and "compression ratio" in out.stdout
    js = json.loads(run_swapfs("stats", "--json", str(m.path)).stdout)
    assert js["devices"]["swap0"]["stored_pages"] == 1
    assert js["tiers"]["pool"]["stored_pages"] == 1
    out = run_swapfs("unmount", str(m.path))
    assert out.returncode == 0, out.stderr
    assert not _is_mounted(m.path)
    assert system.wait_for_exit(m.pid, 10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(mount_factory, sig):
    m = mount_factory()
    os.kill(m.pid, sig)
    assert system.wait_unmounted(m.path, 10)
    assert system.wait_for_exit(m.pid, 10)
    assert "unmounting" in m.log_text()


def test_killed_daemon_leaves_a_dead_mount_not_an_empty_directory(mount_factory):
    """A crash must not unmount: reads then fail (ENOTCONN) instead of finding nothing
    (one process: with failover, the keeper starts a successor instead)."""
    m = mount_factory(args=("--no-failover",))
    os.kill(m.pid, signal.SIGKILL)
    assert system.wait_for_exit(m.pid, 10)
    assert _is_mounted(m.path)
    with pytest.raises(OSError) as e:
        os.stat(m.dev())
    assert e.value.errno == errno.ENOTCONN
    out = run_swapfs("stats", str(m.path))
    assert out.returncode != 0 and "daemon is gone" in out.stderr
    out = run_swapfs("unmount", str(m.path))  # cleans up the dead mount
    assert out.returncode == 0, out.stderr
    assert not _is_mounted(m.path)


def test_poll_option(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = run_swapfs("mount", "--poll-us", "-5", str(mnt))
    assert out.returncode == 2 and "--poll-us" in out.stderr
    assert not _is_mounted(mnt)


@pytest.mark.parametrize("option,value", [("--poll-cpu-pressure", "0"), ("--poll-cpu-pressure", "101"),
                                          ("--cpu-latency-min-rate", "-1")])
def test_wakeup_options_out_of_range_are_refused(tmp_path, option, value):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = run_swapfs("mount", option, value, str(mnt))
    assert out.returncode == 2 and option in out.stderr
    assert not _is_mounted(mnt)


@pytest.mark.parametrize("poll_us", ["0", "1000"])
def test_mount_without_and_with_long_polling_serves_io(tmp_path, poll_us):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "log"
    out = run_swapfs("mount", "--no-mlock", "--poll-us", poll_us, "--log-file", str(log), str(mnt))
    assert out.returncode == 0, out.stderr
    m = Mount(path=mnt, log=log, pid=int(re.search(r"daemon pid (\d+)", out.stdout).group(1)))
    try:
        data = os.urandom(1 << 20)
        fd = os.open(m.dev(), os.O_RDWR)
        try:
            for i in range(16):
                os.pwrite(fd, data[i * 65536:(i + 1) * 65536], i * 65536)
            assert os.pread(fd, 1 << 20, 0) == data
        finally:
            os.close(fd)
    finally:
        stop_mount(m)
    assert "Traceback" not in m.log_text()


def test_background_daemon_logs_under_run_swapfs_as_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (the default log directory of a root daemon)")
    mnt = tmp_path / "mnt"
    out = run_swapfs("mount", "--mkdir", "--no-mlock", str(mnt))
    assert out.returncode == 0, out.stderr
    m = Mount(path=mnt, log=tmp_path / "unused", pid=int(re.search(r"daemon pid (\d+)", out.stdout).group(1)))
    try:
        log = re.search(r"log (\S+)\)", out.stdout).group(1)
        assert log.startswith("/run/swapfs/log/swapfs-") and os.path.exists(log)
        with open(log) as f:
            assert "mounted at " + str(mnt) in f.read()
        with open(f"/proc/{m.pid}/comm") as f:
            assert f.read().strip() == "swapfs"
    finally:
        stop_mount(m)
    os.unlink(log)


def test_the_daemon_imports_no_test_helpers():
    """The daemon's memory is locked: what it imports stays lean, and the
    helpers of tests and benchmarks are not part of it."""
    code = ("import sys, swapfs.cli, swapfs.daemon; "
            "print(sorted(m for m in sys.modules if m.startswith('swapfs.testing')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out
