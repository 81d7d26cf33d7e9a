"""The signature at the start of every tier file, and what else a file may turn out to hold.

Layout of the backing file: the header cluster (``DATA_OFFSET`` bytes, 1 MiB, so that
segments stay aligned to 1 MiB for punching and direct I/O), then the data area: the object at
handle ``h`` of the tier at ``DATA_OFFSET + h`` (swapfs.tiers.file.segments).  The header's
first page holds, little-endian:

=========  =====  ==========================================================
magic      8      ``SWAPFSTR``
version    u16    ``VERSION`` (2: log-structured segments of objects; 1 was raw pages)
(zero)     u16
flags      u32    1 = pages encrypted
offset     u64    where the data area starts (``DATA_OFFSET``)
size       u64    the tier's size in bytes (the data area)
created    i64    when the mount initialised the file, ns since the epoch
pid        u32    the daemon's process id
mount id   16     random, one per initialisation
name       64     the tier's name, UTF-8, NUL-padded
mount      1024   the mount point (empty if the daemon did not say), NUL-padded
checksum   u64    xxh3-64 of every field above
=========  =====  ==========================================================

The rest of the header cluster is a hole.  The header says whose the file is, so that a
second mount is refused by name and an existing file without it is never overwritten
unasked (docs/file-tier.md, "Ownership").  It holds nothing secret: the key is never written.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

import xxhash

from ...kernel import PAGE_SIZE as PAGE

MAGIC = b"SWAPFSTR"
VERSION = 2
DATA_OFFSET = 256 * PAGE  # 1 MiB: the data area stays 1 MiB-aligned
FLAG_ENCRYPTED = 1

_FIELDS = struct.Struct("<8sHHIQQqI16s64s1024s")
_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = _FIELDS.size + _CHECKSUM.size


@dataclass(frozen=True)
class TierHeader:
    """The identity of the mount that initialised a tier file."""

    name: str
    size_bytes: int
    pid: int
    mount_id: bytes
    mountpoint: str = ""
    created_ns: int = 0
    encrypted: bool = False
    version: int = VERSION
    data_offset: int = DATA_OFFSET

    @classmethod
    def new(cls, name: str, size_bytes: int, mountpoint: str, encrypted: bool) -> TierHeader:
        return cls(name=name, size_bytes=size_bytes, pid=os.getpid(), mount_id=os.urandom(16),
                   mountpoint=mountpoint, created_ns=time.time_ns(), encrypted=encrypted)

    def pack(self) -> bytes:
        """The header page: PAGE bytes."""
        fields = _FIELDS.pack(MAGIC, self.version, 0, FLAG_ENCRYPTED if self.encrypted else 0,
                              self.data_offset, self.size_bytes, self.created_ns, self.pid,
                              self.mount_id, _fit(self.name, 64), _fit(self.mountpoint, 1024))
        head = fields + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(fields))
        return head + bytes(PAGE - len(head))

    def describe(self) -> str:
        """The mount, for messages: where, which process, since when."""
        where = f"the swapfs mount at {self.mountpoint}" if self.mountpoint else "a swapfs mount"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created_ns / 1e9))
        return f"{where} (daemon pid {self.pid}, tier {self.name!r}, initialised {when})"


def _fit(text: str, n: int) -> bytes:
    raw = text.encode("utf-8", "replace")[:n]
    return raw + bytes(n - len(raw))


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def has_magic(page: bytes) -> bool:
    return page[:len(MAGIC)] == MAGIC


def unpack(page: bytes) -> TierHeader | None:
    """The header in ``page`` (its first bytes), or None if there is none or it is damaged."""
    if len(page) < HEADER_BYTES or not has_magic(page):
        return None
    fields = page[:_FIELDS.size]
    (want,) = _CHECKSUM.unpack_from(page, _FIELDS.size)
    if xxhash.xxh3_64_intdigest(fields) != want:
        return None
    (_, version, _, flags, offset, size, created, pid, mount_id, name,
     mountpoint) = _FIELDS.unpack(fields)
    return TierHeader(name=_text(name), size_bytes=size, pid=pid, mount_id=mount_id,
                      mountpoint=_text(mountpoint), created_ns=created,
                      encrypted=bool(flags & FLAG_ENCRYPTED), version=version,
                      data_offset=offset)


def read_header(fd: int) -> tuple[bool, TierHeader | None]:
    """``(signed, header)`` of the file open at ``fd``: whether it starts with our magic, and
    the header if it is whole."""
    try:
        page = os.pread(fd, PAGE, 0)
    except OSError:
        return False, None
    return has_magic(page), unpack(page)


# Other signatures worth naming when a file is refused (as wipefs would): (offset, bytes, what).
_KNOWN: tuple[tuple[int, bytes, str], ...] = (
    (PAGE - 10, b"SWAPSPACE2", "a Linux swap area"),
    (PAGE - 10, b"SWAP-SPACE", "a Linux swap area (old format)"),
    (1080, b"\x53\xef", "an ext2/ext3/ext4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (0, b"\x7fELF", "an ELF executable"),
    (0, b"SQLite format 3\0", "an SQLite database"),
    (0, b"\x1f\x8b", "gzip data"),
    (0, b"PK\x03\x04", "a zip archive"),
    (0, b"\xfd7zXZ\0", "xz data"),
    (0, b"\x28\xb5\x2f\xfd", "zstd data"),
)
_PROBE = 0x10040 + 8


def recognise(fd: int) -> str:
    """What the start of the file open at ``fd`` looks like, for a refusal message."""
    try:
        head = os.pread(fd, _PROBE, 0)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if has_magic(head):
        return "a swapfs tier"
    for off, magic, what in _KNOWN:
        if head[off:off + len(magic)] == magic:
            return what
    if not head.strip(b"\0"):
        return f"no known signature, first {len(head)} bytes zero"
    return "no known signature"
