"""The swapfs command line: one module per group of commands, each beside its
parser (mount.py: mount, unmount; swap.py: swapon, swapoff; stats.py: status,
stats; control.py: writeback, compact; monitor.py: top (its screen in
top.py), record, plot, metrics (metrics.py); trace.py: trace record,
trace replay; config.py: check-config;
units.py: install-units, generate-units), the log
set-up in logs.py, what they all print the same way in common.py.  This
module assembles the top parser; manual.py renders the manual pages and the
shell completions from it at build time."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from . import config, control, monitor, mount, stats, swap, trace, units
from .common import EXIT_OK, EXIT_USAGE, exit_codes_epilog

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

EPILOG = """\
Exit status (each command's --help says which it returns):
  0 done; 1 failed (the message says why); 2 bad arguments or configuration,
  nothing done; 3 the daemon of a mount is gone (ENOTCONN); 4 the daemon of a
  mount did not answer within --timeout (stopped or stuck).
"""

# In the order --help lists them.
COMMAND_MODULES = (mount, swap, stats, control, monitor, trace, config, units)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swapfs", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"swapfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    for name, command in sub.choices.items():  # an alias shares its command's parser
        if command.epilog is None:
            command.epilog = exit_codes_epilog(name)
    return parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # What a command did not take is that command's error, said with its own usage
        # (``writeback MOUNT --idle 5 100``), not the top-level one.
        command = _commands(parser).get(getattr(args, "command", None) or "", parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``swapfs stats MOUNT | head``): what it read is all it
        # wanted.  Point stdout at /dev/null so that the interpreter's last flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    return result


if __name__ == "__main__":
    sys.exit(main())
