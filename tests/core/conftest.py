"""Fixtures for the store tests: small stores, checked after every test."""

from __future__ import annotations

import os
import random
from typing import Callable, Iterator

import pytest

from swapfs.config import Config, DeviceConfig, PoolConfig
from swapfs.store import Store

MiB = 1 << 20


def make_config(*, algorithm: str = "lz4", level: int = 1, max_bytes: int = 64 * MiB,
                accept_ratio: float = 0.8, devices: tuple[tuple[str, int], ...] = (
                    ("swap0", 4 * MiB),)) -> Config:
    return Config(
        pool=PoolConfig(max_bytes=max_bytes, algorithm=algorithm, level=level,
                        accept_ratio=accept_ratio),
        devices=tuple(DeviceConfig(name=n, size=s) for n, s in devices))


@pytest.fixture
def make_store() -> Iterator[Callable[..., Store]]:
    """Build stores; every one of them passes check_invariants at teardown."""
    made: list[Store] = []

    def factory(arena_bytes: int | None = 64 * 1024, **kw: object) -> Store:
        store = Store(make_config(**kw), arena_bytes=arena_bytes)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield factory
    for store in made:
        store.check_invariants()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    return make_store()


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
