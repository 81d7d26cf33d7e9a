"""The TOML configuration contract: parsing, defaults and validation.

Every error is a :class:`ConfigError` whose message names the offending key
(``pool.max_bytes``, ``device[1].size``) and says what is wrong.  Keys not in
the contract are refused.  See docs/store.md and the config contract in the
design for the meaning of each key.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from .kernel import PAGE_SIZE
from .slots import MAX_FILE_TIERS, SlotTable
from .stats import xattr_name

ALGORITHMS = ("lz4", "zstd")
ZSTD_LEVELS = range(1, 23)
TIER_KINDS = ("file", "redis")

# Limits mount would hit later, checked here so that check-config refuses what mount refuses.
MIN_POOL_BYTES = 1 << 20  # smaller, the pool's spares alone would fill it
# 16 TiB a device: a slot table reserves 16 bytes of address space a page and
# keeps 3 bytes of counts per 1024 pages (12 MiB at this limit).
MAX_DEVICE_PAGES = 1 << 32

# The embedded default.  The pool may hold 20% of RAM: the share zswap uses by
# default (max_pool_percent=20).  The pool's memory cannot itself be swapped
# (the daemon locks it), so a larger share would starve the workloads whose
# pages it stores; a smaller one makes a 1G device spill sooner than zram or
# zswap would on the same machine.
DEFAULT_CONFIG_TOML = """\
[pool]
algorithm = "lz4"
level = 1
max_bytes = "20%"
accept_ratio = 0.8
high_watermark = 0.9
low_watermark = 0.8

