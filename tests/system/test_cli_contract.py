"""What a script can rely on from the commands against real mounts: a daemon that is
stopped or gone gives a bounded wait and its own exit status, status and stats name the
same things the same way, mount says what the daemon could not set up, writeback says
why nothing moved, and wide device names keep the tables aligned."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata

import pytest

from swapfs import system

from .conftest import Mount, failover_pids, run_swapfs, stop_mount

pytestmark = pytest.mark.timeout(120)

PAGE = 4096


def text_width(text: str) -> int:
    """Terminal columns: wide characters (emoji, CJK) take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)

TIER_CONFIG = """
[pool]
max_bytes = "64M"

[[device]]
name = "swap0"
size = "64M"

[[device]]
name = "kept"
size = "8M"
writeback = false

[[tier]]
name = "ssd"
path = "{tmp}/ssd.img"
size = "64M"
"""


def fill(path, pages: int) -> None:  # type: ignore[no-untyped-def]
    text = b"".join(b"page %06d of some compressible text; " % i for i in range(200))
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(pages):
            os.pwrite(fd, text[i % 50:i % 50 + PAGE], i * PAGE)
    finally:
        os.close(fd)


def timed(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    out = run_swapfs(*args, timeout=60)
    return out, time.monotonic() - start


def test_a_stopped_daemon_is_waited_for_a_bounded_time(mount_factory) -> None:  # type: ignore[no-untyped-def]
    """stats, status, compact, writeback and trace record on a stopped daemon (kill -STOP) return within
    their --timeout with status 4, and leave no process behind."""
    m = mount_factory()
    os.kill(m.pid, signal.SIGSTOP)
    try:
        out, took = timed("stats", str(m.path), "--timeout", "1")
        assert out.returncode == 4 and "not answering" in out.stderr, out.stderr
        assert took < 15
        out, took = timed("stats", str(m.dev()), "--json", "--timeout", "1")
        assert out.returncode == 4 and took < 15
        out, took = timed("status", str(m.path), "--timeout", "1")
        assert out.returncode == 4 and took < 15
        assert "(daemon not answering within 1 s)" in out.stdout
        rows = json.loads(run_swapfs("status", str(m.path), "--json", "--timeout", "1").stdout)
        assert rows == [{"mount": str(m.path), "device": None, "state": "not answering",
                         "error": "daemon not answering within 1 s"}]
        out, took = timed("compact", str(m.path), "--timeout", "1")
        assert out.returncode == 4 and took < 15
        out, took = timed("trace", "record", str(m.path), "-o", str(m.path.parent / "t.trace"),
                          "--seconds", "1")
        assert out.returncode == 4 and "not answering" in out.stderr and took < 20, out.stderr
        left = subprocess.run(["pgrep", "-f", f"swapfs (stats|status|compact|trace record) {m.path}"],
                              capture_output=True, text=True)
        assert left.stdout == ""
    finally:
        os.kill(m.pid, signal.SIGCONT)
    out = run_swapfs("stats", str(m.path))
    assert out.returncode == 0, out.stderr
    assert run_swapfs("status", str(m.path)).returncode == 0


def test_a_gone_daemon_has_its_own_exit_status(mount_factory) -> None:  # type: ignore[no-untyped-def]
    m = mount_factory(args=("--no-failover",))
    os.kill(m.pid, signal.SIGKILL)
    assert system.wait_for_exit(m.pid, 10)
    out = run_swapfs("stats", str(m.path))
    assert out.returncode == 3 and "daemon is gone" in out.stderr
    out = run_swapfs("status", str(m.path))
    assert out.returncode == 3 and "(daemon gone)" in out.stdout
    rows = json.loads(run_swapfs("status", str(m.path), "--json").stdout)
    assert rows[0]["state"] == "gone" and rows[0]["device"] is None
    assert run_swapfs("compact", str(m.path)).returncode == 3


def test_status_names_what_stats_names(mount_factory) -> None:  # type: ignore[no-untyped-def]
    m = mount_factory()
    fill(m.dev(), 20)
    rows = json.loads(run_swapfs("status", str(m.path), "--json").stdout)
    stats = json.loads(run_swapfs("stats", str(m.path), "--json").stdout)
    assert {r["device"] for r in rows} == set(stats["devices"])
    own = {"mount", "device", "state", "loop", "swap_used_bytes", "swap_priority", "algorithm"}
    mount_wide = {"headroom_pages", "backed_fraction"}  # the totals', shared by the devices
    for r in rows:
        d = stats["devices"][r["device"]]
        assert {k: r[k] for k in mount_wide} == {k: stats["totals"][k] for k in mount_wide}
        shared = set(r) - own - mount_wide
        assert shared == {"size_bytes", "stored_pages", "orig_data_size", "compr_data_size",
                          "mem_used_total", "file_pages"}
        assert {k: r[k] for k in shared} == {k: d[k] for k in shared}
        assert r["algorithm"] == stats["tiers"]["pool"]["algorithm"] and r["state"] == "ok"


def test_writeback_says_why_a_device_moves_nothing(mount_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = mount_factory(TIER_CONFIG.format(tmp=tmp_path))
    fill(m.dev("kept"), 10)
    fill(m.dev("swap0"), 10)
    out = run_swapfs("writeback", str(m.dev("kept")), "5")
    assert out.returncode == 1
    assert "device kept has writeback = false" in out.stderr and "never leave" in out.stderr
    out = run_swapfs("writeback", str(m.path), "100")
    assert out.returncode == 0, out.stderr
    assert "moved 10 pages" in out.stdout
    assert "not moved: the pages of kept, which has writeback = false" in out.stdout
    assert m.wait_log("writeback request 100 on all devices")
    assert "b'" not in m.log_text()


def test_mount_prints_what_the_daemon_could_not_set_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without CAP_IPC_LOCK and CAP_SYS_RESOURCE and with a small RLIMIT_MEMLOCK, mlockall,
    oom_score_adj and PR_SET_IO_FLUSHER fail: mount says so, not only the log."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to drop capabilities)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "mnt.log"
    cmd = ["setpriv", "--bounding-set=-ipc_lock,-sys_resource", "--inh-caps=-ipc_lock,-sys_resource",
           "prlimit", "--memlock=65536", sys.executable, "-m", "swapfs", "mount", "--log-file",
           str(log), str(mnt)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    match = re.search(r"daemon pid (\d+)", out.stdout)
    try:
        assert out.returncode == 0 and match, out.stderr
        for what in ("mlockall failed", "oom_score_adj -1000", "PR_SET_IO_FLUSHER"):
            assert re.search(rf"^swapfs: warning: .*{what}", out.stderr, re.M), (what, out.stderr)
            assert what in log.read_text()
    finally:
        stop_mount(Mount(path=mnt, log=log, pid=int(match.group(1)) if match else 0))


def test_wide_device_names_keep_status_aligned(mount_factory) -> None:  # type: ignore[no-untyped-def]
    m = mount_factory("""
[pool]
max_bytes = "64M"
[[device]]
name = "s🚀wap"
size = "8M"
[[device]]
name = "swap1"
size = "8M"
""")
    out = run_swapfs("status", str(m.path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("s🚀wap" in line for line in lines)
    # right-aligned columns end at the same terminal column on every line
    assert len({text_width(line) for line in lines}) == 1, lines
    size_ends = [text_width(line[:line.index("MiB") + 3]) for line in lines[1:]]
    assert len(set(size_ends)) == 1, lines


def test_a_stopped_keeper_is_waited_for_a_bounded_time(mount_factory) -> None:  # type: ignore[no-untyped-def]
    """upgrade asks the mount's keeper first: a stopped keeper accepts the connection and
    never replies, and upgrade says so (4) instead of hanging; nothing changes."""
    m = mount_factory()
    keeper = failover_pids(m.path)[0]
    os.kill(keeper, signal.SIGSTOP)
    try:
        out, took = timed("upgrade", str(m.path))
    finally:
        os.kill(keeper, signal.SIGCONT)
    assert out.returncode == 4 and "keeper" in out.stderr and "did not answer" in out.stderr
    assert took < 30
    assert run_swapfs("stats", str(m.path)).returncode == 0
