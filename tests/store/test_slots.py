"""The slot table (swapfs/slots.py): its encoding has one home, and its
memory follows the clusters in use.

Outside it, only the hot loops named in ``slots.HOT_LOOPS`` may spell the
info word's layout out, and what each of them spells must agree with the
named helpers for every kind, length and flag.
"""

from __future__ import annotations

import ast
import itertools
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import swapfs
from swapfs import slots
from swapfs.slots import (
    ALT,
    EMPTY,
    FILE0,
    FLAGS,
    HUGE,
    HUGE_INFO,
    MAX_FILE_TIERS,
    MOVING,
    POOL,
    SAME,
    SETTLED,
    SHADOW,
    SlotTable,
    file_kind,
    file_tier_of,
    in_file,
    in_pool,
    key_device,
    key_slot,
    kind_of,
    length_of,
    level_of,
    level_tier,
    pool_info,
    slot_key,
    tier_level,
    tier_of_kind,
    unknown_bits,
    with_length,
)

from ..conftest import MakeStore
from .conftest import MiB, compressible_page

P = 4096
PACKAGE = Path(swapfs.__file__).parent
# Names that spell the layout out (the kind constants alone do not: kinds are
# compared with kind_of()'s result everywhere).
LAYOUT = {"LENGTH_MASK", "KIND_MASK", "KIND_BITS", "FILE0", "SLOT_SHIFT", "SLOT_MASK",
          "_IN_POOL_MASK"}
KINDS = {"EMPTY", "SAME", "POOL", "HUGE"}

# Every inlined form the hot loops may use: (source, how the value is
# checked with X standing for the form, the same through the helpers).
ALLOWED = {
    "(i >> 4) & LENGTH_MASK": ("X", "length_of(i)"),
    "h + ((i >> 4) & LENGTH_MASK)": ("X", "h + length_of(i)"),
    "i & KIND_MASK": ("X", "kind_of(i)"),
    "table.info[slot] & KIND_MASK == POOL": ("X", "kind_of(i) == POOL"),
    "k >= FILE0": ("X", "in_file(i)"),
    "(new_i[idx] & KIND_MASK) - FILE0": ("X", "tier_of_kind(kind_of(i))"),
    "n << 4 | POOL": ("X", "pool_info(n)"),
    "dev.index << SLOT_SHIFT": ("X", "slot_key(d, 0)"),
    "dev.index << SLOT_SHIFT | s": ("X", "slot_key(d, s)"),
    "KIND_MASK | MOVING | ALT | SETTLED": (
        "i & (X) == POOL", "kind_of(i) == POOL and not i & (MOVING | ALT | SETTLED)"),
}


