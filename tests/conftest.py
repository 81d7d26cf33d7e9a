"""What every layer's tests share: building stores (and file tier configs)
that are checked after every test and always closed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from swapfs.config import Config, DeviceConfig, PoolConfig, TierConfig
from swapfs.fuse import uring
from swapfs.store import CACHE_PAGES, Store
from swapfs.testing import harness
from swapfs.testing.redis import LocalCluster, redis_server_missing

MiB = 1 << 20

MakeStore = Callable[..., Store]


def tier(name: str, path: Path | str, size: int, priority: int = 100, high: float = 0.95,
         low: float = 0.9, encrypt: bool = True, segment_bytes: int = 4 * MiB,
         recompress: str = "") -> TierConfig:
    """A file tier's config."""
    return TierConfig(name=name, kind="file", path=str(path), size=size, priority=priority,
                      high_watermark=high, low_watermark=low, encrypt=encrypt,
                      segment_bytes=segment_bytes, recompress=recompress)


def store_config(tiers: Sequence[TierConfig] = (), *, pool_bytes: int = 64 * MiB,
                 algorithm: str = "lz4", level: int = 1, accept_ratio: float = 0.8,
                 high: float = 0.9, low: float = 0.8, dedup: bool = False,
                 devices: Sequence[tuple[str, int] | tuple[str, int, bool]] = (("swap0", 4 * MiB),),
                 recompress: str | None = None, recompress_after: float = 600.0,
                 ) -> Config:
    """A config; ``devices`` as (name, size) or (name, size, writeback)."""
    return Config(
        pool=PoolConfig(max_bytes=pool_bytes, algorithm=algorithm, level=level,
                        accept_ratio=accept_ratio, high_watermark=high, low_watermark=low,
                        recompress=recompress, recompress_after=recompress_after,
                        dedup=dedup),
        devices=tuple(DeviceConfig(name=d[0], size=d[1], writeback=d[2] if len(d) > 2 else True)
                      for d in devices),
        tiers=tuple(tiers))


@pytest.fixture
def make_store() -> Iterator[MakeStore]:
    """``make_store(tiers=(), *, cache_pages=..., **store_config)``.
    Every store made passes check_invariants at teardown, and its file tiers
    are closed.  Test modules bind their own defaults with functools.partial."""
    made: list[Store] = []

    def factory(tiers: Sequence[TierConfig] = (), *, cache_pages: int = CACHE_PAGES,
                **kw: object) -> Store:
        store = Store(store_config(tiers, **kw), cache_pages=cache_pages)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield factory
    try:
        for store in made:
            store.check_invariants()
    finally:
        for store in made:
            store.files.close()


@pytest.fixture(scope="session")
def uring_enabled():
    """FUSE over io_uring usable for this test session (harness.uring_ready: as
    root, enable_uring set to Y and fusectl mounted, both restored afterwards);
    otherwise skip with the reason."""
    with harness.uring_ready() as reason:
        if reason:
            pytest.skip(reason)
        yield


@contextlib.contextmanager
def enable_uring_set(value: str) -> Iterator[None]:
    """The fuse module's enable_uring set to ``value`` for the block, restored after."""
    old = uring.enable_uring()
    assert old is not None
    uring.set_enable_uring(value)
    try:
        yield
    finally:
        uring.set_enable_uring(old)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A local Redis Cluster, 3 masters with a replica each, for the whole session (always
    stopped); skipped with the reason where redis-server is missing.  Tests that kill, freeze
    or fill nodes start their own (``LocalCluster``)."""
    why = redis_server_missing()
    if why:
        pytest.skip(why)
    with LocalCluster(masters=3, replicas=1) as cluster:
        yield cluster
