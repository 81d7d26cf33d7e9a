"""Metrics for what people already run: ``swapfs metrics`` covers every mount in
one valid exposition, the node_exporter textfile collector unit (its ExecStart
run as systemd would, the file replaced atomically; ``systemd-analyze verify``),
and the Grafana dashboard, whose every query names a metric a real mount
exports."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess

import pytest

from swapfs import units
from swapfs.cli import metrics

from .conftest import run_swapfs
from .test_commands import fill, tier_config
from .test_systemd import EXE, REPO, analyze_verify

pytestmark = pytest.mark.timeout(120)


def families(text: str) -> dict[str, list]:
    """{family name: samples}, by prometheus_client's own parser; each family once."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} appears twice"
        out[fam.name] = fam.samples
    helps = re.findall(r"^# HELP (\S+)", text, re.M)
    assert len(helps) == len(set(helps)), "a HELP line repeated"
    return out


def test_metrics_covers_every_mount_in_one_exposition(mount_factory, tmp_path):
    a = mount_factory(name="a")
    b = mount_factory(tier_config(tmp_path), name="b")
    fill(a.dev(), 10)
    fill(b.dev(), 20)
    out = run_swapfs("metrics")
    assert out.returncode in (0, 1), out.stderr  # 1 only for another checkout's stuck mount
    fams = families(out.stdout)
    mounts = {s.labels["mount"] for s in fams["swapfs_device_writes"]}
    assert {str(a.path), str(b.path)} <= mounts
    up = {s.labels["mount"]: s.value for s in fams["swapfs_up"]}
    assert up[str(a.path)] == 1 and up[str(b.path)] == 1
    # per mount, the same samples as `swapfs stats MOUNT --format prometheus`
    for m in (a, b):
        one = families(run_swapfs("stats", str(m.path), "--format", "prometheus").stdout)
        for name, samples in one.items():
            mine = [s for s in fams[name] if s.labels.get("mount") == str(m.path)]
            assert sorted(s.labels.items() for s in mine) == sorted(s.labels.items() for s in samples), name
    writes = {s.labels["mount"]: s.value for s in fams["swapfs_device_writes"] if s.labels["device"] == "swap0"}
    assert writes[str(a.path)] == 10 and writes[str(b.path)] == 20


def test_merge_keeps_each_family_once():
    one = '# HELP swapfs_x X\n# TYPE swapfs_x gauge\nswapfs_x{mount="/a"} 1\n'
    two = '# HELP swapfs_x X\n# TYPE swapfs_x gauge\nswapfs_x{mount="/b"} 2\n# HELP swapfs_y Y\n' \
          '# TYPE swapfs_y counter\nswapfs_y_total{mount="/b"} 3\n'
    merged = metrics.merge([one, two])
    assert merged == ('# HELP swapfs_x X\n# TYPE swapfs_x gauge\nswapfs_x{mount="/a"} 1\nswapfs_x{mount="/b"} 2\n'
                      '# HELP swapfs_y Y\n# TYPE swapfs_y counter\nswapfs_y_total{mount="/b"} 3\n')
    assert metrics.merge([]) == ""


def exec_start(service_text: str) -> list[str]:
    line = next(x for x in service_text.splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.split("=", 1)[1])


@pytest.mark.slow
def test_textfile_unit_writes_the_collector_file_atomically(mount_factory, tmp_path):
    m = mount_factory(tier_config(tmp_path))
    fill(m.dev(), 30)
    textfile_dir = tmp_path / "node-exporter"
    textfile_dir.mkdir()
    service = units.textfile_service(exe=EXE, directory=str(textfile_dir))
    assert f"ConditionPathIsDirectory={textfile_dir}" in units.textfile_timer(str(textfile_dir)).splitlines()
    cmd = exec_start(service)
    assert cmd[:2] == [EXE, "metrics"] and cmd[-1] == str(textfile_dir / "swapfs.prom")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    prom = textfile_dir / "swapfs.prom"
    fams = families(prom.read_text())
    assert any(s.labels["mount"] == str(m.path) and s.value == 1 for s in fams["swapfs_up"])
    assert any(s.labels.get("mount") == str(m.path) for s in fams["swapfs_tier_stored_pages"])
    assert prom.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user
    assert [p.name for p in textfile_dir.iterdir()] == ["swapfs.prom"]  # no temporary file left
    inode = prom.stat().st_ino
    # again, with this mount's daemon stopped: the file is replaced (a rename), swapfs_up says 0
    os.kill(m.pid, signal.SIGSTOP)
    try:
        again = subprocess.run([*cmd[:2], "--timeout", "0.5", str(m.path), *cmd[2:]], capture_output=True,
                               text=True, timeout=60)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert again.returncode == 1 and f"{m.path}: the daemon is not answering" in again.stderr
    assert prom.stat().st_ino != inode
    fams = families(prom.read_text())
    assert [(s.labels["mount"], s.value) for s in fams["swapfs_up"]] == [(str(m.path), 0)]
    assert [p.name for p in textfile_dir.iterdir()] == ["swapfs.prom"]
    # a directory that is not there: a message naming the file, nothing written
    out = run_swapfs("metrics", str(m.path), "-o", str(tmp_path / "nope" / "swapfs.prom"))
    assert out.returncode == 1 and "cannot write" in out.stderr and "nope/swapfs.prom" in out.stderr


