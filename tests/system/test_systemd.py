"""systemd: the units and the generator's output pass `systemd-analyze verify` (no
ordering cycle), the installer puts everything in place, and the daemon speaks
sd_notify as a Type=notify service must: READY=1 after INIT, STOPPING=1 only
once the unmount succeeded, STATUS= saying why it waits."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swapfs import system, units
from swapfs.testing import harness

from .conftest import Mount, fuse_available, run_swapfs, stop_mount

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).parent / "swapfs")

MAIN_TOML = """
[pool]
max_bytes = "64M"

[[device]]
name = "swap0"
size = "64M"
swap = true
swap_priority = 10
discard = "pages"

[[device]]
name = "spare"
size = "8M"

[[tier]]
name = "ssd"
path = "{tier_dir}/ssd.img"
size = "64M"
"""


def analyze_verify(files: list[Path], unit_dir: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd; scripts/setup installs it)")
    # swap.target too, with our directory first in the search path, so that
    # ordering cycles through swap.target (and its .wants) are found
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_dir}:", SYSTEMD_LOG_COLOR="0")
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "/usr/lib/systemd/system/swap.target",
         *map(str, files)],
        capture_output=True, text=True, timeout=60, env=env, cwd=unit_dir)


def test_verify_finds_an_ordering_cycle_here(tmp_path):
    """The check below can fail: a service with default dependencies ordered
    before swap.target (the old units' mistake) is reported as a cycle."""
    (tmp_path / "swap.target.wants").mkdir()
    unit = tmp_path / "cyclic.service"
    unit.write_text(f"[Unit]\nBefore=swap.target\n[Service]\nType=oneshot\nExecStart={EXE} --version\n")
    (tmp_path / "swap.target.wants" / "cyclic.service").symlink_to("../cyclic.service")
    out = analyze_verify([unit], tmp_path)
    assert "ordering cycle" in out.stderr + out.stdout


def test_static_files_are_what_the_code_renders():
    assert (REPO / "systemd" / "swapfs@.service").read_text() == units.template_unit()
    gen = REPO / "systemd" / "swapfs-generator"
    assert gen.read_text() == units.GENERATOR_SCRIPT
    assert os.access(gen, os.X_OK)
    assert sorted(p.name for p in (REPO / "systemd").iterdir()) == [
        "swapfs-generator", "swapfs-textfile.service", "swapfs-textfile.timer", "swapfs@.service"]


def test_template_unit_verifies(tmp_path):
    text = units.template_unit(exe=EXE)
    for line in ("Type=notify", "SendSIGKILL=no", "TimeoutStopSec=infinity", "DefaultDependencies=no",
                 "Conflicts=shutdown.target", "Before=swap.target shutdown.target", "OOMScoreAdjust=-1000"):
        assert line in text.splitlines(), line
    (tmp_path / "swapfs@.service").write_text(text)
    inst = tmp_path / "swapfs@main.service"
    inst.write_text(text)
    out = analyze_verify([inst], tmp_path)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def run_generator(tmp_path: Path, configs: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    conf = tmp_path / "etc-swapfs"
    conf.mkdir()
    for name, text in configs.items():
        (conf / name).write_text(text)
    dirs = [tmp_path / d for d in ("normal", "early", "late")]
    for d in dirs:
        d.mkdir()
    env = dict(os.environ, SWAPFS_CONFIG_DIR=str(conf), SWAPFS=EXE)
    out = subprocess.run([str(REPO / "systemd" / "swapfs-generator"), *map(str, dirs)],
                         capture_output=True, text=True, timeout=60, env=env)
    return dirs[0], out


def test_generator_writes_verified_mount_and_swap_units(tmp_path):
    tier_dir = tmp_path / "tiers"
    tier_dir.mkdir()
    normal, out = run_generator(tmp_path, {
        "main.toml": MAIN_TOML.format(tier_dir=tier_dir),
        "my-swap.toml": '[[device]]\nname = "a b"\nsize = "1M"\nswap = true\ndiscard = "off"\n',
        "broken.toml": "[[device]]\nname = 'x'\nsize = 'lots'\n",
        "not toml.txt": "ignored",
    })
    assert out.returncode == 0, out.stderr
    assert "broken.toml" in out.stderr and "device[0].size" in out.stderr
    mount_unit = normal / "swapfs@main.service"
    swap_unit = normal / "swapfs-swap@main-swap0.service"
    other_swap = normal / "swapfs-swap@my\\x2dswap-a\\x20b.service"
    generated = sorted(p.name for p in normal.glob("*.service"))
    assert generated == sorted([mount_unit.name, swap_unit.name, other_swap.name,
                                "swapfs@my\\x2dswap.service"])
    wants = normal / "swap.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == generated
    assert all(os.path.realpath(p) == str(normal / p.name) for p in wants.iterdir())
    assert not any(list((tmp_path / d).iterdir()) for d in ("early", "late"))

    m = mount_unit.read_text().splitlines()
    assert f"ExecStart={EXE} mount --foreground --mkdir --config {tmp_path}/etc-swapfs/main.toml " \
           "/run/swapfs/main" in m
    requires_mounts = next(line for line in m if line.startswith("RequiresMountsFor="))
    assert str(tier_dir) in requires_mounts.split("=", 1)[1].split()
    for line in ("SendSIGKILL=no", "TimeoutStopSec=infinity", "Type=notify"):
        assert line in m
    s = swap_unit.read_text().splitlines()
    assert f"ExecStart={EXE} swapon --priority 10 --discard=pages /run/swapfs/main/swap0" in s
    assert f"ExecStop={EXE} swapoff /run/swapfs/main/swap0" in s
    # swapoff before the unmount: the swap unit is ordered after the mount unit
    assert "Requires=swapfs@main.service" in s and "After=swapfs@main.service" in s
    o = other_swap.read_text()
    assert '--discard=off "/run/swapfs/my-swap/a b"' in o

    out = analyze_verify(sorted(normal.glob("*.service")), normal)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "" and "cycle" not in out.stdout, out.stderr


def test_install_units_into_a_staging_root(tmp_path):
    root = tmp_path / "root"
    out = run_swapfs("install-units", "--root", str(root))
    assert out.returncode == 0, out.stderr
    exe = root / "usr/local/bin/swapfs"
    assert exe.is_symlink() and os.path.samefile(exe, EXE)
    unit = root / "usr/local/lib/systemd/system/swapfs@.service"
    assert unit.read_text() == units.template_unit()
    gen = root / "usr/local/lib/systemd/system-generators/swapfs-generator"
    assert os.access(gen, os.X_OK)
    assert (root / "etc/swapfs").is_dir()
    # the installed generator runs the installed command
    (root / "etc/swapfs/main.toml").write_text('[[device]]\nname = "swap0"\nsize = "1M"\nswap = true\n')
    normal = tmp_path / "gen"
    normal.mkdir()
    env = dict(os.environ, SWAPFS_CONFIG_DIR=str(root / "etc/swapfs"), SWAPFS=str(exe))
    res = subprocess.run([str(gen), str(normal), str(normal), str(normal)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (normal / "swapfs-swap@main-swap0.service").exists()
    # again: idempotent
    assert run_swapfs("install-units", "--root", str(root)).returncode == 0


class NotifySocket:
    """A stand-in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if needle in m:
                    return m
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return next((m for m in self.messages if needle in m), None)


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.timeout(180)
def test_daemon_under_notify_waits_for_swapoff_before_stopping(tmp_path):
    """Type=notify as systemd runs it: READY=1; SIGTERM while swap is on gives
    STATUS= with the reason and no STOPPING=1, the mount keeps serving; after
    swapoff the daemon unmounts by itself, then sends STOPPING=1.  The process
    is named swapfs, has oom_score_adj -1000 and logs with journald priorities."""
    why = fuse_available() or harness.kernel_swap_unavailable()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[pool]\nmax_bytes = "32M"\n[[device]]\nname = "swap0"\nsize = "32M"\n')
    notify = NotifySocket(tmp_path / "notify")
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        daemon = subprocess.Popen(
            [EXE, "mount", "--foreground", "--mkdir", "--no-mlock", "--config", str(cfg), str(mnt)],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    m = Mount(path=mnt, log=stderr_path, pid=daemon.pid)
    try:
        assert notify.wait_for("READY=1", 30), (notify.messages, stderr_path.read_text())
        assert system.is_mounted(mnt)
        with open(f"/proc/{daemon.pid}/comm") as f:
            assert f.read().strip() == "swapfs"
        with open(f"/proc/{daemon.pid}/oom_score_adj") as f:
            adj = f.read().strip()
        # lowering it needs CAP_SYS_RESOURCE, which a container may not grant: then it says so
        assert adj == "-1000" or "cannot set oom_score_adj -1000" in stderr_path.read_text()
        with harness.swap_lock():
            out = run_swapfs("swapon", str(mnt / "swap0"))
            assert out.returncode == 0, out.stderr
            loop = out.stdout.strip()
            try:
                daemon.send_signal(signal.SIGTERM)
                status = notify.wait_for("STATUS=waiting to unmount", 15)
                assert status and "swap is on" in status and loop in status, notify.messages
                assert not any("STOPPING=1" in x for x in notify.messages)
                assert daemon.poll() is None and system.is_mounted(mnt)
                assert system.read_stats(mnt)["devices"]["swap0"]["writes"] > 0  # still serving
            finally:
                off = run_swapfs("swapoff", str(mnt / "swap0"), timeout=120)
            assert off.returncode == 0, off.stderr
        assert notify.wait_for("STOPPING=1", 15), notify.messages
        assert daemon.wait(timeout=15) == 0
        assert not system.is_mounted(mnt)
        log = stderr_path.read_text()
        assert "<6>swapfs.daemon: SIGTERM: unmounting" in log, log
        assert "<3>swapfs.daemon: cannot unmount" in log, log
    finally:
        notify.sock.close()
        if daemon.poll() is None:
            stop_mount(m)
            daemon.wait(timeout=30)
