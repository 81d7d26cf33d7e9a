"""The swapfs command line: mount, unmount, swapon, swapoff, status, stats,
writeback, top, record, plot, check-config, and the systemd generator and installer."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from . import __version__, sysinfo
from .kernel import PAGE_SIZE as PAGE
from .monitor import cmd_plot, cmd_record, cmd_top
from .report import EXIT_OK, EXIT_USAGE, die, fmt_bytes, format_device, format_stats, read_stats, stats_error

CTL_WRITEBACK_XATTR = "user.swapfs.ctl.writeback"
CTL_COMPACT_XATTR = "user.swapfs.ctl.compact"
# Measured here (2-core VM): 200 us of polling took the kernel swap workload
# from 39 s to 23 s and 4k reads at depth 1 from 11.7k to 25.7k IOPS;
# 500-1000 us gained little more.  See docs/fuse.md.
DEFAULT_POLL_US = 200
# While requests flow, ask the kernel (PM QoS) to keep CPU wake-ups within
# this many microseconds: 0 keeps idle CPUs polling.  See swapfs/wakeup.py.
DEFAULT_CPU_LATENCY_US = 0
ROOT_LOG_DIR = "/run/swapfs/log"
# swapfs status reads every mount on the machine: one stuck daemon must not hang it
STATUS_TIMEOUT = 2.0

DESCRIPTION = """\
swapfs: a userspace swap store.  It presents virtual swap devices as files
in a FUSE mount and keeps their pages compressed in memory (lz4 or zstd),
with file tiers below.

To swap into it (as root):
  swapfs mount /run/swapfs                # the embedded default: swap0 of 1 GiB
  swapfs swapon /run/swapfs/swap0 --priority 100    # loop device, mkswap, swapon
  swapfs status                           # every swapfs device, like swapon --show
  swapfs stats /run/swapfs                # a table; --format json|prometheus
and to stop: swapfs swapoff /run/swapfs/swap0 && swapfs unmount /run/swapfs

