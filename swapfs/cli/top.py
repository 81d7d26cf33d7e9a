"""``swapfs top``: a live view of one mount in a terminal.

Per device and per tier: what is stored, the memory it takes, the two
compression ratios, the memory saved against keeping the pages uncompressed,
and a one-line history (sparkline) of the traffic; then moves, promotions,
refaults and the swap cache.  The frame is built from the stats object alone
(``frame``), so any field a tier's record gains shows up in its detail line.

The terminal: on a tty, top draws in the alternate screen, reads keys in
cbreak mode (``q`` quits) and puts the terminal back as it found it on every
way out (q, Ctrl-C, SIGTERM, SIGHUP, an error; Ctrl-Z restores it until
``fg``).  Colour only on a tty, never with ``NO_COLOR`` set or ``TERM=dumb``
(``--color`` decides otherwise).  Into a pipe it writes plain frames separated
by a blank line, and when the reader goes away (``swapfs top | head``) it ends
quietly with status 0: the reader having had enough is how top ends in a pipe.

The stats are read in a thread, so a daemon that does not answer (stopped,
stuck) neither freezes the screen nor the q key: the frame says how long it
has been waiting.  Drawing into a pipe, top gives up after
``PIPE_TIMEOUT`` seconds with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import system
from ..kernel import PAGE_SIZE as PAGE
from .common import EXIT_OK, die, fmt_bytes, stats_error

HISTORY = 30  # samples a sparkline shows
PIPE_TIMEOUT = 10.0  # seconds a daemon may take to answer when nobody watches the screen

SPARK_UNICODE = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-=+*#@"

# ANSI SGR codes, used only when colour is on
BOLD, DIM, RED, GREEN, YELLOW, CYAN = "1", "2", "31", "32", "33", "36"

# tier fields already in the tier table, or settings rather than measurements:
# everything else a tier's record has goes to its detail line
_TIER_SHOWN = {"kind", "priority", "path", "algorithm", "recompress", "stored_pages", "compressed_bytes",
               "pool_bytes", "disk_bytes", "max_bytes", "capacity_pages", "read_bytes", "written_bytes",
               "classes", "checksum_errors", "io_errors", "full", "encrypted"}


# -- what a frame shows ----------------------------------------------------------


def sparkline(values: list[float], chars: str = SPARK_UNICODE) -> str:
    """One character per value: the lowest for zero, then scaled to the
    largest value shown (any non-zero value gets at least the second step)."""
    top = max(values, default=0.0)
    out = []
    for v in values:
        if v <= 0 or top <= 0:
            out.append(chars[0])
        else:
            out.append(chars[max(1, min(len(chars) - 1, round(v / top * (len(chars) - 1))))])
    return "".join(out)


def ratios(data: float, compressed: float, memory: float) -> tuple[float | None, float | None, float]:
    """(compression ratio, memory ratio, memory saved) of pages holding
    ``data`` uncompressed bytes, ``compressed`` bytes of payload and taking
    ``memory`` bytes: the zram ratio ``orig_data_size / compr_data_size``, the
    memory one ``orig_data_size / mem_used_total`` (None when there is
    nothing to divide by) and ``data - memory``."""
    comp = data / compressed if compressed > 0 else None
    mem = data / memory if memory > 0 else None
    return comp, mem, data - memory


@dataclass
class History:
    """Per-interval rates of the counters top draws, HISTORY samples each."""

    series: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.series.setdefault(key, deque(maxlen=HISTORY)).append(value)

    def get(self, key: str) -> list[float]:
        return list(self.series.get(key, ()))


def _num(d: dict[str, Any], key: str) -> float:
    v = d.get(key, 0)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _rate(prev: dict[str, Any] | None, cur: dict[str, Any], key: str, dt: float) -> float:
    if prev is None or dt <= 0:
        return 0.0
    return max(0.0, _num(cur, key) - _num(prev, key)) / dt


def _value(key: str, v: Any) -> str:
    """A field of a record with its unit."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    if key.endswith("_bytes") and isinstance(v, int):
        return fmt_bytes(v)
    return str(v)


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


