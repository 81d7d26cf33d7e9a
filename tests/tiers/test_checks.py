"""check_tier_paths and check_tier_files: each refusal, warnings, and a valid configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from swapfs.tiers.checks import TierConfigError, check_tier_files, check_tier_paths
from swapfs.tiers.file import FileTier
from swapfs.tiers.file.header import TierHeader

MiB = 1 << 20


def test_valid(tmp_path: Path):
    existing = tmp_path / "b.img"
    existing.write_bytes(b"")
    check_tier_paths([("a", str(tmp_path / "a.img"), 4 * MiB),
                      ("b", str(existing), 8 * MiB)], str(tmp_path / "mnt"))
    check_tier_paths([("a", str(tmp_path / "a.img"), 4096)], None)


def test_same_path_twice(tmp_path: Path):
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "alias")
    with pytest.raises(TierConfigError, match='tier "b": .*same path as tier "a"'):
        check_tier_paths([("a", str(tmp_path / "d" / "x.img"), MiB),
                          ("b", str(tmp_path / "alias" / "x.img"), MiB)], None)


def test_same_file_by_hard_link(tmp_path: Path):
    (tmp_path / "x.img").write_bytes(b"")
    os.link(tmp_path / "x.img", tmp_path / "y.img")
    with pytest.raises(TierConfigError, match='same file as tier "a"'):
        check_tier_paths([("a", str(tmp_path / "x.img"), MiB),
                          ("b", str(tmp_path / "y.img"), MiB)], None)


def test_same_name_twice(tmp_path: Path):
    with pytest.raises(TierConfigError, match="already configured"):
        check_tier_paths([("a", str(tmp_path / "x.img"), MiB),
                          ("a", str(tmp_path / "y.img"), MiB)], None)


def test_inside_mountpoint(tmp_path: Path):
    mnt = tmp_path / "mnt"
    (mnt / "sub").mkdir(parents=True)
    with pytest.raises(TierConfigError, match='tier "ssd": .*inside the swapfs mountpoint'):
        check_tier_paths([("ssd", str(mnt / "sub" / "x.img"), MiB)], str(mnt))
    # reached through a symlinked directory: still inside
    os.symlink(mnt, tmp_path / "via")
    with pytest.raises(TierConfigError, match="inside the swapfs mountpoint"):
        check_tier_paths([("ssd", str(tmp_path / "via" / "x.img"), MiB)], str(mnt))
    # a sibling whose name starts like the mountpoint is not inside
    (tmp_path / "mnt2").mkdir()
    check_tier_paths([("ssd", str(tmp_path / "mnt2" / "x.img"), MiB)], str(mnt))


def test_symlink(tmp_path: Path):
    (tmp_path / "real.img").write_bytes(b"")
    os.symlink(tmp_path / "real.img", tmp_path / "link.img")
    with pytest.raises(TierConfigError, match="symbolic link"):
        check_tier_paths([("a", str(tmp_path / "link.img"), MiB)], None)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.img")
    with pytest.raises(TierConfigError, match="symbolic link"):
        check_tier_paths([("a", str(tmp_path / "dangling.img"), MiB)], None)


def test_other_owner(tmp_path: Path):
    p = tmp_path / "x.img"
    p.write_bytes(b"")
    uid = os.geteuid()
    with pytest.raises(TierConfigError, match=f"owned by uid {uid}, not by uid {uid + 1}"):
        check_tier_paths([("a", str(p), MiB)], None, uid=uid + 1)
    if uid == 0:
        os.chown(p, 12345, 12345)
        with pytest.raises(TierConfigError, match="owned by uid 12345"):
            check_tier_paths([("a", str(p), MiB)], None)


def test_not_a_regular_file(tmp_path: Path):
    (tmp_path / "dir.img").mkdir()
    with pytest.raises(TierConfigError, match="not a regular file"):
        check_tier_paths([("a", str(tmp_path / "dir.img"), MiB)], None)
    os.mkfifo(tmp_path / "fifo.img")
    with pytest.raises(TierConfigError, match="not a regular file"):
        check_tier_paths([("a", str(tmp_path / "fifo.img"), MiB)], None)
    with pytest.raises(TierConfigError, match="not a regular file"):
        check_tier_paths([("a", "/dev/null", MiB)], None)


@pytest.mark.parametrize("size", [0, -4096, 4095, 4097, MiB + 1, 1.5, "1M", True])
def test_bad_size(tmp_path: Path, size):
    with pytest.raises(TierConfigError, match="not a positive whole number of 4096-byte pages"):
        check_tier_paths([("a", str(tmp_path / "x.img"), size)], None)


def test_missing_directory(tmp_path: Path):
    path = tmp_path / "x" / "y.img"
    with pytest.raises(TierConfigError) as ei:
        check_tier_paths([("ssd", str(path), MiB)], None)
    assert str(ei.value) == f'tier "ssd": {path}: directory {tmp_path / "x"} does not exist'
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(TierConfigError, match="is not a directory"):
        check_tier_paths([("ssd", str(tmp_path / "file" / "y.img"), MiB)], None)


def test_is_a_value_error():
    assert issubclass(TierConfigError, ValueError)


def test_hard_linked_file(tmp_path: Path):
    (tmp_path / "x.img").write_bytes(b"")
    os.link(tmp_path / "x.img", tmp_path / "elsewhere.img")
    with pytest.raises(TierConfigError, match='tier "a": .*has 2 links'):
        check_tier_paths([("a", str(tmp_path / "x.img"), MiB)], None)


# ---------------------------------------------------------------- what is at the path


@dataclass(frozen=True)
class T:
    name: str
    path: str
    size: int
    preallocate: bool = False
    force_init: bool = False
    segment_bytes: int = 4 << 20


def test_files_valid_missing_empty_and_ours(tmp_path: Path):
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "ours.img").write_bytes(TierHeader.new("o", MiB, "/gone", True).pack() * 2)
    assert check_tier_files([T("a", str(tmp_path / "a.img"), MiB),
                             T("e", str(tmp_path / "empty.img"), MiB),
                             T("o", str(tmp_path / "ours.img"), MiB)]) == []
    assert not (tmp_path / "a.img").exists()  # the creation probe leaves nothing


def test_files_foreign_refused_unless_force_init(tmp_path: Path):
    p = tmp_path / "data.bin"
    p.write_bytes(b"x" * 5000)
    with pytest.raises(TierConfigError, match=r'tier "a": .*data.bin: exists and holds 5000 '
                                              r"bytes without a swapfs signature"):
        check_tier_files([T("a", str(p), MiB)])
    assert check_tier_files([T("a", str(p), MiB, force_init=True)]) == []
    assert p.read_bytes() == b"x" * 5000


def test_files_held_by_a_live_tier_refused(tmp_path: Path):
    p = tmp_path / "t.img"
    live = FileTier("t", str(p), MiB, 1, mountpoint="/run/swapfs/live")
    live.open()
    try:
        with pytest.raises(TierConfigError, match="in use by the swapfs mount at "
                                                  "/run/swapfs/live"):
            check_tier_files([T("t", str(p), MiB)])
    finally:
        live.close()
    assert check_tier_files([T("t", str(p), MiB)]) == []


def test_files_sizes_against_free_space(tmp_path: Path):
    vfs = os.statvfs(tmp_path)
    free = vfs.f_bavail * vfs.f_frsize
    big = (free + (1 << 30)) // 4096 * 4096
    (w,) = check_tier_files([T("s", str(tmp_path / "s.img"), big)])
    assert 'tier "s"' in w and f"{big} bytes" in w and "free on its filesystem" in w
    assert "sparse" in w
    with pytest.raises(TierConfigError, match=r"preallocating .* needs more than the .* free"):
        check_tier_files([T("p", str(tmp_path / "p.img"), big, preallocate=True)])


def test_files_metadata_reservation_refused_with_the_sizes(tmp_path: Path):
    size = 1 << 60  # 1 EiB in 64 KiB segments: 128 TiB of metadata address space
    with pytest.raises(TierConfigError, match=r"size 1152921504606846976 bytes .*refuses to "
                                              r"reserve .* of address space for its metadata"):
        check_tier_files([T("huge", str(tmp_path / "h.img"), size, segment_bytes=64 << 10)])


def test_files_directory_where_nothing_can_be_created(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    d = tmp_path / "frozen"
    d.mkdir()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute")
    try:
        with pytest.raises(TierConfigError) as ei:
            check_tier_files([T("ssd", str(d / "x.img"), MiB)])
        assert str(ei.value) == (f'tier "ssd": {d / "x.img"}: cannot create the backing file '
                                 f"in {d}: Operation not permitted")
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)
