"""Tier files behind real mounts: one mount a file, nothing overwritten unasked, a dead mount's
file reused, and sizes the machine cannot hold refused before mounting."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest

from .conftest import _is_mounted, _pid_alive, run_swapfs, start_mount, stop_mount

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
PAGE = 4096


def config(path: Path | str, *, size: str = "32M", device: str = "16M", extra: str = "") -> str:
    return f"""
[pool]
algorithm = "lz4"
max_bytes = "1M"

[[device]]
name = "swap0"
size = "{device}"

[[tier]]
name = "ssd"
path = "{path}"
size = "{size}"
priority = 10
{extra}"""


def fill(m, n_pages: int) -> bytes:
    data = os.urandom(n_pages * PAGE)  # incompressible: to the file tier
    fd = os.open(m.dev(), os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 0) == len(data)
    finally:
        os.close(fd)
    return data


def read_back(m, n: int) -> bytes:
    fd = os.open(m.dev(), os.O_RDONLY)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


def refused(tmp_path: Path, text: str, name: str = "refused") -> tuple[str, str]:
    """check-config's and mount's stderr for a configuration both must refuse."""
    conf = tmp_path / f"{name}.toml"
    conf.write_text(text)
    check = run_swapfs("check-config", str(conf))
    assert check.returncode == 2, check.stdout + check.stderr
    mnt = tmp_path / f"{name}-mnt"
    mnt.mkdir(exist_ok=True)
    mount = run_swapfs("mount", "--no-mlock", "--config", str(conf), str(mnt))
    assert mount.returncode == 2, mount.stdout + mount.stderr
    assert not _is_mounted(mnt)
    for err in (check.stderr, mount.stderr):
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return check.stderr, mount.stderr


def test_second_mount_of_the_same_tier_file_is_refused(mount_factory, tmp_path: Path) -> None:
    backing = tmp_path / "ssd.img"
    first = mount_factory(config(backing), name="first")
    data = fill(first, 2048)
    assert first.stats()["tiers"]["ssd"]["stored_pages"] > 1000
    before = backing.read_bytes()
    check, mount = refused(tmp_path, config(backing), name="second")
    for err in (check, mount):
        assert f"in use by the swapfs mount at {first.path}" in err or \
            f"daemon pid {first.pid}" in err, err
        assert str(backing) in err
    assert backing.read_bytes() == before  # not truncated, not re-signed
    assert read_back(first, len(data)) == data
    assert first.stats()["tiers"]["ssd"]["checksum_errors"] == 0


def test_existing_foreign_file_is_refused_and_left_intact(mount_factory, tmp_path: Path) -> None:
    backing = tmp_path / "precious.db"
    content = os.urandom(1_200_000)
    backing.write_bytes(content)
    os.chmod(backing, 0o644)
    before = os.stat(backing)
    check, mount = refused(tmp_path, config(backing))
    for err in (check, mount):
        assert f"holds {len(content)} bytes without a swapfs signature" in err, err
        assert "force_init" in err
    after = os.stat(backing)
    assert backing.read_bytes() == content
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (
        before.st_mode, before.st_size, before.st_mtime_ns)
    assert stat.S_IMODE(after.st_mode) == 0o644
    # said explicitly: overwritten
    m = mount_factory(config(backing, extra="force_init = true\n"))
    data = fill(m, 512)
    assert read_back(m, len(data)) == data


def test_file_of_a_killed_daemon_is_reused(tmp_path: Path) -> None:
    backing = tmp_path / "ssd.img"
    m = start_mount(tmp_path, config(backing), name="dead")
    try:
        fill(m, 1024)
        os.kill(m.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(m.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_mount(m)  # the dead mount: aborted and lazily unmounted
    assert os.stat(backing).st_size > 0  # the killed daemon did not empty it
    m2 = start_mount(tmp_path, config(backing), name="next")
    try:
        data = fill(m2, 256)
        assert read_back(m2, len(data)) == data
        assert m2.stats()["tiers"]["ssd"]["stored_pages"] >= 200
    finally:
        stop_mount(m2)
    assert "Traceback" not in m2.log_text()


def test_16_tib_device_is_refused_with_the_sizes_or_mounts(mount_factory, tmp_path: Path) -> None:
    text = '[pool]\nmax_bytes = "8M"\n[[device]]\nname = "huge"\nsize = "16T"\n'
    conf = tmp_path / "huge.toml"
    conf.write_text(text)
    check = run_swapfs("check-config", str(conf))
    if check.returncode == 0:  # the kernel reserves it: then mount works too
        m = mount_factory(text)
        assert os.stat(m.dev("huge")).st_size == 16 << 40
        return
    check, mount = refused(tmp_path, text)
    for err in (check, mount):
        assert "device[0].size: 17592186044416 bytes (16.0 TiB)" in err and "slot table" in err


def test_tier_in_an_immutable_directory_is_one_clear_line(tmp_path: Path) -> None:
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    d = tmp_path / "frozen"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("no immutable attribute on this filesystem")
    try:
        check, mount = refused(tmp_path, config(d / "ssd.img"))
        for err in (check, mount):
            assert f"cannot create the backing file in {d}: Operation not permitted" in err
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_2_tib_sparse_tier_mounts_with_little_memory(mount_factory, tmp_path: Path) -> None:
    """Metadata follows what is stored: a 2 TiB tier costs its per-cluster arrays (16 MiB),
    not 9 bytes a page of capacity (4.5 GiB).  RSS is measured, not the time."""
    vfs = os.statvfs(tmp_path)
    if vfs.f_frsize * vfs.f_blocks < 64 * MiB:
        pytest.skip("filesystem too small")
    backing = tmp_path / "big.img"
    conf = tmp_path / "big.toml"
    conf.write_text(config(backing, size="2T", device="64M"))
    check = run_swapfs("check-config", str(conf))
    assert check.returncode == 0, check.stderr
    if vfs.f_bavail * vfs.f_frsize < 2 << 40:  # sparse and larger than the free space: warned
        assert "swapfs: warning: " in check.stderr and "2199023255552 bytes (2.0 TiB) is more " \
            "than the" in check.stderr, check.stderr
    t0 = time.monotonic()
    m = mount_factory(config(backing, size="2T", device="64M"))
    took = time.monotonic() - t0
    rss = rss_bytes(m.pid)
    print(f"2 TiB tier: mount {took:.2f} s, daemon RSS {rss / MiB:.1f} MiB")
    assert rss <= 128 * MiB, f"daemon RSS {rss / MiB:.1f} MiB"
    assert m.stats()["tiers"]["ssd"]["capacity_pages"] == (2 << 40) // PAGE
    data = fill(m, 4096)
    assert read_back(m, len(data)) == data
    st = m.stats()["tiers"]["ssd"]
    assert st["stored_pages"] >= 4000
    assert st["metadata_bytes"] <= 32 * MiB
    assert rss_bytes(m.pid) <= 128 * MiB + len(data)


def test_second_daemon_started_as_systemd_starts_it_is_refused(mount_factory,
                                                               tmp_path: Path) -> None:
    """The generator's unit runs ``swapfs mount --foreground``: started again (or a second
    configuration naming the same tier file) while the first runs, it exits with one line
    and never mounts."""
    from swapfs import units
    from swapfs.config import parse_config

    backing = tmp_path / "ssd.img"
    text = config(backing)
    first = mount_factory(text, name="unit1")
    conf = tmp_path / "unit2.toml"
    conf.write_text(text)
    mnt = tmp_path / "unit2"
    unit = units.mount_unit("unit2", parse_config(text), str(conf), "swapfs")
    assert "mount --foreground --mkdir --config" in unit  # the command below, as the unit has it
    out = run_swapfs("mount", "--foreground", "--mkdir", "--no-mlock", "--config", str(conf),
                     str(mnt))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"daemon pid {first.pid}" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not _is_mounted(mnt)