class Style:
    """ANSI colour, or none."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, text: str, *codes: str) -> str:
        if not self.on or not codes or not text:
            return text
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m"

    def ratio(self, text: str, r: float | None) -> str:
        if r is None:
            return self(text, DIM)
        return self(text, GREEN if r >= 2 else YELLOW if r >= 1 else RED)

    def use(self, text: str, share: float | None) -> str:
        if share is None:
            return text
        return self(text, RED if share >= 0.95 else YELLOW if share >= 0.8 else GREEN)


def _pad(cell: str, plain: str, width: int, left: bool) -> str:
    """``cell`` (maybe coloured) padded as its plain text would be."""
    fill = " " * max(0, width - len(plain))
    return cell + fill if left else fill + cell


def _table(rows: list[list[tuple[str, str]]], left: set[int]) -> list[str]:
    """Rows of (styled, plain) cells aligned on the plain text."""
    widths = [max(len(r[i][1]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(_pad(c, p, w, i in left) for i, ((c, p), w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _wrap(prefix: str, items: list[str], width: int) -> list[str]:
    lines, line = [], prefix
    for item in items:
        sep = "" if line == prefix else ", "
        if line != prefix and len(line) + len(sep) + len(item) > width:
            lines.append(line)
            line, sep = " " * len(prefix), ""
        line += sep + item
    if line.strip():
        lines.append(line)
    return lines


def frame(mount: str, prev: dict[str, Any] | None, cur: dict[str, Any], dt: float, hist: History,
          *, style: Style, spark: str = SPARK_UNICODE, width: int = 100, interval: float = 1.0,
          waiting: float = 0.0) -> list[str]:
    """The lines of one frame; records this interval's rates in ``hist``."""
    s = style
    tot, wb, cache = cur.get("totals", {}), cur.get("writeback", {}), cur.get("cache", {})
    ptot = prev.get("totals", {}) if prev else None
    head = f"swapfs top {mount}   {time.strftime('%H:%M:%S')}   every {interval:g} s   (q or Ctrl-C to quit)"
    lines = [s(head, BOLD)]
    if waiting:
        lines.append(s(f"(daemon not answering for {waiting:.0f} s: showing its last answer)", RED, BOLD))
    data = _num(tot, "orig_data_size")
    comp, mem, saved = ratios(data, _num(tot, "compr_data_size"), _num(tot, "mem_used_total"))
    lines.append(
        f"memory: {fmt_bytes(data)} of data in memory takes {fmt_bytes(_num(tot, 'mem_used_total'))} "
        f"(compressed {s.ratio(_ratio(comp), comp)}, memory {s.ratio(_ratio(mem), mem)}), "
        f"saved {s(fmt_bytes(max(0.0, saved)), BOLD)}; peak {fmt_bytes(_num(tot, 'mem_used_max'))}, "
        f"tables {fmt_bytes(_num(tot, 'metadata_bytes'))}")
    lines.append("")

    # devices
    rows = [[(s(h, BOLD), h) for h in ("DEVICE", "SIZE", "PAGES", "DATA", "MEMORY", "COMPR", "MEM",
                                       "SAVED", "FILE", "IN/s", "OUT/s", f"TRAFFIC ({HISTORY} x {interval:g} s)")]]
    pdevs = prev.get("devices", {}) if prev else {}
    for name, d in cur.get("devices", {}).items():
        pd = pdevs.get(name)
        w_in, r_out = _rate(pd, d, "written_bytes", dt), _rate(pd, d, "read_bytes", dt)
        hist.add(f"dev:{name}", w_in + r_out)
        data = _num(d, "orig_data_size")
        memory = _num(d, "mem_used_total") or _num(d, "pool_bytes")
        comp, mem, saved = ratios(data, _num(d, "compr_data_size"), memory)
        cells = [name, fmt_bytes(_num(d, "size_bytes")), str(int(_num(d, "stored_pages"))), fmt_bytes(data),
                 fmt_bytes(memory), _ratio(comp), _ratio(mem), fmt_bytes(max(0.0, saved)),
                 str(int(_num(d, "file_pages"))), fmt_bytes(w_in), fmt_bytes(r_out)]
        line = sparkline(hist.get(f"dev:{name}"), spark).rjust(HISTORY)
        styled = list(cells)
        styled[5], styled[6] = s.ratio(cells[5], comp), s.ratio(cells[6], mem)
        rows.append([*zip(styled, cells), (s(line, CYAN), line)])
    lines += _table(rows, left={0, 11})
    lines.append("")

    # tiers
    rows = [[(s(h, BOLD), h) for h in ("TIER", "KIND", "PAGES", "DATA", "HELD", "LIMIT", "USE", "RATIO",
                                       "IN/s", "OUT/s", "ERR", f"PAGES ({HISTORY} x {interval:g} s)")]]
    details: list[str] = []
    ptiers = prev.get("tiers", {}) if prev else {}
    for name, t in cur.get("tiers", {}).items():
        pt = ptiers.get(name)
        pages = _num(t, "stored_pages")
        hist.add(f"tier:{name}", pages)
        kind = str(t.get("kind", ""))
        held = _num(t, "pool_bytes") if "pool_bytes" in t else _num(t, "disk_bytes")
        limit = _num(t, "max_bytes") if "max_bytes" in t else _num(t, "capacity_pages") * PAGE
        share = held / limit if kind == "pool" and limit else pages / (limit / PAGE) if limit else None
        ratio = (pages * PAGE / held) if "compressed_bytes" in t and held else None
        has_io = "written_bytes" in t
        w_in, r_out = _rate(pt, t, "written_bytes", dt), _rate(pt, t, "read_bytes", dt)
        errors = int(_num(t, "checksum_errors") + _num(t, "io_errors"))
        cells = [name, kind, str(int(pages)), fmt_bytes(pages * PAGE), fmt_bytes(held), fmt_bytes(limit),
                 "-" if share is None else f"{share:.0%}", _ratio(ratio),
                 fmt_bytes(w_in) if has_io else "-", fmt_bytes(r_out) if has_io else "-", str(errors)]
        styled = list(cells)
        styled[6] = s.use(cells[6], share)
        styled[7] = s.ratio(cells[7], ratio)
        styled[10] = s(cells[10], RED, BOLD) if errors else cells[10]
        line = sparkline(hist.get(f"tier:{name}"), spark).rjust(HISTORY)
        rows.append([*zip(styled, cells), (s(line, CYAN), line)])
        extra = [f"{k} {_value(k, v)}" for k, v in t.items()
                 if k not in _TIER_SHOWN and not isinstance(v, (dict, list, str)) and v]
        flags = [k for k in ("full", "encrypted") if t.get(k) is True]
        if extra or flags:
            details += [s(x, DIM) for x in _wrap(f"  {name}: ", flags + extra, width)]
    lines += _table(rows, left={0, 1, 11})
    lines += details
    lines.append("")

    # traffic and moves
    rates = {
        "in": _rate(ptot, tot, "written_bytes", dt), "out": _rate(ptot, tot, "read_bytes", dt),
        "moved": _rate(prev.get("writeback") if prev else None, wb, "moved_pages", dt) * PAGE,
        "promoted": _rate(prev.get("writeback") if prev else None, wb, "promotions", dt) * PAGE,
    }
    for key, v in rates.items():
        hist.add(key, v)
    for label, key in (("swap-out (writes)", "in"), ("swap-in (reads)  ", "out"),
                       ("moved down       ", "moved"), ("promoted         ", "promoted")):
        line = sparkline(hist.get(key), spark).rjust(HISTORY)
        lines.append(f"{label} {fmt_bytes(rates[key]) + '/s':>12}  {s(line, CYAN)}")
    pwb = prev.get("writeback") if prev else None
    pcache = prev.get("cache") if prev else None
    lines.append(
        f"moves: {int(_num(wb, 'moved_pages'))} pages down ({fmt_bytes(_num(wb, 'moved_bytes'))}), "
        f"{int(_num(wb, 'aborted_moves'))} aborted, promotions {int(_num(wb, 'promotions'))} "
        f"({_rate(pwb, wb, 'promotions', dt):.0f}/s), refaults {int(_num(wb, 'refaults'))} "
        f"({_rate(pwb, wb, 'refaults', dt):.0f}/s)")
    lines.append(
        f"cache: {int(_num(cache, 'pages'))} pages, hits {_rate(pcache, cache, 'hits', dt):.0f}/s, "
        f"misses {_rate(pcache, cache, 'misses', dt):.0f}/s; discards {_rate(ptot, tot, 'discards', dt):.0f}/s")
    return lines


