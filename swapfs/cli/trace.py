"""swapfs trace record and swapfs trace replay: requests recorded by a live
daemon (through its control xattr, into a file the daemon opens), and a
recorded trace replayed through an in-process store (swapfs/replay.py)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import threading
from typing import Any

from .. import system
from ..config import POLICY_NAMES, ConfigError, load_config
from ..stats import CTL_TRACE_XATTR
from ..trace import TraceError
from .common import DEFAULT_TIMEOUT, EXIT_GONE, EXIT_NOT_ANSWERING, EXIT_OK, EXIT_USAGE, die, fmt_bytes


def _status(mount: str) -> list[str]:
    raw = system.bounded(lambda: os.getxattr(mount, CTL_TRACE_XATTR), DEFAULT_TIMEOUT, mount)
    return raw.decode().split()


def _control(mount: str, value: bytes) -> None:
    """The trace control of ``mount`` set to ``value``, within DEFAULT_TIMEOUT (a stopped
    daemon blocks the call in the kernel)."""
    system.bounded(lambda: os.setxattr(mount, CTL_TRACE_XATTR, value), DEFAULT_TIMEOUT, mount)


def _failed(what: str, mount: str, exc: OSError) -> int:
    if isinstance(exc, TimeoutError):
        return die(f"{what}: the swapfs daemon of {mount} is not answering (stopped or stuck? "
                   "see swapfs status)", EXIT_NOT_ANSWERING)
    if exc.errno == errno.ENOTCONN:
        return die(f"{what}: the swapfs daemon of {mount} is gone", EXIT_GONE)
    return die(f"{what}: {exc.strerror}")


def cmd_record(args: argparse.Namespace) -> int:
    mount = os.path.abspath(args.mount)
    if system.mount_of(mount) != mount:
        return die(f"{mount} is not a swapfs mount (give the mount, not a device file)")
    if args.seconds is not None and args.seconds <= 0:
        return die(f"--seconds {args.seconds:g}: must be positive", EXIT_USAGE)
    # The daemon opens the file itself: resolve it here (this process may
    # look at the mount, the daemon must never), and never inside the mount.
    out = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(args.output))),
                       os.path.basename(args.output))
    if out == mount or out.startswith(mount.rstrip("/") + "/"):
        return die(f"{out}: the trace cannot be written into the mount it records")
    if os.path.lexists(out):
        if not args.force:
            return die(f"{out} exists (--force replaces it)")
        if not os.path.isfile(out) or os.path.islink(out):
            return die(f"{out} exists and is not a regular file")
        os.unlink(out)
    try:
        _control(mount, os.fsencode(out))
    except OSError as exc:
        return _failed(f"cannot start a trace of {mount} into {out}", mount, exc)
    print(f"recording the requests of {mount} into {out}"
          + (f" for {args.seconds:g} s" if args.seconds else " until interrupted (Ctrl-C)"))
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: stop.set())
    old_term = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait(args.seconds)
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
        try:
            _control(mount, b"stop")
            status = _status(mount)
        except OSError as exc:
            return _failed(f"cannot stop the trace of {mount}", mount, exc)
    recorded, dropped = (int(w) for w in status[-2:])
    size = os.path.getsize(out) if os.path.exists(out) else 0
    print(f"{recorded} requests recorded ({fmt_bytes(size)}), {dropped} dropped")
    return EXIT_OK


FIELDS = (("pages_written", "pages written"), ("pages_read", "pages read"),
          ("moves", "moves (pages demoted)"), ("promotions", "promotions"),
          ("refaults", "refaults"), ("wasted_promotions", "wasted promotions"),
          ("pool_hit_rate", "pool hit rate"), ("moves_per_page_written", "moves per page written"),
          ("promotions_per_refault", "promotions per refault"),
          ("cpu_seconds", "store CPU (s)"), ("wall_seconds", "wall (s)"),
          ("trace_seconds", "trace time (s)"), ("wrong_pages", "wrong pages"),
          ("errors", "requests refused"))


def cmd_replay(args: argparse.Namespace) -> int:
    from ..replay import replay

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return die(str(exc))
    try:
        res = replay(args.trace, config, policy=args.policy, corpus=args.corpus,
                     verify=not args.no_verify)
    except (TraceError, OSError) as exc:
        return die(f"{args.trace}: {exc}")
    d: dict[str, Any] = res.to_dict()
    if args.json:
        print(json.dumps(d, sort_keys=True))
    else:
        print(f"{args.trace} under policy {res.policy}: {res.requests} requests")
        for key, label in FIELDS:
            v = d[key]
            print(f"  {label:<26}{v:.4f}" if isinstance(v, float) else f"  {label:<26}{v}")
        for name, n in res.tier_written_bytes.items():
            print(f"  {'written to ' + name:<26}{fmt_bytes(n)}")
    return EXIT_OK if not res.wrong_pages else 1


def cmd_trace(args: argparse.Namespace) -> int:
    args.trace_parser.print_help()
    return EXIT_USAGE


def add_parsers(sub: Any) -> None:
    """Add the parser of trace (record, replay) to the subparsers ``sub``."""
    p = sub.add_parser("trace", help="record a mount's requests; replay them under a policy",
                       description="Record every request a mount serves into a compact binary "
                       "file, or replay such a file through an in-process store to compare "
                       "tiering policies (docs/policy.md).")
    p.set_defaults(func=cmd_trace, trace_parser=p)
    tsub = p.add_subparsers(dest="trace_command", metavar="record|replay")
    r = tsub.add_parser("record", help="record a mount's requests into a file",
                        description="Ask the daemon of MOUNT to record every request (time, "
                        "operation, device, page range, the tier holding a read page) into "
                        "FILE, which it creates (never in the mount), until --seconds pass or "
                        "Ctrl-C.  Example: swapfs trace record /run/swapfs -o /var/tmp/a.trace "
                        "--seconds 60")
    r.add_argument("mount", metavar="MOUNT")
    r.add_argument("-o", "--output", required=True, metavar="FILE")
    r.add_argument("--seconds", type=float, metavar="N", help="stop after N seconds")
    r.add_argument("--force", action="store_true", help="replace FILE if it exists")
    r.set_defaults(func=cmd_record)
    r = tsub.add_parser("replay", help="replay a trace through an in-process store",
                        description="Drive a store of the configuration CFG (no FUSE, no "
                        "kernel; file tiers in a temporary directory) through the requests of "
                        "FILE in the trace's time on a virtual clock, as fast as the store "
                        "goes, and print pages written, moves, promotions, refaults, wasted "
                        "promotions, the pool hit rate, bytes written per tier and the store's "
                        "CPU time.  Every read is checked.")
    r.add_argument("trace", metavar="FILE")
    r.add_argument("--config", required=True, metavar="CFG")
    r.add_argument("--policy", choices=POLICY_NAMES,
                   help="the tiering policy (default: the configuration's [writeback] policy)")
    r.add_argument("--corpus", metavar="FILE",
                   help="take page contents from a corpus of real memory (scripts/corpus)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--no-verify", action="store_true", help="do not check the pages read")
    r.set_defaults(func=cmd_replay)
