"""The swapfs command line: mount, unmount, stats, check-config."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import subprocess
import sys
import time

from . import __version__

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

STATS_XATTR = "user.swapfs.stats"
# Measured here (2-core VM): 200 us of polling took the kernel swap workload
# from 39 s to 23 s and 4k reads at depth 1 from 11.7k to 25.7k IOPS;
# 500-1000 us gained little more.  See docs/fuse.md.
DEFAULT_POLL_US = 200

DESCRIPTION = """\
swapfs: a userspace swap store.  It presents virtual swap devices as files
in a FUSE mount and keeps their pages compressed in memory (lz4 or zstd).

To swap into it (as root):
  swapfs mount /run/swapfs
  losetup --direct-io=on -f --show /run/swapfs/swap0      # prints /dev/loopN
  mkswap /dev/loopN && swapon --discard -p 100 /dev/loopN
  swapfs stats /run/swapfs
and to stop: swapoff /dev/loopN; losetup -d /dev/loopN; swapfs unmount /run/swapfs
"""


def _die(message: str, code: int = EXIT_FAIL) -> int:
    print(f"swapfs: {message}", file=sys.stderr)
    return code


def _setup_logging(level: str, log_file: str | None) -> None:
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def _mountpoint_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"mountpoint {path} does not exist (create it with mkdir -p {path})"
    if not os.path.isdir(path):
        return f"mountpoint {path} is not a directory"
    if os.path.ismount(path):
        return f"{path} is already a mount point (swapfs unmount {path} first?)"
    return None


def _default_log_file(mountpoint: str) -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    escaped = os.path.abspath(mountpoint).strip("/").replace("/", "-") or "root"
    return os.path.join(base, f"swapfs-{escaped}.log")


# -- mount -------------------------------------------------------------------


def _load_checked_config(path: str | None, mountpoint: str | None):
    """The configuration, with its tiers' backing paths checked; raises ValueError
    (ConfigError or TierConfigError) with a message naming the key or tier."""
    from .config import load_config
    from .tiers.checks import check_tier_paths

    config = load_config(path)
    check_tier_paths([(t.name, t.path, t.size) for t in config.tiers], mountpoint)
    return config


def cmd_mount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        config = _load_checked_config(args.config, mountpoint)
    except ValueError as exc:
        return _die(f"invalid configuration: {exc}", EXIT_USAGE)
    if not 0 <= args.poll_us <= 100_000:
        return _die(f"--poll-us {args.poll_us}: must be between 0 and 100000 microseconds", EXIT_USAGE)
    problem = _mountpoint_problem(mountpoint)
    if problem:
        return _die(problem, EXIT_USAGE)
    if args.foreground:
        return _run_foreground(args, config, mountpoint)
    return _spawn_background(args, mountpoint)


def _run_foreground(args: argparse.Namespace, config, mountpoint: str) -> int:
    import trio

    from . import fuse
    from .daemon import protect_process, serve_mount

    _setup_logging(args.log_level, args.log_file)
    log = logging.getLogger("swapfs")
    ready_fd = args.ready_fd

    def report(line: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, line.encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

    for warning in protect_process(lock_memory=not args.no_mlock):
        log.warning("%s", warning)
    try:
        trio.run(
            lambda: serve_mount(
                config, mountpoint, on_ready=lambda: report("READY"), allow_other=args.allow_other,
                poll_us=args.poll_us,
            )
        )
    except fuse.MountError as exc:
        report(f"ERROR {exc}")
        log.error("%s", exc)
        return _die(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - last resort: say why before dying
        log.exception("swapfs daemon failed")
        report(f"ERROR {exc}")
        return _die(f"daemon failed: {exc}")
    return EXIT_OK


def _spawn_background(args: argparse.Namespace, mountpoint: str) -> int:
    log_file = args.log_file or _default_log_file(mountpoint)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "swapfs", "mount", "--foreground", "--ready-fd", str(w)]
    cmd += ["--log-file", log_file, "--log-level", args.log_level]
    if args.config:
        cmd += ["--config", os.path.abspath(args.config)]
    if args.allow_other:
        cmd.append("--allow-other")
    if args.no_mlock:
        cmd.append("--no-mlock")
    cmd += ["--poll-us", str(args.poll_us)]
    cmd.append(mountpoint)
    proc = subprocess.Popen(
        cmd,
        pass_fds=(w,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "READY":
        print(f"swapfs mounted at {mountpoint} (daemon pid {proc.pid}, log {log_file})")
        return EXIT_OK
    proc.wait(timeout=30)
    if line.startswith("ERROR "):
        return _die(line[len("ERROR "):])
    return _die(f"the daemon exited (status {proc.returncode}) before mounting; see {log_file}")


# -- unmount -----------------------------------------------------------------


def _swapfs_mounts() -> dict[str, str]:
    """{mountpoint: fstype} of mounted swapfs filesystems."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype = fields[sep + 1]
            if fstype == "fuse.swapfs" or fields[sep + 2] == "swapfs":
                mounts[fields[4].replace("\\040", " ")] = fstype
    return mounts


