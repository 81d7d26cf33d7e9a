"""Watching a mount over time: ``swapfs top`` (a live view in a terminal;
its screen is top.py), ``swapfs record`` (stats samples as JSON lines),
``swapfs plot`` (pool memory against data stored, the data of each tier and
the traffic over time; matplotlib, the optional ``plot`` extra, is imported
by the command only) and ``swapfs metrics`` (every mount for Prometheus;
metrics.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..kernel import PAGE_SIZE as PAGE
from . import metrics
from .common import EXIT_OK, die, fmt_bytes, positive_seconds, read_stats, stats_error
from .top import cmd_top, quiet_broken_pipe

# -- record and plot ---------------------------------------------------------


def cmd_record(args: argparse.Namespace) -> int:
    """One JSON line per sample: {"time": unix seconds, "mount": ..., "stats": {...}}."""
    mount = os.path.abspath(args.mount)
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
    except BrokenPipeError:  # record -o - | head: the reader had enough
        return quiet_broken_pipe()
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
    """What the plot draws, per sample: seconds since the first sample; the
    memory side in bytes (``data_bytes``: uncompressed pages held in memory,
    zram's orig_data_size; ``compressed_bytes``: their payload;
    ``memory_bytes``: the pool's memory, mem_used_total; ``limit_bytes``: the
    pool's max_bytes); per tier the pages and the bytes of data they hold
    (``tiers``, ``tier_bytes``; same-filled pages as ``same-filled``, they hold
    data but take no storage); and per-interval rates (written/read MiB/s,
    pages moved down/promoted per s)."""
    t0 = samples[0]["time"]
    times = [s["time"] - t0 for s in samples]
    tiers: dict[str, list[int]] = {}
    for s in samples:
        for name in s["stats"]["tiers"]:
            tiers.setdefault(name, [])
    for s in samples:
        for name, series in tiers.items():
            series.append(s["stats"]["tiers"].get(name, {}).get("stored_pages", 0))
    tier_bytes = {name: [p * PAGE for p in pages] for name, pages in tiers.items()}
    tier_bytes["same-filled"] = [s["stats"].get("totals", {}).get("same_filled_pages", 0) * PAGE
                                 for s in samples]

    def totals(key: str) -> list[int]:
        return [s["stats"].get("totals", {}).get(key, 0) for s in samples]

    def rate(section: str, key: str, scale: float = 1.0) -> list[float]:
        out = [0.0]
        for a, b in zip(samples, samples[1:]):
            dt = b["time"] - a["time"]
            d = b["stats"].get(section, {}).get(key, 0) - a["stats"].get(section, {}).get(key, 0)
            out.append(max(0.0, d) / dt / scale if dt > 0 else 0.0)
        return out

    return {
        "time": times, "tiers": tiers, "tier_bytes": tier_bytes,
        "data_bytes": totals("orig_data_size"),
        "compressed_bytes": totals("compr_data_size"),
        "memory_bytes": [s["stats"].get("totals", {}).get("mem_used_total",
                                                           s["stats"].get("totals", {}).get("pool_bytes", 0))
                         for s in samples],
        "limit_bytes": [s["stats"]["tiers"].get("pool", {}).get("max_bytes", 0) for s in samples],
        "written_mib_s": rate("totals", "written_bytes", 1 << 20),
        "read_mib_s": rate("totals", "read_bytes", 1 << 20),
        "moved_pages_s": rate("writeback", "moved_pages"),
        "promotions_s": rate("writeback", "promotions"),
    }


def _byte_unit(peak: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if peak >= scale:
            return unit, float(scale)
    return "KiB", 1024.0


def draw(samples: list[dict[str, Any]]) -> Any:
    """The plot of ``samples`` as a matplotlib Figure (no pyplot, no global
    state): memory against data, data per tier, traffic."""
    from matplotlib.figure import Figure

    series = plot_series(samples)
    t = series["time"]
    fig = Figure(figsize=(10, 8.5))
    fig.suptitle(f"swapfs {samples[0].get('mount', '')}", fontweight="bold")
    mem_ax, tier_ax, traffic = fig.subplots(3, 1, sharex=True)

    # the scale follows what is stored: a limit far above it (20% of RAM by
    # default) would flatten every line, so it is then said, not drawn
    peak = max(series["data_bytes"] + series["memory_bytes"] + [1])
    limit = max(series["limit_bytes"] + [0])
    unit, scale = _byte_unit(max(peak, limit) if limit <= 2 * peak else peak)
    data = [v / scale for v in series["data_bytes"]]
    memory = [v / scale for v in series["memory_bytes"]]
    mem_ax.plot(t, data, label="data in memory (orig_data_size)", color="tab:blue", linewidth=2)
    mem_ax.plot(t, memory, label="pool memory (mem_used_total)", color="tab:red", linewidth=2)
    mem_ax.plot(t, [v / scale for v in series["compressed_bytes"]], label="compressed (compr_data_size)",
                color="tab:green", linewidth=1, linestyle="--")
    if limit and limit <= 2 * peak:
        mem_ax.plot(t, [v / scale for v in series["limit_bytes"]], label="pool limit (max_bytes)",
                    color="tab:gray", linewidth=1, linestyle=":")
    elif limit:
        mem_ax.text(0.99, 0.96, f"pool limit (max_bytes) {fmt_bytes(limit)}: above this scale",
                    transform=mem_ax.transAxes, ha="right", va="top", color="tab:gray", fontsize="small")
    mem_ax.fill_between(t, memory, data, where=[d >= m for d, m in zip(data, memory)], interpolate=True,
                        color="tab:blue", alpha=0.15, label="memory saved")
    top = max(range(len(t)), key=lambda i: series["data_bytes"][i])
    top_data, top_mem = series["data_bytes"][top], series["memory_bytes"][top]
    ratio = f"{top_data / top_mem:.2f}x" if top_mem else "-"
    mem_ax.set_ylabel(unit)
    mem_ax.set_ylim(0, max(data + memory + [v / scale for v in series["limit_bytes"] if v <= 2 * peak]) * 1.25
                    or 1)
    mem_ax.set_title(f"pool memory against data stored (at the most data: memory ratio {ratio}, "
                     f"saved {fmt_bytes(max(0, top_data - top_mem))})")
    mem_ax.legend(loc="upper left", fontsize="small")

    peak = max([v for vs in series["tier_bytes"].values() for v in vs] + [1])
    unit, scale = _byte_unit(peak)
    for name, values in series["tier_bytes"].items():
        if name == "same-filled" and not any(values):
            continue
        tier_ax.plot(t, [v / scale for v in values], label=name,
                     linestyle="--" if name == "same-filled" else "-")
    tier_ax.set_ylabel(unit)
    tier_ax.set_title("data stored per tier (pages x 4 KiB)")
    tier_ax.legend(loc="upper left", fontsize="small")

    traffic.plot(t, series["written_mib_s"], label="swap-out (writes)")
    traffic.plot(t, series["read_mib_s"], label="swap-in (reads)")
    traffic.plot(t, [p * PAGE / (1 << 20) for p in series["moved_pages_s"]], label="moved down")
    traffic.plot(t, [p * PAGE / (1 << 20) for p in series["promotions_s"]], label="promoted")
    traffic.set_title("traffic")
    traffic.set_xlabel("seconds")
    traffic.set_ylabel("MiB/s")
    traffic.legend(loc="upper left", fontsize="small")
    for ax in (mem_ax, tier_ax, traffic):
        ax.grid(True, alpha=0.3)
    tier_ax.set_ylim(bottom=0)
    traffic.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


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
        import matplotlib  # noqa: F401
    except ImportError:
        return die("swapfs plot needs matplotlib, which this installation leaves out: in a "
                   "checkout, pip install 'swapfs[plot]'; the Debian package has none, so copy "
                   "the recording to a machine with a checkout and plot it there")
    fig = draw(samples)
    try:
        fig.savefig(args.output, dpi=100)
    except OSError as exc:
        return die(f"cannot write {args.output}: {exc.strerror}")
    print(f"{args.output}: {len(samples)} samples over {samples[-1]['time'] - samples[0]['time']:.0f} s")
    return EXIT_OK


def positive_count(text: str) -> int:
    """argparse type of --count: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def add_parsers(sub: Any) -> None:
    """Add the parsers of top, record, plot and metrics to the subparsers ``sub``."""
    p = sub.add_parser("top", help="a live view of a mount, once a second (q quits)",
                       description="Per device and per tier: pages, data, memory, the compression "
                       "ratio (orig_data_size / compr_data_size) and the memory ratio "
                       "(orig_data_size / mem_used_total), the memory saved against keeping the "
                       "pages uncompressed, and a sparkline of the traffic; then moves, promotions, "
                       "refaults and cache hits; refreshed every --interval seconds.  In a terminal "
                       "(ssh is fine) q or Ctrl-C quits, with colour unless NO_COLOR is set; into a "
                       "pipe it writes plain frames and ends quietly (status 0) when the reader "
                       "goes away.")
    p.add_argument("mount", metavar="MOUNT")
    p.add_argument("--interval", type=positive_seconds, default=1.0, metavar="S",
                   help="seconds between frames (above 0; default 1)")
    p.add_argument("-n", "--count", type=positive_count, metavar="N", help="stop after N frames")
    p.add_argument("--once", action="store_true", help="one frame, then exit (the same as -n 1)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="auto (the default): colour on a terminal unless NO_COLOR is set or TERM=dumb")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("record", help="record stats samples as JSON lines",
                       description="Append one JSON line per --interval to FILE: "
                       '{"time": UNIX_SECONDS, "mount": MOUNT, "stats": {the stats object}}. '
                       "Stops after --count samples, at Ctrl-C, or when the mount goes away. "
                       "Example: swapfs record /run/swapfs -o run.jsonl --interval 0.5")
    p.add_argument("mount", metavar="MOUNT")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="JSON lines file ('-': stdout)")
    p.add_argument("--interval", type=positive_seconds, default=1.0, metavar="S",
                   help="seconds between samples (above 0; default 1)")
    p.add_argument("-n", "--count", type=positive_count, metavar="N", help="stop after N samples")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("plot", help="draw a recording: memory against data, tiers, traffic (needs matplotlib)",
                       description="Draw a 'swapfs record' file as a PNG in three panels: the pool's "
                       "memory against the data it holds (bytes: orig_data_size, compr_data_size, "
                       "mem_used_total, the pool limit, the memory saved shaded); the data stored "
                       "in each tier; swap-out, swap-in, writeback and promotion rates.  matplotlib "
                       "is an optional extra: pip install 'swapfs[plot]'.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="PNG")
    p.set_defaults(func=cmd_plot)

    metrics.add_parser(sub)
