"""Same content stored once ([pool] dedup): sharing, the last reference,
collisions, writeback and compaction of shared objects, the index's size."""

from __future__ import annotations

import functools
import random

import pytest

from swapfs.dedup import MIN_WORDS
from swapfs.dedup import SHARED as SHARED_TAG
from swapfs.slots import ALT, FILE0, KIND_MASK, POOL, SETTLED
from swapfs.store import Store
from swapfs.tiers.pool import HEADER
from swapfs.writeback import Writeback

from ..conftest import MakeStore, tier
from .conftest import MiB, compressible_page, random_page

P = 4096


@pytest.fixture
def dstore(make_store: MakeStore) -> MakeStore:
    return functools.partial(make_store, dedup=True)


def page(seed: int) -> bytes:
    return compressible_page(random.Random(seed))


async def test_twenty_thousand_identical_pages_take_one_object(dstore: MakeStore) -> None:
    store = dstore(devices=(("swap0", 20_000 * P),))
    dev = store.devices[0]
    one = page(1)
    for first in range(0, 20_000, 250):  # 1 MiB requests, as FUSE sends them
        await store.write(dev, first * P, one * 250)
    st = store.stats()
    assert st.pool.pool_bytes <= 1 * MiB
    assert store.pool.objects == 1
    assert st.pool.stored_pages == st.devices[0].pool_pages == 20_000
    assert st.pool.dedup_pages == 19_999 and st.pool.dedup_hits == 19_999
    assert st.pool.dedup_saved_bytes > 19_999 * len(store.codec.compress(one))
    assert st.totals.stored_pages == 20_000
    assert st.totals.compression_ratio > 1000
    for s in (0, 1, 9_999, 19_999):
        assert await store.read(dev, s * P, P) == one
    assert await store.read(dev, 0, 250 * P) == one * 250
    store.check_invariants()


async def test_off_by_default(store: Store) -> None:
    dev = store.devices[0]
    await store.write(dev, 0, page(1) * 4)
    assert store.dedup is None and store.pool.objects == 4
    assert store.stats().pool.dedup_pages == 0


async def test_the_last_reference_frees_the_object(dstore: MakeStore) -> None:
    store = dstore()
    dev = store.devices[0]
    one = page(2)
    await store.write(dev, 0, one * 10)
    assert store.pool.objects == 1 and store.dedup is not None
    h = dev.table.handles[0]
    assert store.pool.words[(h - HEADER) >> 3] == SHARED_TAG | 10
    await store.discard(dev, 0, 9 * P)
    store.check_invariants()
    assert store.pool.objects == 1 and store.dedup.entries == 1
    assert await store.read(dev, 9 * P, P) == one
    await store.discard(dev, 9 * P, P)
    assert store.pool.objects == 0 and store.dedup.entries == 0
    assert store.pool.compressed_bytes == 0
    st = store.stats().pool
    assert (st.dedup_pages, st.dedup_saved_bytes) == (0, 0)


async def test_overwriting_a_sharer_keeps_the_others(dstore: MakeStore) -> None:
    store = dstore()
    dev = store.devices[0]
    one, two = page(3), page(4)
    await store.write(dev, 0, one * 3)
    await store.write(dev, P, two)  # a sharer rewritten with other content
    assert [await store.read(dev, s * P, P) for s in range(3)] == [one, two, one]
    assert store.stats().pool.dedup_pages == 1
    await store.write(dev, 0, one)  # rewritten with its own content
    await store.write(dev, 2 * P, bytes(P))  # now same-filled
    store.check_invariants()
    assert [await store.read(dev, s * P, P) for s in range(3)] == [one, two, bytes(P)]
    assert store.pool.objects == 2 and store.stats().pool.dedup_pages == 0
    await store.write(dev, 5 * P + 100, b"x" * 10)  # a partial write of a sharer's neighbour
    await store.write(dev, 4 * P, one + one)
    await store.write(dev, 4 * P + 7, b"y")  # read-modify-write of a sharer
    assert await store.read(dev, 4 * P, P) == one[:7] + b"y" + one[8:]
    assert await store.read(dev, 0, P) == one and await store.read(dev, 5 * P, P) == one


