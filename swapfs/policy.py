"""Tiering policies: which refaulted pages go back up, which pages go down.

A policy makes the two decisions of tiering and nothing else; the
mechanisms stay where they are (promotion: ``WritePath._promote``; moves:
swapfs/migrate.py; when to move: the watermarks of swapfs/writeback.py):

* ``promote(dist)`` -- a read found a demoted page whose shadow says
  ``dist`` pages were demoted since it was: promote it to the pool?
  (``ReadPath._accessed`` asks; no await);
* ``select(cursor, devs, src, n, ...)`` -- the victims of a move down from
  level ``src``, in the order they go (``Writeback.select`` asks).

The store holds one, made from ``[writeback] policy`` by :func:`make_policy`;
``swapfs trace replay --policy NAME`` swaps it to compare them on one trace
(docs/policy.md has the rules and the measurements).

* ``classic`` -- the behaviour before policies had names, kept for
  comparison: promote whenever the distance is at most the pages the pool
  holds (the kernel's workingset test against the whole pool) and the pool
  is under ``promote_limit_bytes``; victims are the coldest of a window by
  last access, shadowed pages first.
* ``workingset`` (the default, chosen on replayed traces: docs/policy.md)
  -- made for what a swap device sees.  A page the kernel reads back is in
  the kernel's memory from then on: its stored copy is needed again only
  once the kernel has dropped it (clean) and faults on it again, while a
  page written and not read since may be needed at any time.  So:

  - victims: the oldest by last access, where a page read since written
    ages twice as fast as one written and not read since (a page read
    again and again stays: its last read is recent), and a page just
    promoted and not read since is passed over while it is younger than
    the pool's eviction age (the key of the victims taken lately: a cold
    age that follows the pressure), so it is not the next one demoted;
  - promotion: only while the pool is under its *low* watermark (the room
    between the watermarks belongs to writes: a promotion there is a
    demotion soon), and only if the refault distance is within a threshold
    that follows the outcome of earlier promotions (a promoted page demoted
    before any read is a *wasted promotion*, counted in
    ``wasted_promotions``: the threshold halves when more than a quarter of
    recent promotions were wasted and grows back when few are; it starts at
    the pages the pool holds, the kernel's workingset test).

The marks in the epoch column say which pages were read (swapfs/slots.py):
writes store the epoch with ``UNREAD_MARK``, reads without; a promotion
stores it with ``PROMOTED_MARK``, cleared by any read or write of the slot,
and the state counts a demotion of a page still so marked in ``wasted``.
"""

from __future__ import annotations

import heapq

from .slots import AGE_MASK, PROMOTED_MARK, SHADOW, UNREAD_MARK, movable
from .state import Device, SlotCursor, StoreState

# Slots looked at per victim search, and candidates wanted per victim.
SCAN_SLOTS = 16384
CANDIDATES_PER_VICTIM = 4
# The key of a shadowed page: colder than any age.
_SHADOW_KEY = -(1 << 33)
# In workingset's order a page read since written ages this many times as
# fast as one written and not read since.
READ_AGING = 2


