"""StateMemory: regions, shared memfds, adoption, sizes, giving memory back."""

from __future__ import annotations

import mmap
import os

import pytest

from swapfs.errors import Misuse, StoreError
from swapfs.memory import STATE_VERSION, StateMemory

PAGE = mmap.PAGESIZE


def _adopt(mem: StateMemory) -> StateMemory:
    return StateMemory.adopt({name: os.dup(fd) for name, fd in mem.fds().items()})


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_private_regions_have_no_fds() -> None:
    mem = StateMemory()
    m = mem.reserve("a", 3 * PAGE + 1)
    assert len(m) == 4 * PAGE
    m[:5] = b"hello"
    assert mem.fds() == {}
    assert mem.regions() == {"header": PAGE, "a": 4 * PAGE}
    mem.release(m, 0, PAGE)
    assert m[:5] == bytes(5)
    with pytest.raises(Misuse, match="twice"):
        mem.reserve("a", PAGE)


def test_a_successor_maps_the_same_bytes() -> None:
    mem = StateMemory(shared=True)
    m = mem.reserve("slots.swap0.handles", 64 * PAGE)
    m[PAGE:PAGE + 4] = b"data"
    mem.header.set("epoch", 42)
    mem.add_fd("tierfile.ssd", os.dup(0))
    fds = mem.fds()
    assert {"mem.header", "mem.slots.swap0.handles", "tierfile.ssd"} == set(fds)
    succ = _adopt(mem)
    assert succ.header.get("epoch") == 42
    assert succ.adopted_fd("tierfile.ssd") >= 0
    m2 = succ.reserve("slots.swap0.handles", 64 * PAGE)
    assert m2[PAGE:PAGE + 4] == b"data"
    m2[0:2] = b"ok"  # shared: the predecessor's mapping sees it
    assert m[0:2] == b"ok"
    assert succ.unclaimed() == []


def test_adoption_refuses_missing_or_resized_regions() -> None:
    mem = StateMemory(shared=True)
    mem.reserve("pool", 16 * PAGE)
    succ = _adopt(mem)
    with pytest.raises(StoreError, match="'pool' holds"):
        succ.reserve("pool", 32 * PAGE)
    with pytest.raises(StoreError, match="no region 'dedup'"):
        succ.reserve("dedup", PAGE)


def test_adoption_refuses_another_layout_version() -> None:
    mem = StateMemory(shared=True)
    mem.header.words[1] = STATE_VERSION + 1
    with pytest.raises(StoreError, match="layout version"):
        _adopt(mem)
    mem.header.words[1] = STATE_VERSION
    mem.header.words[0] = 0x1234
    with pytest.raises(StoreError, match="magic"):
        _adopt(mem)


def test_release_punches_the_memfd() -> None:
    """Shared memory given back is freed in the memory file, not just unmapped."""
    mem = StateMemory(shared=True)
    m = mem.reserve("pool", 256 * PAGE)
    fd = mem.fds()["mem.pool"]
    assert _allocated(fd) == 0  # sparse
    m[:] = b"\x01" * len(m)
    assert _allocated(fd) >= 256 * PAGE
    mem.release(m, 0, 128 * PAGE)
    assert _allocated(fd) <= 128 * PAGE
    assert mem.data_ranges(m) == [(128 * PAGE, 256 * PAGE)]
    assert m[0] == 0 and m[128 * PAGE] == 1
