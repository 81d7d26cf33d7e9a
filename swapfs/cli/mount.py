"""swapfs mount (in the foreground or as a background daemon), swapfs unmount and
swapfs upgrade.

With failover (the default), ``swapfs mount`` first starts a keeper for the mount
(``python -m swapfs.keeper``, in a session of its own, named swapfs-keeper) that
holds the /dev/fuse fd and the store's memory, then serves as the first daemon.
The keeper restarts a fresh daemon (this command with ``--role takeover``) when
the active one dies unreplaced; with ``--standby`` a hot standby (``--role
standby``) waits on the active daemon.  ``swapfs upgrade`` starts the installed
code with ``--role upgrade``.  ``--no-failover`` is the one-process daemon.  See
docs/failover.md."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from .. import system
from .common import EXIT_FAIL, EXIT_NOT_ANSWERING, EXIT_OK, EXIT_USAGE, die
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
# ... but only while tasks wait for a CPU less than this share of the time
# (percent; see swapfs/fuse/pressure.py and docs/latency.md).
DEFAULT_POLL_CPU_PRESSURE = 25
# While requests flow, ask the kernel (PM QoS) to keep CPU wake-ups within
# this many microseconds: 0 keeps idle CPUs polling.  See swapfs/wakeup.py.
DEFAULT_CPU_LATENCY_US = 0
# ... but only while requests arrive at this rate or more (per second): see
# docs/latency.md for the measurement behind it.
DEFAULT_CPU_LATENCY_MIN_RATE = 0


def _mountpoint_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"mountpoint {path} does not exist (create it with mkdir -p {path}, or pass --mkdir)"
    if not os.path.isdir(path):
        return f"mountpoint {path} is not a directory"
    if os.path.ismount(path):
        return f"{path} is already a mount point (swapfs unmount {path} first?)"
    return None


def _log_file_problem(log_file: str | None) -> str | None:
    """A --log-file whose directory is missing is refused (a mistyped path would otherwise
    create a tree of directories somewhere); the default log directory is made as needed."""
    if log_file is None:
        return None
    directory = os.path.dirname(os.path.abspath(log_file))
    if not os.path.isdir(directory):
        what = "does not exist" if not os.path.lexists(directory) else "is not a directory"
        return f"--log-file {log_file}: the directory {directory} {what} (create it first)"
    if os.path.isdir(log_file):
        return f"--log-file {log_file}: is a directory; give a file name"
    return None


def keeper_socket(mountpoint: str) -> str:
    """Where the keeper of ``mountpoint`` listens: beside the default log."""
    return default_log_file(mountpoint)[: -len(".log")] + ".keeper"


def _daemon_args(args: argparse.Namespace, mountpoint: str, log_file: str | None) -> list[str]:
    """The options of a daemon of this mount (for its successors), without the role."""
    out = ["--log-level", args.log_level]
    if log_file:
        out += ["--log-file", log_file]
    if args.config:
        out += ["--config", os.path.abspath(args.config)]
    if args.allow_other:
        out.append("--allow-other")
    if args.no_mlock:
        out.append("--no-mlock")
    out += ["--poll-us", str(args.poll_us), "--poll-cpu-pressure", str(args.poll_cpu_pressure),
            "--cpu-latency-us", str(args.cpu_latency_us),
            "--cpu-latency-min-rate", str(args.cpu_latency_min_rate)]
    if args.no_cpu_latency:
        out.append("--no-cpu-latency")
    if args.standby:
        out.append("--standby")
    return [*out, mountpoint]


def _successor_cmd(daemon_args: list[str], role: str, keeper: str) -> list[str]:
    *opts, mountpoint = daemon_args
    return [sys.executable, "-m", "swapfs", "mount", "--foreground", *opts, "--role", role,
            "--keeper", keeper, mountpoint]


def _transport_problem(args: argparse.Namespace) -> str | None:
    """Failover needs the classic transport: a ring's entries die with its process."""
    if args.no_failover or args.transport == "classic":
        return None
    if args.transport == "uring":
        return ("--transport uring cannot take part in failover (a ring's entries belong to the "
                "process that registered them and die with it); pass --no-failover to run io_uring "
                "in one process that the mount does not survive")
    return None  # auto: the classic transport (AUTO_NOTE)


