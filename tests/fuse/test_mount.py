"""mount()/unmount() errors and the fusermount3 path."""

from __future__ import annotations

import os
import shutil

import pytest

from swapfs.fuse import MountError, is_mount_point, mount, unmount

from .conftest import proc_mounts, read_file, sync
from .memfs import MemFS

pytestmark = [pytest.mark.timeout(60)]


def test_missing_mountpoint(tmp_path):
    with pytest.raises(MountError, match="does not exist"):
        mount(tmp_path / "nope")


def test_mountpoint_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(MountError, match="not a directory"):
        mount(f)


@pytest.mark.root
async def test_already_mounted(mounted):
    with pytest.raises(MountError, match="already a mount point"):
        await sync(mount, mounted.path)
    assert await sync(is_mount_point, mounted.path)


@pytest.mark.root
def test_unmount_not_mounted(tmp_path):
    with pytest.raises(MountError, match="umount"):
        unmount(tmp_path)


@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fusermount3 not installed")
async def test_fusermount_path(mount_memfs):
    async with mount_memfs(MemFS({b"f": b"via fusermount3"}), use_fusermount=True) as m:
        assert await sync(read_file, m.p("f")) == b"via fusermount3"
        assert "fuse.swapfs" in proc_mounts()
    assert not is_mount_point(m.path)


@pytest.mark.root
async def test_default_permissions_mount(mount_memfs):
    async with mount_memfs(MemFS({b"f": b"x"}), default_permissions=True, fsname="memfs-test") as m:
        line = [ln for ln in proc_mounts().splitlines() if str(m.path) in ln][0]
        assert line.startswith("memfs-test ") and "default_permissions" in line
        assert await sync(os.access, m.p("f"), os.R_OK)
