"""systemd units for swapfs, and the generator that writes them from /etc/swapfs.

A configuration file ``/etc/swapfs/NAME.toml`` becomes

- ``swapfs@NAME.service``: the daemon, mounting ``/run/swapfs/NAME``
  (Type=notify; never SIGKILLed, no stop timeout: it must not die while the
  kernel swaps into it, and it stops only once the unmount succeeded);
- per ``[[device]]`` with ``swap = true``, ``swapfs-swap@NAME-DEVICE.service``:
  ``swapfs swapon`` at start, ``swapfs swapoff`` at stop (the unit fails if
  swapoff fails).  It requires the mount service and is ordered after it,
  so at every stop (shutdown included) swapoff runs before the unmount.

Every unit leaves out the default dependencies (they order services after
sysinit.target, which comes after swap.target: a cycle) and states its own:
after local-fs.target and the tier directories' mounts, before swap.target,
stopped before shutdown.target.  The static template ``systemd/swapfs@.service``
is the same mount unit with ``%I`` for NAME, for use without the generator.

Beside them, not generated per file: ``swapfs-textfile.service`` and its
timer write every mount's metrics (``swapfs metrics``) into node_exporter's
textfile directory every 15 s; ``systemd/`` holds them as rendered here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .config import Config, DeviceConfig

CONFIG_DIR = "/etc/swapfs"
RUNTIME_DIR = "/run/swapfs"
EXE = "/usr/local/bin/swapfs"
UNIT_DIR = "/usr/local/lib/systemd/system"
GENERATOR_DIR = "/usr/local/lib/systemd/system-generators"

# A configuration file's stem names the mount and its unit.
_STEM_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_UNIT_SAFE = re.compile(r"[A-Za-z0-9:_.]")


def generator_script(exe: str = EXE) -> str:
    """``swapfs-generator``: a shell script that runs ``exe generate-units`` (the
    package renders it with /usr/bin/swapfs, ``swapfs install-units`` with
    /usr/local/bin/swapfs)."""
    return f"""\
#!/bin/sh
# systemd generator for swapfs (systemd.generator(7)): for each /etc/swapfs/NAME.toml
# (or $SWAPFS_CONFIG_DIR/NAME.toml), a mount service swapfs@NAME.service and, per
# [[device]] with swap = true, a swap service swapfs-swap@NAME-DEVICE.service,
# written to the first output directory and pulled in by swap.target.
# Installed by `swapfs install-units` or the package; the units run $SWAPFS (default {exe}).
SWAPFS=${{SWAPFS:-{exe}}}
if [ ! -x "$SWAPFS" ]; then
    echo "swapfs-generator: $SWAPFS is missing; no swapfs units generated" >&2
    exit 0
