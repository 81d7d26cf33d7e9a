"""Traces of a real mount: `swapfs trace record` through the control xattr (the
daemon writes the file), then `swapfs trace replay` of what it recorded."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time

import pytest

from swapfs import kernel
from swapfs.trace import DISCARD, NO_TIER, READ, WRITE, load, records

from .conftest import run_swapfs, swapfs_cmd

pytestmark = pytest.mark.timeout(120)
PAGE = 4096
CTL = "user.swapfs.ctl.trace"


def config(tmp_path) -> str:
    return f"""
[pool]
max_bytes = "4M"
high_watermark = 0.5
low_watermark = 0.3

[[device]]
name = "swap0"
size = "32M"

[[tier]]
name = "ssd"
path = "{tmp_path}/ssd.img"
size = "64M"
"""


def text_page(i: int) -> bytes:
    return (b"page %d of the trace test " % i * 200)[:PAGE]


def test_trace_record_then_replay(mount_factory, tmp_path):
    m = mount_factory(config(tmp_path))
    out = tmp_path / "run.trace"
    rec = subprocess.Popen(swapfs_cmd("trace", "record", str(m.path), "-o", str(out),
                                      "--seconds", "60"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.getxattr(m.path, CTL).startswith(b"on "):
            assert rec.poll() is None, rec.communicate()[0]
            assert time.monotonic() < deadline, "the trace never started"
            time.sleep(0.05)
        # a second trace while one is on is refused
        with pytest.raises(OSError) as exc:
            os.setxattr(m.path, CTL, str(tmp_path / "other.trace").encode())
        assert exc.value.errno == errno.EBUSY
        data = b"".join(text_page(i) for i in range(64))
        with open(m.dev(), "r+b", buffering=0) as f:
            f.write(data)
            f.seek(0)
            assert f.read(len(data)) == data
            kernel.fallocate(f.fileno(), kernel.FALLOC_FL_PUNCH_HOLE | kernel.FALLOC_FL_KEEP_SIZE,
                             8 * PAGE, 8 * PAGE)
            f.seek(4 * PAGE)
            assert f.read(PAGE) == text_page(4)
    finally:
        rec.send_signal(signal.SIGINT)
        said = rec.communicate(timeout=30)[0]
    assert rec.returncode == 0, said
    assert "requests recorded" in said and ", 0 dropped" in said
    assert os.getxattr(m.path, CTL).startswith(b"off " + str(out).encode())
    assert os.stat(out).st_mode & 0o777 == 0o600
    header, body = load(str(out))
    assert header.devices == (("swap0", 32 << 20),)
    recs = list(records(body))
    pages = {op: [] for op in (READ, WRITE, DISCARD)}
    for _t, first, n, op, dev, tier, _flags in recs:
        assert dev == 0
        assert tier in ((0, 1) if op == READ else (NO_TIER,))  # the pool or the ssd
        pages[op].extend(range(first, first + n))
    assert sorted(pages[WRITE]) == list(range(64))
    assert sorted(set(pages[READ])) == list(range(64))
    assert pages[DISCARD] == list(range(8, 16))
    assert [r[0] for r in recs] == sorted(r[0] for r in recs)
    # replayed through an in-process store: the same requests, every read checked
    cfg = tmp_path / "replay.toml"
    cfg.write_text(config(tmp_path / "elsewhere"))
    proc = run_swapfs("trace", "replay", str(out), "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["pages_written"] == 64 and res["pages_read"] == 65
    assert res["wrong_pages"] == 0 and res["errors"] == 0
    assert not (tmp_path / "elsewhere").exists()  # its tiers live in a temporary directory


def test_trace_files_the_daemon_refuses(mount_factory, tmp_path):
    m = mount_factory(config(tmp_path))
    existing = tmp_path / "existing.trace"
    existing.write_bytes(b"keep me")
    for value, err in ((b"relative.trace", errno.EINVAL),
                       (str(m.path / "swap0").encode(), errno.EINVAL),  # in the mount
                       (str(m.path).encode(), errno.EINVAL),
                       (str(existing).encode(), errno.EEXIST),
                       (str(tmp_path / "no" / "dir.trace").encode(), errno.ENOENT)):
        with pytest.raises(OSError) as exc:
            os.setxattr(m.path, CTL, value)
        assert exc.value.errno == err, value
    assert existing.read_bytes() == b"keep me"
    assert os.getxattr(m.path, CTL) == b"off"
    os.setxattr(m.path, CTL, b"stop")  # nothing on: nothing to do
    proc = run_swapfs("trace", "record", str(m.path), "-o", str(m.path / "x.trace"),
                      "--seconds", "1")
    assert proc.returncode == 1 and "cannot be written into the mount" in proc.stderr
    proc = run_swapfs("trace", "record", str(m.path), "-o", str(existing), "--seconds", "1")
    assert proc.returncode == 1 and "exists (--force replaces it)" in proc.stderr
    assert CTL.encode() in os.listxattr(m.path) or CTL in os.listxattr(m.path)
