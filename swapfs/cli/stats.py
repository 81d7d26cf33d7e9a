"""swapfs status (every device on the machine) and swapfs stats (one mount
or device), with the tables they print."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .. import system
from ..kernel import PAGE_SIZE as PAGE
from .common import (
    DEFAULT_TIMEOUT,
    EXIT_GONE,
    EXIT_NOT_ANSWERING,
    EXIT_OK,
    add_timeout_option,
    daemon_problem,
    die,
    fmt_bytes,
    ljust,
    read_stats,
    rjust,
    stats_error,
    text_width,
)


def format_device(name: str, d: dict[str, Any]) -> str:
    """One device's object as a table: its pages by where they are (they add up to the
    pages stored), then their bytes."""
    lines = [f"device {name}: {fmt_bytes(d['size_bytes'])}, {d['stored_pages']} pages stored "
             f"({fmt_bytes(d['stored_pages'] * PAGE)} of data)"]
    rows = [
        ("same-filled pages", d.get("same_filled_pages", 0)),
        ("pool pages (compressed)", d.get("pool_pages", 0)),
        ("huge pages (raw in the pool)", d.get("huge_pages", 0)),
        ("file-tier pages", d.get("file_pages", 0)),
        ("in memory (orig_data_size)", fmt_bytes(d.get("orig_data_size", 0))),
        ("compressed (compr_data_size)", fmt_bytes(d.get("compressed_bytes", 0))),
        ("pool memory (mem_used_total)", fmt_bytes(d.get("pool_bytes", 0))),
        ("in file tiers", fmt_bytes(d.get("file_pages", 0) * PAGE)),
        ("slot table", fmt_bytes(d.get("metadata_bytes", 0))),
        ("reads", f"{d.get('reads', 0)} ({fmt_bytes(d.get('read_bytes', 0))})"),
        ("writes", f"{d.get('writes', 0)} ({fmt_bytes(d.get('written_bytes', 0))})"),
        ("discards", f"{d.get('discards', 0)} ({fmt_bytes(d.get('discarded_bytes', 0))})"),
        ("errors: no space", d.get("nospace_errors", 0)),
    ]
    lines += [f"  {k:<30}{v}" for k, v in rows]
    return "\n".join(lines)


def _counter(key: str, value: Any) -> str:
    """A counter with its unit: bytes as bytes, seconds as seconds, the rest as counts."""
    if key.endswith("_bytes") or key == "bytes":
        return f"{key} {fmt_bytes(value)}"
    if key.endswith("_seconds"):
        return f"{key} {value:.3f} s"
    return f"{key} {value}"


def _ratio(value: float, what: str) -> str:
    """A ratio said with what it divides; 0.0 means nothing to divide (an empty pool)."""
    return f"{value:.2f} ({what})" if value else "- (nothing in the pool)"


def format_stats(stats: dict[str, Any]) -> str:
    """A mount's object as tables.  The device table's page columns add up: stored = same +
    pool + huge + file; DATA is every stored page's uncompressed size, MEMORY the pool memory
    the device's pages take."""
    devs = stats.get("devices", {})
    head = ["device", "size", "stored", "same", "pool", "huge", "file", "data", "compr", "memory",
            "reads", "writes", "discards", "nospace"]
    table = [head]
    for name, d in devs.items():
        table.append([
            name, fmt_bytes(d["size_bytes"]), str(d["stored_pages"]), str(d["same_filled_pages"]),
            str(d.get("pool_pages", 0)), str(d.get("huge_pages", 0)), str(d.get("file_pages", 0)),
            fmt_bytes(d["stored_pages"] * PAGE), fmt_bytes(d.get("compressed_bytes", 0)),
            fmt_bytes(d.get("pool_bytes", 0)), str(d["reads"]), str(d["writes"]),
            str(d["discards"]), str(d.get("nospace_errors", 0))])
    lines = _columns(table, left=1)
    lines.append("  (pages: stored = same + pool + huge + file; data: the stored pages "
                 "uncompressed; compr: their compressed size in the pool; memory: the pool "
                 "memory they take)")
    lines.append("")
    table = [["tier", "kind", "pages", "payload", "memory/disk", "limit", "checksum", "io"]]
    for name, t in stats.get("tiers", {}).items():
        held = t.get("pool_bytes", t.get("disk_bytes", 0))
        limit = t.get("max_bytes", t.get("capacity_pages", 0) * PAGE)
        payload = t.get("compressed_bytes", t.get("live_bytes", t.get("stored_pages", 0) * PAGE))
        table.append([name, t.get("kind", ""), str(t.get("stored_pages", 0)), fmt_bytes(payload),
                      fmt_bytes(held), fmt_bytes(limit), str(t.get("checksum_errors", 0)),
                      str(t.get("io_errors", 0))])
    lines += _columns(table, left=1)
    tot = stats.get("totals", {})
    lines.append("")
    lines.append(
        f"total: {tot.get('stored_pages', 0)} pages stored ({tot.get('same_filled_pages', 0)} same-filled), "
        f"pool {fmt_bytes(tot.get('pool_bytes', 0))} (peak {fmt_bytes(tot.get('mem_used_max', 0))}), "
        f"metadata {fmt_bytes(tot.get('metadata_bytes', 0))}, "
        f"compression ratio {_ratio(tot.get('compression_ratio', 0.0), 'orig_data_size / compr_data_size')}, "
        f"memory ratio {_ratio(tot.get('memory_ratio', 0.0), 'pool data / pool memory')}"
    )
    if "headroom_pages" in tot:
        lines.append(headroom_line(tot, stats.get("tiers", {}).get("pool", {})))
    for section in ("writeback", "cache"):
        counters = {k: v for k, v in stats.get(section, {}).items() if not isinstance(v, dict)}
        if section == "writeback":
            counters.pop("epoch", None)  # a clock, not a counter
            counters.pop("demotions_clock", None)
        if any(v for k, v in counters.items() if k != "capacity_pages"):
            lines.append(f"{section}: " + ", ".join(_counter(k, v) for k, v in counters.items()))
    pairs = stats.get("writeback", {}).get("pairs", {})
    for pair, c in pairs.items():
        lines.append(f"  moved {pair}: " + ", ".join(_counter(k, v) for k, v in c.items()))
    return "\n".join(lines)


