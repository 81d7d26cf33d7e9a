"""The object format of the file tiers: one stored page, as the pool held it.

An object is a 16-byte header, the payload, and an integrity tag::

    magic   u8    0xA7
    codec   u8    0 raw page, else the codec id of swapfs.codec (1 lz4, 2 zstd)
    length  u16   payload bytes (1..4096)
    gen     u32   the generation of the segment it was appended to
    key     u64   its slot: device index << 40 | page (swapfs.slots.slot_key)

then the payload (the pool's compressed bytes as they were; the raw page when it did not
compress), then the tag: with encryption, the payload is AES-256-GCM ciphertext and the tag its
16-byte GCM tag, the header as associated data, the nonce the object's offset in the data area
(u64) and the generation (u32); without, an xxh3-64 of header and payload seeded with the
offset (8 bytes).  Either way a flipped bit, an object copied to another offset, an object of
an older generation of its segment or of another slot reads as ChecksumError, never as
another page.

The header is plain so that cleaning can tell, reading a segment, which slot each object
belongs to (``parse``).  Everything here is pure (no I/O): it runs in worker threads and on
the loop alike.
"""

from __future__ import annotations

import struct

import xxhash

from ...kernel import PAGE_SIZE as PAGE
from .cipher import TAG_BYTES, ObjectCipher

HEADER = struct.Struct("<BBHIQ")
HEADER_BYTES = HEADER.size
assert HEADER_BYTES == 16
NONCE = struct.Struct("<QI")
MAGIC = 0xA7
_MAGIC_BYTE = bytes([MAGIC])
CSUM_BYTES = 8
_CSUM = struct.Struct("<Q")
RAW = 0  # the codec id of a page stored as it is
MAX_CODEC = 15
_xxh3 = xxhash.xxh3_64_intdigest


def tag_bytes(encrypted: bool) -> int:
    return TAG_BYTES if encrypted else CSUM_BYTES


def object_bytes(length: int, encrypted: bool) -> int:
    """Bytes on disk of an object of ``length`` payload bytes."""
    return HEADER_BYTES + length + (TAG_BYTES if encrypted else CSUM_BYTES)


def seal(cipher: ObjectCipher | None, handle: int, gen: int, key: int, codec: int,
         payload: bytes | memoryview) -> list[bytes | memoryview]:
    """The parts of the object (header, body, [tag]) to be written at ``handle``."""
    n = len(payload)
    hdr = HEADER.pack(MAGIC, codec, n, gen, key)
    if cipher is not None:
        return [hdr, cipher.seal(NONCE.pack(handle, gen), payload, hdr)]
    return [hdr, payload, _CSUM.pack(_xxh3(hdr + bytes(payload), handle))]


class Bad(Exception):
    """An object does not verify; the message says how."""


def unseal(cipher: ObjectCipher | None, handle: int, gen: int, key: int, length: int,
           buf: bytes | memoryview) -> tuple[int, bytes]:
    """``(codec, payload)`` of the object read at ``handle`` (``buf``: its bytes), expected to
    be ``key``'s of ``length`` payload bytes in generation ``gen``; Bad otherwise."""
    if len(buf) != object_bytes(length, cipher is not None):
        raise Bad("short object")
    hdr = bytes(buf[:HEADER_BYTES])
    magic, codec, n, g, k = HEADER.unpack(hdr)
    if magic != MAGIC or n != length or k != key or g != gen or codec > MAX_CODEC:
        raise Bad(f"header names slot {k:#x}, {n} bytes, generation {g} "
                  f"(expected {key:#x}, {length} bytes, generation {gen})")
    if cipher is not None:
        out = cipher.open(NONCE.pack(handle, gen), buf[HEADER_BYTES:], hdr)
        if out is None:
            raise Bad("authentication tag mismatch")
        return codec, out
    body = bytes(buf[HEADER_BYTES:HEADER_BYTES + n])
    (tag,) = _CSUM.unpack(buf[HEADER_BYTES + n:])
    if tag != _xxh3(hdr + body, handle):
        raise Bad("checksum mismatch")
    return codec, body


def parse(buf: bytes | memoryview, base: int, gen: int, encrypted: bool
          ) -> list[tuple[int, int, int, int]]:
    """The objects a segment's bytes ``buf`` (read from handle ``base``) appear to hold, in
    generation ``gen``: ``(handle, key, length, position in buf)``.  Unverified: the caller
    checks that a slot names the handle and verifies the object before trusting it.  A region
    that holds no object (padding, a hole, a write that failed) is skipped by looking for the
    next magic byte whose header is plausible."""
    data = bytes(buf)
    out: list[tuple[int, int, int, int]] = []
    end = len(data)
    extra = HEADER_BYTES + tag_bytes(encrypted)
    unpack = HEADER.unpack_from
    pos = 0
    while pos + HEADER_BYTES <= end:
        if data[pos] == MAGIC:
            magic, codec, n, g, k = unpack(data, pos)
            if g == gen and 0 < n <= PAGE and codec <= MAX_CODEC and pos + n + extra <= end:
                out.append((base + pos, k, n, pos))
                pos += n + extra
                continue
        pos = data.find(_MAGIC_BYTE, pos + 1)
        if pos < 0:
            break
    return out