At boot: put the configuration in /etc/swapfs/NAME.toml (devices with
swap = true) and run 'swapfs install-units' once; see README.md.
"""


# -- logging -----------------------------------------------------------------

# syslog priorities (sd-daemon(3) prefixes) of Python's levels
_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                     logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<N>message``: journald reads N as the line's priority; it adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _JOURNAL_PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {super().format(record)}"
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald (JOURNAL_STREAM=dev:ino matches it)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _setup_logging(level: str, log_file: str | None) -> None:
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            handler.setFormatter(JournalFormatter("%(message)s"))
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def _mountpoint_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"mountpoint {path} does not exist (create it with mkdir -p {path}, or pass --mkdir)"
    if not os.path.isdir(path):
        return f"mountpoint {path} is not a directory"
    if os.path.ismount(path):
        return f"{path} is already a mount point (swapfs unmount {path} first?)"
    return None


def default_log_file(mountpoint: str) -> str:
    """Where a background daemon logs: /run/swapfs/log as root, else
    $XDG_RUNTIME_DIR or /tmp."""
    if os.geteuid() == 0:
        base = ROOT_LOG_DIR
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    escaped = os.path.abspath(mountpoint).strip("/").replace("/", "-") or "root"
    return os.path.join(base, f"swapfs-{escaped}.log")


# -- mount -------------------------------------------------------------------


def _load_checked_config(path: str | None, mountpoint: str | None) -> Any:
    """The configuration, checked against this machine and its tiers' backing paths and
    files (warnings printed); raises ValueError (ConfigError or TierConfigError) with a
    message naming the key or tier."""
    from .config import check_machine, load_config
    from .tiers.checks import check_tier_files, check_tier_paths

    config = load_config(path)
    check_machine(config)
    check_tier_paths([(t.name, t.path, t.size) for t in config.tiers], mountpoint)
    for warning in check_tier_files(config.tiers):
        print(f"swapfs: warning: {warning}", file=sys.stderr)
    return config


def cmd_mount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        config = _load_checked_config(args.config, mountpoint)
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
        report(f"ERROR {exc}")
        log.error("%s", exc)
        return die(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        log.exception("swapfs daemon failed")
        report(f"ERROR {exc}")
        return die(f"daemon failed: {exc}")
    return EXIT_OK


def _spawn_background(args: argparse.Namespace, mountpoint: str) -> int:
    log_file = args.log_file or default_log_file(mountpoint)
    try:
        os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
    except OSError as exc:
        return die(f"cannot create the log directory of {log_file}: {exc.strerror}")
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
    return die(f"the daemon exited (status {proc.returncode}) before mounting; see {log_file}")


# -- unmount -----------------------------------------------------------------


def cmd_unmount(args: argparse.Namespace) -> int:
    from . import fuse

    mountpoint = os.path.abspath(args.mountpoint)
    if mountpoint not in sysinfo.swapfs_mounts():
        return die(f"{mountpoint} is not a swapfs mount")
    loops = sysinfo.loops_backed_by(mountpoint)
    swaps = sysinfo.active_swaps()
    for lo in loops:
        if lo.device in swaps:
            return die(f"swap is active on {lo.device} (over {lo.backing_file}); "
                        f"run: swapfs swapoff {lo.backing_file}")
    if loops and not args.lazy:
        devs = " ".join(lo.device for lo in loops)
        return die(f"loop devices still use the mount: {devs}; run: losetup -d {devs}")
    try:
        fuse.unmount(mountpoint, lazy=args.lazy)
    except (OSError, fuse.MountError) as exc:
        return die(f"cannot unmount {mountpoint}: {exc}")
    for _ in range(50):  # the daemon exits once the kernel ends the connection
        if mountpoint not in sysinfo.swapfs_mounts():
            break
        time.sleep(0.1)
    print(f"swapfs unmounted from {mountpoint}")
    return EXIT_OK


# -- swapon / swapoff --------------------------------------------------------


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _device_file(path: str) -> tuple[str, str] | str:
    """(absolute device file, its mount) or an error message."""
    p = os.path.abspath(path)
    mount = sysinfo.mount_of(p)
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
    path, _ = found
    swaps = sysinfo.active_swaps()
    for lo in sysinfo.loops_backed_by(path):
        if lo.backing_file != path:
            continue
        if lo.device in swaps:
            return die(f"swap is already on over {path} ({lo.device}, priority {swaps[lo.device].priority})")
        return die(f"{path} is busy: loop device {lo.device} already uses it "
                    f"(losetup -d {lo.device} if nothing else does)")
    out = _run(["losetup", "--direct-io=on", "-f", "--show", path])
    if out.returncode != 0:
        return die(f"losetup failed: {out.stderr.strip()}")
    loop = out.stdout.strip()
    problem = None
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/loop/dio") as f:
            if f.read().strip() != "1":
                problem = f"the kernel did not enable direct I/O on {loop}"
    except OSError as exc:
        problem = f"cannot check direct I/O on {loop}: {exc.strerror}"
    if problem is None:
        for why in sysinfo.tune_loop_queue(loop):
            print(f"swapfs: {loop}: cannot tune the queue ({why}); swap works, slower", file=sys.stderr)
        out = _run(["mkswap", loop])
        if out.returncode != 0:
            problem = f"mkswap {loop} failed: {out.stderr.strip()}"
    if problem is None:
        cmd = ["swapon"]
        if args.priority is not None:
            cmd += ["--priority", str(args.priority)]
        if args.discard != "off":
            cmd.append("--discard" if args.discard == "both" else f"--discard={args.discard}")
        out = _run(cmd + [loop])
        if out.returncode != 0:
            problem = f"{' '.join(cmd)} {loop} failed: {out.stderr.strip()}"
    if problem is not None:
        _run(["losetup", "-d", loop])
        return die(problem)
    print(loop)
    return EXIT_OK


def cmd_swapoff(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return die("swapoff needs root")
    path = os.path.abspath(args.device_file)
    loops = [lo for lo in sysinfo.loops_backed_by(path) if lo.backing_file == path]
    if not loops:
        if sysinfo.mount_of(path) is None:
            return die(f"{path} is not a device file of a swapfs mount")
        print(f"swapfs: swap is not on over {path}; nothing to do", file=sys.stderr)
        return EXIT_OK
    swaps = sysinfo.active_swaps()
    for lo in loops:
        if lo.device in swaps:
            # swapoff reads every page back in: no timeout of ours
            out = subprocess.run(["swapoff", lo.device], capture_output=True, text=True)
            if out.returncode != 0:
                return die(f"swapoff {lo.device} failed: {out.stderr.strip()} (swap stays on)")
        out = _run(["losetup", "-d", lo.device])
        if out.returncode != 0:
            return die(f"losetup -d {lo.device} failed: {out.stderr.strip()}")
        print(f"{lo.device} detached from {path}")
    return EXIT_OK


# -- status ------------------------------------------------------------------


def status_rows() -> list[dict[str, Any]]:
    """One record per device of every swapfs mount on this machine."""
    rows: list[dict[str, Any]] = []
    swaps = sysinfo.active_swaps()
    loops = sysinfo.loop_devices()
    for mount in sysinfo.swapfs_mounts():
        try:
            stats = sysinfo.read_stats(mount, timeout=STATUS_TIMEOUT)
        except (OSError, ValueError) as exc:
            if isinstance(exc, TimeoutError):
                why = f"daemon not answering within {STATUS_TIMEOUT:g} s"
            elif isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:
                why = "daemon gone"
            else:
                why = str(exc)
            rows.append({"mount": mount, "device": None, "error": why})
            continue
        algorithm = stats.get("tiers", {}).get("pool", {}).get("algorithm", "")
        for name, d in stats.get("devices", {}).items():
            path = os.path.join(mount, name)
            loop = next((lo.device for lo in loops if lo.backing_file == path), None)
            swap = swaps.get(loop) if loop else None
            rows.append({
                "mount": mount, "device": name, "loop": loop,
                "size": d["size_bytes"],
                "used": swap.used_kib * 1024 if swap else None,
                "priority": swap.priority if swap else None,
                "data": d.get("orig_data_size", 0), "compressed": d.get("compr_data_size", 0),
                "memory": d.get("mem_used_total", d.get("pool_bytes", 0)),
                "algorithm": algorithm, "file_pages": d.get("file_pages", 0),
                "stored_pages": d["stored_pages"],
            })
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    rows = status_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no swapfs mounts")
        return EXIT_OK

    def b(v: int | None) -> str:
        if v is None:
            return "-"
        return str(v) if args.bytes else fmt_bytes(v).replace(" ", "")

    header = ["MOUNT", "DEVICE", "LOOP", "SIZE", "USED", "PRIO", "DATA", "COMPR", "MEMORY", "ALGO",
              "FILE-PAGES"]
    table = [header]
    for r in rows:
        if r["device"] is None:
            table.append([r["mount"], f"({r['error']})"] + [""] * (len(header) - 2))
            continue
        table.append([r["mount"], r["device"], r["loop"] or "-", b(r["size"]), b(r["used"]),
                      "-" if r["priority"] is None else str(r["priority"]), b(r["data"]),
                      b(r["compressed"]), b(r["memory"]), r["algorithm"], str(r["file_pages"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [c.ljust(w) if i < 3 or i == 9 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
    return EXIT_OK


# -- stats -------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    from .stats import prometheus_text

    path = os.path.abspath(args.path)
    fmt = "json" if args.json else args.format
    try:
        stats = read_stats(path)
    except (OSError, ValueError) as exc:
        return stats_error(path, exc)
    mount = sysinfo.mount_of(path) or path
    device = None if mount == path else os.path.basename(path)
    if fmt == "json":
        print(json.dumps(stats, indent=2))
    elif fmt == "prometheus":
        print(prometheus_text(stats, mount, device=device), end="")
    elif device is not None:
        print(format_device(device, stats))
    else:
        print(format_stats(stats))
    return EXIT_OK


# -- writeback ---------------------------------------------------------------


def _request_with_progress(path: str, mount: str, request: str, before: dict[str, Any],
                           total: int | None) -> None:
    """setxattr the writeback request (it returns when the pages moved); on a
    terminal, a request that takes over a second shows its progress."""
    import threading

    error: list[OSError] = []

    def run() -> None:
        try:
            os.setxattr(path, CTL_WRITEBACK_XATTR, request.encode())
        except OSError as exc:
            error.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    shown = False
    start = time.monotonic()
    base = before.get("writeback", {}).get("moved_pages", 0)
    while worker.is_alive():
        worker.join(0.2)
        if worker.is_alive() and sys.stderr.isatty() and time.monotonic() - start > 1.0:
            try:
                done = read_stats(mount).get("writeback", {}).get("moved_pages", 0) - base
            except (OSError, ValueError):
                continue
            if total:
                width = 30
                fill = min(width, width * done // total)
                bar = f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} pages"
            else:
                bar = f"{done} pages moved"
            sys.stderr.write(f"\r{bar} ({time.monotonic() - start:.0f} s)")
            sys.stderr.flush()
            shown = True
    if shown:
        sys.stderr.write("\n")
    if error:
        raise error[0]


def cmd_compact(args: argparse.Namespace) -> int:
    mount = os.path.abspath(args.mount)
    if sysinfo.mount_of(mount) != mount:
        return die(f"{mount} is not a swapfs mount (give the mount, not a device file)")
    try:
        before = read_stats(mount)["tiers"]["pool"]
        start = time.monotonic()
        os.setxattr(mount, CTL_COMPACT_XATTR, b"1")
        moved, freed = (int(w) for w in os.getxattr(mount, CTL_COMPACT_XATTR).split())
        after = read_stats(mount)["tiers"]["pool"]
    except OSError as exc:
        return die(f"compaction request on {mount} failed: {exc.strerror}")
    except (ValueError, KeyError) as exc:
        return stats_error(mount, exc)
    took = time.monotonic() - start
    print(f"compacted the pool of {mount} in {took:.2f} s: moved {moved} objects, released "
          f"{fmt_bytes(freed)}; pool memory {fmt_bytes(before['pool_bytes'])} -> "
          f"{fmt_bytes(after['pool_bytes'])}")
    return EXIT_OK


def cmd_writeback(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    if args.idle is not None:
        if args.pages is not None:
            return die("give a page count or --idle SECONDS, not both", EXIT_USAGE)
        if args.idle < 0:
            return die(f"--idle {args.idle}: must not be negative", EXIT_USAGE)
        request = f"idle:{args.idle:g}"
        what = f"every pool page idle for {args.idle:g} s"
    else:
        if args.pages is None or args.pages <= 0:
            return die("how many pages? give N (> 0) or --idle SECONDS", EXIT_USAGE)
        request = str(args.pages)
        what = f"up to {args.pages} of the coldest pool pages"
    mount = sysinfo.mount_of(path) or path
    try:
        before = read_stats(mount)
    except (OSError, ValueError) as exc:
        return stats_error(path, exc)
    if not before.get("tiers") or len(before["tiers"]) < 2:
        return die(f"{mount} has no file tier: pages have nowhere to go")
    start = time.monotonic()
    try:
        _request_with_progress(path, mount, request, before, args.pages)
        moved = int(os.getxattr(path, CTL_WRITEBACK_XATTR))
        after = read_stats(mount)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return die(f"the daemon refused the request {request!r}")
        return die(f"writeback request on {path} failed: {exc.strerror}")
    except ValueError as exc:
        return stats_error(path, exc)
    took = time.monotonic() - start
    print(f"asked for {what}: moved {moved} pages ({fmt_bytes(moved * PAGE)}) in {took:.2f} s")
    old = before.get("writeback", {}).get("pairs", {})
    for pair, c in after.get("writeback", {}).get("pairs", {}).items():
        n = c.get("pages", 0) - old.get(pair, {}).get("pages", 0)
        if n:
            print(f"  {pair}: {n} pages")
    return EXIT_OK


# -- systemd: the generator and the installer --------------------------------


def cmd_generate_units(args: argparse.Namespace) -> int:
    from . import units

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
    from . import units

    root = os.path.abspath(args.root)
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
    if root == "/" and os.path.isdir("/run/systemd/system"):
        out = _run(["systemctl", "daemon-reload"])
        if out.returncode != 0:
            return die(f"systemctl daemon-reload failed: {out.stderr.strip()}")
        print("systemctl daemon-reload: done (the generator ran)")
    else:
        print("systemd is not running here: run 'systemctl daemon-reload' where it is")
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
        return die(f"invalid configuration: {exc}", EXIT_USAGE)
    print(f"configuration OK: {len(config.devices)} device(s), pool {config.pool.algorithm} "
          f"up to {fmt_bytes(config.pool.max_bytes)}, {len(config.tiers)} file tier(s)")
    return EXIT_OK


# -- argument parsing --------------------------------------------------------


def _discard(value: str) -> str:
    if value not in ("once", "pages", "both", "off"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected once, pages, both or off")
    return value


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

    p = sub.add_parser("swapon", help="swap on a device file (loop device, mkswap, swapon)",
                       description="Attach a direct-I/O loop device over DEVICE_FILE, mkswap it and "
                       "swapon it; prints the loop device.  Needs root.  Example: "
                       "swapfs swapon /run/swapfs/swap0 --priority 100")
    p.add_argument("device_file", metavar="DEVICE_FILE", help="a device file of a swapfs mount")
    p.add_argument("--priority", "-p", type=int, metavar="N",
                   help="swap priority, -1..32767 (higher is used first; default: the kernel's)")
    p.add_argument("--discard", nargs="?", const="both", default="both", type=_discard,
                   metavar="once|pages|both|off",
                   help="how freed swap slots reach swapfs (default both: the whole area at swapon, "
                   "then each freed cluster; off: swapfs never learns that slots are free)")
    p.set_defaults(func=cmd_swapon)

    p = sub.add_parser("swapoff", help="swap off a device file and detach its loop device",
                       description="swapoff the loop device over DEVICE_FILE (the kernel reads every "
                       "page back in first), then detach it.  Exits 1 if swapoff fails; 0 if swap "
                       "was not on.")
    p.add_argument("device_file", metavar="DEVICE_FILE")
    p.set_defaults(func=cmd_swapoff)

    p = sub.add_parser("status", help="every swapfs device on this machine, one line each",
                       description="One line per device of every swapfs mount, like zramctl and "
                       "swapon --show: its loop device, size, swap used and priority (from "
                       "/proc/swaps), DATA (uncompressed bytes held in memory), COMPR (their "
                       "compressed size), MEMORY (pool memory they take), the algorithm and the "
                       "pages in file tiers.")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--bytes", action="store_true", help="sizes in bytes, not KiB/MiB/GiB")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stats", help="show statistics of a mount or of one device",
                       description="Print the statistics of a swapfs mount (its user.swapfs.stats "
                       "xattr) or of one device file.  --format prometheus writes the Prometheus "
                       "text format for node_exporter's textfile collector, e.g. "
                       "'swapfs stats /run/swapfs/main --format prometheus > "
                       "/var/lib/node_exporter/swapfs.prom.$$ && mv ... swapfs.prom'.")
    p.add_argument("path", metavar="MOUNT|DEVICE_FILE")
    p.add_argument("--format", choices=["table", "json", "prometheus"], default="table")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("writeback", help="move cold pages down to the file tiers now",
                       description="Ask the daemon to move pages from the pool down to the file "
                       "tiers now, and print what moved.  On the mount: every device; on a device "
                       "file: that device.  Examples: swapfs writeback /run/swapfs 1000; "
                       "swapfs writeback /run/swapfs --idle 300")
    p.add_argument("path", metavar="MOUNT|DEVICE_FILE")
    p.add_argument("pages", nargs="?", type=int, metavar="N", help="move up to N of the coldest pool pages")
    p.add_argument("--idle", type=float, metavar="SECONDS",
                   help="move every pool page not accessed for SECONDS")
    p.set_defaults(func=cmd_writeback)

    p = sub.add_parser("compact", help="compact the pool now: move objects out of sparse spans",
                       description="Ask the daemon to compact its compressed pool now: objects "
                       "move out of the sparsest spans into fuller ones and the emptied spans' "
                       "memory goes back to the system.  Writeback also compacts on its own when "
                       "holes pass 10%% of the pool.  Example: swapfs compact /run/swapfs")
    p.add_argument("mount", metavar="MOUNT")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("top", help="a live view of a mount, once a second",
                       description="Tiers, traffic, moves, promotions, refaults and cache hits of a "
                       "mount, refreshed every --interval seconds (plain terminal; ssh is fine).")
    p.add_argument("mount", metavar="MOUNT")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")
    p.add_argument("--count", type=int, metavar="N", help="stop after N frames")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("record", help="record stats samples as JSON lines",
                       description="Append one JSON line per --interval to FILE: "
                       '{"time": UNIX_SECONDS, "mount": MOUNT, "stats": {the stats object}}. '
                       "Stops after --count samples, at Ctrl-C, or when the mount goes away. "
                       "Example: swapfs record /run/swapfs -o run.jsonl --interval 0.5")
    p.add_argument("mount", metavar="MOUNT")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="JSON lines file ('-': stdout)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")
    p.add_argument("--count", type=int, metavar="N")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("plot", help="draw a recording: tier occupancy and traffic (needs matplotlib)",
                       description="Draw a 'swapfs record' file as a PNG: the pages of each tier over "
                       "time, and swap-out, swap-in, writeback and promotion rates.  matplotlib is "
                       "an optional extra: pip install 'swapfs[plot]'.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="PNG")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("check-config", help="validate a configuration file",
                       description="Parse and validate a configuration as 'swapfs mount' would.")
    p.add_argument("config", nargs="?", metavar="FILE", help="TOML file (default: the embedded one)")
    p.add_argument("--print-default", action="store_true", help="print the embedded default configuration")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("install-units", help="install the systemd generator, unit and /usr/local/bin/swapfs",
                       description="Install /usr/local/bin/swapfs (a symlink to this installation's "
                       "swapfs), the unit template swapfs@.service and the generator swapfs-generator "
                       "under /usr/local/lib/systemd, and create /etc/swapfs; then systemctl "
                       "daemon-reload.  At boot the generator turns each /etc/swapfs/NAME.toml into "
                       "swapfs@NAME.service and a swap unit per device with swap = true.")
    p.add_argument("--root", default="/", metavar="DIR", help="install under DIR instead of / (staging)")
    p.add_argument("--target", metavar="PATH", help="the swapfs executable to link (default: this one)")
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