def headroom_line(totals: dict[str, Any], pool: dict[str, Any]) -> str:
    """The store's real headroom in one line: what it can still take, and how much of the
    devices' capacity stored pages and that headroom back."""
    room = totals.get("headroom_pages", 0)
    backed = totals.get("backed_fraction", 0.0)
    ratio = pool.get("headroom_ratio", 0.0)
    line = (f"headroom: {room} pages ({fmt_bytes(room * PAGE)} of data) more fit, the pool's at "
            f"{ratio:.2f}:1; {backed:.1%} of the devices' capacity is backed")
    if backed < 1.0:
        line += " (the kernel can fill slots the store has no room for)"
    return line


def _columns(table: list[list[str]], left: int) -> list[str]:
    """Rows of cells as aligned text: the first ``left`` columns to the left, the others to
    the right, widths in terminal columns (a device named with emoji stays aligned)."""
    widths = [max(text_width(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(ljust(c, w) if i < left else rjust(c, w)
                      for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in table]


def _read_all(mounts: list[str], timeout: float) -> list[dict[str, Any] | BaseException]:
    """The stats of every mount, read side by side: one stuck daemon costs ``timeout`` once,
    not once per mount after it."""
    import threading

    results: list[dict[str, Any] | BaseException] = [TimeoutError()] * len(mounts)

    def read(i: int) -> None:
        try:
            results[i] = system.read_stats(mounts[i], timeout=timeout)
        except (OSError, ValueError) as exc:
            results[i] = exc

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(mounts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # each returns within the timeout: system.read_stats is bounded
    return results


def status_rows(timeout: float = DEFAULT_TIMEOUT, only: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per device of every swapfs mount on this machine, named as in the stats
    object (``size_bytes``, ``orig_data_size`` ...); a mount whose daemon does not answer is
    one record with ``device`` None, ``state`` (``gone``, ``not answering`` or ``error``)
    and ``error``.  ``only``: these mounts (swapfs mounts), not every one."""
    rows: list[dict[str, Any]] = []
    swaps = system.active_swaps()
    loops = system.loop_devices()
    mounts = system.swapfs_mounts() if only is None else only
    for mount, stats in zip(mounts, _read_all(mounts, timeout)):
        if isinstance(stats, BaseException):
            problem = daemon_problem(stats)
            if problem is not None and problem[0] == "not answering":
                why = f"daemon not answering within {timeout:g} s"
            elif problem is not None:
                why = "daemon gone"
            else:
                why = str(stats)
            rows.append({"mount": mount, "device": None,
                         "state": problem[0] if problem else "error", "error": why})
            continue
        algorithm = stats.get("tiers", {}).get("pool", {}).get("algorithm", "")
        totals = stats.get("totals", {})
        for name, d in stats.get("devices", {}).items():
            path = os.path.join(mount, name)
            loop = next((lo.device for lo in loops if lo.backing_file == path), None)
            swap = swaps.get(loop) if loop else None
            rows.append({
                "mount": mount, "device": name, "state": "ok", "loop": loop,
                "size_bytes": d["size_bytes"],
                "swap_used_bytes": swap.used_kib * 1024 if swap else None,
                "swap_priority": swap.priority if swap else None,
                "stored_pages": d["stored_pages"],
                "orig_data_size": d.get("orig_data_size", 0),
                "compr_data_size": d.get("compr_data_size", 0),
                "mem_used_total": d.get("mem_used_total", d.get("pool_bytes", 0)),
                "algorithm": algorithm, "file_pages": d.get("file_pages", 0),
                # the mount's, shared by its devices
                "headroom_pages": totals.get("headroom_pages"),
                "backed_fraction": totals.get("backed_fraction"),
            })
    return rows


def status_exit(rows: list[dict[str, Any]]) -> int:
    """0 when every mount answered; EXIT_GONE when a daemon is gone, else
    EXIT_NOT_ANSWERING when one did not answer (or its stats were unreadable)."""
    states = {r["state"] for r in rows}
    if "gone" in states:
        return EXIT_GONE
    if states - {"ok"}:
        return EXIT_NOT_ANSWERING
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    only = None
    if args.mounts:
        only = [os.path.abspath(m) for m in args.mounts]
        known = system.swapfs_mounts()
        for m in only:
            if m not in known:
                return die(f"{m} is not a swapfs mount (see: swapfs status)")
    rows = status_rows(args.timeout, only)
    if args.json:
        print(json.dumps(rows, indent=2))
        return status_exit(rows)
    if not rows:
        print("no swapfs mounts")
        return EXIT_OK

    def b(v: int | None) -> str:
        if v is None:
            return "-"
        return str(v) if args.bytes else fmt_bytes(v).replace(" ", "")

    header = ["MOUNT", "DEVICE", "LOOP", "SIZE", "USED", "PRIO", "DATA", "COMPR", "MEMORY", "ALGO",
              "FILE-PAGES", "HEADROOM", "BACKED"]
    table = [header]
    problems: dict[int, str] = {}  # row -> why its mount did not answer
    for r in rows:
        if r["device"] is None:
            problems[len(table)] = f"({r['error']})"
            table.append([r["mount"]] + [""] * (len(header) - 1))
            continue
        table.append([r["mount"], r["device"], r["loop"] or "-", b(r["size_bytes"]),
                      b(r["swap_used_bytes"]),
                      "-" if r["swap_priority"] is None else str(r["swap_priority"]),
                      b(r["orig_data_size"]), b(r["compr_data_size"]), b(r["mem_used_total"]),
                      r["algorithm"], str(r["file_pages"]),
                      "-" if r["headroom_pages"] is None else b(r["headroom_pages"] * PAGE),
                      "-" if r["backed_fraction"] is None else f"{r['backed_fraction']:.0%}"])
    widths = [max(text_width(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        if n in problems:
            print(f"{ljust(row[0], widths[0])}  {problems[n]}")
            continue
        cells = [ljust(c, w) if i < 3 or i == 9 else rjust(c, w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
    return status_exit(rows)


# -- stats -------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    from ..stats import prometheus_text

    path = os.path.abspath(args.path)
    fmt = "json" if args.json else args.format
    try:
        stats = read_stats(path, args.timeout)
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
                       "compressed size), MEMORY (pool memory they take), the algorithm, the "
                       "pages in file tiers, HEADROOM (the data the mount's store can still take "
                       "at its current ratio, shared by its devices) and BACKED (the share of the "
                       "mount's device capacity that stored pages and headroom back).")
    p.add_argument("mounts", nargs="*", metavar="MOUNT",
                   help="only these mounts (default: every swapfs mount); the exit status "
                   "then speaks of them alone")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--bytes", action="store_true", help="sizes in bytes, not KiB/MiB/GiB")
    add_timeout_option(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stats", help="show statistics of a mount or of one device",
                       description="Print the statistics of a swapfs mount (its user.swapfs.stats "
                       "xattr) or of one device file.  --format prometheus writes the Prometheus "
                       "text format of this one mount; for node_exporter's textfile collector use "
                       "'swapfs metrics -o FILE' (every mount, written atomically, with "
                       "swapfs_up) or the swapfs-textfile.timer unit.")
    p.add_argument("path", metavar="MOUNT|DEVICE_FILE")
    p.add_argument("--format", choices=["table", "json", "prometheus"], default="table")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    add_timeout_option(p)
    p.set_defaults(func=cmd_stats)
