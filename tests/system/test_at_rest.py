"""Backing files through a real mount: relative paths, ours alone, encrypted, and empty after
a clean unmount."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from .conftest import Mount, _pid_alive, run_swapfs, stop_mount

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
PAGE = 4096
MARK = b"swapfs-at-rest-marker-"


def config(path: str, *, encrypt: bool | None = None, size: str = "32M") -> str:
    text = f"""
[pool]
algorithm = "lz4"
max_bytes = "1M"

[[device]]
name = "swap0"
size = "16M"

[[tier]]
name = "ssd"
path = "{path}"
size = "{size}"
priority = 10
"""
    if encrypt is not None:
        text += f"encrypt = {'true' if encrypt else 'false'}\n"
    return text


def incompressible_marked(n_pages: int) -> bytes:
    """Pages that do not compress (so they go to the file tier), each starting with MARK."""
    out = bytearray()
    for i in range(n_pages):
        out += MARK + i.to_bytes(4, "little") + os.urandom(PAGE - len(MARK) - 4)
    return bytes(out)


def write_device(m: Mount, data: bytes) -> None:
    fd = os.open(m.dev(), os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 0) == len(data)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_clean_unmount_empties_the_backing_file(mount_factory, tmp_path: Path) -> None:
    m = mount_factory(config(str(tmp_path / "ssd.img")))
    backing = tmp_path / "ssd.img"
    write_device(m, incompressible_marked(2048))  # 8 MiB, nearly all in the tier
    assert m.stats()["tiers"]["ssd"]["stored_pages"] > 1500
    assert os.stat(backing).st_blocks * 512 >= 6 * MiB
    stop_mount(m)
    assert not _pid_alive(m.pid)
    st = os.stat(backing)
    assert (st.st_size, st.st_blocks) == (0, 0)
    assert "Traceback" not in m.log_text()


def test_relative_tier_path_means_the_config_files_directory(mount_factory, tmp_path: Path
                                                             ) -> None:
    (tmp_path / "tiers").mkdir()
    # the daemon runs in /, the config file is tmp_path/mnt0.toml
    m = mount_factory(config("tiers/ssd.img"))
    assert (tmp_path / "tiers" / "ssd.img").exists()
    assert not Path("/tiers/ssd.img").exists()
    write_device(m, incompressible_marked(64))
    assert m.stats()["tiers"]["ssd"]["stored_pages"] > 0


def test_check_config_resolves_relative_paths_as_mount_does(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(config("tiers/ssd.img"))
    proc = run_swapfs("check-config", str(conf))  # from this test's directory, not tmp_path
    assert proc.returncode != 0
    assert f"{tmp_path}/tiers does not exist" in proc.stderr
    (tmp_path / "tiers").mkdir()
    proc = run_swapfs("check-config", str(conf))
    assert proc.returncode == 0, proc.stderr


def test_existing_0644_backing_file_becomes_0600(mount_factory, tmp_path: Path) -> None:
    backing = tmp_path / "ssd.img"
    backing.write_bytes(b"")  # empty: ours to use (data without a signature is refused)
    os.chmod(backing, 0o644)
    mount_factory(config(str(backing)))
    assert stat.S_IMODE(os.stat(backing).st_mode) == 0o600


def test_hard_linked_backing_file_is_refused(tmp_path: Path, mount_factory) -> None:
    backing = tmp_path / "ssd.img"
    backing.write_bytes(b"")
    os.link(backing, tmp_path / "someone-elses-name.img")
    with pytest.raises(AssertionError, match=r"tier .ssd.*2 links"):
        mount_factory(config(str(backing)))
    assert os.stat(backing).st_size == 0  # untouched


@pytest.mark.parametrize("encrypt", [None, False])
def test_backing_file_holds_plaintext_only_when_encrypt_is_false(mount_factory, tmp_path: Path,
                                                                 encrypt: bool | None) -> None:
    m = mount_factory(config(str(tmp_path / "ssd.img"), encrypt=encrypt))
    write_device(m, incompressible_marked(512))
    assert m.stats()["tiers"]["ssd"]["stored_pages"] > 300
    with open(tmp_path / "ssd.img", "rb") as f:
        raw = f.read()
    assert (MARK in raw) is (encrypt is False)
