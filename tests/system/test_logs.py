"""The daemon's log stays bounded: repeats summarised with their count, the
file rotated, the logs of mounts gone removed; a failure is one line."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from swapfs import system
from swapfs.cli import logs
from swapfs.config import Config, DeviceConfig, PoolConfig
from swapfs.fs import SwapFS
from swapfs.fuse import ROOT_INODE, FUSEError
from swapfs.store import Store

PAGE = 4096
KiB = 1024
MiB = 1 << 20
SUMMARY_RE = re.compile(r"([\d,]+) more in the last \d+ s like: (.*)")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def limited(clock: Clock, *, burst: int = 3, window: float = 10.0) -> tuple[logging.Logger, ListHandler,
                                                                            logs.RepeatLimiter]:
    handler = ListHandler()
    limiter = logs.RepeatLimiter(handler, window=window, burst=burst, clock=clock, timer=False)
    handler.addFilter(limiter)
    log = logging.getLogger(f"swapfs.test.repeats.{id(handler)}")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    return log, handler, limiter


@contextlib.contextmanager
def daemon_logging(log_file: Path) -> Iterator[logs.RepeatLimiter]:
    """The daemon's log set-up (level info, to ``log_file``) for the block;
    the test runner's handlers restored after."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    limiter = logs.setup_logging("info", str(log_file))
    try:
        yield limiter
    finally:
        limiter.flush()
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved
        root.setLevel(level)


def suppressed(lines: list[str]) -> int:
    return sum(int(m.group(1).replace(",", "")) for m in map(SUMMARY_RE.match, lines) if m)


def test_repeats_beyond_the_burst_are_counted_and_summarised_when_the_window_closes():
    clock = Clock()
    log, handler, _ = limited(clock)
    log.info("other %d", 1)
    for i in range(1000):
        log.error("write %s offset %d: %s", "swap0", i * PAGE, "pool and tiers full")
    log.info("other %d", 2)
    assert len(handler.lines) == 2 + 3  # each message's burst, nothing of the rest yet
    clock.now += 10.0
    log.error("write %s offset %d: %s", "swap0", 0, "pool and tiers full")  # opens a new window
    summary = handler.lines[5]
    assert summary == "997 more in the last 10 s like: write swap0 offset 4091904: pool and tiers full"
    assert handler.lines[6] == "write swap0 offset 0: pool and tiers full"


def test_the_summary_comes_at_flush_and_counts_every_record():
    clock = Clock()
    log, handler, limiter = limited(clock)
    for i in range(12_345):
        if i % 1000 == 0:
            clock.now += 1.0  # 13 s in all: two windows
        log.warning("refused %d", i)
    limiter.flush()
    passed = [line for line in handler.lines if not SUMMARY_RE.match(line)]
    assert len(passed) == 6  # three per window
    summaries = [line for line in handler.lines if SUMMARY_RE.match(line)]
    assert summaries == ["9,997 more in the last 10 s like: refused 9999",
                         "2,342 more in the last 2 s like: refused 12344"]
    assert len(passed) + suppressed(handler.lines) == 12_345


def test_the_timer_summarises_a_storm_followed_by_silence():
    log, handler, limiter = limited(Clock(), window=0.2)
    limiter.clock, limiter.timer = time.monotonic, True  # the timer runs on real time
    for i in range(50):
        log.error("storm %d", i)
    assert suppressed(handler.lines) == 0
    deadline = time.monotonic() + 5
    while not suppressed(handler.lines) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert suppressed(handler.lines) == 47


