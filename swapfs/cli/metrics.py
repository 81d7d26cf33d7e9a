"""``swapfs metrics``: the stats of every swapfs mount on the machine (or of
the mounts named) in one Prometheus text exposition, for node_exporter's
textfile collector.

Each mount is rendered by ``swapfs.stats.prometheus_text`` (the same text as
``swapfs stats MOUNT --format prometheus``); the renderings are merged so
that every family appears once, its samples from all mounts together (the
text format allows one HELP and TYPE per family per file).  ``swapfs_up``
says per mount whether its daemon answered within ``--timeout``: a stopped
or dead daemon is a 0 there, not a family that silently disappears.

``--output FILE`` writes atomically: a temporary file in FILE's directory
(named ``.FILE.*``: node_exporter reads only ``*.prom``), mode 0644 so that
node_exporter's user can read it, renamed over FILE.  The collector unit
(``swapfs-textfile.service``, see swapfs.units) runs exactly this.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import tempfile
from typing import Any

from .. import system
from ..stats import prometheus_text
from .common import EXIT_FAIL, EXIT_OK, die

DEFAULT_TIMEOUT = 2.0
UP_HELP = "# HELP swapfs_up Whether the mount's daemon answered (1) or not (0) when the metrics were read"


def merge(texts: list[str]) -> str:
    """Prometheus texts as one: each family's HELP and TYPE once, then the
    samples of every text, families in first-seen order."""
    families: dict[str, dict[str, Any]] = {}
    for text in texts:
        name = ""
        for line in text.splitlines():
            parts = line.split(" ", 3)
            if line.startswith("# ") and len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                fam = families.setdefault(name, {"HELP": None, "TYPE": None, "samples": []})
                fam[parts[1]] = fam[parts[1]] or line
            elif line.strip() and not line.startswith("#"):
                sample = line.split("{", 1)[0].split(" ", 1)[0]
                if sample != name:  # a sample outside its family's block (none of ours)
                    name = sample
                families.setdefault(name, {"HELP": None, "TYPE": None, "samples": []})["samples"].append(line)
    out = []
    for fam in families.values():
        out += [fam[k] for k in ("HELP", "TYPE") if fam[k]] + fam["samples"]
    return "".join(line + "\n" for line in out)


def _why(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return "the daemon is not answering"
    if isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:
        return "the daemon is gone"
    if isinstance(exc, OSError) and exc.errno in (errno.ENODATA, errno.ENOTSUP):
        return "not a swapfs mount"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"malformed stats ({exc})"


def collect(mounts: list[str], timeout: float) -> tuple[str, list[str]]:
    """(the merged text of ``mounts``, one line per mount that did not answer)."""
    texts, problems, up = [], [], []
    for mount in mounts:
        try:
            stats = system.read_stats(mount, timeout=timeout)
        except (OSError, ValueError) as exc:
            problems.append(f"{mount}: {_why(exc)}")
            up.append((mount, 0))
            continue
        texts.append(prometheus_text(stats, mount))
        up.append((mount, 1))
    if up:
        lines = [UP_HELP, "# TYPE swapfs_up gauge"]
        lines += [f'swapfs_up{{mount="{_label(m)}"}} {v}' for m, v in up]
        texts.append("\n".join(lines) + "\n")
    return merge(texts), problems


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def write_atomically(path: str, text: str) -> None:
    """``text`` into ``path`` by a rename: a reader sees the old file or the new one, whole."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_metrics(args: argparse.Namespace) -> int:
    mounts = [os.path.abspath(m) for m in args.mounts] if args.mounts else system.swapfs_mounts()
    text, problems = collect(mounts, args.timeout)
    if args.output == "-":
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            from .top import quiet_broken_pipe

            return quiet_broken_pipe()
    else:
        try:
            write_atomically(args.output, text)
        except OSError as exc:
            return die(f"cannot write {args.output}: {exc.strerror or exc}")
    for problem in problems:
        print(f"swapfs: {problem} (swapfs_up 0)", file=sys.stderr)
    return EXIT_FAIL if problems else EXIT_OK


def add_parser(sub: Any) -> None:
    from .common import positive_seconds

    p = sub.add_parser("metrics", help="every mount's stats for Prometheus (node_exporter's textfile collector)",
                       description="The stats of every swapfs mount on this machine (or of the MOUNTs "
                       "named) in the Prometheus text format, one family each with the samples of all "
                       "mounts, plus swapfs_up{mount} (1: the daemon answered within --timeout, 0: "
                       "not).  -o FILE writes FILE atomically (a temporary file beside it, renamed), "
                       "as the unit swapfs-textfile.service does every 15 s into "
                       "/var/lib/prometheus/node-exporter/swapfs.prom.  Exits 1 if a mount did "
                       "not answer (the file is written all the same).")
    p.add_argument("mounts", nargs="*", metavar="MOUNT", help="default: every swapfs mount")
    p.add_argument("-o", "--output", default="-", metavar="FILE", help="the file to write atomically (default: - for stdout)")
    p.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for each daemon (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=cmd_metrics)
