"""swapfs install-units and generate-units: swapfs under systemd (the unit
texts and the generator's work are swapfs.units)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any

from .. import system, units
from .common import EXIT_OK, die

# Where the Debian package (scripts/package) installs swapfs's private virtualenv.
PACKAGE_PREFIX = "/usr/lib/swapfs"


def cmd_generate_units(args: argparse.Namespace) -> int:
    config_dir = args.config_dir or os.environ.get("SWAPFS_CONFIG_DIR") or units.CONFIG_DIR
    try:
        result = units.generate(config_dir, args.normal_dir, args.exe)
    except OSError as exc:
        return die(f"generator: {exc}")
    for problem in result.problems:
        print(f"swapfs-generator: skipped {problem}", file=sys.stderr)
    return EXIT_OK


def _own_executable() -> str | None:
    """The swapfs command of this installation (the venv's bin/swapfs)."""
    candidate = os.path.join(os.path.dirname(sys.executable), "swapfs")
    if os.access(candidate, os.X_OK):
        return os.path.abspath(candidate)
    found = shutil.which("swapfs")
    return os.path.abspath(found) if found else None


def cmd_install_units(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.root)
    if root == "/" and sys.prefix == PACKAGE_PREFIX:
        return die("this swapfs is the Debian package's, whose generator and unit template are in "
                   "/usr/lib/systemd already; install-units is for a checkout (units it put in "
                   "/usr/local would take precedence over the package's)")
    if root == "/" and os.geteuid() != 0:
        return die("install-units writes to /usr/local and /etc: run it as root (or --root DIR)")
    target = args.target or _own_executable()
    if target is None:
        return die("cannot find this installation's swapfs executable; pass --target PATH")

    def at(path: str) -> str:
        return os.path.join(root, path.lstrip("/"))

    exe_link = at(units.EXE)
    os.makedirs(os.path.dirname(exe_link), exist_ok=True)
    if os.path.islink(exe_link) or not os.path.lexists(exe_link):
        if os.path.lexists(exe_link):
            os.unlink(exe_link)
        os.symlink(target, exe_link)
    elif os.path.realpath(exe_link) != os.path.realpath(target):
        return die(f"{exe_link} exists and is not a symlink; remove it or pass --root")
    written = [f"{exe_link} -> {target}"]
    for directory, name, text, mode in [
        (units.UNIT_DIR, "swapfs@.service", units.template_unit(), 0o644),
        (units.GENERATOR_DIR, "swapfs-generator", units.GENERATOR_SCRIPT, 0o755),
        (units.UNIT_DIR, units.TEXTFILE_SERVICE,
         units.textfile_service(directory=os.path.abspath(args.textfile_dir)), 0o644),
        (units.UNIT_DIR, units.TEXTFILE_TIMER,
         units.textfile_timer(directory=os.path.abspath(args.textfile_dir)), 0o644),
    ]:
        d = at(directory)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        written.append(path)
    os.makedirs(at(units.CONFIG_DIR), mode=0o755, exist_ok=True)
    written.append(at(units.CONFIG_DIR) + "/ (put NAME.toml files here)")
    for w in written:
        print(f"installed {w}")
    print(f"for node_exporter: systemctl enable --now {units.TEXTFILE_TIMER} "
          f"(writes {os.path.join(args.textfile_dir, units.TEXTFILE_NAME)} every 15 s)")
    if root == "/" and os.path.isdir("/run/systemd/system"):
        try:
            system.run(["systemctl", "daemon-reload"])
        except system.CommandFailed as exc:
            return die(str(exc))
        print("systemctl daemon-reload: done (the generator ran)")
    else:
        print("systemd is not running here: run 'systemctl daemon-reload' where it is")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Add the parsers of install-units and generate-units to the subparsers ``sub``."""
    p = sub.add_parser("install-units", help="install the systemd generator, unit and /usr/local/bin/swapfs",
                       description="Install /usr/local/bin/swapfs (a symlink to this installation's "
                       "swapfs), the unit template swapfs@.service and the generator swapfs-generator "
                       "under /usr/local/lib/systemd, and create /etc/swapfs; then systemctl "
                       "daemon-reload.  At boot the generator turns each /etc/swapfs/NAME.toml into "
                       "swapfs@NAME.service and a swap unit per device with swap = true.  Also "
                       "swapfs-textfile.service and .timer (not enabled): every mount's metrics for "
                       "node_exporter's textfile collector.")
    p.add_argument("--root", default="/", metavar="DIR", help="install under DIR instead of / (staging)")
    p.add_argument("--target", metavar="PATH", help="the swapfs executable to link (default: this one)")
    p.add_argument("--textfile-dir", default=units.TEXTFILE_DIR, metavar="DIR",
                   help="node_exporter's textfile collector directory, for swapfs-textfile.service "
                   f"(default {units.TEXTFILE_DIR}, Debian's)")
    p.set_defaults(func=cmd_install_units)

    p = sub.add_parser("generate-units", help="the systemd generator's work (run by swapfs-generator)",
                       description="Write the units for /etc/swapfs/*.toml ($SWAPFS_CONFIG_DIR, or "
                       "--config-dir) into NORMAL_DIR, as a systemd generator (systemd.generator(7)).")
    p.add_argument("normal_dir", metavar="NORMAL_DIR")
    p.add_argument("early_dir", nargs="?", metavar="EARLY_DIR", help="unused")
    p.add_argument("late_dir", nargs="?", metavar="LATE_DIR", help="unused")
    p.add_argument("--config-dir", metavar="DIR")
    p.add_argument("--exe", default="/usr/local/bin/swapfs", metavar="PATH",
                   help="the swapfs executable the units run")
    p.set_defaults(func=cmd_generate_units)
