"""Replaying a trace: an in-process store driven through recorded requests.

``swapfs trace replay FILE --config CFG [--policy NAME]`` and
scripts/bench-policy run :func:`replay`: a :class:`swapfs.store.Store` of
the configuration (its file tiers in a temporary directory, never the
configured paths), no FUSE and no kernel, with its writeback task running
as the daemon runs it, through every request of the trace (swapfs/trace.py).

* **Time** is the trace's: the run is under trio's MockClock, moved to each
  record's time before it is served, so the access clock and the writeback
  task's passes (every 1/4 s of trace time, and whenever the pool passes its
  high watermark) follow the recording while the replay goes as fast as the
  store does.  Requests are served between passes, never during one: a
  replay is deterministic (the same trace and configuration give the same
  figures).
* **Pages** are synthesized per (device, page, write count): a stamp of
  those three over one of 256 template pages, made from a corpus file of
  real memory (``corpus``, scripts/corpus) or, without one, built to
  compress about as real process memory does (2.4x with lz4, a few
  same-filled and incompressible pages), so the pool fills as it would.
  Every read is checked against the page last written there (zeros if
  never written or discarded): a replay is also a check of the store.
* **Figures** (:class:`ReplayResult`): pages written and read, moves (pages
  demoted), promotions, refaults, wasted promotions, the pool hit rate
  (page reads served from memory, that is from the pool or a fill word,
  over all page reads), bytes written to each file tier, and the store's
  CPU time (process CPU spent in the store's calls and the writeback
  passes, worker threads included; the synthesis and checks are left out).
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from array import array
from dataclasses import dataclass, field

import trio
import trio.testing

from .config import Config, WritebackConfig
from .errors import StoreError
from .kernel import PAGE_SIZE
from .slots import in_file
from .store import Device, Store
from .trace import DISCARD, READ, WRITE, TraceError, TraceHeader, load, records
from .writeback import EPOCHS_PER_SECOND, Writeback

TEMPLATES = 256
STAMP = 16  # bytes of (device, page, write count) at the start of a page


@dataclass
class ReplayResult:
    policy: str
    requests: int = 0
    pages_written: int = 0
    pages_read: int = 0
    memory_reads: int = 0  # page reads served from the pool or a fill word
    moves: int = 0  # pages demoted (every tier pair)
    promotions: int = 0
    refaults: int = 0
    wasted_promotions: int = 0
    tier_written_bytes: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    trace_seconds: float = 0.0
    wrong_pages: int = 0
    errors: int = 0  # requests the store refused (NoSpace ...)

    @property
    def pool_hit_rate(self) -> float:
        return self.memory_reads / self.pages_read if self.pages_read else 1.0

    @property
    def moves_per_page_written(self) -> float:
        return self.moves / self.pages_written if self.pages_written else 0.0

    @property
    def promotions_per_refault(self) -> float:
        return self.promotions / self.refaults if self.refaults else 0.0

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d.update(pool_hit_rate=round(self.pool_hit_rate, 4),
                 moves_per_page_written=round(self.moves_per_page_written, 4),
                 promotions_per_refault=round(self.promotions_per_refault, 4))
        d["cpu_seconds"] = round(self.cpu_seconds, 3)
        d["wall_seconds"] = round(self.wall_seconds, 3)
        return d


def synthetic_templates(seed: int = 0) -> list[bytes]:
    """Template pages that compress about as real process memory does with
    lz4 (about 2.4x over the set): runs of small integers, pointers, text
    and random bytes in varying shares; a few zero and random pages."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"etaoinshrdlu_ ./") for _ in range(rng.randrange(3, 12)))
             for _ in range(64)]
    out = []
    for t in range(TEMPLATES):
        if t % 40 == 0:
            out.append(bytes(PAGE_SIZE))  # same-filled
            continue
        if t % 40 == 1:
            out.append(rng.randbytes(PAGE_SIZE))  # incompressible
            continue
        noise = rng.uniform(0.0, 0.2)
        heap = rng.randrange(1 << 28) << 16  # the pointers of one page point near each other
        buf = bytearray()
        while len(buf) < PAGE_SIZE:
            r = rng.random()
            if r < noise:
                buf += rng.randbytes(rng.randrange(4, 24))
            elif r < noise + 0.15:
                buf += bytes(rng.randrange(8, 128))
            elif r < noise + 0.4:
                for _ in range(rng.randrange(1, 6)):
                    buf += (heap + rng.randrange(4096) * 16).to_bytes(8, "little")
            elif r < noise + 0.6:
                buf += rng.randrange(1000).to_bytes(4, "little") * rng.randrange(1, 4)
            else:
                buf += rng.choice(words)
        out.append(bytes(buf[:PAGE_SIZE]))
    return out


def corpus_templates(path: str) -> list[bytes]:
    """Template pages taken evenly from a corpus file (pages back to back)."""
    with open(path, "rb") as f:
        data = f.read()
    n = len(data) // PAGE_SIZE
    if n < TEMPLATES:
        raise TraceError(f"{path}: {n} pages, a corpus needs at least {TEMPLATES}")
    step = n // TEMPLATES
    return [data[i * step * PAGE_SIZE:(i * step + 1) * PAGE_SIZE] for i in range(TEMPLATES)]


