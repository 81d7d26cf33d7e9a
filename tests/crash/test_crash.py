"""Model-based crash tests: a store in shared memory, driven by a seed in a
child process, is killed (SIGKILL) after a chosen number of its own
bytecodes (every instruction of swapfs is a possible kill point, commit
points included) or at a random moment; the parent adopts the memory,
recovers, runs the invariant checker and compares every page with the
model: the operation cut short may have happened or not, nothing else."""

from __future__ import annotations

import gc
import itertools
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import trio

import swapfs
from swapfs.errors import StoreError
from swapfs.memory import StateMemory
from swapfs.store import Store

from ..conftest import store_config, tier
from . import model
from .model import PAGE, SLOTS, Op

MiB = 1 << 20
_SWAPFS = os.path.dirname(swapfs.__file__)


def _config(dedup: bool, tier_dir: Path) -> Any:
    """A store over a file tier (a new backing file each time)."""
    path = tier_dir / f"ssd-{next(_files)}.tier"
    # small segments: the mix seals some, and cleaning finds them
    return store_config((tier("ssd", path, 8 * MiB, segment_bytes=64 * 1024),),
                        devices=(("swap0", 4 * MiB),),
                        pool_bytes=8 * MiB, dedup=dedup, recompress="zstd", recompress_after=0.0)


_files = itertools.count()


@pytest.fixture(autouse=True)
def _collect() -> Iterator[None]:
    """Close the dead stores' mappings (and their fds) before the next test."""
    yield
    gc.collect()


