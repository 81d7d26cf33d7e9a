"""The operator's commands, run for real: stats in every format (the Prometheus
text parsed by prometheus_client's own parser), status, writeback, top, swapon and
swapoff through a real loop device, SIGHUP reloading the watermarks."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import pytest

from swapfs import kernel, system
from swapfs.testing import harness

from .conftest import run_swapfs

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
PAGE = 4096


def tier_config(tmp_path, high: float = 0.9, low: float = 0.8) -> str:
    return f"""
[pool]
max_bytes = "64M"
high_watermark = {high}
low_watermark = {low}

[[device]]
name = "swap0"
size = "64M"

[[device]]
name = "swap1"
size = "8M"

[[tier]]
name = "ssd"
path = "{tmp_path}/ssd.img"
size = "64M"
"""


def fill(path, pages: int, offset: int = 0) -> None:
    text = b"".join(b"page %06d of some compressible text; " % i for i in range(200))
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(pages):
            os.pwrite(fd, text[i % 50:i % 50 + PAGE], offset + i * PAGE)
    finally:
        os.close(fd)


def test_stats_formats_prometheus_parses_and_names_are_shell_safe(mount_factory, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    m = mount_factory(tier_config(tmp_path))
    fill(m.dev(), 300)
    out = run_swapfs("writeback", str(m.path), "100")
    assert out.returncode == 0, out.stderr
    assert "moved 100 pages" in out.stdout and "pool_to_ssd: 100 pages" in out.stdout

    js = json.loads(run_swapfs("stats", str(m.path), "--format", "json").stdout)
    assert js.keys() == json.loads(run_swapfs("stats", str(m.path), "--json").stdout).keys()
    assert js["schema"] == 4
    t = js["totals"]
    assert t["same_pages"] == t["same_filled_pages"]
    assert t["orig_data_size"] == (t["same_filled_pages"] + js["tiers"]["pool"]["stored_pages"]) * PAGE
    assert t["compr_data_size"] == t["compressed_bytes"] and t["mem_used_total"] == t["pool_bytes"]
    assert t["mem_used_max"] >= t["pool_bytes"] > 0
    assert t["written_back_pages"] == 100
    assert js["writeback"]["pairs"]["pool_to_ssd"]["pages"] == 100
    for name in ("orig_data_size", "compr_data_size", "mem_used_total", "same_pages", "huge_pages"):
        assert name in js["devices"]["swap0"], name

    # every xattr name is shell-safe, the control xattr is listed
    for path in (m.path, m.dev()):
        names = os.listxattr(path)
        assert "user.swapfs.ctl.writeback" in names
        for n in names:
            assert re.fullmatch(r"user\.swapfs\.[a-z0-9_.]+", n), n
    assert os.getxattr(m.path, "user.swapfs.writeback.pairs.pool_to_ssd.pages") == b"100"
    assert os.getxattr(m.path, "user.swapfs.ctl.writeback") == b"100"

    out = run_swapfs("stats", str(m.path), "--format", "prometheus")
    assert out.returncode == 0, out.stderr
    families = {f.name: f for f in text_string_to_metric_families(out.stdout)}
    assert all(name.startswith("swapfs_") for name in families)
    for f in families.values():
        assert f.documentation and f.type in ("counter", "gauge"), f.name
        for s in f.samples:
            assert s.labels["mount"] == str(m.path)
            if f.type == "counter":
                assert s.name.endswith("_total"), s.name
    reads = families["swapfs_device_writes"]  # the parser drops _total from a counter's family name
    assert reads.type == "counter"
    by_dev = {s.labels["device"]: s.value for s in reads.samples}
    assert by_dev == {"swap0": js["devices"]["swap0"]["writes"], "swap1": 0}
    stored = {s.labels["tier"]: s.value for s in families["swapfs_tier_stored_pages"].samples}
    assert stored["ssd"] == 100 and stored["pool"] == js["tiers"]["pool"]["stored_pages"]
    pair = families["swapfs_writeback_pair_pages"].samples[0]
    assert pair.labels["tier"] == "ssd" and pair.labels["from_tier"] == "pool" and pair.value == 100
    assert families["swapfs_tier_checksum_errors"].type == "counter"
    assert families["swapfs_mem_used_max"].samples[0].value == t["mem_used_max"]

    # one device: its own table, JSON and metrics
    out = run_swapfs("stats", str(m.dev("swap1")))
    assert out.returncode == 0 and "device swap1" in out.stdout and "errors: no space" in out.stdout
    dev = json.loads(run_swapfs("stats", str(m.dev("swap0")), "--json").stdout)
    assert dev["stored_pages"] == js["devices"]["swap0"]["stored_pages"]
    prom = run_swapfs("stats", str(m.dev("swap0")), "--format", "prometheus").stdout
    fams = list(text_string_to_metric_families(prom))
    assert fams and all(s.labels["device"] == "swap0" for f in fams for s in f.samples)

    table = run_swapfs("stats", str(m.path)).stdout
    assert "MiB" in table and "checksum" in table and "nospace" in table


def test_writeback_command_errors(mount_factory):
    m = mount_factory()  # no file tier
    out = run_swapfs("writeback", str(m.path), "10")
    assert out.returncode == 1 and "no file tier" in out.stderr
    out = run_swapfs("writeback", str(m.path))
    assert out.returncode == 2 and "--idle" in out.stderr


@pytest.mark.slow
def test_status_lists_every_device_of_every_mount(mount_factory, tmp_path):
    a = mount_factory(tier_config(tmp_path))
    b = mount_factory()
    fill(a.dev(), 10)
    out = run_swapfs("status")
    # 0 unless a daemon of another mount on this machine (another test run's) is gone or stopped
    others_down = any("(daemon" in line for line in out.stdout.splitlines()
                      if line.split()[0] not in (str(a.path), str(b.path)))
    assert out.returncode == 0 or others_down, out.stderr
    assert run_swapfs("status", str(a.path), str(b.path)).returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["MOUNT", "DEVICE", "LOOP", "SIZE", "USED", "PRIO", "DATA", "COMPR",
                                "MEMORY", "ALGO", "FILE-PAGES", "HEADROOM", "BACKED"]
    mine = [line.split() for line in lines[1:] if line.split()[0] in (str(a.path), str(b.path))]
    assert sorted((r[0], r[1]) for r in mine) == sorted(
        [(str(a.path), "swap0"), (str(a.path), "swap1"), (str(b.path), "swap0"), (str(b.path), "swap1")])
    rows = json.loads(run_swapfs("status", "--json").stdout)
    row = next(r for r in rows if r["mount"] == str(a.path) and r["device"] == "swap0")
    assert row["size_bytes"] == 64 * MiB and row["algorithm"] == "lz4"
    assert row["orig_data_size"] == 10 * PAGE
    out = run_swapfs("status", "--bytes").stdout
    assert str(64 * MiB) in out


def test_status_and_stats_show_the_stores_headroom(mount_factory, tmp_path):
    """The headroom of a mount of known content: 64 MiB of pool at the measured ratio plus the
    tier's room at the assumed one, the same in stats and status; the 72 MiB of devices are
    fully backed."""
    m = mount_factory(tier_config(tmp_path))
    fill(m.dev(), 100)
    st = m.stats()
    pool, ssd, tot = st["tiers"]["pool"], st["tiers"]["ssd"], st["totals"]
    ratio = pool["stored_pages"] * PAGE / pool["used_bytes"]
    assert pool["headroom_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert pool["headroom_pages"] == int((64 * MiB - pool["used_bytes"]) * ratio) // PAGE
    # nothing in the tier yet: its segments but the two kept for cleaning, at lz4's 2.5:1
    assert ssd["stored_pages"] == 0
    assert ssd["headroom_pages"] == int((64 * MiB - 2 * ssd["segment_bytes"]) * 2.5) // PAGE
    assert tot["headroom_pages"] == pool["headroom_pages"] + ssd["headroom_pages"]
    assert tot["backed_fraction"] == 1.0
    rows = json.loads(run_swapfs("status", "--json", str(m.path)).stdout)
    assert {(r["device"], r["headroom_pages"], r["backed_fraction"]) for r in rows} == {
        ("swap0", tot["headroom_pages"], 1.0), ("swap1", tot["headroom_pages"], 1.0)}
    out = run_swapfs("status", "--bytes", str(m.path)).stdout.splitlines()
    assert out[1].split()[-2:] == [str(tot["headroom_pages"] * PAGE), "100%"]
    table = run_swapfs("stats", str(m.path)).stdout
    assert f"headroom: {tot['headroom_pages']} pages" in table
    assert "100.0% of the devices' capacity is backed" in table
    prom = run_swapfs("stats", "--format", "prometheus", str(m.path)).stdout
    assert f'swapfs_headroom_pages{{mount="{m.path}"}} {tot["headroom_pages"]}' in prom
    assert f'swapfs_backed_fraction{{mount="{m.path}"}} 1.0' in prom
    assert f'swapfs_tier_headroom_pages{{mount="{m.path}",tier="ssd"}}' in prom


FULL_CONFIG = """
[pool]
max_bytes = "16M"

