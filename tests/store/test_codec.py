"""Codecs round-trip pages; same-filled detection is exact."""

from __future__ import annotations

import os
import random
import sys

import pytest
import xxhash

from swapfs.codec import CODECS, CODECS_BY_ID, ZERO_PAGE, checksum, fill_page, make_codec, same_fill_word

from .conftest import compressible_page


@pytest.mark.parametrize("name, level", [("lz4", 1), ("zstd", 1), ("zstd", 3), ("zstd", 19)])
def test_round_trip(name: str, level: int) -> None:
    codec = make_codec(name, level)
    rng = random.Random(1)
    pages = [compressible_page(rng) for _ in range(20)] + [os.urandom(4096), ZERO_PAGE,
                                                           b"ab" * 2048]
    for page in pages:
        for buf in (page, bytearray(page), memoryview(page)):
            c = codec.compress(buf)
            assert codec.decompress(c) == page
            assert codec.decompress(memoryview(c)) == page
    c = codec.compress(pages[0])
    assert len(c) < 3000


def test_ids_stable() -> None:
    assert {n: c.id for n, c in CODECS.items()} == {"lz4": 1, "zstd": 2}
    assert CODECS_BY_ID[1].name == "lz4"
    with pytest.raises(ValueError):
        make_codec("lzma")


def test_same_fill_zero() -> None:
    assert same_fill_word(ZERO_PAGE) == 0
    assert same_fill_word(bytearray(4096)) == 0
    assert same_fill_word(memoryview(bytes(8192))[4096:]) == 0


@pytest.mark.parametrize("word", [1, 0xFF, 0x0102030405060708, 2**64 - 1, 0xFF00000000000000])
def test_same_fill_pattern(word: int) -> None:
    page = word.to_bytes(8, sys.byteorder) * 512
    assert same_fill_word(page) == word
    assert fill_page(word) == page


@pytest.mark.parametrize("pos", [0, 1, 7, 8, 2047, 2048, 4087, 4088, 4095])
@pytest.mark.parametrize("word", [0, 0x0102030405060708])
def test_same_fill_near_miss(pos: int, word: int) -> None:
    page = bytearray(word.to_bytes(8, sys.byteorder) * 512)
    page[pos] ^= 0x5A
    assert same_fill_word(page) is None


def test_same_fill_other() -> None:
    assert same_fill_word(os.urandom(4096)) is None
    # Same first and last word, different in between.
    page = bytearray(os.urandom(4096))
    page[4088:] = page[:8]
    assert same_fill_word(page) is None
    # A 4-byte period is also an 8-byte period.
    assert same_fill_word(b"abcd" * 1024) == int.from_bytes(b"abcdabcd", sys.byteorder)
    # A 16-byte period is not.
    assert same_fill_word(b"0123456789abcdef" * 256) is None


def test_fill_page() -> None:
    assert fill_page(0) == ZERO_PAGE
    for w in range(300):
        assert fill_page(w) == w.to_bytes(8, sys.byteorder) * 512


def test_checksum() -> None:
    data = os.urandom(4096)
    assert checksum(data) == xxhash.xxh3_64_intdigest(data)
    assert checksum(memoryview(data)) == checksum(data)
    assert checksum(data) != checksum(data[:-1] + bytes([data[-1] ^ 1]))