class _Killer:
    """A trace function counting the bytecodes executed in swapfs's modules;
    it SIGKILLs the process at the ``kill_at``-th (never if None)."""

    def __init__(self, kill_at: int | None) -> None:
        self.count = 0
        self.kill_at = kill_at if kill_at is not None else -1

    def local(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            self.count += 1
            if self.count == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.local

    def __call__(self, frame: FrameType, event: str, arg: object) -> Any:
        if not frame.f_code.co_filename.startswith(_SWAPFS):
            return None
        frame.f_trace_opcodes = True
        return self.local


def _child(store: Store, ops: list[Op], log_fd: int, kill_at: int | None,
           traced: bool) -> None:
    code = 0
    try:
        killer = _Killer(kill_at)
        if traced:
            sys.settrace(killer)
        trio.run(model.run, store, ops, log_fd, lambda: killer.count)
        sys.settrace(None)
    except BaseException:
        sys.settrace(None)
        os.write(log_fd, b"F\n" + traceback.format_exc().encode().replace(b"\n", b" | "))
        code = 1
    finally:
        os._exit(code)


def _crash(seed: int, tier_dir: Path, *, dedup: bool, count: int, kill_at: int | None = None,
           kill_after_s: float | None = None, traced: bool | None = None,
           mix: list[Op] | None = None) -> tuple[Store, list[Op], int, int, list[int]]:
    """Run the mix of ``seed`` in a child killed as asked; return the
    adopted, recovered store, the operations, the first one not done, the
    one cut short (-1: none) and the instruction count at each operation's
    start (when traced)."""
    if len(os.listdir("/proc/self/fd")) > 256:
        gc.collect()  # dead stores' mappings (each holds a dup of its memfd) go with their views
    config = _config(dedup, tier_dir)
    memory = StateMemory(shared=True)
    store = Store(config, memory=memory)
    ops = mix[:count] if mix is not None else model.operations(seed, count)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        _child(store, ops, w, kill_at, kill_at is not None if traced is None else traced)
    os.close(w)
    if kill_after_s is not None:
        time.sleep(kill_after_s)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    log = b""
    while chunk := os.read(r, 1 << 16):
        log += chunk
    os.close(r)
    assert b"F\n" not in log, f"the child failed (not a kill): {log[log.index(b'F'):]!r}"
    lines = log.split()
    bad = [x for x in lines if x.startswith(b"X")]
    assert not bad, f"a read in the child returned wrong bytes: op {bad[0][1:]}"
    began = [int(x[1:]) for x in lines if x.startswith(b"B")]
    clocks = [int(x) for x in lines if x[:1].isdigit()]
    ended = [int(x[1:]) for x in lines if x.startswith(b"E")]
    done = len(ended)
    assert ended == list(range(done))
    cut = began[-1] if began and (not ended or began[-1] != ended[-1]) else -1
    if kill_at is None and kill_after_s is None:
        assert os.waitstatus_to_exitcode(status) == 0
    fds = {name: os.dup(fd) for name, fd in memory.fds().items()}
    for name, fd in memory.fds().items():
        if name.startswith("tierfile."):  # the dead store's (closing its tier would empty it)
            os.close(fd)
    memory.close()
    successor = Store(config, memory=StateMemory.adopt(fds))
    successor.recover()
    return successor, ops, done, cut, clocks


async def _verify_async(store: Store, ops: list[Op], done: int, cut: int) -> None:
    store.check_invariants()
    before = bytearray((SLOTS + 8) * PAGE)
    for op in ops[:done]:
        model.apply(before, op)
    after = bytearray(before)
    maybe: range = range(0)
    if cut >= 0:
        model.apply(after, ops[cut])
        maybe = model.touched(ops[cut])
    dev = store.devices[0]
    got = await store.read(dev, 0, (SLOTS + 8) * PAGE)
    for s in range(SLOTS + 8):
        page = bytes(got[s * PAGE:(s + 1) * PAGE])
        old = bytes(before[s * PAGE:(s + 1) * PAGE])
        new = bytes(after[s * PAGE:(s + 1) * PAGE])
        assert page == old or (s in maybe and page == new), (
            f"slot {s}: neither before nor after op {cut} ({ops[cut] if cut >= 0 else None})")
    # The recovered store serves writes again.
    await store.write(dev, 0, bytes(range(256)) * 16)
    assert bytes(await store.read(dev, 0, PAGE)) == bytes(range(256)) * 16
    await store.discard(dev, 0, (SLOTS + 8) * PAGE)
    store.compact()
    store.check_invariants()


def _verify(store: Store, ops: list[Op], done: int, cut: int) -> None:
    try:
        trio.run(_verify_async, store, ops, done, cut)
    finally:
        store.files.close()
        store.memory.close()


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_killed_at_an_instruction(seed: int, dedup: bool, tmp_path: Path) -> None:
    """Killed after a random number of swapfs bytecodes (any instruction,
    every commit point among them)."""
    kill_at = random.Random(seed).randrange(20_000, 400_000)
    store, ops, done, cut, _ = _crash(seed, tmp_path, dedup=dedup, count=300, kill_at=kill_at)
    assert done < len(ops), "the kill came after the last operation: the test tests nothing"
    assert store.stats().totals.recoveries == 1
    _verify(store, ops, done, cut)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140))
def test_killed_at_an_instruction_many(seed: int, tmp_path: Path) -> None:
    kill_at = random.Random(seed).randrange(1_000, 600_000)
    store, ops, done, cut, _ = _crash(seed, tmp_path, dedup=seed % 2 == 0, count=400,
                                      kill_at=kill_at)
    _verify(store, ops, done, cut)


@pytest.mark.parametrize("seed", range(3))
def test_killed_at_a_random_moment(seed: int, tmp_path: Path) -> None:
    """Killed by the parent, untraced, after a random time."""
    delay = random.Random(seed).uniform(0.05, 0.4)
    store, ops, done, cut, _ = _crash(seed, tmp_path, dedup=True, count=3000, kill_after_s=delay)
    _verify(store, ops, done, cut)


def test_clean_exit_recovers_everything(tmp_path: Path) -> None:
    store, ops, done, cut, _ = _crash(7, tmp_path, dedup=True, count=200)
    assert (done, cut) == (len(ops), -1)
    assert store.stats().totals.recovered_leaks == 0
    _verify(store, ops, done, cut)


