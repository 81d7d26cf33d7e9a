"""File tiers behind a real mount: spill, verify, discard, corruption, config refusals."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess

import pytest

from swapfs.tiers.file import DATA_OFFSET

from .conftest import _is_mounted, run_swapfs

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
PAGE = 4096


def tiered_config(tmp_path, pool="1M", tiers=(("ssd_a", 50, "24M"), ("ssd_b", 50, "24M"), ("hdd", 10, "64M"))):
    text = f"""
[pool]
algorithm = "lz4"
max_bytes = "{pool}"

[[device]]
name = "swap0"
size = "96M"
"""
    for name, prio, size in tiers:
        text += f"""
[[tier]]
name = "{name}"
kind = "file"
path = "{tmp_path}/{name}.img"
size = "{size}"
priority = {prio}
"""
    return text


def test_fio_verify_across_pool_and_tiers(mount_factory, tmp_path):
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    # the equal-priority tiers large enough that neither fills (a full one, waiting for its
    # cleaning, would leave the turns to the other): their objects are compressed now; and
    # large enough for 1.5 MiB segments (a tier has at least 256 segments where it can)
    m = mount_factory(tiered_config(tmp_path, tiers=(("ssd_a", 50, "384M"), ("ssd_b", 50, "384M"),
                                                     ("hdd", 10, "64M"))))
    out = subprocess.run(
        ["fio", "--name=tiers", f"--filename={m.dev()}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bssplit=4k/50:64k/30:1m/20", "--size=80M", "--iodepth=16",
         "--buffer_compress_percentage=50", "--refill_buffers",
         "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--do_verify=1"],
        capture_output=True, text=True, timeout=110,
    )
    assert out.returncode == 0 and "err= 0" in out.stdout, out.stdout + out.stderr
    s = m.stats()
    tiers = s["tiers"]
    assert tiers["pool"]["stored_pages"] > 0
    assert tiers["ssd_a"]["stored_pages"] > 0 and tiers["ssd_b"]["stored_pages"] > 0
    # equal priority is shared round-robin, segment by segment: within a few segments' worth of
    # objects of each other
    a, b = tiers["ssd_a"], tiers["ssd_b"]
    per_segment = a["segment_bytes"] * (a["stored_pages"] + b["stored_pages"]) \
        / (a["live_bytes"] + b["live_bytes"])
    assert abs(a["stored_pages"] - b["stored_pages"]) <= 4 * per_segment, (a, b, tiers["hdd"])
    t = s["totals"]
    assert t["stored_pages"] == t["same_filled_pages"] + sum(x["stored_pages"] for x in tiers.values())
    assert t["stored_pages"] == s["devices"]["swap0"]["stored_pages"]
    for name in ("ssd_a", "ssd_b"):
        assert tiers[name]["disk_bytes"] >= tiers[name]["live_bytes"] > 0  # objects, compressed
        assert tiers[name]["checksum_errors"] == 0 and tiers[name]["io_errors"] == 0
    for attr in ("user.swapfs.tiers.ssd_a.stored_pages", "user.swapfs.tiers.hdd.capacity_pages"):
        assert attr in os.listxattr(m.path)
    table = run_swapfs("stats", str(m.path)).stdout
    assert "ssd_a" in table and "hdd" in table


def test_fio_512_byte_writes_at_depth_verify_on_a_file_tier(mount_factory, tmp_path):
    # 512-byte O_DIRECT AIO writes at depth 16: several sub-page writes of
    # one page are in flight at once (FUSE async DIO), each a read-modify-
    # write of a page that lives in a file tier.  fio verifies every block.
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    m = mount_factory(tiered_config(tmp_path, tiers=(("ssd", 100, "32M"),)))
    out = subprocess.run(
        ["fio", "--name=sub_page", f"--filename={m.dev()}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bs=512", "--size=2M", "--iodepth=16", "--numjobs=1",
         "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--do_verify=1"],
        capture_output=True, text=True, timeout=110,
    )
    assert out.returncode == 0 and "err= 0" in out.stdout, out.stdout + out.stderr
    s = m.stats()
    assert s["tiers"]["ssd"]["stored_pages"] > 0  # random blocks: the pages live in the tier


def test_discard_shrinks_backing_file(mount_factory, tmp_path):
    m = mount_factory(tiered_config(tmp_path, tiers=(("ssd", 100, "32M"),)))
    backing = tmp_path / "ssd.img"
    data = os.urandom(8 * MiB)
    fd = os.open(m.dev(), os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        used = os.stat(backing).st_blocks * 512
        assert used >= 7 * MiB
        subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", "0", "-l", str(6 * MiB), str(m.dev())],
                       check=True)
        assert os.stat(backing).st_blocks * 512 <= used - 5 * MiB
        assert os.pread(fd, 6 * MiB, 0) == bytes(6 * MiB)
        assert os.pread(fd, 2 * MiB, 6 * MiB) == data[6 * MiB:]
    finally:
        os.close(fd)
    assert m.stats()["tiers"]["ssd"]["stored_pages"] <= 2 * MiB // PAGE + 256


def test_flipped_byte_gives_eio_for_that_page(mount_factory, tmp_path):
    m = mount_factory(tiered_config(tmp_path, tiers=(("ssd", 100, "32M"),)))
    pages = [os.urandom(PAGE) for _ in range(16)]
    fd = os.open(m.dev(), os.O_RDWR)
    try:
        # page 9 first: it takes the tier's first page (the file holds
        # ciphertext, so it cannot be found by its content)
        os.pwrite(fd, pages[9], 9 * PAGE)
        assert m.stats()["tiers"]["ssd"]["stored_pages"] == 1
        os.pwrite(fd, b"".join(pages[:9]), 0)
        os.pwrite(fd, b"".join(pages[10:]), 10 * PAGE)
        backing = tmp_path / "ssd.img"
        assert pages[3] not in backing.read_bytes()  # encrypted at rest by default
        bfd = os.open(backing, os.O_RDWR)
        try:
            byte = os.pread(bfd, 1, DATA_OFFSET + 99)
            os.pwrite(bfd, bytes([byte[0] ^ 1]), DATA_OFFSET + 99)
        finally:
            os.close(bfd)
        with pytest.raises(OSError) as e:
            os.pread(fd, PAGE, 9 * PAGE)
        assert e.value.errno == errno.EIO
        for i, page in enumerate(pages):
            if i != 9:
                assert os.pread(fd, PAGE, i * PAGE) == page
    finally:
        os.close(fd)
    assert m.stats()["tiers"]["ssd"]["checksum_errors"] >= 1
    assert "checksum mismatch" in m.log_text()


def _refused(tmp_path, text: str, *needles: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    mnt = tmp_path / "mnt-refused"
    mnt.mkdir(exist_ok=True)
    out = run_swapfs("mount", "--config", str(cfg), str(mnt))
    assert out.returncode == 2, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr
    assert not _is_mounted(mnt)


def _tier(name: str, path, size="8M", prio=10) -> str:
    return f'\n[[tier]]\nname = "{name}"\nkind = "file"\npath = "{path}"\nsize = "{size}"\npriority = {prio}\n'


BASE = '[[device]]\nname = "swap0"\nsize = "8M"\n'


def test_tier_config_refusals(tmp_path):
    _refused(tmp_path, BASE + _tier("a", tmp_path / "x.img") + _tier("b", tmp_path / "x.img"), '"b"', "x.img")
    _refused(tmp_path, BASE + _tier("a", tmp_path / "mnt-refused" / "in.img"), '"a"', "mount")
    (tmp_path / "target.img").write_bytes(b"")
    (tmp_path / "link.img").symlink_to(tmp_path / "target.img")
    _refused(tmp_path, BASE + _tier("a", tmp_path / "link.img"), '"a"', "symbolic link")
    _refused(tmp_path, BASE + _tier("a", tmp_path / "y.img", size="1000"), "size")
    _refused(tmp_path, BASE + _tier("a", tmp_path / "nodir" / "y.img"), '"a"', "does not exist")
    if os.geteuid() == 0:
        other = tmp_path / "other.img"
        other.write_bytes(b"")
        os.chown(other, 1234, 1234)
        _refused(tmp_path, BASE + _tier("a", other), '"a"', "owned")


def test_backing_file_created_private(mount_factory, tmp_path):
    m = mount_factory(tiered_config(tmp_path, tiers=(("ssd", 100, "8M"),)))
    st = os.stat(tmp_path / "ssd.img")
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == DATA_OFFSET + 8 * MiB
    assert m.stats()["tiers"]["ssd"]["capacity_pages"] == 8 * MiB // PAGE


def test_a_corrupt_tier_region_logs_a_bounded_number_of_lines(mount_factory, tmp_path):
    """Every page of a 4 MiB region of the device damaged in the backing file: each read is EIO, each
    mismatch is counted, and the log says so in a few lines, not one per page."""
    m = mount_factory(tiered_config(tmp_path, tiers=(("ssd", 100, "32M"),)))
    npages = 1024
    fd = os.open(m.dev(), os.O_RDWR | os.O_DIRECT)
    aligned = mmap.mmap(-1, npages * PAGE)  # O_DIRECT wants aligned buffers: mmaps are
    try:
        aligned.write(os.urandom(npages * PAGE))  # incompressible: straight to the tier
        os.pwritev(fd, [aligned], 0)
        st = m.stats()["tiers"]["ssd"]
        assert st["stored_pages"] == npages
        # the segments the objects fill, back to back from the start (each object holds a
        # page and less than 64 bytes more; a segment's end may be left empty)
        seg = st["segment_bytes"]
        region = -(-npages // (seg // (PAGE + 64))) * seg
        bfd = os.open(tmp_path / "ssd.img", os.O_RDWR)
        try:  # a byte in every KiB of the objects' region
            for k in range(region // 1024):
                off = DATA_OFFSET + k * 1024 + 123
                byte = os.pread(bfd, 1, off)
                os.pwrite(bfd, bytes([byte[0] ^ 0x40]), off)
        finally:
            os.close(bfd)
        page = mmap.mmap(-1, PAGE)
        eio = 0
        for p in range(npages):
            try:
                os.preadv(fd, [page], p * PAGE)
            except OSError as e:
                assert e.errno == errno.EIO
                eio += 1
        assert eio == npages
        page.close()
    finally:
        os.close(fd)
        aligned.close()
    assert m.stats()["tiers"]["ssd"]["checksum_errors"] >= npages
    text = m.log_text()
    lines = [ln for ln in text.splitlines() if "checksum mismatch" in ln]
    # a burst of single lines; the rest only counted, and summarised when the window closes
    assert len(lines) <= 20, "\n".join(lines[:30])
    assert len(text.encode()) < 20_000


@pytest.mark.timeout(150)
def test_fio_verify_while_a_tier_fills_to_cleaning(mount_factory, tmp_path):
    """Incompressible pages rewritten at random over a region holding about half of a small
    tier, eight times over: the tier fills with dead objects, the writeback task cleans its
    segments as the writes go on, and every block fio reads back verifies."""
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    m = mount_factory(tiered_config(tmp_path, tiers=(("ssd", 100, "16M"),)))
    out = subprocess.run(
        ["fio", "--name=clean", f"--filename={m.dev()}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bs=4k", "--size=8M", "--loops=8", "--iodepth=8",
         "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--do_verify=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0 and "err= 0" in out.stdout, out.stdout + out.stderr
    t = m.stats()["tiers"]["ssd"]
    # whole passes over the region empty whole segments: they are punched and reused
    assert t["punched_segments"] > 0 and t["written_bytes"] > 2 * (16 << 20), t
    assert t["segments_free"] > 0 and not t["full"], t
    assert t["checksum_errors"] == 0 and t["io_errors"] == 0, t
    assert t["stored_pages"] > 0 and t["live_bytes"] <= 16 << 20
