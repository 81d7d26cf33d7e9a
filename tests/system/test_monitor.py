"""swapfs top in a real terminal (tmux: capture-pane, send-keys q, the terminal
restored), into a closed pipe and with bad options; swapfs plot's figure read
back (its axes and series, the PNG's pixels) from a recording of a real mount."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from swapfs import cli
from swapfs.cli import top
from swapfs.kernel import PAGE_SIZE as PAGE

from .conftest import run_swapfs, swapfs_cmd
from .test_commands import fill, tier_config

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def a_mount_with_a_file_tier(mount_factory, tmp_path):
    m = mount_factory(tier_config(tmp_path))
    fill(m.dev(), 400)
    out = run_swapfs("writeback", str(m.path), "100")
    assert out.returncode == 0, out.stderr
    return m


class Tmux:
    """A tmux server of its own (its own socket), killed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux not installed (scripts/setup installs it)")
        self.sock = str(tmp_path / "tmux.sock")

    def __call__(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        envs = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
        self("new-session", "-d", "-x", "150", "-y", "45", *envs, command)

    def wait(self, text: str, timeout: float = 20, escapes: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self("capture-pane", "-p", *(["-e"] if escapes else []))
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen within {timeout} s:\n{screen}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=20)


def _pid_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["q", "ctrl-c"])
def test_top_in_a_terminal_quits_and_restores_it(mount_factory, tmp_path, how):
    m = a_mount_with_a_file_tier(mount_factory, tmp_path)
    tmux = Tmux(tmp_path)
    pid_file, tty_before, tty_after = tmp_path / "pid", tmp_path / "before", tmp_path / "after"
    top_cmd = shlex.join(swapfs_cmd("top", str(m.path), "--interval", "0.2"))
    # Ctrl-C reaches the whole foreground group: the shell around top catches it (a handler,
    # not an ignore, which top would inherit) and waits for top's own exit status
    script = (f"trap true INT; stty -g > {tty_before}; sh -c 'echo $$ > {pid_file}; exec {top_cmd}'; "
              f"echo EXIT=$?; stty -g > {tty_after}; sleep 60")
    env = {"TERM": "xterm-256color", "NO_COLOR": "1" if how == "ctrl-c" else ""}
    try:
        tmux.start(script, env)
        screen = tmux.wait("TIER")
        lines = screen.splitlines()
        assert f"swapfs top {m.path}" in lines[0] and "q or Ctrl-C to quit" in lines[0]
        assert any(line.split()[:1] == ["swap0"] for line in lines)
        pool = next(line for line in lines if line.split()[:2] == ["pool", "pool"])
        ssd = next(line for line in lines if line.split()[:2] == ["ssd", "file"])
        assert pool.split()[2] == "300" and ssd.split()[2] == "100", screen
        assert "saved" in screen and "x, memory " in screen and re.search(r" \d+\.\d\dx ", pool), pool
        assert "\u2581" in screen or "\u2588" in screen  # sparklines drawn in block characters
        coloured = tmux("capture-pane", "-p", "-e")
        if env["NO_COLOR"]:
            assert "\x1b[32m" not in coloured and "\x1b[36m" not in coloured, "NO_COLOR is set: no colour"
        else:
            assert "\x1b[36m" in coloured, "a colour terminal gets colour"
        pid = int(pid_file.read_text())
        tmux("send-keys", "q" if how == "q" else "C-c")
        screen = tmux.wait("EXIT=")
        assert "EXIT=0" in screen and "Traceback" not in screen, screen
        assert _pid_gone(pid)
        deadline = time.monotonic() + 10
        while not tty_after.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tty_after.read_text() == tty_before.read_text(), "the terminal is as top found it"
    finally:
        tmux.close()