[[device]]
name = "swap0"
size = "1G"
writeback = true
"""


# The ratio a codec plausibly reaches on real process memory in the pool, fragmentation
# included (zram holds such memory at about 2.3-2.6x with lz4, 3.4-3.8x with zstd): what
# check-config, mount and the headroom in the stats assume while the pool holds nothing to
# measure, unless [pool] expected_ratio says otherwise.
EXPECTED_RATIOS = {"lz4": 2.5, "zstd": 3.5}
MAX_EXPECTED_RATIO = 64.0


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass(frozen=True)
class PoolConfig:
    max_bytes: int
    algorithm: str = "lz4"
    level: int = 1
    accept_ratio: float = 0.8
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    dedup: bool = False
    # The codec pages idle for ``recompress_after`` seconds are recompressed
    # with (None: never); zstd at ``level``.
    recompress: str | None = None
    recompress_after: float = 600.0
    # uncompressed bytes per byte of pool memory assumed where nothing is measured yet
    # (0.0: the codec's, EXPECTED_RATIOS); see ratio()
    expected_ratio: float = 0.0

    def ratio(self) -> float:
        """The pool's assumed memory ratio: expected_ratio, or the codec's plausible one."""
        return self.expected_ratio or EXPECTED_RATIOS[self.algorithm]


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    size: int
    writeback: bool = True
    # read by the systemd generator only: swap on at boot, its priority and discard policy
    swap: bool = False
    swap_priority: int | None = None  # None: the kernel's default
    discard: str = "both"


# [[tier]] segment_bytes: the default, and the sizes allowed (a segment holds at least a few
# pages' objects; larger than a FUSE request's worth of writes gains nothing measurable).
SEGMENT_BYTES = 4 << 20
MIN_SEGMENT_BYTES = 64 << 10
MAX_SEGMENT_BYTES = 64 << 20


@dataclass(frozen=True)
class TierConfig:
    name: str
    kind: str
    path: str
    size: int
    priority: int
    high_watermark: float
    low_watermark: float
    preallocate: bool = False
    encrypt: bool = True  # AES-GCM with a random key per mount (docs/file-tier.md)
    # Overwrite an existing file that holds data but no swapfs signature (docs/file-tier.md).
    force_init: bool = False
    # The unit of sequential writes and of cleaning (docs/file-tier.md).
    segment_bytes: int = SEGMENT_BYTES
    # A codec the pages are recompressed with on their way down to this tier ("": none).
    recompress: str = ""
    # kind = "redis" (docs/remote-tier.md): the cluster's seed nodes (host:port), the ACL user
    # and the file holding its password, TLS files, the prefix of every key, the deadline of
    # one remote request, how long a read retries before EIO, the replicas WAIT must count.
    seeds: tuple[str, ...] = ()
    user: str = ""
    password_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    key_prefix: str = ""
    timeout: float = 0.2
    read_deadline: float = 10.0
    replicas: int = 1


# The tiering policies (swapfs/policy.py, docs/policy.md): which refaults
# are promoted and which pages are demoted first.
POLICY_NAMES = ("workingset", "classic")
DEFAULT_POLICY = "workingset"


@dataclass(frozen=True)
class WritebackConfig:
    policy: str = DEFAULT_POLICY


@dataclass(frozen=True)
class Config:
    pool: PoolConfig
    devices: tuple[DeviceConfig, ...]
    tiers: tuple[TierConfig, ...] = ()
    writeback: WritebackConfig = WritebackConfig()


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def sized(n: int) -> str:
    """``n`` bytes for a message: ``2199023255552 bytes (2.0 TiB)``."""
    if n < 1024:
        return f"{n} bytes"
    v = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        v /= 1024
        if v < 1024 or unit == "PiB":
            break
    return f"{n} bytes ({v:.1f} {unit})"


def check_machine(config: Config) -> None:
    """What this machine can hold, checked by check-config and mount before anything starts
    (the tiers' own checks are swapfs.tiers.checks).  Raises ConfigError naming the key and
    echoing the sizes: a pool larger than RAM (its memory is locked: it cannot itself be
    swapped); devices whose slot tables the kernel will not reserve address space for (the
    very reservation is tried, all devices at once, and given back)."""
    ram = mem_total_bytes()
    if config.pool.max_bytes > ram:
        raise ConfigError(f"pool.max_bytes: {sized(config.pool.max_bytes)} is more than this "
                          f"machine's memory, {sized(ram)} (the pool is locked in memory)")
    tables: list[SlotTable] = []
    try:
        for i, d in enumerate(config.devices):
            npages = d.size // PAGE_SIZE
            try:
                tables.append(SlotTable(npages))
            except (OSError, MemoryError) as e:
                why = e.strerror if isinstance(e, OSError) else "out of memory"
                raise ConfigError(f"device[{i}].size: {sized(d.size)}: the kernel refuses to "
                                  f"reserve {sized(16 * npages)} of address space for its "
                                  f"slot table ({why}); use a smaller device") from None
    finally:
        tables.clear()


def store_capacity_bytes(config: Config) -> int:
    """What the pool and the file tiers can hold, in uncompressed bytes: the pool's
    max_bytes and each file tier's size at the pool's assumed ratio (:meth:`PoolConfig.ratio`;
    a file tier stores the pool codec's objects).  Same-filled pages take no room and come
    on top."""
    return int((config.pool.max_bytes + sum(t.size for t in config.tiers)) * config.pool.ratio())


def capacity_warnings(config: Config) -> list[str]:
    """What check-config and mount warn of: devices larger in total than the store can hold
    at the assumed ratio.  The kernel sees free slots on such a device after the store is
    full, and keeps swapping into it (every write refused) rather than turning to the next
    swap device or to the OOM killer."""
    devices = sum(d.size for d in config.devices)
    capacity = store_capacity_bytes(config)
    if devices <= capacity:
        return []
    pool = config.pool
    tiers = "".join(f" and tier {t.name} {sized(t.size)}" for t in config.tiers)
    return [f"devices larger than the store can hold: they total {sized(devices)}, the "
            f"store about {sized(capacity)} (pool.max_bytes {sized(pool.max_bytes)}{tiers} "
            f"at {pool.ratio():g}:1, pool.expected_ratio).  Once it is full, every write "
            "is refused while the kernel still sees free swap slots: it keeps retrying rather "
            "than using the next swap device or OOM-killing.  Make the devices total at most "
            f"{sized(capacity // PAGE_SIZE * PAGE_SIZE)}, or give the store more room"]


def mem_total_bytes() -> int:
    """RAM of this machine, from /proc/meminfo MemTotal."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def parse_size(value: Any, key: str, *, allow_percent: bool = False) -> int:
    """Bytes from an int or a string with K, M, G or T (powers of 1024).

    With ``allow_percent`` (only where a share of RAM makes sense) a string
    such as "10%" is a share of MemTotal, rounded down to whole pages.  The
    result is always a positive multiple of PAGE_SIZE.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{key}: expected a size (bytes or a string like \"1G\"), "
                          f"got {type(value).__name__} {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(value)
        if m:
            size = int(m.group(1)) * _UNITS[m.group(2).upper()]
        else:
            p = _PERCENT_RE.match(value)
            if not p:
                raise ConfigError(f"{key}: cannot read {value!r} as a size "
                                  "(bytes, or a number with K, M, G or T)")
            if not allow_percent:
                raise ConfigError(f"{key}: a share of RAM ({value!r}) is not allowed here")
            share = float(p.group(1))
            if not 0 < share <= 100:
                raise ConfigError(f"{key}: share of RAM must be in (0%, 100%], got {value!r}")
            size = int(mem_total_bytes() * share / 100) // PAGE_SIZE * PAGE_SIZE
            if size <= 0:
                raise ConfigError(f"{key}: {value!r} of RAM is less than one page")
            return size
    if size <= 0:
        raise ConfigError(f"{key}: size must be positive, got {value!r}")
    if size % PAGE_SIZE:
        raise ConfigError(f"{key}: size must be a multiple of {PAGE_SIZE}, got {value!r}")
    return size


class _Table:
    """One TOML table being read: typed getters that name the key on error."""

    def __init__(self, data: Any, key: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: expected a table, got {type(data).__name__}")
        for k in data:
            if k not in allowed:
                raise ConfigError(f"{self._name(key, k)}: unknown key "
                                  f"(allowed: {', '.join(allowed)})")
        self.data = data
        self.key = key

    @staticmethod
    def _name(prefix: str, k: str) -> str:
        return f"{prefix}.{k}" if prefix else k

    def name(self, k: str) -> str:
        return self._name(self.key, k)

    def get(self, k: str, types: tuple[type, ...], default: Any, what: str) -> Any:
        if k not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"{self.name(k)}: missing (expected {what})")
            return default
        v = self.data[k]
        if isinstance(v, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(v, types)
        if not ok:
            raise ConfigError(f"{self.name(k)}: expected {what}, got {type(v).__name__} {v!r}")
        return v

    def get_str(self, k: str, default: Any = None) -> str:
        v = self.get(k, (str,), default, "a string")
        if not v:
            raise ConfigError(f"{self.name(k)}: must not be empty")
        return v

    def get_int(self, k: str, default: Any = None) -> int:
        return self.get(k, (int,), default, "an integer")

    def get_bool(self, k: str, default: Any = None) -> bool:
        return self.get(k, (bool,), default, "true or false")

    def get_ratio(self, k: str, default: Any = None) -> float:
        v = float(self.get(k, (int, float), default, "a number"))
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"{self.name(k)}: must be in (0, 1], got {v!r}")
        return v

    def get_duration(self, k: str, default: Any = None) -> float:
        """Seconds: a number, or a string of a number with s, m, h or d ("10m")."""
        v = self.get(k, (int, float, str), default, 'a duration such as 30, "30s", "10m" or "1h"')
        if isinstance(v, str) and v.lower().endswith("ms"):
            try:
                v = float(v[:-2]) / 1000
            except ValueError:
                raise ConfigError(f'{self.name(k)}: expected a duration such as 30, "30s", '
                                  f'"200ms" or "10m", got {self.data[k]!r}') from None
        elif isinstance(v, str):
            unit = _DURATION_UNITS.get(v[-1:].lower())
            try:
                v = float(v[:-1] if unit else v) * (unit or 1)
            except ValueError:
                raise ConfigError(f'{self.name(k)}: expected a duration such as 30, "30s", "10m" '
                                  f"or \"1h\", got {self.data[k]!r}") from None
        if not 0 <= v < 10 ** 9:
            raise ConfigError(f"{self.name(k)}: must be between 0 and 10^9 seconds, got {v!r}")
        return float(v)

    def get_size(self, k: str, default: Any = None, *, allow_percent: bool = False) -> int:
        if k not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"{self.name(k)}: missing (expected a size)")
            return parse_size(default, self.name(k), allow_percent=allow_percent)
        return parse_size(self.data[k], self.name(k), allow_percent=allow_percent)


_REQUIRED = object()
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _watermarks(t: _Table, high_default: float, low_default: float) -> tuple[float, float]:
    high = t.get_ratio("high_watermark", high_default)
    low = t.get_ratio("low_watermark", low_default)
    if low >= high:
        raise ConfigError(f"{t.name('low_watermark')}: must be below "
                          f"{t.name('high_watermark')} ({low} >= {high})")
    return high, low


def _check_file_name(name: str, key: str) -> None:
    if name in (".", "..") or "/" in name or "\0" in name:
        raise ConfigError(f"{key}: {name!r} cannot be a file name")


def _parse_pool(data: Any) -> PoolConfig:
    t = _Table(data, "pool", ("algorithm", "level", "max_bytes", "accept_ratio",
                              "high_watermark", "low_watermark", "recompress", "recompress_after",
                              "dedup", "expected_ratio"))
    algorithm = t.get_str("algorithm", "lz4")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"pool.algorithm: unknown algorithm {algorithm!r} "
                          f"(known: {', '.join(ALGORITHMS)})")
    level = t.get_int("level", 1)
    if algorithm == "zstd" and level not in ZSTD_LEVELS:
        raise ConfigError(f"pool.level: zstd level must be in "
                          f"{ZSTD_LEVELS.start}..{ZSTD_LEVELS.stop - 1}, got {level}")
    max_bytes = t.get_size("max_bytes", "20%", allow_percent=True)
    if max_bytes < MIN_POOL_BYTES:
        raise ConfigError(f"pool.max_bytes: {max_bytes} bytes is less than the pool's "
                          f"allocation unit; must be at least {MIN_POOL_BYTES >> 20} MiB")
    accept_ratio = t.get_ratio("accept_ratio", 0.8)
    high, low = _watermarks(t, 0.9, 0.8)
    dedup = t.get_bool("dedup", False)
    recompress = t.get_str("recompress", None) if "recompress" in t.data else None
    if recompress is not None:
        if recompress not in ALGORITHMS:
            raise ConfigError(f"pool.recompress: unknown algorithm {recompress!r} "
                              f"(known: {', '.join(ALGORITHMS)})")
        if recompress == algorithm:
            raise ConfigError(f"pool.recompress: {recompress!r} is already the pool's algorithm; "
                              "recompressing needs a denser one (e.g. algorithm = \"lz4\", "
                              "recompress = \"zstd\")")
        if recompress == "zstd" and level not in ZSTD_LEVELS:
            raise ConfigError(f"pool.level: zstd level must be in "
                              f"{ZSTD_LEVELS.start}..{ZSTD_LEVELS.stop - 1}, got {level}")
    recompress_after = t.get_duration("recompress_after", 600.0)
    if "recompress_after" in t.data and recompress is None:
        raise ConfigError("pool.recompress_after: set without pool.recompress (the codec to use)")
    expected = float(t.get("expected_ratio", (int, float), EXPECTED_RATIOS[algorithm],
                            "a number"))
    if not 1.0 <= expected <= MAX_EXPECTED_RATIO:
        raise ConfigError(f"pool.expected_ratio: must be between 1 and {MAX_EXPECTED_RATIO:g} "
                          f"(uncompressed bytes per byte of pool memory), got {expected!r}")
    return PoolConfig(max_bytes=max_bytes, algorithm=algorithm, level=level,
                      accept_ratio=accept_ratio, high_watermark=high, low_watermark=low,
                      recompress=recompress, recompress_after=recompress_after,
                      dedup=dedup, expected_ratio=expected)


def _parse_writeback(data: Any) -> WritebackConfig:
    t = _Table(data, "writeback", ("policy",))
    policy = t.get_str("policy", DEFAULT_POLICY)
    if policy not in POLICY_NAMES:
        raise ConfigError(f"writeback.policy: unknown policy {policy!r} "
                          f"(known: {', '.join(POLICY_NAMES)})")
    return WritebackConfig(policy=policy)


def _array(data: Any, key: str) -> list[Any]:
    if not isinstance(data, list):
        raise ConfigError(f"{key}: expected an array of tables ([[{key}]]), "
                          f"got {type(data).__name__}")
    return data


# The root's stats object must fit one xattr (the kernel's limit is 64 KiB);
# the kernel itself swaps to at most about 30 devices at once.
MAX_DEVICES = 64
MAX_DEVICE_NAME = 64
DISCARD_POLICIES = ("once", "pages", "both", "off")


def _parse_device(data: Any, key: str) -> DeviceConfig:
    if isinstance(data, dict) and "group" in data:
        raise ConfigError(f"{key}.group: policy groups do not exist (the key used to be ignored); "
                          "remove it")
    t = _Table(data, key, ("name", "size", "writeback", "swap", "swap_priority", "discard"))
    name = t.get_str("name", _REQUIRED)
    _check_file_name(name, t.name("name"))
    if len(name.encode()) > MAX_DEVICE_NAME or not name.isprintable():
        raise ConfigError(f"{t.name('name')}: {name!r}: a device name is at most "
                          f"{MAX_DEVICE_NAME} bytes of printable characters")
    size = t.get_size("size", _REQUIRED)
    if size // PAGE_SIZE > MAX_DEVICE_PAGES:
        raise ConfigError(f"{t.name('size')}: {size} bytes is more than "
                          f"{MAX_DEVICE_PAGES} pages of {PAGE_SIZE} bytes")
    writeback = t.get_bool("writeback", True)
    swap = t.get_bool("swap", False)
    priority = t.get("swap_priority", (int,), None, "an integer")
    if priority is not None and not -1 <= priority <= 32767:
        raise ConfigError(f"{t.name('swap_priority')}: must be in -1..32767 (swapon -p), got {priority}")
    discard = t.get_str("discard", "both")
    if discard not in DISCARD_POLICIES:
        raise ConfigError(f"{t.name('discard')}: unknown discard policy {discard!r} "
                          f"(known: {', '.join(DISCARD_POLICIES)})")
    return DeviceConfig(name=name, size=size, writeback=writeback,
                        swap=swap, swap_priority=priority, discard=discard)


# kind = "redis": the default segment size (a remote segment holds segment_bytes - 64 bytes,
# so that the server's allocation, string header included, is exactly segment_bytes).
REDIS_SEGMENT_BYTES = 1 << 20
REDIS_KEYS = ("seeds", "user", "password_file", "tls_ca", "tls_cert", "tls_key", "key_prefix",
              "timeout", "read_deadline", "replicas")


def _parse_tier(data: Any, key: str, base_dir: str) -> TierConfig:
    t = _Table(data, key, ("name", "kind", "path", "size", "priority",
                           "high_watermark", "low_watermark", "preallocate", "encrypt",
                           "force_init", "segment_bytes", "recompress") + REDIS_KEYS)
    name = t.get_str("name", _REQUIRED)
    if name == "pool":
        raise ConfigError(f"{t.name('name')}: 'pool' is the name of the memory tier")
    kind = t.get_str("kind", "file")
    if kind not in TIER_KINDS:
        raise ConfigError(f"{t.name('kind')}: unknown tier kind {kind!r} "
                          f"(known: {', '.join(TIER_KINDS)})")
    if kind == "redis":
        return _parse_redis_tier(t, name, base_dir)
    for k in REDIS_KEYS:
        if k in t.data:
            raise ConfigError(f"{t.name(k)}: only a tier of kind \"redis\" takes it")
    path = t.get_str("path", _REQUIRED)
    if "\0" in path:
        raise ConfigError(f"{t.name('path')}: contains a NUL byte")
    # A relative path means the config file's directory (the daemon runs in /).
    path = os.path.normpath(os.path.join(base_dir, path))
    size = t.get_size("size", _REQUIRED)
    priority = t.get_int("priority", 0)
    high, low = _watermarks(t, 0.95, 0.9)
    preallocate = t.get_bool("preallocate", False)
    encrypt = t.get_bool("encrypt", True)
    force_init = t.get_bool("force_init", False)
    segment_bytes = _segment_bytes(t, SEGMENT_BYTES)
    recompress = _recompress(t)
    return TierConfig(name=name, kind=kind, path=path, size=size, priority=priority,
                      high_watermark=high, low_watermark=low, preallocate=preallocate,
                      encrypt=encrypt, force_init=force_init, segment_bytes=segment_bytes,
                      recompress=recompress)


def _segment_bytes(t: _Table, default: int) -> int:
    segment_bytes = t.get_size("segment_bytes", default)
    if not MIN_SEGMENT_BYTES <= segment_bytes <= MAX_SEGMENT_BYTES \
            or segment_bytes & (segment_bytes - 1):
        raise ConfigError(f"{t.name('segment_bytes')}: {sized(segment_bytes)}: must be a power "
                          f"of two from {MIN_SEGMENT_BYTES >> 10} KiB to "
                          f"{MAX_SEGMENT_BYTES >> 20} MiB")
    return segment_bytes


def _recompress(t: _Table) -> str:
    # "" (the default) is none.
    recompress = t.get("recompress", (str,), "", "a string")
    if recompress and recompress not in ALGORITHMS:
        raise ConfigError(f"{t.name('recompress')}: unknown algorithm {recompress!r} "
                          f"(known: {', '.join(ALGORITHMS)})")
    return recompress


def _parse_redis_tier(t: _Table, name: str, base_dir: str) -> TierConfig:
    """A remote tier on a Redis Cluster (docs/remote-tier.md)."""
    for k in ("path", "preallocate", "force_init"):
        if k in t.data:
            raise ConfigError(f"{t.name(k)}: a tier of kind \"redis\" has no file "
                              f"(its place is the cluster named by seeds)")
    if not t.get_bool("encrypt", True):
        raise ConfigError(f"{t.name('encrypt')}: a remote tier is always encrypted (nothing "
                          f"leaves the machine in the clear)")
    seeds = t.get("seeds", (list,), _REQUIRED, 'a list of "host:port"')
    if not seeds:
        raise ConfigError(f"{t.name('seeds')}: must name at least one node")
    for s in seeds:
        host, sep, port = s.rpartition(":") if isinstance(s, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{t.name('seeds')}: {s!r} is not \"host:port\"")

    def text(k: str) -> str:  # "" (the default) is none
        return str(t.get(k, (str,), "", "a string"))

    def path_of(k: str) -> str:
        p = text(k)
        if not p:
            return ""
        if "\0" in p:
            raise ConfigError(f"{t.name(k)}: contains a NUL byte")
        return os.path.normpath(os.path.join(base_dir, p))

    user = text("user")
    password_file = path_of("password_file")
    if user and not password_file:
        raise ConfigError(f"{t.name('password_file')}: missing (user {user!r} needs a password)")
    tls_ca, tls_cert, tls_key = path_of("tls_ca"), path_of("tls_cert"), path_of("tls_key")
    if (tls_cert or tls_key) and not (tls_cert and tls_key):
        raise ConfigError(f"{t.name('tls_cert' if tls_key else 'tls_key')}: missing "
                          f"(mutual TLS needs both tls_cert and tls_key)")
    key_prefix = text("key_prefix")
    if any(c in key_prefix for c in "{}"):
        raise ConfigError(f"{t.name('key_prefix')}: must not hold {{ or }} (a hash tag would "
                          f"put every segment on one node)")
    timeout = t.get_duration("timeout", 0.2)
    read_deadline = t.get_duration("read_deadline", 10.0)
    if not 0 < timeout <= 60:
        raise ConfigError(f"{t.name('timeout')}: must be more than 0 and at most 60 s")
    if read_deadline < timeout:
        raise ConfigError(f"{t.name('read_deadline')}: must be at least timeout ({timeout} s)")
    replicas = t.get_int("replicas", 1)
    if not 0 <= replicas <= 16:
        raise ConfigError(f"{t.name('replicas')}: must be in 0..16, got {replicas}")
    high, low = _watermarks(t, 0.95, 0.9)
    return TierConfig(name=name, kind="redis", path="", size=t.get_size("size", _REQUIRED),
                      priority=t.get_int("priority", 0), high_watermark=high,
                      low_watermark=low, encrypt=True,
                      segment_bytes=_segment_bytes(t, REDIS_SEGMENT_BYTES),
                      recompress=_recompress(t), seeds=tuple(seeds), user=user,
                      password_file=password_file, tls_ca=tls_ca, tls_cert=tls_cert,
                      tls_key=tls_key, key_prefix=key_prefix, timeout=timeout,
                      read_deadline=read_deadline, replicas=replicas)


def parse_config(text: str, source: str = "<config>", base_dir: str | None = None) -> Config:
    """A Config from TOML text; ConfigError naming the key on any problem.

    Relative tier paths are resolved against ``base_dir`` (the config file's directory;
    default: the current directory, at this call), so every tier path in the result is absolute.
    """
    base = os.path.abspath(base_dir if base_dir is not None else os.getcwd())
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        top = _Table(data, "", ("pool", "device", "tier", "writeback"))
        pool = _parse_pool(top.data.get("pool", {}))
        writeback = _parse_writeback(top.data.get("writeback", {}))
        if "device" not in data:
            raise ConfigError("device: at least one [[device]] is required")
        devices = tuple(_parse_device(d, f"device[{i}]")
                        for i, d in enumerate(_array(data["device"], "device")))
        if not devices:
            raise ConfigError("device: at least one [[device]] is required")
        if len(devices) > MAX_DEVICES:
            raise ConfigError(f"device: {len(devices)} devices, at most {MAX_DEVICES} "
                              "(the stats of the mount's root must fit one 64 KiB xattr)")
        seen: dict[str, int] = {}
        for i, d in enumerate(devices):
            # two names that the stats render alike (xattr names: [a-z0-9_.]) are one
            key = xattr_name(d.name)
            if key in seen:
                raise ConfigError(f"device[{i}].name: device name {d.name!r} is the same as "
                                  f"device[{seen[key]}]'s in the stats ({key!r})")
            seen[key] = i
        tiers = tuple(_parse_tier(d, f"tier[{i}]", base)
                      for i, d in enumerate(_array(data.get("tier", []), "tier")))
        if len(tiers) > MAX_FILE_TIERS:
            raise ConfigError(f"tier: {len(tiers)} tiers configured, at most "
                              f"{MAX_FILE_TIERS} are supported")
        tseen: dict[str, int] = {"pool": -1}
        for i, tc in enumerate(tiers):
            key = xattr_name(tc.name)
            if key in tseen:
                other = "the pool's" if tseen[key] < 0 else f"tier[{tseen[key]}]'s"
                raise ConfigError(f"tier[{i}].name: tier name {tc.name!r} is the same as "
                                  f"{other} in the stats ({key!r})")
            tseen[key] = i
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return Config(pool=pool, devices=devices, tiers=tiers, writeback=writeback)


def load_config(path: str | None) -> Config:
    """The config in ``path``, or the embedded default when ``path`` is None.

    Relative tier paths in the file mean the file's own directory."""
    if path is None:
        return parse_config(DEFAULT_CONFIG_TOML, "<default config>")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read config: not UTF-8 text (byte {e.start})") from None
    return parse_config(text, path, os.path.dirname(os.path.abspath(path)))