[[device]]
name = "swap0"
size = "1G"

[[tier]]
name = "disk"
path = "{tmp}/disk.img"
size = "32M"
"""


def test_check_config_and_mount_warn_of_devices_the_store_cannot_back(tmp_path):
    """1 GiB of devices over a 16 MiB pool and a 32 MiB tier (120 MiB of data at lz4's assumed
    2.5:1): check-config and mount warn, naming the sizes and what to do; the mount
    still starts, and its stats say how little of the devices is backed."""
    from .conftest import Mount, stop_mount

    cfg = tmp_path / "full.toml"
    cfg.write_text(FULL_CONFIG.format(tmp=tmp_path))
    out = run_swapfs("check-config", str(cfg))
    assert out.returncode == 0, out.stderr
    want = ("swapfs: warning: devices larger than the store can hold: they total 1073741824 "
            "bytes (1.0 GiB), the store about 125829120 bytes (120.0 MiB)")
    assert want in out.stderr
    assert "pool.expected_ratio" in out.stderr and "at most 125829120 bytes" in out.stderr
    assert "capacity: the store holds about 125829120 bytes (120.0 MiB) of data" in out.stdout
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "mnt.log"
    out = run_swapfs("mount", "--no-mlock", "--log-file", str(log), "--config", str(cfg),
                     str(mnt))
    match = re.search(r"daemon pid (\d+)", out.stdout)
    try:
        assert out.returncode == 0 and match, out.stderr
        assert want in out.stderr
        assert "devices larger than the store can hold" in log.read_text()
        tot = system.read_stats(mnt)["totals"]
        assert tot["backed_fraction"] == pytest.approx(
            tot["headroom_pages"] / (1 << 18), rel=1e-6)
        assert tot["backed_fraction"] <= 120 / 1024  # at most what check-config said
    finally:
        if match:
            stop_mount(Mount(path=mnt, log=log, pid=int(match.group(1))))
    cfg.write_text(FULL_CONFIG.format(tmp=tmp_path).replace('"1G"', '"120M"'))
    out = run_swapfs("check-config", str(cfg))
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr


def test_top_draws_frames_in_a_plain_terminal(mount_factory):
    m = mount_factory()
    out = run_swapfs("top", str(m.path), "--count", "2", "--interval", "0.1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(f"swapfs top {m.path}") == 2 and "\x1b[" not in out.stdout
    assert "promotions" in out.stdout and "refaults" in out.stdout and "hits" in out.stdout


def test_sighup_reloads_the_pool_watermarks(mount_factory, tmp_path):
    m = mount_factory(tier_config(tmp_path, 0.9, 0.8), name="hup")
    before = m.stats()["writeback"]["watermarks"]["pool"]
    cfg = tmp_path / "hup.toml"
    cfg.write_text(tier_config(tmp_path, 0.5, 0.25).replace('max_bytes = "64M"', 'max_bytes = "32M"'))
    os.kill(m.pid, signal.SIGHUP)
    assert m.wait_log("SIGHUP")
    after = m.stats()["writeback"]["watermarks"]["pool"]
    assert after["high"] == 64 * MiB // 2 and after["low"] == 64 * MiB // 4, (before, after)
    log = m.log_text()
    assert "applied: pool watermarks" in log and "needs a remount to change: pool.max_bytes" in log
    cfg.write_text("[pool]\nhigh_watermark = 2\n")
    os.kill(m.pid, signal.SIGHUP)
    assert m.wait_log("not reloaded")
    assert "configuration not reloaded" in m.log_text() and "high_watermark" in m.log_text()
    assert m.stats()["writeback"]["watermarks"]["pool"] == after


def test_root_stats_of_the_largest_mount_fit_one_xattr(mount_factory, tmp_path):
    devices = "".join(f'[[device]]\nname = "{"d" * 60}{i:04d}"\nsize = "1M"\n' for i in range(64))
    m = mount_factory("[pool]\nmax_bytes = \"16M\"\n" + devices)
    stats = system.read_stats(m.path)
    assert len(stats["devices"]) == 64
    too_many = tmp_path / "many.toml"
    too_many.write_text(devices + '[[device]]\nname = "one_more"\nsize = "1M"\n')
    out = run_swapfs("check-config", str(too_many))
    assert out.returncode == 2 and "device: 65 devices, at most 64" in out.stderr


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.timeout(300)
def test_swapon_and_swapoff_commands(mount_factory):
    why = harness.kernel_swap_unavailable()
    if why:
        pytest.skip(why)
    m = mount_factory()
    dev = str(m.dev())
    with harness.swap_lock():
        out = run_swapfs("swapon", dev, "--priority", "5", "--discard=pages")
        assert out.returncode == 0, out.stderr
        loop = out.stdout.strip()
        try:
            assert re.fullmatch(r"/dev/loop\d+", loop)
            assert system.active_swaps()[loop].priority == 5
            lo = system.loops_backed_by(dev)
            assert [x.device for x in lo] == [loop] and lo[0].direct_io
            queue = f"/sys/block/{os.path.basename(loop)}/queue"
            for key, value in system.LOOP_QUEUE_TUNING:  # the queue as docs/latency.md measured it
                with open(f"{queue}/{key}") as f:
                    assert f.read().strip() == value, key
            again = run_swapfs("swapon", dev)
            assert again.returncode == 1 and "already on" in again.stderr and loop in again.stderr
            row = next(r for r in json.loads(run_swapfs("status", "--json").stdout)
                       if r["mount"] == str(m.path) and r["device"] == "swap0")
            assert row["loop"] == loop and row["swap_priority"] == 5
            assert "swapfs swapoff" in run_swapfs("unmount", str(m.path)).stderr
        finally:
            off = run_swapfs("swapoff", dev, timeout=120)
        assert off.returncode == 0, off.stderr
        assert loop not in system.active_swaps() and system.loops_backed_by(dev) == []
        out = run_swapfs("swapoff", dev)
        assert out.returncode == 0 and "not on" in out.stderr

        # busy: a loop device that is not swap already holds the file
        with harness.loop_device(m.dev("swap1")) as other:
            out = run_swapfs("swapon", str(m.dev("swap1")))
            assert out.returncode == 1 and "busy" in out.stderr and other in out.stderr
        out = run_swapfs("swapon", str(m.path / "nope"))
        assert out.returncode == 1 and "no such device" in out.stderr


def test_swapon_sizes_the_swap_area_to_what_the_store_backs(tmp_path):
    """1 GiB over a store that holds about 120 MiB: the swap area stops there, so that the
    kernel sees the device full when the store is; --whole takes the whole device."""
    from .conftest import start_mount, stop_mount

    why = harness.kernel_swap_unavailable()
    if why:
        pytest.skip(why)
    m = start_mount(tmp_path, FULL_CONFIG.format(tmp=tmp_path))
    try:
        dev = str(m.dev())
        tot = m.stats()["totals"]
        backed = int((1 << 18) * tot["backed_fraction"] * 0.5)  # half: stale pages, dead bytes
        assert backed < 120 * MiB // PAGE
        with harness.swap_lock():
            out = run_swapfs("swapon", dev)
            assert out.returncode == 0, out.stderr
            loop = out.stdout.strip()
            try:
                assert "swap area of" in out.stderr and "--whole" in out.stderr
                # the area less its header page
                assert system.active_swaps()[loop].size_kib == (backed - 1) * 4
            finally:
                assert run_swapfs("swapoff", dev, timeout=120).returncode == 0
            out = run_swapfs("swapon", "--whole", dev)
            assert out.returncode == 0, out.stderr
            loop = out.stdout.strip()
            try:
                assert "swap area" not in out.stderr
                assert system.active_swaps()[loop].size_kib == (1 << 20) - 4
            finally:
                assert run_swapfs("swapoff", dev, timeout=120).returncode == 0
    finally:
        stop_mount(m)


def test_swapon_and_swapoff_say_they_need_root(monkeypatch, capsys):
    from swapfs import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["swapon", "/run/swapfs/swap0"]) == 1
    assert "swapon needs root" in capsys.readouterr().err
    assert cli.main(["swapoff", "/run/swapfs/swap0"]) == 1
    assert "swapoff needs root" in capsys.readouterr().err


@pytest.mark.slow
def test_record_then_plot(mount_factory, tmp_path):
    m = mount_factory(tier_config(tmp_path))
    rec = tmp_path / "run.jsonl"
    fill(m.dev(), 50)
    out = run_swapfs("record", str(m.path), "-o", str(rec), "--count", "2", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    fill(m.dev(), 100, offset=MiB)
    assert run_swapfs("writeback", str(m.path), "20").returncode == 0
    out = run_swapfs("record", str(m.path), "-o", str(rec), "--count", "1")
    assert out.returncode == 0, out.stderr
    from swapfs.cli.monitor import load_samples, plot_series

    samples = load_samples(str(rec))
    assert len(samples) == 3 and samples[0]["mount"] == str(m.path)
    series = plot_series(samples)
    assert series["tiers"]["ssd"][-1] == 20 and series["tiers"]["pool"][0] > 0
    assert series["written_mib_s"][2] > 0 and series["moved_pages_s"][2] > 0

    png = tmp_path / "run.png"
    out = run_swapfs("plot", str(rec), "-o", str(png))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out.returncode == 1 and "matplotlib" in out.stderr
        pytest.skip("matplotlib (the plot extra) not installed")
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"time": 1}\n')
    out = run_swapfs("plot", str(bad), "-o", str(png))
    assert out.returncode == 1 and "bad.jsonl:1" in out.stderr


@pytest.mark.slow
def test_status_does_not_hang_on_a_stopped_daemon(mount_factory):
    """A daemon that does not answer (here: stopped) is reported, not waited for, and the
    exit status says so (4; 3 if another mount's daemon on this machine is gone)."""
    m = mount_factory()
    os.kill(m.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        out = run_swapfs("status", timeout=60)
        took = time.monotonic() - start
        mine = run_swapfs("status", str(m.path), timeout=60)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert out.returncode in (3, 4), out.stderr
    assert mine.returncode == 4, mine.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith(str(m.path)))
    assert "not answering" in line and took < 30
    assert "swap0" in run_swapfs("status").stdout


@pytest.mark.slow
def test_compact_command_gives_scattered_holes_back(mount_factory):
    m = mount_factory()
    rng = random.Random(5)
    words = [b"swap", b"page", b"slot", b"tier", b"pool", b"span"]
    data = b"".join(rng.choice(words) for _ in range(4096 * 4096 // 4))  # 4096 pages
    fd = os.open(m.dev(), os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        for i in range(0, 4096, 4):  # keep one page in four: holes in every span
            # a discard through the mount, as the loop device sends it
            kernel.fallocate(fd, kernel.FALLOC_FL_PUNCH_HOLE | kernel.FALLOC_FL_KEEP_SIZE,
                             (i + 1) * 4096, 3 * 4096)
    finally:
        os.close(fd)
    assert "user.swapfs.ctl.compact" in os.listxattr(m.path)
    before = m.stats()["tiers"]["pool"]
    out = run_swapfs("compact", str(m.path))
    assert out.returncode == 0, out.stderr
    assert re.search(r"moved [1-9]\d* objects", out.stdout), out.stdout
    after = m.stats()["tiers"]["pool"]
    assert after["pool_bytes"] < before["pool_bytes"]
    assert after["compacted_objects"] > 0 and after["holes"] < before["holes"]
    with open(m.dev(), "rb", buffering=0) as f:
        got = f.read(4096 * 4096)
    for i in range(0, 4096, 4):
        assert got[i * 4096:(i + 1) * 4096] == data[i * 4096:(i + 1) * 4096]
    bad = run_swapfs("compact", str(m.dev()))
    assert bad.returncode != 0 and "not a swapfs mount" in bad.stderr