fi
exec "$SWAPFS" generate-units --exe "$SWAPFS" "$@"
"""


GENERATOR_SCRIPT = generator_script()


def escape(text: str, *, path: bool = False) -> str:
    """``systemd-escape`` (with ``--path`` when ``path``): ``/`` becomes ``-``,
    anything outside ``[A-Za-z0-9:_.]`` (and a leading ``.``) becomes ``\\xNN``."""
    if path:
        text = "/".join(p for p in text.split("/") if p) or "-"
        if text == "-":
            return "-"
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif _UNIT_SAFE.fullmatch(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def quote(arg: str) -> str:
    """One argument of an Exec*= line (systemd.service(5) quoting; ``%`` and
    ``$`` escaped so systemd expands neither)."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and re.fullmatch(r"[A-Za-z0-9_./:=@+,-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mount_unit_name(name: str) -> str:
    return f"swapfs@{escape(name)}.service"


def swap_unit_name(name: str, device: str) -> str:
    return f"swapfs-swap@{escape(f'{name}/{device}', path=True)}.service"


def _mount_unit(description: str, mount_arg: str, config_arg: str, exe: str,
                mounts_for: list[str], source: str, install: bool) -> str:
    lines = [
        f"# {source}",
        "# The daemon sits in the kernel's reclaim path: it locks its memory, is never",
        "# OOM-killed first, never SIGKILLed and has no stop timeout.  It stops only once",
        "# the unmount succeeded (STOPPING=1); while swap is on over one of its devices it",
        "# keeps serving and says why in its status.",
        "[Unit]",
        f"Description={description}",
        "DefaultDependencies=no",
        "After=local-fs.target",
        "Before=swap.target shutdown.target",
        "Conflicts=shutdown.target",
    ]
    if mounts_for:
        lines.append("RequiresMountsFor=" + " ".join(quote(p) for p in mounts_for))
    lines += [
        "",
        "[Service]",
        "Type=notify",
        "# Failover: the keeper (swapfs-keeper) that `swapfs mount` starts holds the mount",
        "# while a daemon dies and starts its successor, which tells systemd READY=1 and",
        "# MAINPID=; so only the main daemon is signalled at stop (it unmounts, and keeper",
        "# and standby end with the connection) and any process of the unit may notify.",
        "# `systemctl reload` re-reads the configuration (SIGHUP); `swapfs upgrade MOUNT`",
        "# hands the mount to the installed code.",
        "NotifyAccess=all",
        "KillMode=process",
        f"ExecStart={quote(exe)} mount --foreground --mkdir --config {config_arg} {mount_arg}",
        "ExecReload=kill -HUP $MAINPID",
        "OOMScoreAdjust=-1000",
        "LimitMEMLOCK=infinity",
        "SendSIGKILL=no",
        "TimeoutStopSec=infinity",
        "Restart=no",
    ]
    if install:
        lines += ["", "[Install]", "WantedBy=swap.target"]
    return "\n".join(lines) + "\n"


def template_unit(exe: str = EXE) -> str:
    """``swapfs@.service``: the mount unit for ``/etc/swapfs/%I.toml``."""
    return _mount_unit(
        f"swapfs userspace swap store at {RUNTIME_DIR}/%I", f"{RUNTIME_DIR}/%I",
        f"{CONFIG_DIR}/%I.toml", exe, [CONFIG_DIR],
        "swapfs at /run/swapfs/NAME from /etc/swapfs/NAME.toml: systemctl enable --now swapfs@NAME "
        "(the generator writes the same unit per file, plus swap units)",
        install=True)


def _tier_dirs(config: Config, config_path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(config_path))
    dirs = []
    for t in config.tiers:
        if t.kind != "file":
            continue
        d = os.path.dirname(os.path.join(base, t.path))
        if d not in dirs:
            dirs.append(d)
    return dirs


def mount_unit(name: str, config: Config, config_path: str, exe: str) -> str:
    """The generated mount unit of one configuration file."""
    mounts_for = [os.path.dirname(os.path.abspath(config_path))]
    exe_dir = os.path.dirname(os.path.realpath(exe))
    for d in [exe_dir, *_tier_dirs(config, config_path)]:
        if d not in mounts_for:
            mounts_for.append(d)
    return _mount_unit(
        f"swapfs userspace swap store at {RUNTIME_DIR}/{name}", quote(f"{RUNTIME_DIR}/{name}"),
        quote(os.path.abspath(config_path)), exe, mounts_for,
        f"Generated by swapfs-generator from {config_path}; edit that file instead.",
        install=False)


def swap_unit(name: str, device: DeviceConfig, exe: str, config_path: str) -> str:
    """The generated swap unit of one device marked ``swap = true``."""
    dev_file = f"{RUNTIME_DIR}/{name}/{device.name}"
    mount = mount_unit_name(name)
    opts = f"--discard={device.discard}"
    if device.swap_priority is not None:
        opts = f"--priority {device.swap_priority} " + opts
    return "\n".join([
        f"# Generated by swapfs-generator for device {device.name!r} of {config_path}.",
        "# Ordered after the mount service, so swapoff runs before the unmount; the",
        "# stop fails (and so does the unit) if swapoff fails.",
        "[Unit]",
        f"Description=swap on swapfs device {dev_file}",
        "DefaultDependencies=no",
        f"Requires={mount}",
        f"After={mount}",
        "Before=swap.target shutdown.target",
        "Conflicts=shutdown.target",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"ExecStart={quote(exe)} swapon {opts} {quote(dev_file)}",
        f"ExecStop={quote(exe)} swapoff {quote(dev_file)}",
        "# swapoff reads every page back in: it takes as long as it takes",
        "TimeoutStopSec=infinity",
        "SendSIGKILL=no",
    ]) + "\n"


@dataclass
class Generated:
    units: list[str]  # unit names written
    problems: list[str]  # files or devices skipped, and why


def generate(config_dir: str, normal_dir: str, exe: str) -> Generated:
    """Write the units for every ``*.toml`` in ``config_dir`` into ``normal_dir``
    and pull them in from swap.target.  A file that does not load is skipped
    (named in ``problems``); the others are still written."""
    from .config import ConfigError, load_config

    out = Generated([], [])
    try:
        names = sorted(f for f in os.listdir(config_dir) if f.endswith(".toml"))
    except FileNotFoundError:
        return out
    wants = os.path.join(normal_dir, "swap.target.wants")
    for fname in names:
        path = os.path.join(config_dir, fname)
        stem = fname[: -len(".toml")]
        if not _STEM_RE.fullmatch(stem):
            out.problems.append(f"{path}: the name {stem!r} is not usable for a mount and a unit "
                                "(letters, digits, _ . -; at most 64)")
            continue
        try:
            config = load_config(path)
        except ConfigError as exc:
            out.problems.append(f"{path}: {exc}")
            continue
        files = {mount_unit_name(stem): mount_unit(stem, config, path, exe)}
        for dev in config.devices:
            if dev.swap:
                files[swap_unit_name(stem, dev.name)] = swap_unit(stem, dev, exe, path)
        os.makedirs(wants, exist_ok=True)
        for unit, text in files.items():
            with open(os.path.join(normal_dir, unit), "w") as f:
                f.write(text)
            link = os.path.join(wants, unit)
            if not os.path.lexists(link):
                os.symlink(os.path.join("..", unit), link)
            out.units.append(unit)
    return out


# -- the node_exporter textfile collector ------------------------------------

# Debian's prometheus-node-exporter reads *.prom files here (its
# --collector.textfile.directory); other installations: install-units --textfile-dir
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
TEXTFILE_NAME = "swapfs.prom"
TEXTFILE_SERVICE = "swapfs-textfile.service"
TEXTFILE_TIMER = "swapfs-textfile.timer"
TEXTFILE_SCHEDULE = "*:*:00/15"  # every 15 s, by the clock


def textfile_service(exe: str = EXE, directory: str = TEXTFILE_DIR) -> str:
    """``swapfs-textfile.service``: every mount's metrics written atomically
    into node_exporter's textfile directory."""
    return "\n".join([
        "# Writes the metrics of every swapfs mount for node_exporter's textfile collector:",
        f"# {directory}/{TEXTFILE_NAME}, replaced whole by a rename (a scrape never sees half",
        "# a file).  Started by swapfs-textfile.timer; another directory: install-units",
        "# --textfile-dir DIR, or drop-ins (systemctl edit) for this ExecStart= and the",
        "# timer's ConditionPathIsDirectory=.",
        "[Unit]",
        "Description=swapfs metrics for the node_exporter textfile collector",
        "Documentation=man:swapfs(8)",
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={quote(exe)} metrics --output {quote(os.path.join(directory, TEXTFILE_NAME))}",
        "# a daemon that does not answer is swapfs_up 0 after --timeout; never wait longer",
        "TimeoutStartSec=60",
        "Nice=10",
        "IOSchedulingClass=idle",
        "NoNewPrivileges=yes",
        "# no ProtectSystem= or Private*=: a mount namespace of its own would copy every",
        "# FUSE mount, a stuck daemon's too; this reads xattrs and writes one file",
    ]) + "\n"


def textfile_timer(directory: str = TEXTFILE_DIR, schedule: str = TEXTFILE_SCHEDULE) -> str:
    """``swapfs-textfile.timer``: runs the collector service on the calendar
    ``schedule``; it starts only where node_exporter's directory exists (the
    condition sits on the timer, checked once when it starts: on the service
    it would be checked every run, and a service skipped by its condition
    confuses the timers that follow it)."""
    return "\n".join([
        "# Enable with: systemctl enable --now swapfs-textfile.timer",
        "[Unit]",
        "Description=swapfs metrics for node_exporter every 15 s",
        f"ConditionPathIsDirectory={quote(directory)}",
        "",
        "[Timer]",
        f"OnCalendar={schedule}",
        "AccuracySec=1s",
        "",
        "[Install]",
        "WantedBy=timers.target",
    ]) + "\n"
