"""Traces made by small deterministic generators (tests, scripts/bench-policy).

:func:`kernel_swap` models what the kernel asks of a swap device while a
program touches more memory than its cgroup holds: an access stream over
``pages`` pages of which ``ram`` fit in memory (LRU), where a page evicted
without a valid swap copy is written to the next free slot, a page touched
while swapped out is read back (its slot kept, as a loop device's swap
slots are, until the page is written to: then the slot is discarded), and a
clean page evicted with its slot still valid costs nothing.  The access
patterns are the classic ones a tiering policy must not get wrong:

* ``random``: uniform over every page;
* ``hot``: 90% of accesses to a hot set of ``hot`` pages, the rest uniform;
* ``scan``: a loop over every page in order (LRU's worst case);
* ``phase``: ``hot`` for the first half, then the hot set moves elsewhere.

Every generator is a pure function of its arguments (seeded ``random``).
"""

from __future__ import annotations

import random
from collections import OrderedDict

from ..kernel import PAGE_SIZE
from ..trace import DISCARD, NO_TIER, READ, WRITE, write_trace

Record = tuple[int, int, int, int, int, int, int]
PATTERNS = ("random", "hot", "scan", "phase")


def kernel_swap(pattern: str, *, pages: int, ram: int, accesses: int, hot: int = 0,
                dirty: float = 0.3, rate: int = 50_000, seed: int = 0,
                device_pages: int | None = None) -> list[Record]:
    """The requests (records of swapfs/trace.py, device 0) the kernel would
    send while a program makes ``accesses`` page accesses by ``pattern``;
    ``dirty`` is the share of accesses that write; ``rate`` accesses per
    second of trace time."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r} (known: {', '.join(PATTERNS)})")
    rng = random.Random(seed)
    nslots = device_pages or pages * 2
    hot = hot or pages // 8
    lru: OrderedDict[int, bool] = OrderedDict()  # in memory: page -> dirty
    slot_of: dict[int, int] = {}  # page -> its swap slot (valid copy)
    free = list(range(nslots - 1, -1, -1))  # a stack: the lowest slot first
    out: list[Record] = []
    step_ns = 1_000_000_000 // rate
    hot_base = 0
    for k in range(accesses):
        t = k * step_ns
        if pattern == "scan":
            p = k % pages
        elif pattern == "random":
            p = rng.randrange(pages)
        else:
            if pattern == "phase" and k == accesses // 2:
                hot_base = pages // 2
            if rng.random() < 0.9:
                p = (hot_base + rng.randrange(hot)) % pages
            else:
                p = rng.randrange(pages)
        write = rng.random() < dirty
        if p in lru:
            lru.move_to_end(p)
        else:
            if p in slot_of:  # swapped out: read it back, keep the slot
                out.append((t, slot_of[p], 1, READ, 0, NO_TIER, 0))
            lru[p] = False
            if len(lru) > ram:  # evict the least recently used page
                q, qdirty = lru.popitem(last=False)
                if qdirty or q not in slot_of:
                    s = free.pop() if free else None
                    if s is not None:
                        slot_of[q] = s
                        out.append((t, s, 1, WRITE, 0, NO_TIER, 0))
        if write:
            lru[p] = True
            s = slot_of.pop(p, None)
            if s is not None:  # the copy in swap is stale: the kernel frees the slot
                free.append(s)
                out.append((t, s, 1, DISCARD, 0, NO_TIER, 0))
    return out


def write_kernel_swap(path: str, pattern: str, *, device: str = "swap0",
                      device_bytes: int | None = None, **kw: int | float) -> int:
    """:func:`kernel_swap` written to ``path`` (device ``device``); its size."""
    pages = int(kw["pages"])
    size = device_bytes or pages * 2 * PAGE_SIZE
    recs = kernel_swap(pattern, device_pages=size // PAGE_SIZE, **kw)  # type: ignore[arg-type]
    return write_trace(path, [(device, size)], recs)