def _inlined() -> list[tuple[str, str, str]]:
    """(module path, enclosing function, source) of every expression outside
    slots.py that spells the slot layout out."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "slots.py":
            continue
        src = path.read_text()
        tree = ast.parse(src)
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
                continue
            if node.id in LAYOUT:
                pass
            elif node.id in KINDS and isinstance(parents.get(node), ast.BinOp):
                pass  # an info word built by hand: n << 4 | POOL
            else:
                continue
            expr: ast.AST = node
            while isinstance(parents.get(expr), (ast.BinOp, ast.Compare, ast.UnaryOp)):
                expr = parents[expr]
            names = []
            up: ast.AST = node
            while up in parents:
                up = parents[up]
                if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.append(up.name)
            module = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
            where = ".".join([module, *reversed(names)])
            found.append((path.name, where, ast.get_source_segment(src, expr) or ""))
    return found


def test_only_the_named_hot_loops_inline_the_encoding() -> None:
    found = _inlined()
    assert found, "the scan finds nothing: it is broken"
    outside = [(p, w, e) for p, w, e in found if w not in slots.HOT_LOOPS]
    assert not outside, f"slot encoding spelled out off the hot loops: {outside}"
    unknown = sorted({e for _, _, e in found} - set(ALLOWED))
    assert not unknown, f"inlined forms without a helper to agree with: {unknown}"


def test_every_named_hot_loop_exists() -> None:
    import importlib
    for name in slots.HOT_LOOPS:
        module, *attrs = name.split(".")
        obj: Any = importlib.import_module(f"swapfs.{module}")
        for a in attrs:
            obj = getattr(obj, a)
        assert callable(obj), name


def _words() -> list[int]:
    kinds = [EMPTY, SAME, POOL, HUGE, *range(FILE0, FILE0 + MAX_FILE_TIERS)]
    flags = [MOVING, SHADOW, ALT, SETTLED]
    out = []
    for k, n in itertools.product(kinds, (0, 1, 17, 2048, 4095, 4096)):
        for r in range(len(flags) + 1):
            for combo in itertools.combinations(flags, r):
                out.append(k | n << 4 | sum(combo))
    return out


@pytest.mark.parametrize("form", sorted(ALLOWED))
def test_inlined_forms_agree_with_the_helpers(form: str) -> None:
    wrap, helper = ALLOWED[form]
    inlined = wrap.replace("X", form)
    names = {k: v for k, v in vars(slots).items() if not k.startswith("__")}
    for i in _words():
        for d, s in ((0, 0), (3, 12345), (7, (1 << 40) - 1)):
            env = dict(names, i=i, k=kind_of(i), n=length_of(i), h=4104, d=d, s=s, slot=0,
                       idx=0, new_i=[i], table=SimpleNamespace(info=[i]),
                       dev=SimpleNamespace(index=d))
            assert eval(inlined, env) == eval(helper, env), (form, hex(i), d, s)


def test_helpers() -> None:
    for i in _words():
        k = kind_of(i)
        assert in_pool(i) == (k in (POOL, HUGE))
        assert in_file(i) == (file_tier_of(i) is not None)
        if in_file(i):
            ti = tier_of_kind(k)
            assert file_kind(ti) == k and level_of(i) == tier_level(ti)
            assert level_tier(level_of(i)) == ti
        else:
            assert level_of(i) == 0
        assert not unknown_bits(i)
        m = with_length(i, 100)
        assert length_of(m) == 100 and m & FLAGS == i & FLAGS and kind_of(m) == k
    assert unknown_bits(1 << 21)
    assert length_of(HUGE_INFO) == 4096 and kind_of(HUGE_INFO) == HUGE
    assert length_of(pool_info(4096)) == 4096 and kind_of(pool_info(7)) == POOL
    key = slot_key(5, 777)
    assert (key_device(key), key_slot(key)) == (5, 777)


def test_slot_table_memory_follows_clusters() -> None:
    table = SlotTable(5000)
    assert table.nclusters == 5 and table.clusters_in_use == 0
    assert table.next_stored(0) == 5000
    table.info[2100] = POOL
    table.filled(2100)
    assert table.clusters_in_use == 1
    assert list(table.stored_chunks(0, 5000)) == [(2048, 3072)]
    table.check()
    table.info[2100] = 0
    table.emptied(2100)
    assert table.clusters_in_use == 0
    table.check()
    table.info[10] = POOL  # a slot in use that no count knows of
    with pytest.raises(AssertionError, match="cluster 0"):
        table.check()


async def test_a_huge_device_holds_only_what_is_stored(make_store: MakeStore) -> None:
    # 1 TiB of slots is 4 GiB of table at 16 bytes a slot: reserved, never
    # backed until written.  Clusters in use cost 16 bytes a slot; a
    # cluster whose last page is discarded gives its memory back.
    store = make_store(devices=(("big", 1 << 40),), pool_bytes=256 * MiB)
    dev = store.devices[0]
    assert dev.npages == 1 << 28
    empty = store.stats().device("big").metadata_bytes
    assert empty < 1 << 20  # the per-cluster counts: 3 bytes a cluster
    rng = random.Random(8)
    page = compressible_page(rng)
    far = [(i * 7919 * 1024 + 5) % dev.npages for i in range(1, 201)]
    for s in far:  # 200 pages in 200 clusters spread over the device
        await store.write(dev, s * P, page)
    await store.write(dev, 0, page * 1024)  # one full cluster
    st = store.stats().device("big")
    assert st.stored_pages == 200 + 1024
    assert st.metadata_bytes - empty <= 201 * 1024 * 16
    for s in far:
        assert await store.read(dev, s * P, P) == page
    store.check_invariants()
    await store.discard(dev, 0, 1 << 40)
    assert store.stats().device("big").metadata_bytes == empty
    assert await store.read(dev, far[3] * P, P) == bytes(P)
    store.check_invariants()


def test_freed_clusters_give_memory_back_in_a_locked_process() -> None:
    # The daemon runs mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), and
    # MADV_DONTNEED refuses locked pages: a freed cluster must still give its
    # memory back (and be locked again when written).  In a child process,
    # so that this test process's memory is not locked.
    code = """
import ctypes, sys
from swapfs.kernel import libc
from swapfs.slots import CLUSTER_SLOTS, SlotTable
if libc().mlockall(1 | 2 | 4) != 0:
    print("SKIP mlockall failed errno", ctypes.get_errno()); sys.exit(0)
def locked_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
t = SlotTable(1 << 24)  # 16M slots: 256 MiB of table reserved
base = locked_kib()
for s in range(64 * CLUSTER_SLOTS):  # 64 clusters written: 1 MiB of table
    t.info[s] = 2
    t.handles[s] = s + 1
    t.filled(s)
grown = locked_kib() - base
for s in range(64 * CLUSTER_SLOTS):
    t.info[s] = 0
    t.handles[s] = 0
    t.emptied(s)
t.check()
shrunk = locked_kib() - base
t.info[5] = 2; t.filled(5)  # written again after the release: still works
print("OK", grown, shrunk, t.release_errors)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    if words[0] == "SKIP":
        pytest.skip(out.stdout.strip())
    grown, shrunk, errors = int(words[1]), int(words[2]), int(words[3])
    assert errors == 0
    assert grown >= 700  # KiB: 64 clusters, 12 bytes a slot written (handle and info)
    assert shrunk < grown / 4, (grown, shrunk)

