"""check_tier_paths: each refusal, and a valid configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swapfs.tiers.checks import TierConfigError, check_tier_paths

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