# -- the terminal ------------------------------------------------------------------


def color_wanted(choice: str, stream: TextIO) -> bool:
    if choice != "auto":
        return choice == "always"
    if os.environ.get("NO_COLOR"):  # no-color.org: set and not empty
        return False
    return stream.isatty() and os.environ.get("TERM", "") not in ("", "dumb")


def spark_chars(stream: TextIO) -> str:
    try:
        SPARK_UNICODE.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return SPARK_ASCII
    return SPARK_UNICODE


class _Quit(Exception):
    """A signal asked top to end (the terminal is restored on the way out)."""


class Screen:
    """The terminal while top draws: alternate screen, hidden cursor and keys
    in cbreak mode on a tty; nothing on a pipe.  ``restore`` is safe to call
    any number of times."""

    # alternate screen, cursor hidden, no line wrap (a line wider than the
    # terminal is cut, not wrapped over the next one); and back
    ENTER = "\x1b[?1049h\x1b[?25l\x1b[?7l"
    LEAVE = "\x1b[?7h\x1b[?25h\x1b[?1049l"

    def __init__(self, out: TextIO, keys_fd: int | None) -> None:
        self.out = out
        # a terminal that can move its cursor (TERM=dumb gets plain frames, as a pipe does)
        self.tty = out.isatty() and os.environ.get("TERM", "") != "dumb"
        self.keys_fd = keys_fd if keys_fd is not None and os.isatty(keys_fd) else None
        self.saved: list[Any] | None = None
        self.active = False

    def enter(self) -> None:
        if self.keys_fd is not None:
            self.saved = termios.tcgetattr(self.keys_fd)
            tty.setcbreak(self.keys_fd, termios.TCSANOW)
        if self.tty:
            self.out.write(self.ENTER)
            self.out.flush()
        self.active = True

    def restore(self) -> None:
        if not self.active:
            return
        self.active = False
        if self.saved is not None and self.keys_fd is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.keys_fd, termios.TCSADRAIN, self.saved)
        if self.tty:
            with contextlib.suppress(OSError, ValueError):
                self.out.write(self.LEAVE)
                self.out.flush()

    def draw(self, lines: list[str]) -> None:
        if self.tty:
            rows = 50
            with contextlib.suppress(OSError):
                rows = os.get_terminal_size(self.out.fileno()).lines
            shown = lines[: max(1, rows - 1)]
            self.out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in shown) + "\x1b[J")
        else:
            self.out.write("\n".join(lines) + "\n\n")
        self.out.flush()

    def width(self) -> int:
        if self.tty:
            with contextlib.suppress(OSError):
                return os.get_terminal_size(self.out.fileno()).columns
        return 100


