"""The stats object for people and scripts: bytes with units, the stats
table, and what to say when a mount's stats cannot be read.  Shared by the
commands (swapfs/cli.py, swapfs/monitor.py); the daemon never imports it."""

from __future__ import annotations

import errno
import sys
from typing import Any

from . import sysinfo
from .kernel import PAGE_SIZE as PAGE
from .sysinfo import STATS_XATTR

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


def die(message: str, code: int = EXIT_FAIL) -> int:
    print(f"swapfs: {message}", file=sys.stderr)
    return code


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def read_stats(path: str) -> dict[str, Any]:
    return sysinfo.read_stats(path)


def format_device(name: str, d: dict[str, Any]) -> str:
    """One device's object as a table."""
    lines = [f"device {name}: {fmt_bytes(d['size_bytes'])}, {d['stored_pages']} pages stored"]
    rows = [
        ("same-filled pages", d.get("same_filled_pages", 0)),
        ("pool pages (compressed)", d.get("pool_pages", 0)),
        ("huge pages (raw in the pool)", d.get("huge_pages", 0)),
        ("file-tier pages", d.get("file_pages", 0)),
        ("data (orig_data_size)", fmt_bytes(d.get("orig_data_size", 0))),
        ("compressed (compr_data_size)", fmt_bytes(d.get("compressed_bytes", 0))),
        ("pool memory", fmt_bytes(d.get("pool_bytes", 0))),
        ("slot table", fmt_bytes(d.get("metadata_bytes", 0))),
        ("reads", f"{d.get('reads', 0)} ({fmt_bytes(d.get('read_bytes', 0))})"),
        ("writes", f"{d.get('writes', 0)} ({fmt_bytes(d.get('written_bytes', 0))})"),
        ("discards", f"{d.get('discards', 0)} ({fmt_bytes(d.get('discarded_bytes', 0))})"),
        ("errors: no space", d.get("nospace_errors", 0)),
    ]
    lines += [f"  {k:<30}{v}" for k, v in rows]
    return "\n".join(lines)


def format_stats(stats: dict[str, Any]) -> str:
    lines = []
    devs = stats.get("devices", {})
    lines.append(f"{'device':<12}{'size':>11}{'stored':>10}{'same':>10}{'huge':>8}{'file':>10}"
                 f"{'data':>11}{'memory':>11}{'reads':>10}{'writes':>10}{'discards':>10}{'nospace':>9}")
    for name, d in devs.items():
        lines.append(
            f"{name:<12}{fmt_bytes(d['size_bytes']):>11}{d['stored_pages']:>10}"
            f"{d['same_filled_pages']:>10}{d.get('huge_pages', 0):>8}{d.get('file_pages', 0):>10}"
            f"{fmt_bytes(d.get('orig_data_size', 0)):>11}{fmt_bytes(d.get('pool_bytes', 0)):>11}"
            f"{d['reads']:>10}{d['writes']:>10}{d['discards']:>10}{d.get('nospace_errors', 0):>9}"
        )
    lines.append("")
    lines.append(f"{'tier':<12}{'kind':>6}{'pages':>10}{'payload':>12}{'memory/disk':>13}{'limit':>12}"
                 f"{'checksum':>10}{'io':>6}")
    for name, t in stats.get("tiers", {}).items():
        held = t.get("pool_bytes", t.get("disk_bytes", 0))
        limit = t.get("max_bytes", t.get("capacity_pages", 0) * PAGE)
        payload = t.get("compressed_bytes", t.get("stored_pages", 0) * PAGE)
        lines.append(
            f"{name:<12}{t.get('kind', ''):>6}{t.get('stored_pages', 0):>10}"
            f"{fmt_bytes(payload):>12}{fmt_bytes(held):>13}{fmt_bytes(limit):>12}"
            f"{t.get('checksum_errors', 0):>10}{t.get('io_errors', 0):>6}"
        )
    tot = stats.get("totals", {})
    lines.append("")
    lines.append(
        f"total: {tot.get('stored_pages', 0)} pages stored ({tot.get('same_filled_pages', 0)} same-filled), "
        f"pool {fmt_bytes(tot.get('pool_bytes', 0))} (peak {fmt_bytes(tot.get('mem_used_max', 0))}), "
        f"metadata {fmt_bytes(tot.get('metadata_bytes', 0))}, "
        f"compression ratio {tot.get('compression_ratio', 0.0):.2f}"
    )
    for section in ("writeback", "cache"):
        counters = {k: v for k, v in stats.get(section, {}).items() if not isinstance(v, dict)}
        if section == "writeback":
            counters.pop("epoch", None)  # a clock, not a counter
            counters.pop("demotions_clock", None)
        if any(v for k, v in counters.items() if k != "capacity_pages"):
            lines.append(f"{section}: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    pairs = stats.get("writeback", {}).get("pairs", {})
    for pair, c in pairs.items():
        lines.append(f"  moved {pair}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    return "\n".join(lines)


def stats_error(path: str, exc: Exception) -> int:
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return die(f"{path} is not a swapfs mount or device file (no {STATS_XATTR} attribute)")
        if exc.errno == errno.ENOTCONN:
            return die(f"{path}: the swapfs daemon is gone (transport endpoint not connected)")
        if exc.errno == errno.ENOENT:
            return die(f"{path}: no such file or directory")
        return die(f"cannot read stats of {path}: {exc.strerror}")
    return die(f"malformed stats from {path}: {exc}")
