"""The state layer (swapfs/state.py): the slot operations, the cursor, the
clocks and hooks, compaction through the slots, and who may import the
store.  (Compaction interleaved with writes, discards, reads and
migrations against a model is part of the model test in test_writeback.py.)"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
import trio

import swapfs
from swapfs.errors import Misuse
from swapfs.fileset import FileTierSet
from swapfs.slots import (
    MAX_FILE_TIERS,
    MOVING,
    POOL,
    SHADOW,
    UNREAD_MARK,
    file_kind,
    kind_of,
    with_length,
)
from swapfs.state import SlotCursor

from ..conftest import MakeStore, tier
from .conftest import MiB, compressible_page, random_page

PAGE = 4096


async def test_compact_after_scattered_discards(make_store: MakeStore) -> None:
    store = make_store(devices=(("swap0", 16 * MiB),))
    dev = store.devices[0]
    rng = random.Random(1)
    pages = [compressible_page(rng) if i % 7 else random_page() for i in range(3000)]
    await store.write(dev, 0, b"".join(pages))
    full = store.pool.pool_bytes
    # Discard three pages in four: holes in nearly every span.
    for i in range(3000):
        if i % 4:
            await store.discard(dev, i * PAGE, PAGE)
            pages[i] = bytes(PAGE)
    store.pool.release_spares()
    before = store.stats().pool
    assert before.pool_bytes < full and store.pool.holes > 0.3
    moved, freed = store.compact()
    after = store.stats().pool
    assert moved > 0 and freed > 0
    assert after.pool_bytes == before.pool_bytes - freed
    assert store.pool.holes < 0.1
    assert after.compressed_bytes == before.compressed_bytes
    assert await store.read(dev, 0, 3000 * PAGE) == b"".join(pages)
    store.check_invariants()
    assert store.compact() == (0, 0)


async def test_relocate_refuses_a_moving_slot(make_store: MakeStore) -> None:
    store = make_store()
    dev = store.devices[0]
    rng = random.Random(2)
    await store.write(dev, 0, b"".join(compressible_page(rng) for _ in range(40)))
    h = dev.table.handles[3]
    owner = dev.index << 40 | 3
    dev.table.info[3] |= MOVING
    assert not store.relocate(owner, h, h + 16)
    assert dev.table.handles[3] == h
    dev.table.info[3] &= ~MOVING
    assert not store.relocate(owner, h + 16, h)  # not the slot's handle
    assert store.pool.owner(h, (dev.table.info[3] >> 4) & 0x1FFF) == owner


async def test_the_cursor_walks_round_only_clusters_in_use(make_store: MakeStore) -> None:
    store = make_store(devices=(("a", 16 * MiB), ("b", 16 * MiB)))
    a, b = store.devices
    page = compressible_page(random.Random(3))
    for dev, s in ((a, 5), (a, 3000), (b, 1030)):
        await store.write(dev, s * PAGE, page)
    cur = SlotCursor()
    chunks = [(d.name, lo, hi) for d, lo, hi in cur.walk(store.devices, 10**6)]
    # one cluster of 1024 slots each, empty clusters skipped, one round
    assert chunks == [("a", 0, 1024), ("a", 2048, 3072), ("b", 1024, 2048)]
    assert (cur.di, cur.slot) == (0, 0)  # round the end, back at the start
    # a bounded walk stops where its budget ends and resumes there
    first = [(d.name, lo, hi) for d, lo, hi in cur.walk(store.devices, 1500)]
    assert first == [("a", 0, 1024), ("a", 2048, 2524)]
    assert [(d.name, lo, hi) for d, lo, hi in cur.walk(store.devices, 600)] == [
        ("a", 2524, 3072), ("b", 1024, 1076)]
    # a consumer that stops inside a chunk says where to resume
    for dev, lo, _hi in cur.walk(store.devices, 10**6):
        cur.stop(dev, lo + 2)
        break
    assert (cur.di, cur.slot) == (1, 1078)
    assert list(SlotCursor().walk([], 100)) == []


async def test_a_move_commits_only_if_the_slot_is_unchanged(make_store: MakeStore) -> None:
    store = make_store()
    dev = store.devices[0]
    rng = random.Random(4)
    await store.write(dev, 0, compressible_page(rng) + compressible_page(rng))
    flagged = store.flag_moving(dev, 0)
    assert flagged & MOVING and store.moves_in_flight == 1
    h = dev.table.handles[0]
    await store.write(dev, 0, compressible_page(rng))  # a write wins over the move
    assert not store.commit_move(dev, 0, flagged, h, 0, 0, 77, 100)
    store.unflag_moving(dev, 0, flagged)
    assert kind_of(dev.table.info[0]) == POOL and not dev.table.info[0] & MOVING
    assert store.moves_in_flight == 0
    store.check_invariants()


async def test_clock_and_writeback_hook_have_named_setters(make_store: MakeStore) -> None:
    store = make_store(pool_bytes=256 * 1024, high=0.5, low=0.4)
    store.set_epoch(2**32 + 7)
    assert store.epoch == 7  # the epoch column's width
    kicks: list[int] = []
    store.set_writeback_kicker(lambda: kicks.append(1))
    dev = store.devices[0]
    rng = random.Random(5)
    for s in range(60):
        await store.write(dev, s * PAGE, compressible_page(rng))
    assert kicks  # the pool passed its high watermark
    assert dev.table.epoch[0] == 7 | UNREAD_MARK  # the epoch, marked written and not read
    store.set_writeback_kicker(None)
    n = len(kicks)
    await store.write(dev, 60 * PAGE, compressible_page(rng))
    assert len(kicks) == n


async def test_one_migration_at_a_time(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store([tier("ssd", tmp_path / "ssd.img", 4 * MiB)])
    dev = store.devices[0]
    rng = random.Random(6)
    await store.write(dev, 0, b"".join(compressible_page(rng) for _ in range(8)))
    tier_ = store.files[0]
    writing, release = trio.Event(), trio.Event()
    write = tier_.write

    async def held_write(*args: object, **kw: object) -> None:
        writing.set()
        await release.wait()  # the first migration stays between copy and commit
        await write(*args, **kw)  # type: ignore[arg-type]

    tier_.write = held_write  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        n.start_soon(store.migrate, [(dev, s) for s in range(4)], 0)
        await writing.wait()
        with pytest.raises(Misuse):
            await store.migrate([(dev, 4)], 0)
        release.set()
    assert all(with_length(dev.table.info[s], 0) == file_kind(0) | SHADOW for s in range(4))


def test_more_file_tiers_than_kinds_is_misuse(tmp_path: Path) -> None:
    from swapfs.cache import SwapCache
    tiers = [tier(f"t{i}", tmp_path / f"t{i}.img", MiB) for i in range(MAX_FILE_TIERS + 1)]
    with pytest.raises(Misuse):
        FileTierSet(tiers, SwapCache(0))


def _imports(path: Path) -> set[str]:
    """The swapfs modules ``path`` imports (relative imports resolved)."""
    pkg = path.relative_to(Path(swapfs.__file__).parent.parent).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[:len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_only_the_adapter_writeback_daemon_and_replay_import_the_store() -> None:
    root = Path(swapfs.__file__).parent
    # swapfs.testing (the fuzzer, the harness) drives the store as the tests do
    importers = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                       if "swapfs.store" in _imports(p) and p.parent.name != "testing")
    assert importers == ["daemon.py", "fs.py", "replay.py", "writeback.py"]
    for name in ("state", "read_path", "write_path", "migrate", "recompress", "invariants",
                 "store_stats"):
        assert "swapfs.state" in _imports(root / f"{name}.py") or name == "state"
