"""Fixtures for the store tests: small stores (made by the shared
``make_store``, checked after every test) and page contents."""

from __future__ import annotations

import functools
import os
import random

import pytest

from swapfs.store import Store

from ..conftest import MakeStore

MiB = 1 << 20


@pytest.fixture
def store(make_store: MakeStore) -> Store:
    return make_store()


@pytest.fixture
def stores(make_store: MakeStore) -> MakeStore:
    """Small pools over file tiers, so that pools fill fast."""
    return functools.partial(make_store, pool_bytes=256 * 1024, cache_pages=64,
                             devices=(("swap0", 8 * MiB, True),))


_WORDS = [bytes(random.Random(i).choice(b"abcdefghijklmnopqrstuvwxyz")
                for _ in range(3 + i % 7)) for i in range(300)]


def compressible_page(rng: random.Random) -> bytes:
    """A page that lz4 compresses to roughly a third: words and small numbers."""
    out = bytearray()
    while len(out) < 4096:
        r = rng.random()
        if r < 0.7:
            out += rng.choice(_WORDS) + b" "
        elif r < 0.85:
            out += rng.randrange(1000).to_bytes(4, "little")
        else:
            out += bytes(rng.randrange(4, 32))
    return bytes(out[:4096])


def random_page() -> bytes:
    return os.urandom(4096)