@pytest.mark.slow
def test_a_hundred_thousand_refused_writes_leave_a_small_log_with_the_count(tmp_path):
    """A full pool without tiers refuses every new page (ENOSPC); each refusal
    is logged by the adapter.  Through the daemon's log set-up, 100,000 of
    them leave a log far under 100 KB that still says how many there were."""
    store = Store(Config(pool=PoolConfig(max_bytes=256 * KiB),
                         devices=(DeviceConfig(name="swap0", size=64 * MiB),)))
    fs = SwapFS(store)
    refused = 0
    try:
        async def main() -> None:
            nonlocal refused
            fh = ROOT_INODE + 1  # the first device's inode is its file handle
            page = bytearray(os.urandom(PAGE))  # incompressible: the pool fills at once
            i = 0
            while refused < 100_000:
                struct.pack_into("<Q", page, 0, i)
                try:
                    await fs.write(fh, (i % (64 * MiB // PAGE)) * PAGE, memoryview(page))
                except FUSEError as exc:
                    assert exc.errno == errno.ENOSPC
                    refused += 1
                i += 1

        with daemon_logging(tmp_path / "swapfs-test.log"):
            trio.run(main)
    finally:
        store.files.close()
    written = [p for p in tmp_path.iterdir() if p.name.startswith("swapfs-test.log")]
    size = sum(p.stat().st_size for p in written)
    text = "".join(p.read_text() for p in written)
    assert size < 100 * KiB, size
    lines = [line for line in text.splitlines() if "swapfs.fs: write swap0" in line or "like: write" in line]
    shown = [line for line in lines if "more in the last" not in line]
    counted = sum(int(m.group(1).replace(",", "")) for m in map(SUMMARY_RE.search, lines) if m)
    assert shown and counted
    assert len(shown) + counted == refused == 100_000


def test_the_file_log_rotates_at_its_cap(tmp_path, monkeypatch):
    assert (logs.LOG_MAX_BYTES, logs.LOG_BACKUPS) == (MiB, 3)
    monkeypatch.setattr(logs, "LOG_MAX_BYTES", 64 * KiB)  # the same, 16 times faster
    log_file = tmp_path / "swapfs-cap.log"
    with daemon_logging(log_file):
        log = logging.getLogger("swapfs.test.rotation")
        for i in range(2500):  # distinct messages: the repeat limit does not apply
            log.info(f"line {i} " + "x" * 200)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["swapfs-cap.log", "swapfs-cap.log.1", "swapfs-cap.log.2", "swapfs-cap.log.3"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= logs.LOG_MAX_BYTES
    assert "line 2499 " in log_file.read_text()


def test_mounting_removes_the_logs_of_mounts_that_are_gone(tmp_path):
    live = ["/run/swapfs/main", "/mnt/a b"]
    keep = [logs.default_log_file(m).rpartition("/")[2] for m in live]
    stale = ["swapfs-tmp-gone.log", "swapfs-tmp-gone.log.1", "swapfs-run-old.log.3"]
    others = ["swapfs-run-swapfs-main.log.bak", "notes.log", "swapfs-x.txt"]
    starting = ["swapfs-tmp-starting.log"]  # its daemon has it open, its mount is not there yet
    old = time.time() - logs.STALE_LOG_MIN_AGE - 1
    for name in [*keep, keep[0] + ".2", *stale, *others, *starting]:
        (tmp_path / name).write_text("x\n")
        if name not in starting:
            os.utime(tmp_path / name, (old, old))
    removed = logs.remove_stale_logs(str(tmp_path), live)
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, keep[0] + ".2", *others, *starting])


def test_an_exception_is_one_line_unless_the_level_is_debug():
    def fail() -> None:
        raise OSError(errno.EACCES, "Permission denied", "/srv/tier")

    for tracebacks in (False, True):
        fmt = logs.Formatter("%(levelname)s %(message)s", tracebacks=tracebacks)
        try:
            fail()
        except OSError:
            record = logging.LogRecord("swapfs.x", logging.ERROR, __file__, 1, "writeback pass failed",
                                       (), sys.exc_info())
        text = fmt.format(record)
        if tracebacks:
            assert "Traceback" in text
        else:
            assert "\n" not in text
            assert text.startswith("ERROR writeback pass failed: PermissionError at ")
            assert "test_logs.py:" in text and "in fail: [Errno 13] Permission denied: '/srv/tier'" in text


def test_one_line_unwraps_a_group_of_one():
    try:
        raise ExceptionGroup("nursery", [ValueError("bad page size")])
    except ExceptionGroup as exc:
        line = logs.one_line(exc)
    assert line.startswith("ValueError") and line.endswith(": bad page size"), line


def test_a_daemon_that_dies_without_a_word_to_its_parent_is_explained_by_its_log(tmp_path):
    """Killed before it could answer (an OOM kill, a crash in C): the parent
    quotes the last error the daemon logged."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(DYING_DAEMON)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log_file = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(site), "SWAPFS_TEST_FAIL_DAEMON": "1"}
    # the one-process daemon (serve_mount, which the site hook replaces)
    proc = subprocess.run([sys.executable, "-m", "swapfs", "mount", "--no-mlock", "--no-failover",
                           "--log-file", str(log_file), str(mnt)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1
    # What the daemon could not set up before it died (no CAP_SYS_RESOURCE here) comes first,
    # each line a warning; then the one line that explains the death.
    said = [line for line in proc.stderr.splitlines(keepends=True)
            if not line.startswith("swapfs: warning: ")]
    assert "".join(said) == (f"swapfs: the daemon exited (status 9) before mounting, last logging: "
                             f"swapfs.test: pool of 9 TiB: no memory; see {log_file}\n"), proc.stderr
    assert logs.last_error(str(tmp_path / "none.log")) is None


DYING_DAEMON = textwrap.dedent("""
    import os
    if os.environ.get("SWAPFS_TEST_FAIL_DAEMON"):
        import logging
        import swapfs.daemon

        async def serve_mount(config, mountpoint, **kw):
            logging.getLogger("swapfs.test").error("pool of %d TiB: no memory", 9)
            logging.getLogger("swapfs.test").info("after the error")
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(9)

        swapfs.daemon.serve_mount = serve_mount
""")


# A daemon whose serve_mount fails inside (as a tier that cannot be opened
# would): patched in at interpreter start-up, so that the background daemon,
# a new process, fails the same way.
FAILING_DAEMON = textwrap.dedent("""
    import os
    if os.environ.get("SWAPFS_TEST_FAIL_DAEMON"):
        import swapfs.daemon

        async def serve_mount(config, mountpoint, **kw):
            import trio

            async def open_tier():
                raise OSError(5, "Input/output error", "/srv/tier0")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(open_tier)

        swapfs.daemon.serve_mount = serve_mount
""")


@pytest.mark.parametrize("foreground", [True, False])
def test_a_daemon_failure_is_one_line_in_the_log_and_from_mount(tmp_path, foreground):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAILING_DAEMON)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log_file = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(site), "SWAPFS_TEST_FAIL_DAEMON": "1"}
    # the one-process daemon (serve_mount, which the site hook replaces)
    cmd = [sys.executable, "-m", "swapfs", "mount", "--no-mlock", "--no-failover", "--log-file",
           str(log_file)]
    if foreground:
        cmd.append("--foreground")
    proc = subprocess.run([*cmd, str(mnt)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc
    # the failure is one line, after a warning per protection the daemon could not set up
    said = "".join(line for line in proc.stderr.splitlines(keepends=True)
                   if not line.startswith("swapfs: warning: ")).strip()
    assert "\n" not in said, said
    assert re.fullmatch(rf"swapfs: daemon at {re.escape(str(mnt))} failed: OSError at \S+:\d+ in "
                        r"open_tier: \[Errno 5\] Input/output error: '/srv/tier0'", said), said
    text = log_file.read_text()
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(said.removeprefix("swapfs: ")), text
    # at log level debug the traceback is there too
    log_file.unlink()
    proc = subprocess.run([*cmd, "--log-level", "debug", str(mnt)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1 and "Traceback" in log_file.read_text()
    if foreground:  # logging to stderr, as under systemd: the line once, not twice
        cmd.remove("--log-file")
        cmd.remove(str(log_file))
        proc = subprocess.run([*cmd, str(mnt)], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 1
        failures = [line for line in proc.stderr.splitlines() if "failed:" in line]
        assert len(failures) == 1 and failures[0].endswith(said.removeprefix("swapfs: ")), proc.stderr
        assert "Traceback" not in proc.stderr
    assert not system.is_mounted(mnt)
