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


def cmd_check_config(args: argparse.Namespace) -> int:
    from ..config import DEFAULT_CONFIG_TOML

    if args.print_default:
        print(DEFAULT_CONFIG_TOML, end="")
        return EXIT_OK
    try:
        config = load_checked_config(args.config, None)
    except ValueError as exc:
        return die(f"invalid configuration: {exc}", EXIT_USAGE)
    print(f"configuration OK: {len(config.devices)} device(s), pool {config.pool.algorithm} "
          f"up to {fmt_bytes(config.pool.max_bytes)}, {len(config.tiers)} file tier(s)")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Add the parser of check-config to the subparsers ``sub``."""
    p = sub.add_parser("check-config", help="validate a configuration file",
                       description="Parse and validate a configuration as 'swapfs mount' would.")
    p.add_argument("config", nargs="?", metavar="FILE", help="TOML file (default: the embedded one)")
    p.add_argument("--print-default", action="store_true", help="print the embedded default configuration")
    p.set_defaults(func=cmd_check_config)