AUTO_NOTE = "transport auto: classic, because failover needs it (--no-failover allows io_uring)"


# -- mount -------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        if args.role in (None, "start"):
            config = load_checked_config(args.config, mountpoint)
        else:
            # A successor never touches the mount before it serves it: while nobody serves,
            # a stat of it waits for ever.  The first daemon checked the configuration.
            from ..config import load_config

            config = load_config(args.config)
    except ValueError as exc:
        return die(f"invalid configuration: {exc}", EXIT_USAGE)
    if not 0 <= args.poll_us <= 100_000:
        return die(f"--poll-us {args.poll_us}: must be between 0 and 100000 microseconds", EXIT_USAGE)
    if not 1 <= args.poll_cpu_pressure <= 100:
        return die(f"--poll-cpu-pressure {args.poll_cpu_pressure}: must be a percentage between 1 and 100",
                   EXIT_USAGE)
    if not 0 <= args.cpu_latency_us <= 1_000_000:
        return die(f"--cpu-latency-us {args.cpu_latency_us}: must be between 0 and 1000000 microseconds",
                   EXIT_USAGE)
    if not 0 <= args.cpu_latency_min_rate <= 10_000_000:
        return die(f"--cpu-latency-min-rate {args.cpu_latency_min_rate}: must be between 0 and 10000000 "
                   "requests per second", EXIT_USAGE)
    if args.mkdir and args.role in (None, "start") and not os.path.lexists(mountpoint):
        try:
            os.makedirs(mountpoint, mode=0o755)
        except OSError as exc:
            return die(f"cannot create mountpoint {mountpoint}: {exc.strerror}")
    problem = _transport_problem(args)
    if problem:
        return die(problem, EXIT_USAGE)
    if args.role in (None, "start"):
        problem = _mountpoint_problem(mountpoint) or _log_file_problem(args.log_file)
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

    def tell(line: str) -> None:
        """A line to the waiting parent (``swapfs mount`` or ``swapfs upgrade``)."""
        if ready_fd is not None:
            try:
                os.write(ready_fd, line.encode() + b"\n")
            except OSError:
                pass

    def report(line: str) -> None:
        """The last line to the parent: READY or ERROR."""
        nonlocal ready_fd
        tell(line)
        if ready_fd is not None:
            try:
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
        # What keeps the machine from deadlocking could not be set up: in the log, and
        # printed by the command that started the daemon.
        log.warning("%s", warning)
        tell(f"WARNING {warning.replace(chr(10), ' ')}")
    if args.role in (None, "start"):
        from ..config import capacity_warnings

        for warning in capacity_warnings(config):  # devices the store cannot back
            log.warning("%s", warning)
            tell(f"WARNING {warning}")
    config_path = os.path.abspath(args.config) if args.config else None
    if not args.no_failover:
        if args.transport == "auto":
            log.info("%s", AUTO_NOTE)
        try:
            return _run_failover(args, config, mountpoint, config_path, report, failed, log)
        finally:
            limiter.flush()
    log.info("failover off (--no-failover): the mount does not survive this process")
    try:
        trio.run(
            lambda: serve_mount(
                config, mountpoint, on_ready=lambda: report("READY"), allow_other=args.allow_other,
                poll_us=args.poll_us, poll_pressure=args.poll_cpu_pressure / 100, config_path=config_path,
                transport=args.transport,
                cpu_latency_us=None if args.no_cpu_latency else args.cpu_latency_us,
                cpu_latency_min_rate=args.cpu_latency_min_rate,
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


def _run_failover(args: argparse.Namespace, config: Any, mountpoint: str, config_path: str | None,
                  report: Any, failed: Any, log: logging.Logger) -> int:
    import trio

    from .. import fuse
    from ..daemon import serve_failover
    from ..fuse.handoff import TakeoverRefused
    from ..keeper import KeeperError

    role = args.role or "start"
    keeper_proc: subprocess.Popen[bytes] | None = None
    if role == "start":
        keeper = keeper_socket(mountpoint)
        daemon_args = _daemon_args(args, mountpoint, args.log_file)
        try:
            keeper_proc = _start_keeper(keeper, _successor_cmd(daemon_args, "takeover", keeper),
                                        args.log_file)
        except OSError as exc:
            return failed(f"cannot start the keeper of {mountpoint}: {exc}")
        log.info("keeper of %s started (pid %d, socket %s)", mountpoint, keeper_proc.pid, keeper)
    else:
        keeper = args.keeper or keeper_socket(mountpoint)
        daemon_args = _daemon_args(args, mountpoint, args.log_file)
    standby_cmd = _successor_cmd(daemon_args, "standby", keeper) if args.standby else None
    handed_off = False
    try:
        handed_off = trio.run(
            lambda: serve_failover(
                config, mountpoint, keeper=keeper, role=role, standby_cmd=standby_cmd,
                meta={"daemon_args": daemon_args},
                on_ready=lambda: report(f"READY {os.getpid()}"), allow_other=args.allow_other,
                poll_us=args.poll_us, poll_pressure=args.poll_cpu_pressure / 100, config_path=config_path,
                cpu_latency_us=None if args.no_cpu_latency else args.cpu_latency_us,
                cpu_latency_min_rate=args.cpu_latency_min_rate,
            )
        )
    except KeeperError as exc:  # a successor whose keeper is gone: the mount has ended
        if role == "upgrade":
            return failed(f"upgrade of {mountpoint}: {exc}")
        log.info("%s for %s ends: %s", role, mountpoint, exc)  # also from inside the nursery
        return EXIT_OK
    except TakeoverRefused as exc:
        if role == "standby":
            log.info("standby for %s ends: %s", mountpoint, exc)
            return EXIT_OK
        return failed(f"takeover of {mountpoint} refused: {exc}")
    except fuse.MountError as exc:
        _stop_keeper(keeper_proc)
        return failed(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        if keeper_proc is not None and not _keeper_holds_connection(keeper):
            _stop_keeper(keeper_proc)  # nothing was deposited: nothing to keep
        return failed(f"daemon at {mountpoint} failed: {one_line(exc)}",
                      exc if log.isEnabledFor(logging.DEBUG) else None)
    if handed_off:
        logging.shutdown()
        os._exit(EXIT_OK)  # the successor waits for this exit: no teardown
    return EXIT_OK


def _keeper_holds_connection(sock: str) -> bool:
    """Whether the keeper holds a FUSE connection (asked of the keeper: a daemon never makes a
    system call on its own mount, which waits for ever while nobody serves it)."""
    from ..fuse.handoff import KeeperClient
    from ..keeper import KeeperError

    try:
        client = KeeperClient(sock)
        try:
            return "fuse" in client.status()["names"]
        finally:
            client.close()
    except KeeperError:
        return False


def _start_keeper(sock: str, restart: list[str], log_file: str | None) -> subprocess.Popen[bytes]:
    """The keeper, in a session of its own (a terminal's ^C or the death of this process
    does not reach it); it restarts ``restart`` when the active daemon dies unreplaced."""
    os.makedirs(os.path.dirname(sock), mode=0o700, exist_ok=True)
    err = open(log_file, "ab") if log_file else None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swapfs.keeper", sock, "--restart", *restart],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, start_new_session=True,
            cwd="/")
    finally:
        if err is not None:
            err.close()
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    if line != b"ready\n":
        proc.kill()
        proc.wait()
        raise OSError(f"the keeper did not start (exit status {proc.returncode})")
    return proc


def _stop_keeper(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def _spawn_background(args: argparse.Namespace, mountpoint: str) -> int:
    log_file = args.log_file or default_log_file(mountpoint)
    if not args.log_file:  # the default directory is ours to make; a given one must exist
        try:
            os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
        except OSError as exc:
            return die(f"cannot create the log directory of {log_file}: {exc.strerror}")
    if not args.log_file:  # the default directory: drop the logs of mounts gone since
        remove_stale_logs(log_dir(), [*system.swapfs_mounts(), mountpoint])
    r, w = os.pipe()
    *opts, _ = _daemon_args(args, mountpoint, log_file)
    cmd = [sys.executable, "-m", "swapfs", "mount", "--foreground", "--ready-fd", str(w), *opts,
           "--transport", args.transport]
    if args.no_failover:
        cmd.append("--no-failover")
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
    line = _read_answer(r)
    if line == "READY" or line.startswith("READY "):
        pid = int(line.split()[1]) if " " in line else proc.pid
        how = "no failover" if args.no_failover else (
            "failover: keeper, " + ("hot standby" if args.standby else "fresh daemon on a crash"))
        print(f"swapfs mounted at {mountpoint} (daemon pid {pid}, {how}, log {log_file})")
        if args.transport == "auto" and not args.no_failover:
            print(AUTO_NOTE)
        return EXIT_OK
    proc.wait(timeout=30)
    if line.startswith("ERROR "):
        return die(line[len("ERROR "):])
    last = last_error(log_file)
    return die(f"the daemon exited (status {proc.returncode}) before mounting"
               + (f", last logging: {last}" if last else "") + f"; see {log_file}")


def _read_answer(fd: int) -> str:
    """The daemon's answer on its ready pipe: ``READY [PID]``, ``ERROR ...``, or "" if it
    closed the pipe without one.  The ``WARNING ...`` lines before it (what the daemon could
    not set up: mlockall, oom_score_adj, PR_SET_IO_FLUSHER; devices larger than the store
    can hold) are printed on stderr."""
    with os.fdopen(fd, "rb") as pipe:
        for raw in pipe:
            line = raw.decode(errors="replace").strip()
            if line.startswith("WARNING "):
                print(f"swapfs: warning: {line[len('WARNING '):]}", file=sys.stderr)
                continue
            return line
    return ""


# -- unmount -----------------------------------------------------------------


def cmd_unmount(args: argparse.Namespace) -> int:
    from .. import fuse

    mountpoint = os.path.abspath(args.mountpoint)
    if mountpoint not in system.swapfs_mounts():
        return die(f"{mountpoint} is not a swapfs mount")
    busy = system.busy_reason(mountpoint, loops_ok=args.lazy)
    if busy:
        return die(f"cannot unmount {mountpoint}: {busy}")
    processes = _failover_processes(mountpoint)
    try:
        fuse.unmount(mountpoint, lazy=args.lazy)
    except (OSError, fuse.MountError) as exc:
        return die(f"cannot unmount {mountpoint}: {exc}")
    system.wait_unmounted(mountpoint, 5.0)  # the daemon exits once the kernel ends the connection
    # Keeper, daemon and standby end by themselves once the connection has ended.
    left = [pid for pid in processes if not system.wait_for_exit(pid, 10)]
    if left:
        return die(f"unmounted {mountpoint}, but process(es) {', '.join(map(str, left))} of it "
                   "are still running")
    print(f"swapfs unmounted from {mountpoint}")
    return EXIT_OK


# How long the commands wait for a keeper's answer (a local round trip when it runs).
KEEPER_TIMEOUT = 5.0


def _keeper_status(sock: str) -> dict[str, Any]:
    """The keeper's status; KeeperError without a keeper, TimeoutError if it does not answer
    within KEEPER_TIMEOUT (a stopped keeper accepts the connection and never replies)."""
    from ..fuse.handoff import KeeperClient

    def ask() -> dict[str, Any]:
        client = KeeperClient(sock)
        try:
            return client.status()
        finally:
            client.close()

    return system.bounded(ask, KEEPER_TIMEOUT, sock)


def _failover_processes(mountpoint: str) -> list[int]:
    """The pids of the keeper, the active daemon and the standbys of a failover mount."""
    from ..keeper import KeeperError

    sock = keeper_socket(mountpoint)
    if not os.path.exists(sock):
        return []
    try:
        status = _keeper_status(sock)
    except (KeeperError, TimeoutError):
        return []  # no keeper, or one that does not answer: nothing to wait for
    pids = [status["pid"], *status.get("standbys", [])]
    if status.get("active"):
        pids.append(status["active"])
    return pids


# -- upgrade -----------------------------------------------------------------


def _runs_this_installation(pid: int) -> bool:
    """Whether process ``pid`` runs this installation's Python (its argv[0] is under
    sys.prefix: /usr/lib/swapfs for the package, a checkout's .venv for a checkout)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
        if not argv0:
            return False
        path = os.path.normpath(os.path.join(os.readlink(f"/proc/{pid}/cwd"), argv0))
    except OSError:
        return False
    return path.startswith(os.path.join(sys.prefix, ""))


def cmd_upgrade(args: argparse.Namespace) -> int:
    from ..keeper import KeeperError

    if args.all == (args.mountpoint is not None):
        return die("upgrade: give MOUNTPOINT or --all", EXIT_USAGE)
    if args.all:
        return _upgrade_all()
    mountpoint = os.path.abspath(args.mountpoint)
    if mountpoint not in system.swapfs_mounts():
        return die(f"{mountpoint} is not a swapfs mount")
    sock = keeper_socket(mountpoint)
    try:
        status = _keeper_status(sock)
    except TimeoutError:
        return die(f"the keeper of {mountpoint} did not answer within {KEEPER_TIMEOUT:g} s "
                   "(stopped?); nothing was changed", EXIT_NOT_ANSWERING)
    except KeeperError as exc:
        return die(f"{mountpoint} has no keeper ({exc}): it was mounted with --no-failover, "
                   "and only swapoff, unmount and mount can change its code")
    return _upgrade(mountpoint, status)


def _upgrade_all() -> int:
    """Every mount whose daemon runs this installation's code (the package's postinst runs
    this after an upgrade); mounts of other installations are left to theirs, untouched: their
    keepers are not even asked (a keeper that does not answer would hold up the upgrade)."""
    from ..keeper import KeeperError

    failed = False
    for mountpoint in system.swapfs_mounts():
        ours = _processes_of_this_installation(mountpoint)
        if not ours:
            continue
        if not any("swapfs.keeper" in argv for argv in ours):
            if any("--no-failover" in argv for argv in ours):
                print(f"swapfs: {mountpoint} has no keeper (--no-failover): it runs the old code "
                      "until it is unmounted and mounted again", file=sys.stderr)
            continue
        try:
            status = _keeper_status(keeper_socket(mountpoint))
        except (KeeperError, TimeoutError) as exc:
            print(f"swapfs: the keeper of {mountpoint} does not answer ({exc}): not upgraded",
                  file=sys.stderr)
            failed = True
            continue
        active = status.get("active")
        if not active or not _runs_this_installation(int(active)):
            continue
        failed |= _upgrade(mountpoint, status) != EXIT_OK
    return EXIT_FAIL if failed else EXIT_OK


def _processes_of_this_installation(mountpoint: str) -> list[list[str]]:
    """The command lines of this installation's processes of ``mountpoint``: its keeper
    (``-m swapfs.keeper SOCKET``) and daemons (whose last argument is the mountpoint)."""
    sock = keeper_socket(mountpoint)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if (sock in argv or argv[-1:] == [mountpoint]) and _runs_this_installation(int(entry)):
            found.append(argv)
    return found


def _upgrade(mountpoint: str, status: dict[str, Any]) -> int:
    """Hand the mount to the installed code: a new daemon takes over with upgrade=True."""
    sock = keeper_socket(mountpoint)
    daemon_args = status["meta"].get("daemon_args")
    if not daemon_args:
        return die(f"the keeper of {mountpoint} does not say how its daemon was started")
    old = status.get("active")
    r, w = os.pipe()
    cmd = _successor_cmd(list(daemon_args), "upgrade", sock)
    cmd[cmd.index("--role"):cmd.index("--role")] = ["--ready-fd", str(w)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
    os.close(w)
    line = _read_answer(r)
    if line.startswith("READY"):
        pid = int(line.split()[1]) if " " in line else proc.pid
        print(f"swapfs at {mountpoint} upgraded in {time.monotonic() - started:.2f} s "
              f"(daemon pid {old} handed off to pid {pid})")
        return EXIT_OK
    proc.wait(timeout=30)
    reason = line[len("ERROR "):] if line.startswith("ERROR ") else f"exit status {proc.returncode}"
    return die(f"upgrade of {mountpoint} refused: {reason}; the daemon (pid {old}) keeps serving")


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
    p.add_argument("--poll-cpu-pressure", type=int, default=DEFAULT_POLL_CPU_PRESSURE, metavar="PCT",
                   help="busy-poll only while tasks wait for a CPU less than PCT%% of the time "
                   f"(/proc/pressure/cpu; default {DEFAULT_POLL_CPU_PRESSURE}; 100: poll regardless). "
                   "On a busy machine the spinning daemon would hold the CPU that the next request's "
                   "producers wait for")
    p.add_argument("--transport", choices=["classic", "uring", "auto"], default="classic",
                   help="how FUSE requests reach the daemon: classic (/dev/fuse reads, the default), "
                   "uring (FUSE over io_uring; fails with the reason if the kernel cannot: needs "
                   "/sys/module/fuse/parameters/enable_uring = Y; only with --no-failover) or auto (uring when "
                   "available; classic with failover). "
                   "The log says which is used and why")
    p.add_argument("--cpu-latency-us", type=int, default=DEFAULT_CPU_LATENCY_US, metavar="N",
                   help="while requests flow, ask the kernel to wake idle CPUs within N microseconds "
                   f"(/dev/cpu_dma_latency, released after a quarter second without requests; default "
                   f"{DEFAULT_CPU_LATENCY_US}: idle CPUs poll instead of sleeping).  Each swap-in is a "
                   "chain of wake-ups: on a VM this halves its latency, for some CPU while swapping")
    p.add_argument("--cpu-latency-min-rate", type=int, default=DEFAULT_CPU_LATENCY_MIN_RATE, metavar="N",
                   help="ask for the CPU wake-up latency only while requests arrive at N per second or "
                   f"more (default {DEFAULT_CPU_LATENCY_MIN_RATE}; 0: at any request).  Below it the "
                   "polling CPUs cost more than the faster wake-ups save")
    p.add_argument("--no-cpu-latency", action="store_true",
                   help="never ask for a CPU wake-up latency (idle CPUs sleep as the system decides)")
    p.add_argument("--log-file", metavar="FILE",
                   help=f"log here (background default: {ROOT_LOG_DIR} as root, else "
                   "$XDG_RUNTIME_DIR or /tmp; swapfs-MOUNT.log)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-failover", action="store_true",
                   help="one process, no keeper: the mount dies with the daemon (for benchmarks, "
                   "and the io_uring transport)")
    p.add_argument("--standby", action="store_true",
                   help="keep a hot standby daemon waiting (about 30-40 MiB more locked memory): "
                   "a crash then stalls swap for milliseconds instead of the start of a fresh daemon")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--role", choices=["start", "takeover", "standby", "upgrade"], help=argparse.SUPPRESS)
    p.add_argument("--keeper", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("upgrade", help="hand a mount to the installed swapfs without unmounting",
                       description="Start the installed swapfs as a new daemon of MOUNTPOINT: it "
                       "checks that it can read the state, then the running daemon stops reading, "
                       "finishes what it holds and exits, and the new one serves on, swap and all. "
                       "If the new code cannot read the state it refuses and the old daemon keeps "
                       "serving.  (SIGHUP, or systemctl reload, only re-reads the configuration.)  "
                       "--all: every mount whose daemon runs this installation (what the Debian "
                       "package runs after it is upgraded; mounts of other installations are left "
                       "alone).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--all", action="store_true",
                   help="every swapfs mount served by this installation's code")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("unmount", aliases=["umount"], help="unmount swapfs",
                       description="Unmount a swapfs mount.  Refuses while swap or a loop device "
                       "still uses one of its devices, and says what to run first.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now, finish when no longer busy")
    p.set_defaults(func=cmd_unmount)