async def test_a_hash_collision_never_shares(dstore: MakeStore) -> None:
    """Every page hashes to 0: the index holds one long probe run, every
    lookup compares bytes, and distinct pages read back exact."""
    store = dstore(devices=(("swap0", 8 * MiB),))
    assert store.dedup is not None
    store.dedup.hash = lambda data: 0
    dev = store.devices[0]
    pages = [page(100 + i) for i in range(150)] + [page(100 + i % 20) for i in range(150)]
    pages += [b"a" * 2000 + b"b" * 2096, b"b" * 2096 + b"a" * 2000]  # equal lengths compressed
    for s, p in enumerate(pages):
        await store.write(dev, s * P, p)
    store.check_invariants()
    for s, p in enumerate(pages):
        assert await store.read(dev, s * P, P) == p
    assert store.dedup.collisions > 0
    assert store.pool.objects == 152 and store.stats().pool.dedup_pages == 150
    # removals from the middle of the run keep every entry findable
    await store.discard(dev, 0, 40 * P)
    await store.discard(dev, 200 * P, 50 * P)
    store.check_invariants()
    for s, p in enumerate(pages):
        if not (s < 40 or 200 <= s < 250):
            assert await store.read(dev, s * P, P) == p


async def test_a_weak_tag_compares_bytes(dstore: MakeStore) -> None:
    """Hashes equal in their top bits (tag and bucket) but for the low ones."""
    store = dstore()
    assert store.dedup is not None
    store.dedup.hash = lambda data: 0xABCD << 48 | len(bytes(data)) % 3
    dev = store.devices[0]
    pages = [page(200 + i) for i in range(64)]
    await store.write(dev, 0, b"".join(pages) + b"".join(pages))
    assert await store.read(dev, 0, 128 * P) == b"".join(pages) * 2
    assert store.pool.objects == 64
    store.check_invariants()


async def test_the_index_grows_and_shrinks_with_the_objects(dstore: MakeStore) -> None:
    store = dstore(devices=(("swap0", 16 * MiB),))
    dd = store.dedup
    assert dd is not None and dd.nwords == MIN_WORDS
    dev = store.devices[0]
    pages = [page(1000 + i) for i in range(3000)]
    await store.write(dev, 0, b"".join(pages))
    assert dd.entries == 3000 and dd.nwords == 4096 and dd.entries * 4 <= dd.nwords * 3
    store.check_invariants()
    await store.write(dev, 3000 * P, b"".join(pages[:100]))
    assert store.stats().pool.dedup_pages == 100
    await store.discard(dev, 0, 2900 * P)
    store.check_invariants()
    assert dd.nwords < 4096
    await store.discard(dev, 0, 16 * MiB)
    assert dd.entries == 0 and dd.nwords == MIN_WORDS
    assert store.stats().pool.dedup_index_bytes == MIN_WORDS * 8


async def test_the_check_sees_a_wrong_reference_count(dstore: MakeStore) -> None:
    store = dstore()
    dev = store.devices[0]
    await store.write(dev, 0, page(5) * 3 + page(6))
    h = dev.table.handles[0]
    k = (h - HEADER) >> 3
    store.pool.words[k] = SHARED_TAG | 2
    with pytest.raises(AssertionError, match="references"):
        store.check_invariants()
    store.pool.words[k] = SHARED_TAG | 3
    assert store.dedup is not None
    store.dedup.extra_refs += 1
    with pytest.raises(AssertionError, match="shared references"):
        store.check_invariants()
    store.dedup.extra_refs -= 1
    store.check_invariants()


async def test_compaction_moves_unshared_objects_and_leaves_shared_ones(
        dstore: MakeStore) -> None:
    store = dstore(devices=(("swap0", 8 * MiB),))
    dev = store.devices[0]
    rng = random.Random(7)
    n = 1200
    data = [compressible_page(rng) if s % 10 else page(s % 30) for s in range(n)]
    await store.write(dev, 0, b"".join(data))
    shared = {s: dev.table.handles[s] for s in range(0, n, 10)}
    for s in range(n):  # leave holes: free most unshared pages
        if s % 10 and s % 7:
            await store.discard(dev, s * P, P)
    moved, freed = store.compact()
    assert moved > 0 and freed > 0
    assert {s: dev.table.handles[s] for s in shared} == shared  # shared objects stay
    store.check_invariants()  # the index follows the moved objects
    for s in range(n):
        want = data[s] if s % 10 == 0 or s % 7 == 0 else bytes(P)
        assert await store.read(dev, s * P, P) == want
    # a write into a freed slot still finds a moved object in the index
    before = store.pool.objects
    await store.write(dev, 1 * P, data[7])
    assert store.pool.objects == before and store.stats().pool.dedup_pages >= 1
    assert await store.read(dev, P, P) == data[7]
    store.check_invariants()


