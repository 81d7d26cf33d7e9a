"""The swapfs command line: one module per group of commands, each beside its
parser (mount.py: mount, unmount; swap.py: swapon, swapoff; stats.py: status,
stats; control.py: writeback, compact; monitor.py: top, record, plot;
config.py: check-config; units.py: install-units, generate-units), the log
set-up in logs.py, what they all print the same way in common.py.  This
module assembles the top parser; manual.py renders the manual pages and the
shell completions from it at build time."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import config, control, monitor, mount, stats, swap, units
from .common import EXIT_USAGE

DESCRIPTION = """\
swapfs: a userspace swap store.  It presents virtual swap devices as files
in a FUSE mount and keeps their pages compressed in memory (lz4 or zstd),
with file tiers below.

To swap into it (as root):
  swapfs mount /run/swapfs                # the embedded default: swap0 of 1 GiB
  swapfs swapon /run/swapfs/swap0 --priority 100    # loop device, mkswap, swapon
  swapfs status                           # every swapfs device, like swapon --show
  swapfs stats /run/swapfs                # a table; --format json|prometheus
and to stop:
  swapfs swapoff /run/swapfs/swap0 && swapfs unmount /run/swapfs

At boot: put the configuration in /etc/swapfs/NAME.toml (devices with
swap = true; the keys: swapfs.toml(5), 'swapfs check-config FILE' checks one).
The systemd generator, installed by the Debian package (or from a checkout by
'swapfs install-units'), makes swapfs@NAME.service of it and a swap unit per
device; see README.md.
"""

# In the order --help lists them.
COMMAND_MODULES = (mount, swap, stats, control, monitor, config, units)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swapfs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"swapfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