@contextlib.contextmanager
def _signals(screen: Screen) -> Iterator[None]:
    """SIGTERM and SIGHUP end top through its finally clauses; Ctrl-Z (SIGTSTP)
    gives the terminal back until the shell continues top."""

    def quit_(signum: int, _frame: Any) -> None:
        raise _Quit(signum)

    def stop(_signum: int, _frame: Any) -> None:
        was = screen.active
        screen.restore()
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT
        signal.signal(signal.SIGTSTP, stop)
        if was:
            screen.enter()

    old = {sig: signal.signal(sig, handler) for sig, handler in
           ((signal.SIGTERM, quit_), (signal.SIGHUP, quit_), (signal.SIGTSTP, stop))}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _Fetch:
    """One stats read in a thread; ``wake_fd`` becomes readable when it is done."""

    def __init__(self, mount: str, wake_fd: int) -> None:
        self.started = time.monotonic()
        self.result: dict[str, Any] | Exception | None = None
        self._wake = wake_fd
        threading.Thread(target=self._run, args=(mount,), daemon=True).start()

    def _run(self, mount: str) -> None:
        try:
            self.result = system.read_stats(mount)
        except (OSError, ValueError) as exc:
            self.result = exc
        with contextlib.suppress(OSError):
            os.write(self._wake, b"x")


