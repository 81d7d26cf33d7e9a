"""Compression and same-filled page detection.

Checksums are not this module's: the file tiers tag their own objects
(swapfs/tiers/file/objects.py); ``checksum`` below is an xxh3-64 for tools
and tests.

One small class per algorithm, each with a stable one-byte id, written in
the header of every file-tier object (0 there means a raw page; never reuse
an id): pages move down the tiers as the pool holds them, compressed.  The store binds
``codec.compress`` and ``codec.decompress`` once and calls them per page, so
they are plain C callables where possible.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import lz4.block
import xxhash
import zstandard

from swapfs.kernel import PAGE_SIZE

if TYPE_CHECKING:
    from typing_extensions import Buffer

ZERO_PAGE = bytes(PAGE_SIZE)
_WORDS_PER_PAGE = PAGE_SIZE // 8


class Codec:
    """A page compressor: ``compress(page) -> bytes``, ``decompress(buf) -> bytes``.

    ``decompress`` returns exactly PAGE_SIZE bytes for a buffer made by
    ``compress`` of one page.
    """

    id: ClassVar[int]
    name: ClassVar[str]
    compress: Callable[[bytes | bytearray | memoryview], bytes]
    decompress: Callable[[bytes | bytearray | memoryview], bytes]

    def __init__(self, level: int = 1) -> None:
        """``level``: the algorithm's compression level, where it has one."""


class Lz4Codec(Codec):
    id = 1
    name = "lz4"

    def __init__(self, level: int = 1) -> None:
        # lz4's block format carries no size; we always know it is one page.
        self.compress = functools.partial(lz4.block.compress, store_size=False)
        self.decompress = functools.partial(lz4.block.decompress, uncompressed_size=PAGE_SIZE)


class ZstdCodec(Codec):
    id = 2
    name = "zstd"

    def __init__(self, level: int = 1) -> None:
        # No checksum (the pool is memory; file tiers checksum with xxh3), no
        # content size in the frame (the size is always one page; measured
        # faster), no dictionary id.
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=False,
                                              write_content_size=False, write_dict_id=False)
        self._dctx = zstandard.ZstdDecompressor()
        self.compress = self._cctx.compress
        self.decompress = functools.partial(self._dctx.decompress, max_output_size=PAGE_SIZE)


CODECS: dict[str, type[Codec]] = {"lz4": Lz4Codec, "zstd": ZstdCodec}
CODECS_BY_ID: dict[int, type[Codec]] = {c.id: c for c in CODECS.values()}


def make_codec(name: str, level: int = 1) -> Codec:
    """The codec for an algorithm name of the config contract."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown compression algorithm {name!r}") from None
    return cls(level)


def same_fill_word(page: Buffer) -> int | None:
    """The 8-byte word (native byte order) a page is made of, or None.

    Most pages are rejected by comparing their first and last words; only
    the rest are compared in full, as bytes (memcmp in C).  Zero pages, by
    far the most common same-filled pages, are compared with one constant.
    """
    mv = memoryview(page)
    q = mv.cast("Q") if mv.format != "Q" else mv
    w = q[0]
    if w != q[_WORDS_PER_PAGE - 1]:
        return None
    b = mv.tobytes()
    if w == 0:
        return 0 if b == ZERO_PAGE else None
    return w if b[8:] == b[:-8] else None


_fill_cache: dict[int, bytes] = {0: ZERO_PAGE}


def fill_page(word: int) -> bytes:
    """A page made of the 8-byte word ``word`` (native byte order)."""
    p = _fill_cache.get(word)
    if p is None:
        p = word.to_bytes(8, sys.byteorder) * _WORDS_PER_PAGE
        if len(_fill_cache) < 256:
            _fill_cache[word] = p
    return p


def checksum(buf: Buffer) -> int:
    """64-bit xxh3 of a buffer (an unencrypted file tier tags its objects with it, seeded)."""
    return xxhash.xxh3_64_intdigest(buf)
