"""The command line without a mount: exit statuses in every --help, usage errors said
by the command they concern, check-config echoing what it understood, options refused
before anything starts, and the tables' arithmetic and alignment."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata

import pytest

from swapfs import cli, system
from swapfs.cli.stats import format_device, format_stats

pytestmark = pytest.mark.timeout(60)

PAGE = 4096


def text_width(text: str) -> int:
    """Terminal columns: wide characters (emoji, CJK) take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def swapfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "swapfs", *args], capture_output=True, text=True,
                          timeout=30)


def help_of(cmd: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([cmd, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_command_documents_its_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    from swapfs.cli.common import EXIT_CODES

    parser = cli.build_parser()
    commands = set(cli._commands(parser)) - {"umount"}
    assert commands <= set(EXIT_CODES), commands - set(EXIT_CODES)
    for cmd in commands:
        text = " ".join(help_of(cmd, capsys).split())
        assert "Exit status: 0 " in text, cmd
    for cmd in ("stats", "status", "writeback", "compact", "top", "record"):
        text = " ".join(help_of(cmd, capsys).split())
        assert "3 the daemon" in text and "4 " in text and "ENOTCONN" in text, cmd
    for cmd in ("stats", "status", "writeback", "compact"):
        assert "--timeout SECONDS" in help_of(cmd, capsys), cmd
    top = " ".join(swapfs("--help").stdout.split())
    assert "Exit status" in top and "did not answer within --timeout" in top


def test_help_prints_percent_signs_once(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of("compact", capsys)
    assert "10%" in text and "%%" not in text


def test_a_commands_extra_argument_gets_that_commands_usage() -> None:
    out = swapfs("writeback", "/nonexistent", "--idle", "5", "100")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: swapfs writeback")
    assert "swapfs writeback: error: unrecognized arguments: 100" in out.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_timeout_must_be_a_positive_number(value: str) -> None:
    out = swapfs("stats", "/nonexistent", "--timeout", value)
    assert out.returncode == 2 and "argument --timeout" in out.stderr
    assert "positive number of seconds" in out.stderr or "not a number" in out.stderr


def test_log_file_in_a_missing_directory_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "no" / "such" / "dir" / "swapfs.log"
    try:
        out = swapfs("mount", "--no-mlock", "--log-file", str(log), str(mnt))
    finally:
        if system.is_mounted(mnt):  # refused before mounting; if not, leave nothing behind
            subprocess.run([sys.executable, "-m", "swapfs", "unmount", str(mnt)],
                           capture_output=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"the directory {log.parent} does not exist" in out.stderr
    assert not (tmp_path / "no").exists()
    assert "Traceback" not in out.stderr


def test_check_config_echoes_what_it_understood(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[pool]
algorithm = "zstd"
level = 3
max_bytes = "64M"

[[device]]
name = "swap0"
size = "1G"
swap = true
swap_priority = 10

[[device]]
name = "fast"
size = "16T"
writeback = false

[[tier]]
name = "ssd"
path = "{tmp_path}/ssd.img"
size = "2G"
""")
    out = swapfs("check-config", str(cfg))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "max_bytes 67108864 bytes (64.0 MiB)" in text and "zstd level 3" in text
    assert "device[0] swap0: size 1073741824 bytes (1.0 GiB), 262144 pages" in text
    assert "swap at boot (priority 10, discard both)" in text
    assert "device[1] fast: size 17592186044416 bytes (16.0 TiB), 4294967296 pages; writeback off" in text
    assert f"tier[0] ssd: file {tmp_path}/ssd.img, size 2147483648 bytes (2.0 GiB)" in text


def test_check_config_says_why_without_python_in_the_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = swapfs("check-config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2
    assert "cannot read config: No such file or directory" in out.stderr
    assert "[Errno" not in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[pool]\n")
    out = swapfs("check-config", str(bad))
    assert out.returncode == 2 and "not UTF-8" in out.stderr and "Traceback" not in out.stderr


def _device(**kw: object) -> dict[str, object]:
    d: dict[str, object] = {"size_bytes": 64 << 20, "stored_pages": 0, "same_filled_pages": 0,
                            "pool_pages": 0, "huge_pages": 0, "file_pages": 0,
                            "compressed_bytes": 0, "pool_bytes": 0, "reads": 0, "writes": 0,
                            "discards": 0, "nospace_errors": 0, "orig_data_size": 0}
    d.update(kw)
    return d


def test_the_device_table_adds_up_and_says_its_units() -> None:
    """stored = same + pool + huge + file, each a column; data counts file-tier pages too."""
    dev = _device(stored_pages=100, same_filled_pages=10, pool_pages=50, huge_pages=15,
                  file_pages=25, compressed_bytes=20 * PAGE, pool_bytes=21 * PAGE,
                  orig_data_size=75 * PAGE)
    stats = {"devices": {"swap0": dev}, "tiers": {}, "totals": {},
             "writeback": {"moved_pages": 25, "moved_bytes": 25 * PAGE, "recovery_seconds": 0.5,
                           "pairs": {"pool_to_ssd": {"pages": 25, "bytes": 25 * PAGE, "batches": 1}}}}
    lines = format_stats(stats).splitlines()
    head = lines[0].split()
    row = dict(zip(head, re.split(r"\s{2,}", lines[1].strip()), strict=True))
    assert int(row["stored"]) == sum(int(row[k]) for k in ("same", "pool", "huge", "file")) == 100
    assert row["data"] == "400.0 KiB"  # 100 pages, file-tier pages included
    text = "\n".join(lines)
    assert "moved_bytes 100.0 KiB" in text and "bytes 100.0 KiB" in text
    assert "moved_bytes 102400" not in text and "recovery_seconds 0.500 s" in text
    one = format_device("swap0", dev)
    assert "100 pages stored (400.0 KiB of data)" in one and "in file tiers" in one


def test_ratios_say_what_they_divide_and_an_empty_pool_shows_none() -> None:
    stats = {"devices": {}, "tiers": {}, "totals": {"compression_ratio": 3.5, "memory_ratio": 2.25}}
    text = format_stats(stats)
    assert "compression ratio 3.50 (orig_data_size / compr_data_size)" in text
    assert "memory ratio 2.25 (pool data / pool memory)" in text
    empty = format_stats({"devices": {}, "tiers": {}, "totals": {"compression_ratio": 0.0}})
    assert "compression ratio - (nothing in the pool)" in empty and "0.00" not in empty


def test_wide_names_keep_the_table_aligned() -> None:
    from swapfs.cli import common

    assert common.text_width("s🚀wap") == 6 and common.text_width("日本") == 4
    stats = {"devices": {"s🚀wap": _device(), "swap0": _device(), "日本語の名前": _device()},
             "tiers": {}, "totals": {}}
    lines = format_stats(stats).splitlines()[:4]
    # every column ends at the same terminal column on every line
    assert len({text_width(line) for line in lines}) == 1, lines
    ends = [text_width(line[:line.index(" 64.0 MiB")]) for line in lines[1:]]
    assert len(set(ends)) == 1, lines


def test_status_exit_says_gone_before_not_answering() -> None:
    from swapfs.cli.stats import status_exit

    ok = {"state": "ok"}
    assert status_exit([]) == 0 and status_exit([ok, ok]) == 0
    assert status_exit([ok, {"state": "not answering"}]) == 4
    assert status_exit([{"state": "not answering"}, {"state": "gone"}, ok]) == 3
    assert status_exit([{"state": "error"}]) == 4


def test_a_closed_pipe_ends_a_command_quietly() -> None:
    """``swapfs check-config | head -1``: the reader leaves before the output is written."""
    proc = subprocess.Popen([sys.executable, "-m", "swapfs", "check-config"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has started and written
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=30) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_check_config_refuses_a_tier_file_the_daemon_could_not_open(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An existing tier file that is immutable or append-only (chattr +i, +a): the daemon
    opens it for writing and would fail after starting; check-config (and so mount) says so
    first, naming the tier."""
    tier = tmp_path / "ssd.img"
    tier.write_bytes(b"")
    tier.chmod(0o600)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[pool]
max_bytes = "64M"
[[device]]
name = "swap0"
size = "64M"
[[tier]]
name = "ssd"
path = "{tier}"
size = "64M"
""")
    assert swapfs("check-config", str(cfg)).returncode == 0
    for flag in ("+i", "+a"):
        if subprocess.run(["chattr", flag, str(tier)], capture_output=True).returncode != 0:
            pytest.skip(f"chattr {flag} is not possible here (needs root and a filesystem with it)")
        try:
            out = swapfs("check-config", str(cfg))
        finally:
            subprocess.run(["chattr", flag.replace("+", "-"), str(tier)], capture_output=True)
        assert out.returncode == 2, (flag, out.stdout)
        assert f'tier "ssd": {tier}: cannot open for writing: Operation not permitted' in out.stderr
        assert "[Errno" not in out.stderr and "Traceback" not in out.stderr


def test_the_swap_area_grows_with_what_the_store_backs_without_a_cliff() -> None:
    """swapon's area is AREA_MARGIN of the pages the store backs, at most the whole device:
    a store backing 99% of its devices and one backing 100% get areas 1% apart, not half
    the device and all of it; only a store backing twice its devices gets the whole."""
    from swapfs.cli.swap import AREA_MARGIN, backed_area

    pages = 1 << 18  # a 1 GiB device beside a 3 GiB one: a quarter of what is backed

    def area(backed_pages: int) -> int:
        stored = backed_pages // 3
        stats = {"devices": {"swap0": {"size_bytes": pages * PAGE},
                             "swap1": {"size_bytes": 3 * pages * PAGE}},
                 "totals": {"stored_pages": stored, "headroom_pages": backed_pages - stored,
                            "backed_fraction": min(1.0, backed_pages / (4 * pages))}}
        size, n = backed_area(stats, "swap0")
        assert size == pages * PAGE
        return n

    assert area(0) == 0
    assert area(4 * pages // 10) == int(pages * AREA_MARGIN / 10)
    below, at = area(4 * pages * 99 // 100), area(4 * pages)
    assert at == int(pages * AREA_MARGIN) and below == pytest.approx(0.99 * at, abs=1)
    assert area(int(4 * pages / AREA_MARGIN)) == pages  # the whole device, and not more
    assert area(40 * pages) == pages
    previous = -1
    for k in range(0, 12 * pages, pages // 7):  # never a step larger than the backing's
        n = area(k)
        assert previous <= n <= previous + AREA_MARGIN * (pages // 7) / 4 + 1 or previous < 0
        previous = n