def quiet_broken_pipe() -> int:
    """The reader of stdout went away: nothing more to say, and nothing for
    the interpreter to fail on when it flushes stdout at exit."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    mount = os.path.abspath(args.mount)
    out = sys.stdout
    stdin_fd: int | None = None
    with contextlib.suppress(AttributeError, ValueError, OSError):
        stdin_fd = sys.stdin.fileno()
    screen = Screen(out, stdin_fd if out.isatty() else None)
    style = Style(color_wanted(args.color, out))
    spark = spark_chars(out)
    count = 1 if args.once else args.count
    wake_r, wake_w = os.pipe()
    hist = History()
    prev: dict[str, Any] | None = None
    prev_at = 0.0
    frames = 0
    try:
        with _signals(screen):
            screen.enter()
            fetch: _Fetch | None = _Fetch(mount, wake_w)
            next_tick = time.monotonic() + args.interval
            while True:
                fds = [wake_r] + ([screen.keys_fd] if screen.keys_fd is not None else [])
                now = time.monotonic()
                ready, _, _ = select.select(fds, [], [], max(0.0, next_tick - now))
                if screen.keys_fd is not None and screen.keys_fd in ready:
                    keys = os.read(screen.keys_fd, 64)
                    if not keys:  # end of input: no more keys to wait for
                        screen.keys_fd = None
                    elif b"q" in keys.lower():
                        return EXIT_OK
                if wake_r in ready:
                    os.read(wake_r, 64)
                now = time.monotonic()
                if fetch is not None and fetch.result is not None:
                    result, fetch = fetch.result, None
                    if isinstance(result, Exception):
                        screen.restore()
                        return stats_error(mount, result)
                    lines = frame(mount, prev, result, now - prev_at if prev else 0.0, hist, style=style,
                                  spark=spark, width=screen.width(), interval=args.interval)
                    screen.draw(lines)
                    prev, prev_at = result, now
                    frames += 1
                    if count is not None and frames >= count:
                        return EXIT_OK
                elif fetch is not None and now >= next_tick:
                    waited = now - fetch.started
                    if not screen.tty and waited >= PIPE_TIMEOUT:
                        return die(f"{mount}: the swapfs daemon is not answering (waited {waited:.0f} s)")
                    if screen.tty and waited < 1.0:
                        pass  # a slow answer, not yet worth a word
                    elif screen.tty and prev is not None:
                        screen.draw(frame(mount, None, prev, 0.0, copy.deepcopy(hist), style=style, spark=spark,
                                          width=screen.width(), interval=args.interval, waiting=waited))
                    elif screen.tty:
                        screen.draw([style(f"swapfs top {mount}   (q or Ctrl-C to quit)", BOLD),
                                     style(f"(daemon not answering for {waited:.0f} s)", RED, BOLD)])
                if now >= next_tick:
                    next_tick += args.interval * max(1, int((now - next_tick) / args.interval) + 1)
                    if fetch is None:
                        fetch = _Fetch(mount, wake_w)
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (KeyboardInterrupt, _Quit):
        return EXIT_OK
    finally:
        screen.restore()
        os.close(wake_r)
        # wake_w stays open: a fetch still waiting for a stopped daemon may write to it

