"""swapfs swapon and swapoff: a device file as swap through a direct-I/O loop device."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import system
from ..kernel import PAGE_SIZE as PAGE
from .common import EXIT_OK, add_timeout_option, die, fmt_bytes, read_stats, stats_error


def _device_file(path: str) -> tuple[str, str] | str:
    """(absolute device file, its mount) or an error message."""
    p = os.path.abspath(path)
    mount = system.mount_of(p)
    if mount is None or p == mount:
        return f"{p} is not a device file of a swapfs mount (see: swapfs status)"
    if not os.path.isfile(p):
        return f"{p}: no such device in the swapfs mount {mount} (it has: {', '.join(_listdir(mount))})"
    return p, mount


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def cmd_swapon(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return die("swapon needs root (it attaches a loop device and turns swap on)")
    found = _device_file(args.device_file)
    if isinstance(found, str):
        return die(found)
    path, mount = found
    area = None
    if not args.whole:
        try:
            stats = read_stats(mount, args.timeout)
        except (OSError, ValueError) as exc:
            return stats_error(mount, exc)
        name = os.path.basename(path)
        size, pages = backed_area(stats, name)
        if pages < MIN_AREA_PAGES:
            return die(f"{path}: the store backs {pages} pages of it ({stats_line(stats)}); "
                       "free room in the store first, or swap on it anyway with --whole")
        if pages * PAGE < size:
            area = pages * PAGE
            print(f"swapfs: swap area of {path}: the first {fmt_bytes(area)} of its "
                  f"{fmt_bytes(size)}, half of what the store can back ({stats_line(stats)}); "
                  "--whole for all of it", file=sys.stderr)
    try:
        loop, problems = system.swap_on_file(path, priority=args.priority, discard=args.discard,
                                             area_bytes=area)
    except system.CommandFailed as exc:
        return die(str(exc))
    for why in problems:
        print(f"swapfs: {loop}: cannot tune the queue ({why}); swap works, slower", file=sys.stderr)
    print(loop)
    return EXIT_OK


# mkswap refuses smaller areas (it needs 10 pages); a few more make a swap area worth having.
MIN_AREA_PAGES = 16
# The share of what the store backs that the swap area takes.  The store holds more than the
# kernel uses: pages of freed slots until their discard arrives (the kernel discards whole free
# clusters only), dead bytes in file tiers until cleaning, a ratio worse than assumed; a store
# that fills before the area leaves the pages refused at its end retried for good.  Measured
# with scripts/bench-full and a second swap device (docs/operations.md): the whole backed area
# and 0.9 of it filled the store (at 29,283 stored for 29,439 used, and 26,496 stored for
# 26,440 used with 4 MiB dead in the tier); half never refused a write.
AREA_MARGIN = 0.5


def backed_area(stats: dict[str, Any], device: str) -> tuple[int, int]:
    """(the device's size in bytes, the pages of the swap area swapon makes): AREA_MARGIN of
    the pages the store backs of the device (its share, by size, of the pages stored and the
    headroom of its mount), at most the whole device.  A continuous function of what the
    store backs: a store backing 99% of its devices and one backing 100% get areas 1% apart
    (half the device each), and only a store backing twice its devices gets the whole."""
    devices = stats["devices"]
    size = devices[device]["size_bytes"]
    pages = size // PAGE
    tot = stats.get("totals", {})
    total = sum(d["size_bytes"] for d in devices.values()) // PAGE
    if "stored_pages" in tot and "headroom_pages" in tot and total:
        # backed_fraction stops at 1; the pages behind it do not
        backed = (tot["stored_pages"] + tot["headroom_pages"]) / total
    else:
        backed = tot.get("backed_fraction", 1.0)
    return size, min(pages, int(pages * backed * AREA_MARGIN))


def stats_line(stats: dict[str, Any]) -> str:
    """What the store holds and can still take, for swapon's messages."""
    tot = stats.get("totals", {})
    ratio = stats.get("tiers", {}).get("pool", {}).get("headroom_ratio", 0.0)
    return (f"{tot.get('stored_pages', 0)} pages stored, room for about "
            f"{tot.get('headroom_pages', 0)} more at {ratio:.2f}:1, "
            f"{tot.get('backed_fraction', 0.0):.1%} of the mount's device capacity")


def cmd_swapoff(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return die("swapoff needs root")
    path = os.path.abspath(args.device_file)
    loops = [lo for lo in system.loops_backed_by(path) if lo.backing_file == path]
    if not loops:
        if system.mount_of(path) is None:
            return die(f"{path} is not a device file of a swapfs mount")
        print(f"swapfs: swap is not on over {path}; nothing to do", file=sys.stderr)
        return EXIT_OK
    for lo in loops:
        try:
            system.swap_off(lo.device)
        except system.CommandFailed as exc:
            return die(f"{exc} (swap stays on)")
        try:
            system.detach_loop(lo.device)
        except system.CommandFailed as exc:
            return die(str(exc))
        print(f"{lo.device} detached from {path}")
    return EXIT_OK


def _discard(value: str) -> str:
    if value not in ("once", "pages", "both", "off"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected once, pages, both or off")
    return value


def add_parsers(sub: Any) -> None:
    """Add the parsers of swapon and swapoff to the subparsers ``sub``."""
    p = sub.add_parser("swapon", help="swap on a device file (loop device, mkswap, swapon)",
                       description="Attach a direct-I/O loop device over DEVICE_FILE, mkswap it and "
                       "swapon it; prints the loop device.  The swap area is half of what the store "
                       "can back of the device (its share of the pages stored and of the "
                       "store's headroom, from the mount's stats: the other half is for pages "
                       "of freed slots not yet discarded and dead bytes in file tiers), at most "
                       "the whole device (a store backing twice the device), unless --whole.  "
                       "Needs root.  Example: "
                       "swapfs swapon /run/swapfs/swap0 --priority 100")
    p.add_argument("device_file", metavar="DEVICE_FILE", help="a device file of a swapfs mount")
    p.add_argument("--priority", "-p", type=int, metavar="N",
                   help="swap priority, -1..32767 (higher is used first; default: the kernel's)")
    p.add_argument("--discard", nargs="?", const="both", default="both", type=_discard,
                   metavar="once|pages|both|off",
                   help="how freed swap slots reach swapfs (default both: the whole area at swapon, "
                   "then each freed cluster; off: swapfs never learns that slots are free)")
    p.add_argument("--whole", action="store_true",
                   help="a swap area over the whole device file, even where the store has no "
                   "room behind it (default: the area stops at half of what the store can "
                   "back, so that the kernel sees the device full before the store is)")
    add_timeout_option(p)
    p.set_defaults(func=cmd_swapon)

    p = sub.add_parser("swapoff", help="swap off a device file and detach its loop device",
                       description="swapoff the loop device over DEVICE_FILE (the kernel reads every "
                       "page back in first), then detach it.  Exits 1 if swapoff fails; 0 if swap "
                       "was not on.")
    p.add_argument("device_file", metavar="DEVICE_FILE")
    p.set_defaults(func=cmd_swapoff)