def test_textfile_units_verify_and_are_what_systemd_holds(tmp_path):
    assert (REPO / "systemd" / units.TEXTFILE_SERVICE).read_text() == units.textfile_service()
    assert (REPO / "systemd" / units.TEXTFILE_TIMER).read_text() == units.textfile_timer()
    assert exec_start(units.textfile_service()) == [
        units.EXE, "metrics", "--output", "/var/lib/prometheus/node-exporter/swapfs.prom"]
    service = tmp_path / units.TEXTFILE_SERVICE
    service.write_text(units.textfile_service(exe=EXE, directory=str(tmp_path)))
    timer = tmp_path / units.TEXTFILE_TIMER
    timer.write_text(units.textfile_timer(directory=str(tmp_path)))
    out = analyze_verify([service, timer], tmp_path)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_install_units_installs_the_collector(tmp_path):
    root = tmp_path / "root"
    out = run_swapfs("install-units", "--root", str(root), "--textfile-dir", "/srv/textfile")
    assert out.returncode == 0, out.stderr
    unit_dir = root / units.UNIT_DIR.lstrip("/")
    assert (unit_dir / units.TEXTFILE_TIMER).read_text() == units.textfile_timer(directory="/srv/textfile")
    text = (unit_dir / units.TEXTFILE_SERVICE).read_text()
    assert text == units.textfile_service(directory="/srv/textfile")
    assert exec_start(text)[-1] == "/srv/textfile/swapfs.prom"
    assert "systemctl enable --now swapfs-textfile.timer" in out.stdout


# -- the Grafana dashboard -----------------------------------------------------------

DASHBOARD = REPO / "dashboards" / "swapfs.json"


def queries(dashboard: dict) -> list[str]:
    """Every PromQL text of the dashboard: panel targets (rows' panels too) and variables."""
    out = []

    def panels(items: list) -> None:
        for p in items:
            out.extend(t["expr"] for t in p.get("targets", []))
            panels(p.get("panels", []))

    panels(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            out.append(q["query"])
        elif var["type"] == "query":
            out.append(q)
    return out


def metric_names(query: str) -> set[str]:
    return set(re.findall(r"\bswapfs_[A-Za-z0-9_]+", query))


def test_dashboard_queries_name_only_metrics_swapfs_exports(mount_factory, tmp_path):
    # a mount with every kind of tier, traffic and a move, read as the collector reads it
    m = mount_factory(tier_config(tmp_path))
    fill(m.dev(), 200)
    assert run_swapfs("writeback", str(m.path), "50").returncode == 0
    with open(m.dev(), "rb") as f:  # a refault of a moved page
        f.read(4096)
    out = run_swapfs("metrics", str(m.path))
    assert out.returncode == 0, out.stderr
    exported = set(families(out.stdout))
    # prometheus_client names counter families without _total; the text has both spellings
    exported |= {name for name in re.findall(r"^(swapfs_\w+)[{ ]", out.stdout, re.M)}

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "swapfs" and dashboard["schemaVersion"] >= 36
    found = queries(dashboard)
    assert len(found) >= 20
    used: set[str] = set()
    for q in found:
        names = metric_names(q)
        assert names, f"a query without a swapfs metric: {q}"
        assert names <= exported, f"{q}: {sorted(names - exported)} not exported"
        assert q.count("(") == q.count(")") and q.count("{") == q.count("}"), q
        used |= names
    # what the dashboard is for
    for name in ("swapfs_orig_data_size", "swapfs_mem_used_total", "swapfs_compr_data_size",
                 "swapfs_tier_stored_pages", "swapfs_device_written_bytes_total",
                 "swapfs_writeback_pair_bytes_total", "swapfs_writeback_promotions_total", "swapfs_up"):
        assert name in used, name
    # every panel reads the chosen data source and every selector the chosen mounts
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            for sel in re.findall(r"swapfs_\w+(\{[^}]*\})?", t["expr"]):
                assert 'mount=~"$mount"' in sel, t["expr"]


def test_dashboard_check_finds_a_misspelt_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][1]["targets"][0]["expr"] = "swapfs_orig_data_bytes"
    assert metric_names(queries(dashboard)[0]) == {"swapfs_orig_data_bytes"}
