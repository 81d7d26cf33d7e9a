"""The manual pages and shell completions, rendered at build time (scripts/package):

- swapfs(8) from the argparse definitions (``build_parser()``) by argparse-manpage;
- swapfs.toml(5) from the configuration contract in swapfs/config.py: the keys of each
  table are the fields of PoolConfig, DeviceConfig and TierConfig (what the parser
  accepts), every key's default is checked against what ``parse_config`` makes of a file
  without it, the limits and choices are config.py's constants; only the prose is here,
  and a key without prose (or prose for a key the parser refuses) stops the build;
- bash and zsh completions from the same parser by shtab.

argparse-manpage and shtab are build-only dependencies (the ``package`` extra): they are
imported here, in functions, and nothing of the daemon or the other commands imports this
module.  ``python -m swapfs.cli.manual OUTDIR`` writes all four files.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from .. import __version__, config

REQUIRED = "required"
NONE = "none"
DROP = "<drop>"  # in a Key's context: the key is left out of the smallest file that loads


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # what the value is, for the reader
    default: str  # a TOML value as written in a file, REQUIRED, or NONE (the field is None)
    text: str  # what it does
    context: str = ""  # TOML lines of the same table that the key needs beside it


SIZE = "size"
RATIO = "number in (0, 1]"

# The prose of each table's keys, in the order the page lists them.
POOL_KEYS = (
    Key("algorithm", "string", '"lz4"',
        "The codec of the compressed pool: {algorithms}. lz4 is the fast one; zstd holds the "
        "same pages in about two thirds of the memory and costs more CPU on every swap-in."),
    Key("level", "integer", "1",
        "The zstd level ({zstd_min}..{zstd_max}), for the pool's codec or for recompress; "
        "ignored for lz4."),
    Key("max_bytes", SIZE + " or share of RAM", '"20%"',
        "The memory the pool may hold, fragmentation included: bytes, a size such as "
        '"512M", or a share of the machine\'s RAM such as "10%". At least {min_pool}, at '
        "most the machine's RAM (the pool is locked in memory: it cannot itself be swapped)."),
    Key("accept_ratio", RATIO, "0.8",
        "A page stays in the pool only if it compresses to this share of 4096 bytes or less; "
        "one that does not goes to a file tier, or is kept raw in the pool when there is none."),
    Key("high_watermark", RATIO, "0.9",
        "With file tiers: writeback starts moving the coldest pages down when the pool holds "
        "more than this share of max_bytes ..."),
    Key("low_watermark", RATIO, "0.8",
        "... and stops once it holds less than this share. Must be below high_watermark. "
        "Both watermarks are applied again when the daemon re-reads the file (SIGHUP)."),
    Key("recompress", "string", NONE,
        "A denser codec ({algorithms}, not the pool's own) that pages left idle for "
        "recompress_after are recompressed with, in small steps of the writeback task; "
        "devices with writeback = false are left alone."),
    Key("recompress_after", "duration", '"10m"',
        "How long a page stays idle before recompress takes it. Only with recompress.",
        context='recompress = "zstd"'),
    Key("dedup", "boolean", "false",
        "true: equal pages share one compressed object (found by an xxh3 index, confirmed by "
        "comparing the bytes). Worth it only for workloads with many equal pages: the index "
        "costs memory per stored object."),
    Key("expected_ratio", "number from 1 to 64", "2.5",
        "The memory ratio (uncompressed bytes per byte stored) assumed where none is measured "
        "yet; the default is the codec's, 2.5 for lz4 and 3.5 for zstd. check-config and mount "
        "warn when the devices total more than max_bytes and the file tiers' sizes at this "
        "ratio; the stats' headroom, and so the swap area of swapfs swapon, use it while the "
        "pool or a tier holds nothing."),
)

DEVICE_KEYS = (
    Key("name", "string", REQUIRED,
        "The device file's name in the mount: at most {max_name} bytes of printable characters, "
        "no slash. Two names that the stats would render alike are refused."),
    Key("size", SIZE, REQUIRED,
        "The device's size, a multiple of 4096 bytes, at most {max_pages} pages. It never "
        "changes while mounted. A slot table is reserved for the whole device and backed only "
        "where pages are stored."),
    Key("writeback", "boolean", "true",
        "false: this device's pages never leave memory (no writeback, no recompression)."),
    Key("swap", "boolean", "false",
        "Read by the systemd generator only: true turns swap on over this device at boot "
        "(swapfs-swap@NAME-DEVICE.service)."),
    Key("swap_priority", "integer", NONE,
        "The swap priority the generator's unit passes to swapon (-1..32767); without it, the "
        "kernel's default."),
    Key("discard", "string", '"both"',
        "The swapon discard policy of the generator's unit: {discards}. swapfs learns of freed "
        "slots only through discards: keep both."),
)

_REDIS = f'kind = "redis"\npath = {DROP}'
_REDIS_SEEDED = _REDIS + '\nseeds = ["127.0.0.1:7000"]'

TIER_KEYS = (
    Key("name", "string", REQUIRED,
        'The tier\'s name in the stats and logs; not "pool" (the memory tier).'),
    Key("kind", "string", '"file"', "The kind of tier: {tier_kinds}."),
    Key("path", "path", REQUIRED,
        "The backing file; a relative path means the configuration file's directory. The daemon "
        "creates it (mode 0600) or uses an existing one that is empty or carries a swapfs "
        "signature; its directory must exist, outside the mount. A tier file belongs to one "
        "mount at a time."),
    Key("size", SIZE, REQUIRED,
        "The most this tier stores, a multiple of 4096 bytes; the file is sparse unless "
        "preallocate is true."),
    Key("priority", "integer", "0",
        "Tiers are used by priority, higher first; equal priorities share the load "
        "round-robin, segment by segment."),
    Key("high_watermark", RATIO, "0.95",
        "Moves to the next (lower-priority) tier start when this tier holds more than this "
        "share of its size ..."),
    Key("low_watermark", RATIO, "0.9",
        "... and stop below this share. Must be below high_watermark."),
    Key("preallocate", "boolean", "false",
        "true: reserve the whole size up front (fallocate); refused if the filesystem has not "
        "the free space. A sparse tier on a filesystem that fills counts as full."),
    Key("encrypt", "boolean", "true",
        "Pages on disk are encrypted and authenticated (AES-256-GCM) under a random key made at "
        "mount and held only in the daemon's locked memory; false stores them in the clear, "
        "with a checksum."),
    Key("force_init", "boolean", "false",
        "true: overwrite an existing file that holds data without a swapfs signature (a swap "
        "area, a filesystem image, ...), which is otherwise refused and left untouched."),
    Key("segment_bytes", SIZE, '"4M"',
        "The tier is a log of segments of this size, a power of two from 64K to 64M: the unit "
        "of its sequential writes and of cleaning, which reclaims the space of pages that died. "
        "A tier smaller than 256 segments gets smaller ones, down to 64K. A redis tier's "
        "default is 1M, and a remote segment holds 64 bytes less (the server's allocation, its "
        "string header included, is then exactly segment_bytes)."),
    Key("recompress", "string", NONE,
        '"zstd": pages the pool holds with lz4 are recompressed with zstd on their way down '
        "to this tier (kept if smaller); unset, they are stored as the pool held them."),
    Key("seeds", "array of strings", REQUIRED,
        'kind = "redis": nodes of the Redis Cluster as "host:port"; one that answers is '
        "enough, the others are learnt from it. Only for kind = \"redis\", which has no path, "
        "preallocate or force_init, and is always encrypted.",
        context=_REDIS),
    Key("user", "string", '""',
        "kind = \"redis\": the ACL user the daemon authenticates as (AUTH); empty: the default "
        "user. Needs password_file.", context=_REDIS_SEEDED),
    Key("password_file", "path", '""',
        "kind = \"redis\": a file whose first line is the password (of user, or of the default "
        "user); keep it readable by root only.", context=_REDIS_SEEDED),
    Key("tls_ca", "path", '""',
        "kind = \"redis\": talk TLS to the nodes and verify them against this CA file.",
        context=_REDIS_SEEDED),
    Key("tls_cert", "path", '""',
        "kind = \"redis\": a client certificate for mutual TLS (with tls_key).",
        context=_REDIS_SEEDED),
    Key("tls_key", "path", '""',
        "kind = \"redis\": the client certificate's private key.", context=_REDIS_SEEDED),
    Key("key_prefix", "string", '""',
        "kind = \"redis\": the prefix of every key the tier writes (no {{ or }}); empty: "
        "swapfs:MACHINE-ID:MOUNT:TIER:. Two mounts must not share one.", context=_REDIS_SEEDED),
    Key("timeout", "duration", '"200ms"',
        "kind = \"redis\": the deadline of one remote request (a duration also takes ms).",
        context=_REDIS_SEEDED),
    Key("read_deadline", "duration", '"10s"',
        "kind = \"redis\": how long a read is retried (a node lost, a replica being promoted) "
        "before the page reads as an I/O error.", context=_REDIS_SEEDED),
    Key("replicas", "integer", "1",
        "kind = \"redis\": replicas that must have a write (WAIT) before the page's local copy "
        "is freed; 0 for a cluster without replicas, which loses pages when a node is lost.",
        context=_REDIS_SEEDED),
)

TABLES = (
    ("pool", "THE POOL: [pool]", config.PoolConfig, POOL_KEYS,
     "The compressed memory tier, always the top one. The whole table is optional."),
    ("device", "DEVICES: [[device]]", config.DeviceConfig, DEVICE_KEYS,
     "One virtual swap device, a file of the mount; at least one, at most {max_devices}."),
    ("tier", "LOWER TIERS: [[tier]]", config.TierConfig, TIER_KEYS,
     "A tier below the pool: pages that do not compress well enough, that find the pool "
     "full, or that writeback moves down. A backing file (kind = \"file\") or segments on a "
     "Redis Cluster (kind = \"redis\"). Optional; at most {max_tiers}."),
)

# Placeholders of the prose: the choices and limits as config.py has them.
FACTS = {
    "algorithms": " or ".join(config.ALGORITHMS),
    "zstd_min": config.ZSTD_LEVELS.start,
    "zstd_max": config.ZSTD_LEVELS.stop - 1,
    "min_pool": f"{config.MIN_POOL_BYTES >> 20} MiB",
    "max_name": config.MAX_DEVICE_NAME,
    "max_pages": f"2^{config.MAX_DEVICE_PAGES.bit_length() - 1}",
    "discards": ", ".join(config.DISCARD_POLICIES),
    "tier_kinds": ", ".join(config.TIER_KINDS),
    "max_devices": config.MAX_DEVICES,
    "max_tiers": config.MAX_FILE_TIERS,
}

# The smallest file that loads, and where each table's key goes in it.
_BASE = {
    "pool": ("[pool]\n{line}\n[[device]]\nname = \"d\"\nsize = 4096\n", ""),
    "device": ("[[device]]\n{line}\n", 'name = "d"\nsize = 4096'),
    "tier": ("[[device]]\nname = \"d\"\nsize = 4096\n[[tier]]\n{line}\n",
             'name = "t"\npath = "/nonexistent/t.img"\nsize = 4096'),
}


class ManualError(Exception):
    """The prose and the configuration contract disagree: the build stops, naming the key."""


def _load(table: str, lines: dict[str, str]) -> Any:
    """The parsed table of a file with ``lines`` (key -> TOML value) in ``table``."""
    template, _ = _BASE[table]
    text = template.format(line="\n".join(f"{k} = {v}" for k, v in lines.items()))
    parsed = config.parse_config(text, f"<{table} check>", "/")
    return parsed.pool if table == "pool" else getattr(parsed, table + "s")[0]


def _required(table: str) -> dict[str, str]:
    _, required = _BASE[table]
    return dict(line.split(" = ", 1) for line in required.splitlines())


def check_keys() -> None:
    """Every key the parser reads has prose, every documented default is the parser's."""
    for table, _, cls, keys, _ in TABLES:
        fields = [f.name for f in dataclasses.fields(cls)]
        names = [k.name for k in keys]
        if sorted(fields) != sorted(names):
            missing = sorted(set(fields) - set(names))
            extra = sorted(set(names) - set(fields))
            raise ManualError(f"{table}: keys without prose in swapfs/cli/manual.py: {missing}; "
                              f"prose for keys the configuration does not have: {extra}")
        for key in keys:
            where = f"{table}.{key.name}"
            base = _required(table)
            for line in filter(None, key.context.splitlines()):
                k, v = line.split(" = ", 1)
                if v == DROP:
                    base.pop(k, None)
                else:
                    base[k] = v
            if key.default == REQUIRED:
                without = {k: v for k, v in base.items() if k != key.name}
                try:
                    _load(table, without)
                except config.ConfigError:
                    continue
                raise ManualError(f"{where}: documented as required, but a file without it loads")
            implicit = getattr(_load(table, base), key.name)
            if key.default == NONE:
                if implicit not in (None, ""):  # unset: None, or "" for a string
                    raise ManualError(f"{where}: documented without a default, but it is {implicit!r}")
                continue
            try:
                explicit = getattr(_load(table, {**base, key.name: key.default}), key.name)
            except config.ConfigError as exc:
                raise ManualError(f"{where}: the documented default {key.default} does not load: "
                                  f"{exc}") from None
            if explicit != implicit:
                raise ManualError(f"{where}: documented default {key.default} is {explicit!r}, "
                                  f"but a file without the key gets {implicit!r}")


