"""swapfs check-config, and the configuration as every command loads it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import EXIT_OK, EXIT_USAGE, die, fmt_bytes


def load_checked_config(path: str | None, mountpoint: str | None) -> Any:
    """The configuration, checked against this machine and its tiers' backing paths and
    files (warnings printed); raises ValueError (ConfigError or TierConfigError) with a
    message naming the key or tier."""
    from ..config import check_machine, load_config
    from ..tiers.checks import check_tier_files, check_tier_paths

    config = load_config(path)
    check_machine(config)
    files = [t for t in config.tiers if t.kind == "file"]
    check_tier_paths([(t.name, t.path, t.size) for t in files], mountpoint)
    for warning in check_tier_files(files):
        print(f"swapfs: warning: {warning}", file=sys.stderr)
    return config


def describe(config: Any) -> list[str]:
    """What a configuration was understood to say, one line per part, sizes in bytes and
    units (check-config prints it)."""
    from ..config import mem_total_bytes, sized, store_capacity_bytes
    from ..kernel import PAGE_SIZE

    pool = config.pool
    try:
        share = f", {pool.max_bytes / mem_total_bytes():.1%} of this machine's memory"
    except OSError:
        share = ""
    codec = pool.algorithm + (f" level {pool.level}" if pool.algorithm == "zstd" else "")
    lines = [f"pool: {codec}, max_bytes {sized(pool.max_bytes)}{share}, holding about "
             f"{sized(int(pool.max_bytes * pool.ratio()))} of data at {pool.ratio():g}:1 "
             f"(expected_ratio); accept_ratio "
             f"{pool.accept_ratio:g}; watermarks high {pool.high_watermark:g}, low "
             f"{pool.low_watermark:g}"
             + (f"; recompress {pool.recompress} after {pool.recompress_after:g} s"
                if pool.recompress else "")
             + ("; dedup" if pool.dedup else "")]
    for i, d in enumerate(config.devices):
        swap = (f"swap at boot (priority {'default' if d.swap_priority is None else d.swap_priority}"
                f", discard {d.discard})" if d.swap else "no swap at boot")
        lines.append(f"device[{i}] {d.name}: size {sized(d.size)}, {d.size // PAGE_SIZE} pages; "
                     f"writeback {'on' if d.writeback else 'off'}; {swap}")
    for i, t in enumerate(config.tiers):
        lines.append(f"tier[{i}] {t.name}: {t.kind} {t.path}, size {sized(t.size)}, priority "
                     f"{t.priority}; {'preallocated' if t.preallocate else 'sparse'}, "
                     f"{'encrypted' if t.encrypt else 'not encrypted'}; watermarks high "
                     f"{t.high_watermark:g}, low {t.low_watermark:g}")
    devices = sum(d.size for d in config.devices)
    lines.append(f"capacity: the store holds about {sized(store_capacity_bytes(config))} of "
                 f"data, the devices total {sized(devices)}")
    return lines


def cmd_check_config(args: argparse.Namespace) -> int:
    from ..config import DEFAULT_CONFIG_TOML

    if args.print_default:
        print(DEFAULT_CONFIG_TOML, end="")
        return EXIT_OK
    try:
        config = load_checked_config(args.config, None)
    except ValueError as exc:
        return die(f"invalid configuration: {exc}", EXIT_USAGE)
    from ..config import capacity_warnings

    for warning in capacity_warnings(config):
        print(f"swapfs: warning: {warning}", file=sys.stderr)
    print(f"configuration OK: {len(config.devices)} device(s), pool {config.pool.algorithm} "
          f"up to {fmt_bytes(config.pool.max_bytes)}, {len(config.tiers)} file tier(s)")
    for line in describe(config):
        print(f"  {line}")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Add the parser of check-config to the subparsers ``sub``."""
    p = sub.add_parser("check-config", help="validate a configuration file",
                       description="Parse and validate a configuration and check it against "
                       "this machine, running every check 'swapfs mount' runs before it starts "
                       "the daemon (the pool against RAM, the devices' slot tables, the tiers' "
                       "paths and files: creatable, not held by another mount, space), then "
                       "print what was understood, sizes in bytes and units.  Warns, as mount "
                       "does, when the devices are larger in total than the pool and the file "
                       "tiers can hold at the pool's assumed ratio (pool.expected_ratio).")
    p.add_argument("config", nargs="?", metavar="FILE", help="TOML file (default: the embedded one)")
    p.add_argument("--print-default", action="store_true", help="print the embedded default configuration")
    p.set_defaults(func=cmd_check_config)