def _loops_backed_by(mountpoint: str) -> list[tuple[str, str]]:
    """[(/dev/loopN, backing file)] for loop devices over files in the mount."""
    found = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    prefix = mountpoint.rstrip("/") + "/"
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append((f"/dev/{name}", backing))
    return found


def _active_swaps() -> set[str]:
    try:
        with open("/proc/swaps") as f:
            return {line.split()[0] for line in f.readlines()[1:] if line.strip()}
    except OSError:
        return set()


def cmd_unmount(args: argparse.Namespace) -> int:
    from . import fuse

    mountpoint = os.path.abspath(args.mountpoint)
    if mountpoint not in _swapfs_mounts():
        return _die(f"{mountpoint} is not a swapfs mount")
    loops = _loops_backed_by(mountpoint)
    swaps = _active_swaps()
    for dev, backing in loops:
        if dev in swaps:
            return _die(
                f"swap is active on {dev} (over {backing}); run: swapoff {dev} && losetup -d {dev}"
            )
    if loops and not args.lazy:
        devs = " ".join(d for d, _ in loops)
        return _die(f"loop devices still use the mount: {devs}; run: losetup -d {devs}")
    try:
        fuse.unmount(mountpoint, lazy=args.lazy)
    except (OSError, fuse.MountError) as exc:
        return _die(f"cannot unmount {mountpoint}: {exc}")
    for _ in range(50):  # the daemon exits once the kernel ends the connection
        if mountpoint not in _swapfs_mounts():
            break
        time.sleep(0.1)
    print(f"swapfs unmounted from {mountpoint}")
    return EXIT_OK


# -- stats -------------------------------------------------------------------