async def test_a_slot_naming_a_freed_object_is_refused(tmp_path: Path) -> None:
    """Recovery refuses a state it cannot serve instead of reading zeros."""
    config = _config(False, tmp_path)
    memory = StateMemory(shared=True)
    store = Store(config, memory=memory)
    dev = store.devices[0]
    await store.write(dev, 0, model.content(Op("write", 0, seed=1)))
    h = dev.table.handles[0]
    store.pool.words[(h - 8) >> 3] = 1 << 63  # the object's header says "free"
    fds = {name: os.dup(fd) for name, fd in memory.fds().items()}
    adopted = StateMemory.adopt(fds)
    successor = Store(config, memory=adopted)
    with pytest.raises(StoreError, match="free"):
        successor.recover()
    successor.files.close()
    adopted.close()
    store.files.close()
    memory.close()


def _targets(seed: int, tier_dir: Path, dedup: bool, count: int,
             mix: list[Op] | None = None) -> tuple[list[Op], list[int]]:
    """The operations of ``seed`` (or ``mix``) and the instruction count at
    each one's start, measured by a traced run that is not killed."""
    store, ops, done, cut, clocks = _crash(seed, tier_dir, dedup=dedup, count=count, traced=True,
                                           mix=mix)
    assert (done, cut) == (len(ops), -1)
    store.files.close()
    store.memory.close()
    return ops, clocks


def _every_instruction_of(seed: int, tier_dir: Path, dedup: bool, count: int, kinds: tuple[str, ...],
                          per_op: int | None, mix: list[Op] | None = None) -> int:
    """Kill the mix of ``seed`` (or ``mix``) inside each operation of
    ``kinds`` (at ``per_op`` instructions spread over it, or at every one)
    and verify each recovery; returns the kills made."""
    ops, clocks = _targets(seed, tier_dir, dedup, count, mix)
    kills = 0
    for k in range(len(ops) - 1):
        if ops[k].kind not in kinds:
            continue
        lo, hi = clocks[k] + 1, clocks[k + 1] + 1
        step = 1 if per_op is None else max(1, (hi - lo) // per_op)
        for at in range(lo, hi, step):
            store, _, done, cut, _ = _crash(seed, tier_dir, dedup=dedup, count=k + 1, kill_at=at,
                                            mix=mix)
            assert done in (k, k + 1), f"the kill at {at} was meant for op {k}, not {done}"
            _verify(store, ops, done, cut)
            kills += 1
    return kills


@pytest.mark.parametrize("dedup", [False, True])
def test_killed_inside_every_kind_of_operation(dedup: bool, tmp_path: Path) -> None:
    """Kills spread over the instructions of every write, sub-page write,
    discard, compaction and recompression of a short mix (their commit
    points among them)."""
    kills = _every_instruction_of(3, tmp_path, dedup, 40,
                                  ("write", "sub", "discard", "compact", "recompress", "migrate"),
                                  per_op=6)
    assert kills > 50


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [0])
def test_killed_densely_inside_operations(seed: int, tmp_path: Path) -> None:
    """A kill at 30 instructions spread over each operation of a mix of 25
    (rewrites of slots in use, dedup sharing, moves and switches): hundreds
    of kills a seed."""
    _every_instruction_of(200 + seed, tmp_path, seed % 2 == 0, 25,
                          ("write", "sub", "discard", "compact", "recompress", "migrate"),
                          per_op=30)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_at_every_instruction_of_a_short_mix(tmp_path: Path) -> None:
    """Every instruction of the writes and the discard of a short mix: a
    kill at each (about two thousand)."""
    kills = _every_instruction_of(201, tmp_path, False, 5, ("write", "discard"),
                                  per_op=None)
    assert kills > 1500


def test_killed_inside_cleaning_steps(tmp_path: Path) -> None:
    """Kills spread over each cleaning step of a mix that leaves the file
    tier's segments half live (the copy, the write, each slot's commit and
    the frees and punch among them): every recovery finds each page as it
    was, and the recovered tier's segments count what slots name."""
    mix = model.cleaning_mix()
    ops, clocks = _targets(0, tmp_path, False, len(mix), mix)
    steps = [k for k in range(len(ops) - 1) if ops[k].kind == "clean"]
    assert all(clocks[k + 1] - clocks[k] > 2000 for k in steps), "a cleaning step moved nothing"
    kills = _every_instruction_of(0, tmp_path, False, len(mix), ("clean",), per_op=25, mix=mix)
    assert kills >= 40