class Pages:
    """The content of (device, page, write count): deterministic."""

    def __init__(self, templates: list[bytes]) -> None:
        self.templates = templates
        self.tails = [t[STAMP:] for t in templates]
        self.same = {i for i, t in enumerate(templates) if t == t[:8] * (PAGE_SIZE // 8)}

    def page(self, dev: int, page: int, count: int) -> bytes:
        if count == 0:
            return bytes(PAGE_SIZE)
        h = (page * 0x9E3779B1 + count * 0x85EBCA77 + dev * 0xC2B2AE3D) & 0xFFFFFFFF
        t = (h >> 8) % TEMPLATES
        if t in self.same:
            return self.templates[t]  # a same-filled page stays one
        stamp = (dev << 56 | page).to_bytes(8, "little") + count.to_bytes(8, "little")
        return stamp + self.tails[t]


def _with_policy(config: Config, policy: str | None, tier_dir: str) -> Config:
    tiers = tuple(dataclasses.replace(t, path=f"{tier_dir}/{i}-{t.name}.img", preallocate=False,
                                      force_init=True)
                  for i, t in enumerate(config.tiers))
    wb = config.writeback if policy is None else WritebackConfig(policy=policy)
    return dataclasses.replace(config, tiers=tiers, writeback=wb)


def replay(path: str, config: Config, *, policy: str | None = None,
           corpus: str | None = None, verify: bool = True) -> ReplayResult:
    """Drive a store of ``config`` (``policy`` instead of its own if given)
    through the trace at ``path``; TraceError if the trace does not fit the
    configuration (a device missing or smaller)."""
    header, body = load(path)
    templates = corpus_templates(corpus) if corpus else synthetic_templates()
    with tempfile.TemporaryDirectory(prefix="swapfs-replay-") as tier_dir:
        cfg = _with_policy(config, policy, tier_dir)
        clock = trio.testing.MockClock()
        return trio.run(_replay, header, body, cfg, Pages(templates), verify, clock,
                        clock=clock)


def _devices(header: TraceHeader, store: Store) -> list[Device]:
    out = []
    names = {d.name: d for d in store.devices}
    for name, size in header.devices:
        dev = names.get(name)
        if dev is None:
            raise TraceError(f"device {name!r} of the trace is not in the configuration "
                             f"(it has {', '.join(sorted(names))})")
        if dev.size_bytes < size:
            raise TraceError(f"device {name!r}: {dev.size_bytes} bytes in the configuration, "
                             f"{size} in the trace")
        out.append(dev)
    return out


async def _replay(header: TraceHeader, body: memoryview, config: Config, pages: Pages,
                  verify: bool, clock: trio.testing.MockClock) -> ReplayResult:
    store = Store(config)
    res = ReplayResult(policy=config.writeback.policy)
    devs = _devices(header, store)
    counts = [array("I", bytes(4 * d.npages)) for d in devs]
    wb = Writeback(store, interval=1e9)  # the replay asks for its passes in trace time
    tick = 1.0 / EPOCHS_PER_SECOND
    next_tick = tick
    cpu = time.process_time
    store_cpu = 0.0
    wall0 = time.perf_counter()
    t = 0.0
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(wb.run)
            c0 = cpu()
            await wb.settle()
            store_cpu += cpu() - c0
            for t_ns, first, n, op, di, _tier, _flags in records(body):
                t = t_ns / 1e9
                now = trio.current_time()
                if t > now:
                    clock.jump(t - now)
                if t >= next_tick:
                    next_tick = (int(t / tick) + 1) * tick
                    wb.kick()
                dev = devs[di]
                cnt = counts[di]
                end = min(first + n, dev.npages)
                if first >= end:
                    continue
                res.requests += 1
                off = first * PAGE_SIZE
                if op == WRITE:
                    for p in range(first, end):
                        cnt[p] += 1
                    data = b"".join(pages.page(di, p, cnt[p]) for p in range(first, end))
                    c0 = cpu()
                    try:
                        await store.write(dev, off, data)
                    except StoreError:
                        res.errors += 1
                        for p in range(first, end):  # nothing changed: as before
                            cnt[p] -= 1
                    store_cpu += cpu() - c0
                    res.pages_written += end - first
                elif op == READ:
                    info = dev.table.info
                    for p in range(first, end):
                        if not in_file(info[p]):
                            res.memory_reads += 1
                    res.pages_read += end - first
                    c0 = cpu()
                    try:
                        got = await store.read(dev, off, (end - first) * PAGE_SIZE)
                    except StoreError:
                        res.errors += 1
                        got = None
                    store_cpu += cpu() - c0
                    if verify and got is not None:
                        for k, p in enumerate(range(first, end)):
                            if got[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] != pages.page(di, p, cnt[p]):
                                res.wrong_pages += 1
                elif op == DISCARD:
                    c0 = cpu()
                    try:
                        await store.discard(dev, off, (end - first) * PAGE_SIZE)
                    except StoreError:
                        res.errors += 1
                    store_cpu += cpu() - c0
                    for p in range(first, end):
                        cnt[p] = 0
                if wb.pending:
                    c0 = cpu()
                    await wb.settle()
                    store_cpu += cpu() - c0
            nursery.cancel_scope.cancel()
        st = store.stats()
    finally:
        await store.aclose()
    wbs = st.writeback
    res.moves = wbs.moved_pages
    res.promotions = wbs.promotions
    res.refaults = wbs.refaults
    res.wasted_promotions = wbs.wasted_promotions
    res.tier_written_bytes = {t.name: getattr(t, "written_bytes", 0) for t in st.tiers
                              if t.name != "pool"}
    res.cpu_seconds = store_cpu
    res.wall_seconds = time.perf_counter() - wall0
    res.trace_seconds = t
    return res