def read_stats(mountpoint: str) -> dict:
    raw = os.getxattr(mountpoint, STATS_XATTR)
    return json.loads(raw)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_stats(stats: dict) -> str:
    lines = []
    devs = stats.get("devices", {})
    lines.append(f"{'device':<12}{'size':>11}{'stored':>10}{'same':>10}{'reads':>10}{'writes':>10}{'discards':>10}")
    for name, d in devs.items():
        lines.append(
            f"{name:<12}{_fmt_bytes(d['size_bytes']):>11}{d['stored_pages']:>10}"
            f"{d['same_filled_pages']:>10}{d['reads']:>10}{d['writes']:>10}{d['discards']:>10}"
        )
    lines.append("")
    lines.append(f"{'tier':<12}{'kind':>6}{'pages':>10}{'payload':>12}{'memory/disk':>13}{'limit':>12}")
    for name, t in stats.get("tiers", {}).items():
        held = t.get("pool_bytes", t.get("disk_bytes", 0))
        limit = t.get("max_bytes", t.get("capacity_pages", 0) * 4096)
        payload = t.get("compressed_bytes", t.get("stored_pages", 0) * 4096)
        lines.append(
            f"{name:<12}{t.get('kind', ''):>6}{t.get('stored_pages', 0):>10}"
            f"{_fmt_bytes(payload):>12}{_fmt_bytes(held):>13}{_fmt_bytes(limit):>12}"
        )
    tot = stats.get("totals", {})
    lines.append("")
    lines.append(
        f"total: {tot.get('stored_pages', 0)} pages stored ({tot.get('same_filled_pages', 0)} same-filled), "
        f"pool {_fmt_bytes(tot.get('pool_bytes', 0))}, metadata {_fmt_bytes(tot.get('metadata_bytes', 0))}, "
        f"compression ratio {tot.get('compression_ratio', 0.0):.2f}"
    )
    for section in ("writeback", "cache"):
        counters = {k: v for k, v in stats.get(section, {}).items() if not isinstance(v, dict)}
        if section == "writeback":
            counters.pop("epoch", None)  # a clock, not a counter
        if any(v for k, v in counters.items() if k != "capacity_pages"):
            lines.append(f"{section}: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    pairs = stats.get("writeback", {}).get("pairs", {})
    for pair, c in pairs.items():
        lines.append(f"  moved {pair}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.mountpoint)
    try:
        stats = read_stats(path)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return _die(f"{path} is not a swapfs mount (no {STATS_XATTR} attribute)")
        if exc.errno == errno.ENOTCONN:
            return _die(f"{path}: the swapfs daemon is gone (transport endpoint not connected)")
        return _die(f"cannot read stats of {path}: {exc.strerror}")
    except json.JSONDecodeError as exc:
        return _die(f"malformed stats from {path}: {exc}")
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(format_stats(stats))
    return EXIT_OK


# -- check-config ------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import DEFAULT_CONFIG_TOML

    if args.print_default:
        print(DEFAULT_CONFIG_TOML, end="")
        return EXIT_OK
    try:
        config = _load_checked_config(args.config, None)
    except ValueError as exc:
        return _die(f"invalid configuration: {exc}", EXIT_USAGE)
    print(f"configuration OK: {len(config.devices)} device(s), pool {config.pool.algorithm} "
          f"up to {_fmt_bytes(config.pool.max_bytes)}, {len(config.tiers)} file tier(s)")
    return EXIT_OK


# -- argument parsing --------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swapfs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"swapfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "mount",
        help="mount swapfs (returns once the mount is live)",
        description="Mount swapfs at MOUNTPOINT.  Without --foreground, returns once the mount "
        "is live and leaves the daemon running in the background; SIGTERM or SIGINT to the "
        "daemon, or 'swapfs unmount', unmount it cleanly.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="TOML configuration (default: the embedded one; see 'swapfs check-config --print-default')")
    p.add_argument("--foreground", "-f", action="store_true", help="serve in this process; log to stderr")
    p.add_argument("--allow-other", action="store_true",
                   help="let users other than the mounting one open the device files")
    p.add_argument("--no-mlock", action="store_true",
                   help="do not lock the daemon's memory (only for tests: a swapped-out swap daemon can deadlock)")
    p.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US, metavar="N",
                   help="after answering a request, busy-poll for the next one for up to N "
                   f"microseconds before sleeping (default {DEFAULT_POLL_US}; 0: never poll). "
                   "Trades some CPU while swapping for latency: each swap-in waits on the daemon")
    p.add_argument("--log-file", metavar="FILE",
                   help="log here (background default: $XDG_RUNTIME_DIR or /tmp, swapfs-MOUNT.log)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", aliases=["umount"], help="unmount swapfs",
                       description="Unmount a swapfs mount.  Refuses while swap or a loop device "
                       "still uses one of its devices, and says what to run first.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now, finish when no longer busy")
    p.set_defaults(func=cmd_unmount)

    p = sub.add_parser("stats", help="show statistics of a mount",
                       description="Print the statistics of a swapfs mount (read from its "
                       "user.swapfs.stats xattr) as a table, or the JSON object with --json.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the stats contract's JSON object")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("check-config", help="validate a configuration file",
                       description="Parse and validate a configuration as 'swapfs mount' would.")
    p.add_argument("config", nargs="?", metavar="FILE", help="TOML file (default: the embedded one)")
    p.add_argument("--print-default", action="store_true", help="print the embedded default configuration")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
