"""Watching a mount over time: ``swapfs top`` (a live view in a plain
terminal), ``swapfs record`` (stats samples as JSON lines) and ``swapfs plot``
(tier occupancy and traffic over time; matplotlib, the optional ``plot``
extra, is imported by the command only)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..kernel import PAGE_SIZE as PAGE
from .common import EXIT_OK, EXIT_USAGE, die, fmt_bytes, read_stats, stats_error

# -- top ---------------------------------------------------------------------


def _top_frame(mount: str, prev: dict[str, Any] | None, cur: dict[str, Any], dt: float) -> str:
    def rate(section: str, key: str, sub: str | None = None) -> float:
        if prev is None or dt <= 0:
            return 0.0
        a = prev.get(section, {})
        b = cur.get(section, {})
        if sub is not None:
            a, b = a.get(sub, {}), b.get(sub, {})
        return max(0, b.get(key, 0) - a.get(key, 0)) / dt

    lines = [f"swapfs top {mount}   {time.strftime('%H:%M:%S')}   (q or Ctrl-C to quit)", ""]
    lines.append(f"{'tier':<12}{'pages':>10}{'held':>12}{'limit':>12}")
    for name, t in cur.get("tiers", {}).items():
        held = t.get("pool_bytes", t.get("disk_bytes", 0))
        limit = t.get("max_bytes", t.get("capacity_pages", 0) * PAGE)
        lines.append(f"{name:<12}{t.get('stored_pages', 0):>10}{fmt_bytes(held):>12}{fmt_bytes(limit):>12}")
    tot = cur.get("totals", {})
    wb = cur.get("writeback", {})
    cache = cur.get("cache", {})
    lines += [
        "",
        f"in (writes)  {fmt_bytes(rate('totals', 'written_bytes'))}/s   "
        f"out (reads)  {fmt_bytes(rate('totals', 'read_bytes'))}/s   "
        f"discards {rate('totals', 'discards'):.0f}/s",
        f"moved down   {rate('writeback', 'moved_pages'):.0f} pages/s   "
        f"promotions {rate('writeback', 'promotions'):.0f}/s   refaults {rate('writeback', 'refaults'):.0f}/s",
        f"cache        {cache.get('pages', 0)} pages, hits {rate('cache', 'hits'):.0f}/s, "
        f"misses {rate('cache', 'misses'):.0f}/s",
        f"totals       {tot.get('stored_pages', 0)} pages, ratio {tot.get('compression_ratio', 0.0):.2f}, "
        f"moved {wb.get('moved_pages', 0)}, promotions {wb.get('promotions', 0)}",
    ]
    return "\n".join(lines)


def cmd_top(args: argparse.Namespace) -> int:
    mount = os.path.abspath(args.mount)
    prev: dict[str, Any] | None = None
    last = time.monotonic()
    clear = sys.stdout.isatty()
    n = 0
    try:
        while args.count is None or n < args.count:
            try:
                cur = read_stats(mount)
            except (OSError, ValueError) as exc:
                return stats_error(mount, exc)
            now = time.monotonic()
            frame = _top_frame(mount, prev, cur, now - last)
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(frame, flush=True)
            if not clear:
                print()
            prev, last = cur, now
            n += 1
            if args.count is None or n < args.count:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# -- record and plot ---------------------------------------------------------


def cmd_record(args: argparse.Namespace) -> int:
    """One JSON line per sample: {"time": unix seconds, "mount": ..., "stats": {...}}."""
    mount = os.path.abspath(args.mount)
    if args.interval <= 0:
        return die(f"--interval {args.interval}: must be positive", EXIT_USAGE)
    n = 0
    try:
        out = sys.stdout if args.output == "-" else open(args.output, "a", encoding="utf-8")
    except OSError as exc:
        return die(f"cannot write {args.output}: {exc.strerror}")
    try:
        next_at = time.monotonic()
        while args.count is None or n < args.count:
            try:
                stats = read_stats(mount)
            except (OSError, ValueError) as exc:
                if n:  # the mount went away while recording: what was recorded stays
                    print(f"swapfs: stopped after {n} samples: {exc}", file=sys.stderr)
                    return EXIT_OK
                return stats_error(mount, exc)
            out.write(json.dumps({"time": round(time.time(), 3), "mount": mount, "stats": stats},
                                 separators=(",", ":")) + "\n")
            out.flush()
            n += 1
            next_at += args.interval
            if args.count is None or n < args.count:
                time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK


def load_samples(path: str) -> list[dict[str, Any]]:
    """The samples of a ``swapfs record`` file; ValueError naming the line if malformed."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                float(rec["time"])
                rec["stats"]["tiers"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{i}: not a swapfs record sample ({exc})") from None
            samples.append(rec)
    return samples


def plot_series(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """What the plot draws: seconds since the first sample, pages per tier, and
    per-interval rates (written/read MiB/s, pages moved down/promoted per s)."""
    t0 = samples[0]["time"]
    times = [s["time"] - t0 for s in samples]
    tiers: dict[str, list[int]] = {}
    for s in samples:
        for name in s["stats"]["tiers"]:
            tiers.setdefault(name, [])
    for s in samples:
        for name, series in tiers.items():
            series.append(s["stats"]["tiers"].get(name, {}).get("stored_pages", 0))

    def rate(section: str, key: str, scale: float = 1.0) -> list[float]:
        out = [0.0]
        for a, b in zip(samples, samples[1:]):
            dt = b["time"] - a["time"]
            d = b["stats"].get(section, {}).get(key, 0) - a["stats"].get(section, {}).get(key, 0)
            out.append(max(0.0, d) / dt / scale if dt > 0 else 0.0)
        return out

    return {
        "time": times, "tiers": tiers,
        "written_mib_s": rate("totals", "written_bytes", 1 << 20),
        "read_mib_s": rate("totals", "read_bytes", 1 << 20),
        "moved_pages_s": rate("writeback", "moved_pages"),
        "promotions_s": rate("writeback", "promotions"),
    }


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        samples = load_samples(args.file)
    except OSError as exc:
        return die(f"cannot read {args.file}: {exc.strerror}")
    except ValueError as exc:
        return die(str(exc))
    if len(samples) < 2:
        return die(f"{args.file}: {len(samples)} sample(s); a plot needs at least 2")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return die("swapfs plot needs matplotlib: pip install 'swapfs[plot]' (or .venv/bin/pip install matplotlib)")
    series = plot_series(samples)
    fig, (occ, traffic) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for name, pages in series["tiers"].items():
        occ.plot(series["time"], [p * PAGE / (1 << 20) for p in pages], label=name)
    occ.set_ylabel("MiB stored (pages x 4 KiB)")
    occ.set_title(f"swapfs {samples[0].get('mount', '')}: tier occupancy and traffic")
    occ.legend()
    traffic.plot(series["time"], series["written_mib_s"], label="swap-out (writes) MiB/s")
    traffic.plot(series["time"], series["read_mib_s"], label="swap-in (reads) MiB/s")
    traffic.plot(series["time"], [p * PAGE / (1 << 20) for p in series["moved_pages_s"]],
                 label="moved down MiB/s")
    traffic.plot(series["time"], [p * PAGE / (1 << 20) for p in series["promotions_s"]],
                 label="promoted MiB/s")
    traffic.set_xlabel("seconds")
    traffic.set_ylabel("MiB/s")
    traffic.legend()
    fig.tight_layout()
    try:
        fig.savefig(args.output)
    except OSError as exc:
        return die(f"cannot write {args.output}: {exc.strerror}")
    finally:
        plt.close(fig)
    print(f"{args.output}: {len(samples)} samples over {series['time'][-1]:.0f} s")
    return EXIT_OK




def add_parsers(sub: Any) -> None:
    """Add the parsers of top, record and plot to the subparsers ``sub``."""
    p = sub.add_parser("top", help="a live view of a mount, once a second",
                       description="Tiers, traffic, moves, promotions, refaults and cache hits of a "
                       "mount, refreshed every --interval seconds (plain terminal; ssh is fine).")
    p.add_argument("mount", metavar="MOUNT")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")
    p.add_argument("--count", type=int, metavar="N", help="stop after N frames")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("record", help="record stats samples as JSON lines",
                       description="Append one JSON line per --interval to FILE: "
                       '{"time": UNIX_SECONDS, "mount": MOUNT, "stats": {the stats object}}. '
                       "Stops after --count samples, at Ctrl-C, or when the mount goes away. "
                       "Example: swapfs record /run/swapfs -o run.jsonl --interval 0.5")
    p.add_argument("mount", metavar="MOUNT")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="JSON lines file ('-': stdout)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")
    p.add_argument("--count", type=int, metavar="N")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("plot", help="draw a recording: tier occupancy and traffic (needs matplotlib)",
                       description="Draw a 'swapfs record' file as a PNG: the pages of each tier over "
                       "time, and swap-out, swap-in, writeback and promotion rates.  matplotlib is "
                       "an optional extra: pip install 'swapfs[plot]'.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="PNG")
    p.set_defaults(func=cmd_plot)
