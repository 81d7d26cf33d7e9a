"""swapfs writeback and swapfs compact: requests to a live daemon, through
its control xattrs."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from typing import Any

from .. import system
from ..kernel import PAGE_SIZE as PAGE
from ..stats import CTL_COMPACT_XATTR, CTL_WRITEBACK_XATTR
from .common import (
    EXIT_OK,
    EXIT_USAGE,
    add_timeout_option,
    daemon_problem,
    die,
    fmt_bytes,
    read_stats,
    stats_error,
)


def _request_with_progress(path: str, mount: str, request: str, before: dict[str, Any],
                           total: int | None, timeout: float) -> None:
    """setxattr the writeback request (it returns when the pages moved); on a
    terminal, a request that takes over a second shows its progress.  Moving pages
    takes as long as it takes, but the daemon must keep answering: its stats are read
    every second, and a daemon that does not answer them within ``timeout`` (stopped,
    stuck) or is gone ends the wait with TimeoutError or ENOTCONN (the request is
    abandoned in a thread: the daemon may still serve it)."""
    import threading

    error: list[OSError] = []

    def run() -> None:
        try:
            os.setxattr(path, CTL_WRITEBACK_XATTR, request.encode())
        except OSError as exc:
            error.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    shown = False
    start = time.monotonic()
    base = before.get("writeback", {}).get("moved_pages", 0)
    while worker.is_alive():
        worker.join(1.0 if not sys.stderr.isatty() else 0.2)
        if not worker.is_alive():
            break
        try:
            done = read_stats(mount, timeout).get("writeback", {}).get("moved_pages", 0) - base
        except ValueError:
            continue
        if not worker.is_alive() or not sys.stderr.isatty() or time.monotonic() - start <= 1.0:
            continue
        if total:
            width = 30
            fill = min(width, width * done // total)
            bar = f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} pages"
        else:
            bar = f"{done} pages moved"
        sys.stderr.write(f"\r{bar} ({time.monotonic() - start:.0f} s)")
        sys.stderr.flush()
        shown = True
    if shown:
        sys.stderr.write("\n")
    if error:
        raise error[0]


def cmd_compact(args: argparse.Namespace) -> int:
    mount = os.path.abspath(args.mount)
    if system.mount_of(mount) != mount:
        return die(f"{mount} is not a swapfs mount (give the mount, not a device file)")
    try:
        before = read_stats(mount, args.timeout)["tiers"]["pool"]
        start = time.monotonic()
        # Compaction runs in the daemon's loop without waiting on a disk: bounded too.
        system.bounded(lambda: os.setxattr(mount, CTL_COMPACT_XATTR, b"1"), args.timeout, mount)
        result = system.bounded(lambda: os.getxattr(mount, CTL_COMPACT_XATTR), args.timeout, mount)
        moved, freed = (int(w) for w in result.split())
        after = read_stats(mount, args.timeout)["tiers"]["pool"]
    except OSError as exc:
        if daemon_problem(exc) is not None:
            return stats_error(mount, exc)
        return die(f"compaction request on {mount} failed: {exc.strerror}")
    except (ValueError, KeyError) as exc:
        return stats_error(mount, exc)
    took = time.monotonic() - start
    print(f"compacted the pool of {mount} in {took:.2f} s: moved {moved} objects, released "
          f"{fmt_bytes(freed)}; pool memory {fmt_bytes(before['pool_bytes'])} -> "
          f"{fmt_bytes(after['pool_bytes'])}")
    return EXIT_OK


def cmd_writeback(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    if args.idle is not None:
        if args.pages is not None:
            return die("give a page count or --idle SECONDS, not both", EXIT_USAGE)
        if args.idle < 0:
            return die(f"--idle {args.idle}: must not be negative", EXIT_USAGE)
        request = f"idle:{args.idle:g}"
        what = f"every pool page idle for {args.idle:g} s"
    else:
        if args.pages is None or args.pages <= 0:
            return die("how many pages? give N (> 0) or --idle SECONDS", EXIT_USAGE)
        request = str(args.pages)
        what = f"up to {args.pages} of the coldest pool pages"
    mount = system.mount_of(path) or path
    try:
        before = read_stats(mount, args.timeout)
    except (OSError, ValueError) as exc:
        return stats_error(path, exc)
    if not before.get("tiers") or len(before["tiers"]) < 2:
        return die(f"{mount} has no file tier: pages have nowhere to go")
    devices = before.get("devices", {})
    kept = [name for name, d in devices.items() if not d.get("writeback", True)]
    device = None if path == mount else os.path.basename(path)
    if device in kept or (device is None and devices and len(kept) == len(devices)):
        which = f"device {device} has" if device else f"every device of {mount} has"
        return die(f"{which} writeback = false in its configuration: its pages never leave "
                   "memory, so there is nothing to move")
    start = time.monotonic()
    try:
        _request_with_progress(path, mount, request, before, args.pages, args.timeout)
        moved = int(system.bounded(lambda: os.getxattr(path, CTL_WRITEBACK_XATTR), args.timeout, path))
        after = read_stats(mount, args.timeout)
    except OSError as exc:
        if daemon_problem(exc) is not None:
            return stats_error(path, exc)
        if exc.errno == errno.EINVAL:
            return die(f"the daemon refused the request {request!r}")
        return die(f"writeback request on {path} failed: {exc.strerror}")
    except ValueError as exc:
        return stats_error(path, exc)
    took = time.monotonic() - start
    print(f"asked for {what}: moved {moved} pages ({fmt_bytes(moved * PAGE)}) in {took:.2f} s")
    if device is None and kept:
        print(f"  (not moved: the pages of {', '.join(kept)}, which ha{'ve' if len(kept) > 1 else 's'} "
              "writeback = false)")
    old = before.get("writeback", {}).get("pairs", {})
    for pair, c in after.get("writeback", {}).get("pairs", {}).items():
        n = c.get("pages", 0) - old.get(pair, {}).get("pages", 0)
        if n:
            print(f"  {pair}: {n} pages ({fmt_bytes(n * PAGE)})")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Add the parsers of writeback and compact to the subparsers ``sub``."""
    p = sub.add_parser("writeback", help="move cold pages down to the file tiers now",
                       description="Ask the daemon to move pages from the pool down to the file "
                       "tiers now, and print what moved.  On the mount: every device; on a device "
                       "file: that device.  Examples: swapfs writeback /run/swapfs 1000; "
                       "swapfs writeback /run/swapfs --idle 300")
    p.add_argument("path", metavar="MOUNT|DEVICE_FILE")
    p.add_argument("pages", nargs="?", type=int, metavar="N", help="move up to N of the coldest pool pages")
    p.add_argument("--idle", type=float, metavar="SECONDS",
                   help="move every pool page not accessed for SECONDS")
    add_timeout_option(p)
    p.set_defaults(func=cmd_writeback)

    p = sub.add_parser("compact", help="compact the pool now: move objects out of sparse spans",
                       description="Ask the daemon to compact its compressed pool now: objects "
                       "move out of the sparsest spans into fuller ones and the emptied spans' "
                       "memory goes back to the system.  Writeback also compacts on its own when "
                       "holes pass 10% of the pool's memory.  Example: swapfs compact /run/swapfs")
    p.add_argument("mount", metavar="MOUNT")
    add_timeout_option(p)
    p.set_defaults(func=cmd_compact)