class Policy:
    """The interface, and classic's victim search (shared)."""

    name = ""

    def __init__(self, state: StoreState) -> None:
        self.state = state

    def promote(self, dist: int) -> bool:
        """A refault at distance ``dist`` (demotions since the page's): try
        to promote it?  (The store then promotes it if the pool has room
        under ``promote_limit_bytes`` and the page compresses well enough.)"""
        raise NotImplementedError

    def _age_key(self, e: int, now: int) -> int:
        """The sort key of a candidate with epoch ``e`` (smaller: colder)."""
        return -((now - e) & AGE_MASK)

    def select(self, cursor: SlotCursor, devs: list[Device], src: int, n: int, *,
               idle_before: int | None = None, now: int | None = None
               ) -> list[tuple[Device, int]]:
        """Up to ``n`` victims at level ``src`` among ``devs``: the coldest
        of a window of candidates found from ``cursor``.  With
        ``idle_before`` (an age in epochs), only pages not accessed for at
        least that long, in slot order (one walk round per request); ``now``
        is the epoch ages count from.  No await."""
        if not devs:
            return []
        mask, want = movable(src)
        if now is None:
            now = self.state.epoch
        key = self._age_key
        cands: list[tuple[int, int, int]] = []
        goal = n if idle_before is not None else n * CANDIDATES_PER_VICTIM
        total = sum(d.npages for d in devs)
        # Slots looked at in clusters in use (empty clusters are skipped for
        # free): one walk round at most, once per request with idle_before.
        budget = total if idle_before is not None else min(SCAN_SLOTS, total)
        for dev, start, end in cursor.walk(devs, budget):
            info = dev.table.info
            epoch = dev.table.epoch
            di = devs.index(dev)
            stop = -1
            for s in range(start, end):
                i = info[s]
                if i & mask == want:
                    e = epoch[s]
                    if idle_before is not None:
                        if i & SHADOW or (now - e) & AGE_MASK < idle_before:
                            continue
                    # shadowed pages (demoted, not read since) are the coldest
                    cands.append((_SHADOW_KEY if i & SHADOW else key(e, now), di, s))
                    if idle_before is not None and len(cands) >= goal:
                        stop = s + 1
                        break
            if stop >= 0:
                cursor.stop(dev, stop)
                break
            if len(cands) >= goal:
                break
        if idle_before is None and len(cands) > n:
            cands = heapq.nsmallest(n, cands)
        self._selected(cands, now)
        return [(devs[d], s) for _, d, s in cands]

    def _selected(self, cands: list[tuple[int, int, int]], now: int) -> None:
        """What was chosen (a policy that learns from it overrides this)."""


class ClassicPolicy(Policy):
    name = "classic"

    def promote(self, dist: int) -> bool:
        state = self.state
        limit = state.promote_distance
        if limit is None:
            limit = max(state.pool.objects, 1)
        return dist <= limit


# workingset: promotions between two looks at their outcome, the share of
# them wasted above which the distance threshold halves and below which it
# grows by a quarter, and its floor (pages).
ADAPT_EVERY = 256
WASTE_HIGH = 0.25
WASTE_LOW = 0.1
MIN_THRESHOLD = 64


class WorkingsetPolicy(Policy):
    name = "workingset"

    def __init__(self, state: StoreState) -> None:
        super().__init__(state)
        self.share = 1.0  # of the pool's pages: the distance threshold
        self._seen = (0, 0)  # (promotions, wasted) at the last look
        # The age (epochs) of the victims taken lately: a promoted page not
        # read since is spared while younger than this.
        self.eviction_age = 0

    def threshold(self) -> int:
        state = self.state
        if state.promote_distance is not None:
            return state.promote_distance
        return max(int(state.pool.objects * self.share), MIN_THRESHOLD)

    def promote(self, dist: int) -> bool:
        state = self.state
        if state.pool.pool_bytes >= state.pool_low_bytes:
            return False  # the room is the writes': a promotion now is a demotion soon
        self._adapt()
        return dist <= self.threshold()

    def _adapt(self) -> None:
        moves = self.state.moves
        promoted = sum(moves.promotions)
        p0, w0 = self._seen
        if promoted - p0 < ADAPT_EVERY:
            return
        waste = (moves.wasted - w0) / (promoted - p0)
        self._seen = (promoted, moves.wasted)
        if waste > WASTE_HIGH:
            self.share = max(self.share / 2, 1 / 1024)
        elif waste < WASTE_LOW:
            self.share = min(self.share * 1.25, 1.0)

    def _age_key(self, e: int, now: int) -> int:
        age = (now - e) & AGE_MASK
        if e & UNREAD_MARK:
            return -age  # written, not read since: the kernel may need it any time
        if e & PROMOTED_MARK and age <= self.eviction_age:
            return 1  # just promoted, not read since: after every other candidate
        return -(READ_AGING * age + 1)  # read since written: the kernel holds a copy

    def _selected(self, cands: list[tuple[int, int, int]], now: int) -> None:
        oldest = -1
        for k, _, _ in cands:
            if k > _SHADOW_KEY:
                oldest = max(oldest, -k)
        if oldest >= 0:
            # a slow average: one batch does not decide the pool's age
            self.eviction_age = (3 * self.eviction_age + oldest + 3) // 4


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (ClassicPolicy, WorkingsetPolicy)}


def make_policy(name: str, state: StoreState) -> Policy:
    """The policy called ``name`` (config.POLICY_NAMES) over ``state``."""
    return POLICIES[name](state)