def test_top_keeps_q_working_while_the_daemon_does_not_answer(mount_factory, tmp_path):
    m = mount_factory()
    tmux = Tmux(tmp_path)
    top_cmd = shlex.join(swapfs_cmd("top", str(m.path), "--interval", "0.2"))
    try:
        tmux.start(f"{top_cmd}; echo EXIT=$?; sleep 60", {"TERM": "xterm"})
        tmux.wait("DEVICE")
        os.kill(m.pid, signal.SIGSTOP)
        try:
            tmux.wait("daemon not answering for")
            tmux("send-keys", "q")
            assert "EXIT=0" in tmux.wait("EXIT=")
        finally:
            os.kill(m.pid, signal.SIGCONT)
    finally:
        tmux.close()


def test_top_into_a_pipe_that_closes_ends_quietly(mount_factory):
    m = mount_factory()
    # the shell's way: status 0 under pipefail, nothing on stderr
    cmd = shlex.join(swapfs_cmd("top", str(m.path), "--interval", "0.1"))
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -3"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith(f"swapfs top {m.path}") and len(out.stdout.splitlines()) == 3
    rec = shlex.join(swapfs_cmd("record", str(m.path), "-o", "-", "--interval", "0.1"))
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {rec} | head -1"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert json.loads(out.stdout)["mount"] == str(m.path)
    # the reader closes between frames
    with subprocess.Popen(swapfs_cmd("top", str(m.path), "--interval", "0.1"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"swapfs top")
            proc.stdout.close()
            assert proc.wait(timeout=30) == 0
            assert proc.stderr is not None and proc.stderr.read() == b""
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_top_into_a_pipe_gives_up_on_a_daemon_that_does_not_answer(mount_factory):
    m = mount_factory()
    os.kill(m.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        out = run_swapfs("top", str(m.path), "--once", timeout=60)
        took = time.monotonic() - start
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert out.returncode == 1 and "not answering" in out.stderr, out.stderr
    assert top.PIPE_TIMEOUT <= took < top.PIPE_TIMEOUT + 20


@pytest.mark.parametrize("command", ["top", "record"])
@pytest.mark.parametrize("option", [("--interval", "-1"), ("--interval", "0"), ("--interval", "nan"),
                                    ("--interval", "soon"), ("--count", "0"), ("-n", "-3")])
def test_top_and_record_refuse_bad_intervals_and_counts(capsys, command, option):
    args = [command, "/nonexistent", *option] + (["-o", "/dev/null"] if command == "record" else [])
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {'-n/--count' if option[0] in ('-n', '--count') else '--interval'}" in err, err
    assert option[1] in err


def test_top_once_shows_ratios_saved_memory_and_every_tier_field(mount_factory, tmp_path):
    m = a_mount_with_a_file_tier(mount_factory, tmp_path)
    out = run_swapfs("top", str(m.path), "--once")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("swapfs top") == 1 and "\x1b[" not in out.stdout
    stats = m.stats()
    tot = stats["totals"]
    comp, mem, saved = top.ratios(tot["orig_data_size"], tot["compr_data_size"], tot["mem_used_total"])
    assert comp is not None and mem is not None and saved > 0
    assert f"compressed {comp:.2f}x, memory {mem:.2f}x" in out.stdout
    dev = next(line.split() for line in out.stdout.splitlines() if line.startswith("swap0 "))
    d = stats["devices"]["swap0"]
    assert dev[3] == str(d["stored_pages"]) and f"{d['orig_data_size'] / d['compr_data_size']:.2f}x" in dev
    # a field a tier's record gains appears in its detail line, with its unit
    stats["tiers"]["ssd"].update(live_bytes=3 * MiB, segments_used=7, write_amplification=1.25)
    lines = top.frame(str(m.path), None, stats, 0.0, top.History(), style=top.Style(False))
    detail = " ".join(line for line in lines if line.startswith(("  ssd: ", "       ")))
    assert "live_bytes 3.0 MiB" in detail and "segments_used 7" in detail
    assert "write_amplification 1.25" in detail and "encrypted" in detail
    # an empty pool: no ratio to show, nothing that reads as an alarm
    empty = json.loads(json.dumps(stats))
    for section in [empty["totals"], *empty["devices"].values()]:
        section.update(orig_data_size=0, compr_data_size=0, mem_used_total=0, pool_bytes=0)
    text = "\n".join(top.frame(str(m.path), None, empty, 0.0, top.History(), style=top.Style(False)))
    assert "compressed -, memory -" in text


def test_sparkline_scales_to_the_largest_value():
    assert top.sparkline([0, 1, 2, 4]) == "\u2581\u2583\u2585\u2588"
    assert top.sparkline([0, 0]) == "\u2581\u2581"
    assert top.sparkline([0, 1000, 1], chars=top.SPARK_ASCII) == "_@."  # non-zero shows
    assert top.sparkline([]) == ""


@pytest.mark.slow
def test_plot_draws_pool_memory_against_data_stored(mount_factory, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) not installed")
    import matplotlib.image

    from swapfs.cli.monitor import draw, load_samples, plot_series

    m = mount_factory(tier_config(tmp_path))
    rec = tmp_path / "run.jsonl"
    for i in range(4):  # the pool grows, then writeback moves some of it down
        fill(m.dev(), 1000, offset=i * 1000 * PAGE)
        assert run_swapfs("record", str(m.path), "-o", str(rec), "-n", "1").returncode == 0
    assert run_swapfs("writeback", str(m.path), "1500").returncode == 0
    assert run_swapfs("record", str(m.path), "-o", str(rec), "-n", "2", "--interval", "0.1").returncode == 0

    samples = load_samples(str(rec))
    series = plot_series(samples)
    last = samples[-1]["stats"]["totals"]
    assert series["data_bytes"][-1] == last["orig_data_size"] > series["memory_bytes"][-1] == last["mem_used_total"]
    assert series["data_bytes"][3] == 4000 * PAGE and series["tier_bytes"]["ssd"][-1] == 1500 * PAGE

    fig = draw(samples)
    mem_ax, tier_ax, traffic = fig.axes
    lines = {line.get_label(): line for line in mem_ax.get_lines()}
    assert mem_ax.get_ylabel() == "MiB" and "pool memory against data stored" in mem_ax.get_title()
    assert fig.get_suptitle() == f"swapfs {m.path}"
    data = lines["data in memory (orig_data_size)"].get_ydata()
    memory = lines["pool memory (mem_used_total)"].get_ydata()
    assert list(data) == pytest.approx([v / MiB for v in series["data_bytes"]])
    assert list(memory) == pytest.approx([v / MiB for v in series["memory_bytes"]])
    assert "compressed (compr_data_size)" in lines
    # the 64 MiB limit is more than twice the data: said, not drawn (it would flatten the lines)
    assert "pool limit (max_bytes)" not in lines
    assert [x.get_text() for x in mem_ax.texts] == ["pool limit (max_bytes) 64.0 MiB: above this scale"]
    assert [c.get_label() for c in mem_ax.collections] == ["memory saved"]
    assert {line.get_label() for line in tier_ax.get_lines()} == {"pool", "ssd"}
    assert len(traffic.get_lines()) == 4 and traffic.get_ylabel() == "MiB/s"

    png = tmp_path / "run.png"
    out = run_swapfs("plot", str(rec), "-o", str(png))
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.shape[0] == 850 and img.shape[1] == 1000

    def pixels(rgb: str) -> int:
        want = [int(rgb[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        close = abs(img[:, :, :3] - want).max(axis=2) < 0.02
        return int(close.sum())

    # the top third holds the data line (tab:blue) and the memory line (tab:red)
    top_third = img[: img.shape[0] // 3]
    assert pixels("#1f77b4") > 500 and pixels("#d62728") > 500
    blue = abs(top_third[:, :, :3] - [0x1F / 255, 0x77 / 255, 0xB4 / 255]).max(axis=2) < 0.02
    red = abs(top_third[:, :, :3] - [0xD6 / 255, 0x27 / 255, 0x28 / 255]).max(axis=2) < 0.02
    assert blue.sum() > 300 and red.sum() > 300
    # the data line runs above the memory line: its pixels sit higher in the image
    assert blue.nonzero()[0].mean() < red.nonzero()[0].mean()