async def test_writeback_demotes_a_sharer_and_the_others_stay(
        make_store: MakeStore, tmp_path) -> None:
    store = make_store([tier("ssd", tmp_path / "ssd.img", 16 * MiB)], pool_bytes=8 * MiB,
                       dedup=True, devices=(("swap0", 8 * MiB, True),))
    dev = store.devices[0]
    one = page(9)
    rest = [page(300 + i) for i in range(32)]
    store.epoch = 10
    await store.write(dev, 0, one * 4)  # the oldest: demoted first
    store.epoch = 20
    await store.write(dev, 4 * P, b"".join(rest) + one * 4)
    wb = Writeback(store)
    assert await wb.writeback_pages(3) == 3
    kinds = [dev.table.info[s] & KIND_MASK for s in range(40)]
    assert kinds[:3] == [FILE0] * 3 and kinds[3:] == [POOL] * 37
    store.check_invariants()
    assert store.stats().pool.dedup_pages == 4  # slot 3 and the four after the rest
    assert await store.read(dev, 0, 40 * P) == one * 4 + b"".join(rest) + one * 4
    await wb.writeback_pages(40)  # (the read may have promoted the three back)
    assert all(dev.table.info[s] & KIND_MASK == FILE0 for s in range(40))
    assert store.pool.objects == 0 and store.dedup is not None and store.dedup.entries == 0
    assert await store.read(dev, 0, 40 * P) == one * 4 + b"".join(rest) + one * 4
    store.check_invariants()


async def test_incompressible_and_same_filled_pages_are_not_indexed(dstore: MakeStore) -> None:
    store = dstore()
    dev = store.devices[0]
    noise = random_page()
    await store.write(dev, 0, noise * 3 + bytes(P) * 3)
    assert store.dedup is not None and store.dedup.entries == 0
    assert store.pool.objects == 3
    assert await store.read(dev, 0, 6 * P) == noise * 3 + bytes(P) * 3


async def test_one_page_writes_share_too(dstore: MakeStore) -> None:
    """The kernel swaps out one page per request: the one-page path shares."""
    store = dstore()
    dev = store.devices[0]
    one = page(11)
    for s in range(100):
        await store.write(dev, s * P, one)
    assert store.pool.objects == 1 and store.stats().pool.dedup_pages == 99
    await store.write(dev, 5 * P, page(12))  # a sharer rewritten, one page
    await store.write(dev, 5 * P, one)  # and back
    assert store.pool.objects == 1
    store.check_invariants()
    assert await store.read(dev, 0, 100 * P) == one * 100


async def test_recompression_skips_shared_objects(make_store: MakeStore) -> None:
    store = make_store(dedup=True, recompress="zstd", recompress_after=0)
    dev = store.devices[0]
    one = page(13)
    rest = [page(400 + i) for i in range(20)]
    await store.write(dev, 0, one * 5 + b"".join(rest))
    shared = dev.table.handles[0]
    store.recompressor.step(1000, 0)
    store.check_invariants()
    assert store.recompressor.recompressed_pages > 0
    assert all(dev.table.handles[s] == shared for s in range(5))
    assert await store.read(dev, 0, 25 * P) == one * 5 + b"".join(rest)
    await store.discard(dev, P, 4 * P)  # slot 0 alone refers to it now: recompressed
    store.recompressor.step(1000, 0)
    store.check_invariants()
    assert dev.table.info[0] & (ALT | SETTLED) and dev.table.handles[0] != shared
    assert await store.read(dev, 0, 25 * P) == one + bytes(4 * P) + b"".join(rest)


async def test_a_table_larger_than_its_tags_rehashes_from_the_pool(dstore: MakeStore) -> None:
    """Once the table has more bucket bits than a word keeps of the hash
    (very large pools), homes are recomputed from the objects' bytes."""
    store = dstore(devices=(("swap0", 16 * MiB),))
    dd = store.dedup
    assert dd is not None
    dd.tag_bits = 4  # as if the handles took all but 4 bits of the word
    dev = store.devices[0]
    pages = [page(2000 + i) for i in range(2500)]
    await store.write(dev, 0, b"".join(pages))
    assert dd.nwords == 4096 and dd.bits > dd.tag_bits
    await store.discard(dev, 0, 1200 * P)  # backward shifts with recomputed homes
    store.check_invariants()
    await store.write(dev, 3000 * P, b"".join(pages[1200:1300]))
    assert store.stats().pool.dedup_pages == 100
    assert await store.read(dev, 1200 * P, 1300 * P) == b"".join(pages[1200:])
    store.check_invariants()
