"""swapfs status (every device on the machine) and swapfs stats (one mount
or device), with the tables they print."""

from __future__ import annotations

import argparse
import errno
import json
import os
from typing import Any

from .. import system
from ..kernel import PAGE_SIZE as PAGE
from .common import EXIT_OK, fmt_bytes, read_stats, stats_error

# swapfs status reads every mount on the machine: one stuck daemon must not hang it
STATUS_TIMEOUT = 2.0


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
        payload = t.get("compressed_bytes", t.get("live_bytes", t.get("stored_pages", 0) * PAGE))
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


def status_rows() -> list[dict[str, Any]]:
    """One record per device of every swapfs mount on this machine."""
    rows: list[dict[str, Any]] = []
    swaps = system.active_swaps()
    loops = system.loop_devices()
    for mount in system.swapfs_mounts():
        try:
            stats = system.read_stats(mount, timeout=STATUS_TIMEOUT)
        except (OSError, ValueError) as exc:
            if isinstance(exc, TimeoutError):
                why = f"daemon not answering within {STATUS_TIMEOUT:g} s"
            elif isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:
                why = "daemon gone"
            else:
                why = str(exc)
            rows.append({"mount": mount, "device": None, "error": why})
            continue
        algorithm = stats.get("tiers", {}).get("pool", {}).get("algorithm", "")
        for name, d in stats.get("devices", {}).items():
            path = os.path.join(mount, name)
            loop = next((lo.device for lo in loops if lo.backing_file == path), None)
            swap = swaps.get(loop) if loop else None
            rows.append({
                "mount": mount, "device": name, "loop": loop,
                "size": d["size_bytes"],
                "used": swap.used_kib * 1024 if swap else None,
                "priority": swap.priority if swap else None,
                "data": d.get("orig_data_size", 0), "compressed": d.get("compr_data_size", 0),
                "memory": d.get("mem_used_total", d.get("pool_bytes", 0)),
                "algorithm": algorithm, "file_pages": d.get("file_pages", 0),
                "stored_pages": d["stored_pages"],
            })
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    rows = status_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no swapfs mounts")
        return EXIT_OK

    def b(v: int | None) -> str:
        if v is None:
            return "-"
        return str(v) if args.bytes else fmt_bytes(v).replace(" ", "")

    header = ["MOUNT", "DEVICE", "LOOP", "SIZE", "USED", "PRIO", "DATA", "COMPR", "MEMORY", "ALGO",
              "FILE-PAGES"]
    table = [header]
    for r in rows:
        if r["device"] is None:
            table.append([r["mount"], f"({r['error']})"] + [""] * (len(header) - 2))
            continue
        table.append([r["mount"], r["device"], r["loop"] or "-", b(r["size"]), b(r["used"]),
                      "-" if r["priority"] is None else str(r["priority"]), b(r["data"]),
                      b(r["compressed"]), b(r["memory"]), r["algorithm"], str(r["file_pages"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [c.ljust(w) if i < 3 or i == 9 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
    return EXIT_OK


# -- stats -------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    from ..stats import prometheus_text

    path = os.path.abspath(args.path)
    fmt = "json" if args.json else args.format
    try:
        stats = read_stats(path)
    except (OSError, ValueError) as exc:
        return stats_error(path, exc)
    mount = system.mount_of(path) or path
    device = None if mount == path else os.path.basename(path)
    if fmt == "json":
        print(json.dumps(stats, indent=2))
    elif fmt == "prometheus":
        print(prometheus_text(stats, mount, device=device), end="")
    elif device is not None:
        print(format_device(device, stats))
    else:
        print(format_stats(stats))
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Add the parsers of status and stats to the subparsers ``sub``."""
    p = sub.add_parser("status", help="every swapfs device on this machine, one line each",
                       description="One line per device of every swapfs mount, like zramctl and "
                       "swapon --show: its loop device, size, swap used and priority (from "
                       "/proc/swaps), DATA (uncompressed bytes held in memory), COMPR (their "
                       "compressed size), MEMORY (pool memory they take), the algorithm and the "
                       "pages in file tiers.")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--bytes", action="store_true", help="sizes in bytes, not KiB/MiB/GiB")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stats", help="show statistics of a mount or of one device",
                       description="Print the statistics of a swapfs mount (its user.swapfs.stats "
                       "xattr) or of one device file.  --format prometheus writes the Prometheus "
                       "text format for node_exporter's textfile collector, e.g. "
                       "'swapfs stats /run/swapfs/main --format prometheus > "
                       "/var/lib/node_exporter/swapfs.prom.$$ && mv ... swapfs.prom'.")
    p.add_argument("path", metavar="MOUNT|DEVICE_FILE")
    p.add_argument("--format", choices=["table", "json", "prometheus"], default="table")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.set_defaults(func=cmd_stats)
