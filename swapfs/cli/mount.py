"""swapfs mount (in the foreground or as a background daemon) and swapfs unmount."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Any

from .. import system
from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, die
from .config import load_checked_config
from .logs import (
    ROOT_LOG_DIR,
    default_log_file,
    last_error,
    log_dir,
    one_line,
    remove_stale_logs,
    setup_logging,
)

# Measured here (2-core VM): 200 us of polling took the kernel swap workload
# from 39 s to 23 s and 4k reads at depth 1 from 11.7k to 25.7k IOPS;
# 500-1000 us gained little more.  See docs/fuse.md.
DEFAULT_POLL_US = 200
# While requests flow, ask the kernel (PM QoS) to keep CPU wake-ups within
# this many microseconds: 0 keeps idle CPUs polling.  See swapfs/wakeup.py.
DEFAULT_CPU_LATENCY_US = 0


def _mountpoint_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"mountpoint {path} does not exist (create it with mkdir -p {path}, or pass --mkdir)"
    if not os.path.isdir(path):
        return f"mountpoint {path} is not a directory"
    if os.path.ismount(path):
        return f"{path} is already a mount point (swapfs unmount {path} first?)"
    return None


# -- mount -------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        config = load_checked_config(args.config, mountpoint)
    except ValueError as exc:
        return die(f"invalid configuration: {exc}", EXIT_USAGE)
    if not 0 <= args.poll_us <= 100_000:
        return die(f"--poll-us {args.poll_us}: must be between 0 and 100000 microseconds", EXIT_USAGE)
    if not 0 <= args.cpu_latency_us <= 1_000_000:
        return die(f"--cpu-latency-us {args.cpu_latency_us}: must be between 0 and 1000000 microseconds",
                   EXIT_USAGE)
    if args.mkdir and not os.path.lexists(mountpoint):
        try:
            os.makedirs(mountpoint, mode=0o755)
        except OSError as exc:
            return die(f"cannot create mountpoint {mountpoint}: {exc.strerror}")
    problem = _mountpoint_problem(mountpoint)
    if problem:
        return die(problem, EXIT_USAGE)
    if args.foreground:
        return _run_foreground(args, config, mountpoint)
    return _spawn_background(args, mountpoint)


def _run_foreground(args: argparse.Namespace, config: Any, mountpoint: str) -> int:
    import trio

    from .. import fuse
    from ..daemon import protect_process, serve_mount

    limiter = setup_logging(args.log_level, args.log_file)
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

    def failed(line: str, exc: BaseException | None = None) -> int:
        """The failure once in the log, to the waiting parent, and on stderr
        unless the log is there already (under systemd: one journal line)."""
        log.error("%s", line, exc_info=exc)
        report(f"ERROR {line}")
        return die(line) if args.log_file else EXIT_FAIL

    for warning in protect_process(lock_memory=not args.no_mlock):
        log.warning("%s", warning)
    config_path = os.path.abspath(args.config) if args.config else None
    try:
        trio.run(
            lambda: serve_mount(
                config, mountpoint, on_ready=lambda: report("READY"), allow_other=args.allow_other,
                poll_us=args.poll_us, config_path=config_path, transport=args.transport,
                cpu_latency_us=None if args.no_cpu_latency else args.cpu_latency_us,
            )
        )
    except fuse.MountError as exc:
        return failed(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        # One line for the journal and the parent: what, where, why; the
        # traceback only when the log level asks for it.
        return failed(f"daemon at {mountpoint} failed: {one_line(exc)}",
                      exc if log.isEnabledFor(logging.DEBUG) else None)
    finally:
        limiter.flush()
    return EXIT_OK


def _spawn_background(args: argparse.Namespace, mountpoint: str) -> int:
    log_file = args.log_file or default_log_file(mountpoint)
    try:
        os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
    except OSError as exc:
        return die(f"cannot create the log directory of {log_file}: {exc.strerror}")
    if not args.log_file:  # the default directory: drop the logs of mounts gone since
        remove_stale_logs(log_dir(), [*system.swapfs_mounts(), mountpoint])
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "swapfs", "mount", "--foreground", "--ready-fd", str(w)]
    cmd += ["--log-file", log_file, "--log-level", args.log_level]
    if args.config:
        cmd += ["--config", os.path.abspath(args.config)]
    if args.allow_other:
        cmd.append("--allow-other")
    if args.no_mlock:
        cmd.append("--no-mlock")
    cmd += ["--poll-us", str(args.poll_us), "--cpu-latency-us", str(args.cpu_latency_us)]
    if args.no_cpu_latency:
        cmd.append("--no-cpu-latency")
    cmd += ["--transport", args.transport]
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
        return die(line[len("ERROR "):])
    last = last_error(log_file)
    return die(f"the daemon exited (status {proc.returncode}) before mounting"
               + (f", last logging: {last}" if last else "") + f"; see {log_file}")


# -- unmount -----------------------------------------------------------------


def cmd_unmount(args: argparse.Namespace) -> int:
    from .. import fuse

    mountpoint = os.path.abspath(args.mountpoint)
    if mountpoint not in system.swapfs_mounts():
        return die(f"{mountpoint} is not a swapfs mount")
    busy = system.busy_reason(mountpoint, loops_ok=args.lazy)
    if busy:
        return die(f"cannot unmount {mountpoint}: {busy}")
    try:
        fuse.unmount(mountpoint, lazy=args.lazy)
    except (OSError, fuse.MountError) as exc:
        return die(f"cannot unmount {mountpoint}: {exc}")
    system.wait_unmounted(mountpoint, 5.0)  # the daemon exits once the kernel ends the connection
    print(f"swapfs unmounted from {mountpoint}")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Add the parsers of mount and unmount to the subparsers ``sub``."""
    p = sub.add_parser(
        "mount",
        help="mount swapfs (returns once the mount is live)",
        description="Mount swapfs at MOUNTPOINT.  Without --foreground, returns once the mount "
        "is live and leaves the daemon running in the background; SIGTERM or SIGINT to the "
        "daemon, or 'swapfs unmount', unmount it cleanly (while swap is on over one of its "
        "devices the daemon keeps serving and unmounts once it is off).  SIGHUP re-reads "
        "the configuration file and applies the pool's watermarks.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="TOML configuration (default: the embedded one; see 'swapfs check-config --print-default')")
    p.add_argument("--mkdir", action="store_true", help="create MOUNTPOINT (and its parents) if missing")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="serve in this process; log to stderr (with journald priorities under systemd)")
    p.add_argument("--allow-other", action="store_true",
                   help="let users other than the mounting one open the device files")
    p.add_argument("--no-mlock", action="store_true",
                   help="do not lock the daemon's memory (only for tests: a swapped-out swap daemon can deadlock)")
    p.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US, metavar="N",
                   help="after answering a request, busy-poll for the next one for up to N "
                   f"microseconds before sleeping (default {DEFAULT_POLL_US}; 0: never poll). "
                   "Trades some CPU while swapping for latency: each swap-in waits on the daemon")
    p.add_argument("--transport", choices=["classic", "uring", "auto"], default="classic",
                   help="how FUSE requests reach the daemon: classic (/dev/fuse reads, the default), "
                   "uring (FUSE over io_uring; fails with the reason if the kernel cannot: needs "
                   "/sys/module/fuse/parameters/enable_uring = Y) or auto (uring when available). "
                   "The log says which is used and why")
    p.add_argument("--cpu-latency-us", type=int, default=DEFAULT_CPU_LATENCY_US, metavar="N",
                   help="while requests flow, ask the kernel to wake idle CPUs within N microseconds "
                   f"(/dev/cpu_dma_latency, released after a quarter second without requests; default "
                   f"{DEFAULT_CPU_LATENCY_US}: idle CPUs poll instead of sleeping).  Each swap-in is a "
                   "chain of wake-ups: on a VM this halves its latency, for some CPU while swapping")
    p.add_argument("--no-cpu-latency", action="store_true",
                   help="never ask for a CPU wake-up latency (idle CPUs sleep as the system decides)")
    p.add_argument("--log-file", metavar="FILE",
                   help=f"log here (background default: {ROOT_LOG_DIR} as root, else "
                   "$XDG_RUNTIME_DIR or /tmp; swapfs-MOUNT.log)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", aliases=["umount"], help="unmount swapfs",
                       description="Unmount a swapfs mount.  Refuses while swap or a loop device "
                       "still uses one of its devices, and says what to run first.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now, finish when no longer busy")
    p.set_defaults(func=cmd_unmount)
