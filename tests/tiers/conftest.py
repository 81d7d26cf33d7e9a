"""Fixtures for the file tier tests: tiers on real files, checked after every test."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from swapfs.tiers.file import CLUSTER_PAGES, PAGE, FileTier

MiB = 1 << 20
CLUSTER_BYTES = CLUSTER_PAGES * PAGE


@pytest.fixture(params=[False, True], ids=["plain", "gcm"])
def make_tier(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., FileTier]]:
    """Build and open tiers; every one passes check_invariants at teardown and is closed.

    Every test using it runs twice: objects stored in the clear and encrypted (AES-GCM)."""
    made: list[FileTier] = []

    def make(size_bytes: int = 4 * CLUSTER_BYTES, *, name: str = "t", path: str | None = None,
             priority: int = 100, open: bool = True, **kw: object) -> FileTier:
        kw.setdefault("encrypt", request.param)
        tier = FileTier(name, path or str(tmp_path / f"{name}.img"), size_bytes, priority,
                        **kw)  # type: ignore[arg-type]
        if open:
            tier.open()
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.check_invariants()
        tier.close()


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted 8 MiB ext4 filesystem; always unmounted and its loop device detached."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a loop device")
    image = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    try:
        _run("mkfs.ext4", "-q", "-F", str(image))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"mkfs.ext4 unavailable: {e}")
    try:
        _run("mount", "-o", "loop", str(image), str(mnt))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot loop-mount an image here: {e.stderr.strip()}")
    try:
        yield mnt
    finally:
        for _ in range(50):
            r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
            if r.returncode == 0 or not os.path.ismount(mnt):
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        # mount -o loop sets autoclear; detach anything still bound to the image anyway
        r = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            dev = line.split(":", 1)[0]
            if dev:
                subprocess.run(["losetup", "-d", dev], capture_output=True)
