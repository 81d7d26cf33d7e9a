"""The stress mix of the crash tests, driven by a seed, and its model.

:func:`operations` turns a seed into a list of operations on one device;
:func:`apply` changes a model (slot -> page bytes) as one of them does;
:func:`run` performs them on a store, in a child process, logging each
operation's start and end to a pipe so that the parent knows which one a
kill cut short.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from swapfs.store import Store

from ..store.conftest import compressible_page

PAGE = 4096
SLOTS = 48  # slots the mix touches (of a larger device): most writes are rewrites


@dataclass(frozen=True)
class Op:
    kind: str  # write, spill, sub, discard, read, compact, recompress, migrate, clean, epoch
    slot: int = 0
    npages: int = 1
    start: int = 0  # sub-page write or discard: byte offset in the first page
    length: int = 0
    seed: int = 0  # the content's


def content(op: Op) -> bytes:
    """The bytes an operation writes (npages pages, or length bytes)."""
    rng = random.Random(op.seed)
    n = op.length if op.kind == "sub" else op.npages * PAGE
    if op.kind == "spill":  # incompressible: straight to the file tier
        return rng.randbytes(n)
    out = bytearray()
    while len(out) < n:
        r = rng.random()
        if r < 0.5:
            out += compressible_page(rng)
        elif r < 0.65:
            out += rng.randbytes(PAGE)
        elif r < 0.8:
            out += bytes([rng.randrange(3)]) * PAGE
        else:  # one of a few pages: dedup shares them
            out += compressible_page(random.Random(rng.randrange(4)))
    return bytes(out[:n])


def operations(seed: int, count: int) -> list[Op]:
    rng = random.Random(seed)
    ops = []
    for k in range(count):
        r = rng.random()
        slot = rng.randrange(SLOTS)
        if r < 0.45:
            ops.append(Op("write", slot, npages=rng.choice((1, 1, 1, 2, 5)), seed=seed * 1_000_003 + k))
        elif r < 0.6:
            start = rng.randrange(PAGE)
            length = rng.randrange(1, 2 * PAGE)
            ops.append(Op("sub", slot, start=start, length=length, seed=seed * 1_000_003 + k))
        elif r < 0.75:
            ops.append(Op("discard", slot, npages=rng.choice((1, 3)), start=rng.choice((0, 0, 100)),
                          length=0))
        elif r < 0.85:
            ops.append(Op("read", slot, npages=rng.choice((1, 4))))
        elif r < 0.88:
            ops.append(Op("compact"))
        elif r < 0.92:
            ops.append(Op("recompress"))
        elif r < 0.95:  # demote (to the file tier) the pool pages of 8 slots
            ops.append(Op("migrate", slot, npages=8))
        elif r < 0.98:  # clean the file tier's emptiest segments (their live objects move)
            ops.append(Op("clean"))
        else:
            ops.append(Op("epoch", seed=k))
    return ops


def cleaning_mix() -> list[Op]:
    """Incompressible pages straight to the file tier (several segments' worth), every other
    one discarded (the segments half live), then cleaning steps between reads."""
    ops = [Op("spill", s, npages=4, seed=s + 1) for s in range(0, SLOTS, 4)]
    ops += [Op("discard", s, npages=1) for s in range(0, SLOTS, 2)]
    ops += [Op("clean"), Op("read", 1, npages=4), Op("clean"), Op("read", 5, npages=4)]
    return ops


def _span(op: Op) -> tuple[int, int]:
    """Byte range an operation changes."""
    base = op.slot * PAGE
    if op.kind in ("write", "spill"):
        return base, base + op.npages * PAGE
    if op.kind == "sub":
        return base + op.start, base + op.start + op.length
    if op.kind == "discard":
        return base + op.start, base + op.npages * PAGE
    return base, base


def apply(model: bytearray, op: Op) -> None:
    """Apply ``op`` to ``model`` (the device's bytes over SLOTS + 8 pages)."""
    a, b = _span(op)
    if op.kind in ("write", "spill", "sub"):
        model[a:b] = content(op)
    elif op.kind == "discard":
        model[a:b] = bytes(b - a)


def touched(op: Op) -> range:
    """Slots an operation may change."""
    a, b = _span(op)
    return range(a // PAGE, -(-b // PAGE)) if b > a else range(0)


async def run(store: Store, ops: list[Op], log_fd: int,
              clock: Callable[[], int] = lambda: 0) -> None:
    """Perform ``ops`` on the store's first device, writing ``B<k>`` and
    ``clock()`` (the tracer's count of instructions) before and ``E<k>``
    after operation k to ``log_fd``; a read that does not return the model's
    bytes writes ``X<k>`` and stops."""
    dev = store.devices[0]
    model = bytearray((SLOTS + 8) * PAGE)
    for k, op in enumerate(ops):
        os.write(log_fd, b"B%d %d\n" % (k, clock()))
        a, b = _span(op)
        if op.kind in ("write", "spill", "sub"):
            await store.write(dev, a, content(op))
        elif op.kind == "discard":
            await store.discard(dev, a, b - a)
        elif op.kind == "read":
            got = await store.read(dev, op.slot * PAGE, op.npages * PAGE)
            if bytes(got) != bytes(model[op.slot * PAGE:(op.slot + op.npages) * PAGE]):
                os.write(log_fd, b"X%d\n" % k)
                return
        elif op.kind == "compact":
            store.compact()
        elif op.kind == "recompress":
            store.recompressor.step(16, 0)
        elif op.kind == "migrate":
            await store.migrate([(dev, s) for s in range(op.slot, op.slot + op.npages)], 0)
        elif op.kind == "clean":
            await store.clean(0, 2)
        elif op.kind == "epoch":
            store.set_epoch(store.epoch + 1)
        apply(model, op)
        os.write(log_fd, b"E%d\n" % k)