# -- roff --------------------------------------------------------------------


def roff_text(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, no leading control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def roff_lines(text: str) -> list[str]:
    return [roff_text(line) for line in text.splitlines()]


def _example(text: str) -> list[str]:
    return [".PP", ".nf", ".RS 4", *roff_lines(text.rstrip("\n")), ".RE", ".fi"]


def build_date() -> str:
    """SOURCE_DATE_EPOCH (reproducible builds), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%d")


def config_manual(version: str = __version__, date: str | None = None) -> str:
    """swapfs.toml(5): the configuration file, key by key."""
    check_keys()
    out = [f'.TH SWAPFS.TOML 5 "{date or build_date()}" "swapfs {version}" "File Formats"',
           ".SH NAME", "swapfs.toml \\- configuration of a swapfs mount",
           ".SH SYNOPSIS", "/etc/swapfs/\\fINAME\\fR.toml",
           ".br", "swapfs mount \\-\\-config \\fIFILE\\fR \\fIMOUNTPOINT\\fR",
           ".SH DESCRIPTION"]
    out += roff_lines(textwrap.dedent("""\
        A swapfs configuration is a TOML file with an optional [pool] table, one or more
        [[device]] tables and optional [[tier]] tables. swapfs mount reads it with --config
        (without, it uses the embedded default below); the systemd generator turns each
        /etc/swapfs/NAME.toml into the mount unit swapfs@NAME.service, mounted at
        /run/swapfs/NAME, and a swap unit per device with swap = true.
        """))
    out += [".PP"] + roff_lines(textwrap.dedent("""\
        Keys not listed here are refused, and so are values out of range: every error names
        the key (pool.max_bytes, device[1].size) and says what is wrong, before anything is
        mounted. swapfs check-config FILE runs the checks swapfs mount runs, this machine's
        memory and the tier files included.
        """))
    out += [".SS Sizes and durations"] + roff_lines(textwrap.dedent("""\
        A size is a number of bytes or a string of a number with K, M, G or T (powers of
        1024): 4096, "64M", "1G". pool.max_bytes may also be a share of RAM such as "10%".
        Sizes of devices and tiers are multiples of 4096 bytes. A duration is a number of
        seconds or a string with s, m, h or d: 30, "30s", "10m", "1h".
        """))
    for _, heading, _, keys, about in TABLES:
        out += [f'.SH "{heading}"',
                *roff_lines(about.format(**FACTS))]
        for key in keys:
            default = {REQUIRED: "required", NONE: "no default"}.get(key.default,
                                                                      f"default {key.default}")
            out += [".TP", f"\\fB{roff_text(key.name)}\\fR = \\fI{roff_text(key.kind)}\\fR "
                    f"({roff_text(default)})", *roff_lines(key.text.format(**FACTS))]
    out += [".SH LIMITS"] + roff_lines(textwrap.dedent(f"""\
        At most {config.MAX_DEVICES} devices (the stats of a mount's root must fit one 64 KiB
        extended attribute) and {config.MAX_FILE_TIERS} file tiers; a device of at most
        {FACTS['max_pages']} pages; a pool of at least {FACTS['min_pool']} and at most the
        machine's RAM.
        """))
    out += [".SH EXAMPLE",
            "The embedded default (swapfs check\\-config \\-\\-print\\-default):",
            *_example(config.DEFAULT_CONFIG_TOML)]
    out += [".PP", "A mount at boot with a file tier, as /etc/swapfs/main.toml:",
            *_example(EXAMPLE_CONFIG)]
    out += [".SH FILES", ".TP", "/etc/swapfs/*.toml",
            "One mount each, read by the systemd generator at boot and at every "
            "systemctl daemon\\-reload.",
            ".TP", "/etc/swapfs/main.toml.example",
            "An example installed by the package; not read until copied to a .toml name.",
            ".SH SEE ALSO", "\\fBswapfs\\fR(8), \\fBswapon\\fR(8), \\fBsystemd.generator\\fR(7)"]
    return "\n".join(out) + "\n"


# The example the package installs as /etc/swapfs/main.toml.example (and the page shows).
EXAMPLE_CONFIG = """\
# swapfs: copy to /etc/swapfs/main.toml (any NAME.toml) to mount it at /run/swapfs/main at boot
# (systemctl daemon-reload && systemctl start swap.target); swapfs.toml(5) lists every key.
[pool]
algorithm = "lz4"           # lz4 | zstd
max_bytes = "20%"           # memory the pool may hold: a size or a share of RAM
accept_ratio = 0.8          # keep a page compressed only if it shrinks to 80% or less

[[device]]
name = "swap0"
size = "4G"
swap = true                 # the generator's unit turns swap on over it ...
swap_priority = 100         # ... with this priority ...
discard = "both"            # ... and this discard policy

# A file tier below the pool (its directory must exist):
# [[tier]]
# name = "ssd"
# path = "/var/lib/swapfs/ssd.img"
# size = "16G"
# priority = 100
"""


# -- swapfs(8) ---------------------------------------------------------------

COMMAND_SECTIONS = {
    "configuration": "The configuration file is described in \\fBswapfs.toml\\fR(5); "
                     "\\fBswapfs check\\-config \\-\\-print\\-default\\fR prints the embedded default.",
    "files": "\n".join([
        ".TP", "/etc/swapfs/\\fINAME\\fR.toml",
        "A mount at /run/swapfs/\\fINAME\\fR, started at boot by the systemd generator "
        "(/usr/lib/systemd/system\\-generators/swapfs\\-generator) as swapfs@\\fINAME\\fR.service, "
        "with a swapfs\\-swap@ unit per device with swap = true.",
        ".TP", "/run/swapfs/log/",
        "The logs of background daemons started as root, and their keepers' sockets.",
    ]),
    "see also": "\\fBswapfs.toml\\fR(5), \\fBswapon\\fR(8), \\fBlosetup\\fR(8), \\fBzramctl\\fR(8), "
                "\\fBsystemd.generator\\fR(7)",
}


def _description_roff(text: str) -> str:
    """The top parser's raw description: prose filled, indented example lines kept as they are."""
    out: list[str] = []
    literal = False
    for line in text.rstrip("\n").splitlines():
        indented = line.startswith(" ")
        if indented != literal:
            out += [".nf", ".RS 2"] if indented else [".RE", ".fi"]
            literal = indented
        out.append(".PP" if not line.strip() else roff_text(line.strip() if indented else line))
    if literal:
        out += [".RE", ".fi"]
    return "\n".join(out)


def command_manual(version: str = __version__, date: str | None = None) -> str:
    """swapfs(8) from the argparse definitions."""
    from argparse_manpage.manpage import Manpage

    from . import build_parser

    parser = build_parser()
    description, parser.description = parser.description or "", None
    parser._positionals.title = "commands"
    page = Manpage(parser, _data={
        "project_name": "swapfs", "version": version, "manual_section": 8,
        "manual_title": "System Administration", "date": date or build_date(),
        "description": "a userspace swap store: compressed swap devices over FUSE"},
        format="single-commands-section")
    page.add_section("description", "=", _description_roff(description))
    for heading, content in COMMAND_SECTIONS.items():
        page.add_section(heading, ">", content)
    # A help text that begins with ' would be read by roff as a control line (as one that
    # begins with "." is); argparse-manpage writes its own requests with "." only.
    return "".join("\\&" + line if line.startswith("'") else line
                   for line in str(page).splitlines(keepends=True))


# -- completions -------------------------------------------------------------

_DIRECTORY_METAVARS = ("MOUNTPOINT", "MOUNT", "DIR", "NORMAL_DIR", "EARLY_DIR", "LATE_DIR")


def _mark_paths(parser: argparse.ArgumentParser) -> None:
    """Tell shtab which arguments are directories and which files, by their metavar."""
    import shtab

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_paths(sub)
        elif action.metavar in _DIRECTORY_METAVARS:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        elif isinstance(action.metavar, str) and ("FILE" in action.metavar
                                                  or action.metavar in ("PATH", "PNG")):
            action.complete = shtab.FILE  # type: ignore[attr-defined]


def completion(shell: str) -> str:
    """The completion script for ``shell`` (bash or zsh)."""
    import shtab

    from . import build_parser

    parser = build_parser()
    _mark_paths(parser)
    text: str = shtab.complete(parser, shell=shell)
    return text


# -- the build's entry point -------------------------------------------------

OUTPUTS = {
    "swapfs.8": lambda: command_manual(),
    "swapfs.toml.5": lambda: config_manual(),
    "swapfs.bash": lambda: completion("bash"),
    "_swapfs": lambda: completion("zsh"),  # zsh's name for the completion of swapfs
    "main.toml.example": lambda: EXAMPLE_CONFIG,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m swapfs.cli.manual",
                                 description="Write swapfs(8), swapfs.toml(5), the bash and zsh "
                                 "completions and the example configuration into OUTDIR.")
    ap.add_argument("outdir", metavar="OUTDIR")
    args = ap.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    try:
        for name, render in OUTPUTS.items():
            with open(os.path.join(args.outdir, name), "w", encoding="utf-8") as f:
                f.write(render())
    except ManualError as exc:
        print(f"swapfs.cli.manual: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
