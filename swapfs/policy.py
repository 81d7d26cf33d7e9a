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

import functools
from collections import Counter
from itertools import compress

from .slots import AGE_MASK, POOL_LEVEL, PROMOTED_MARK, SHADOW, UNREAD_MARK, movable
from .state import Device, SlotCursor, StoreState

# Slots looked at per victim search, and candidates wanted per victim.
SCAN_SLOTS = 16384
CANDIDATES_PER_VICTIM = 4
# In workingset's order a page read since written ages this many times as
# fast as one written and not read since.
READ_AGING = 2
# The chunk form of the keys (Policy.select): 32-bit lanes of big integers.
_LANE = 0xFFFFFFFF  # a lane's bits: a lane of 0/1 times this is a mask
_B31 = 1 << 31
_LOW31 = _B31 - 1  # added to a lane below 2**31, sets its bit 31 iff it is not 0
_SHADOW_BIT = SHADOW.bit_length() - 1
_UNREAD_BIT = UNREAD_MARK.bit_length() - 1
_PROMOTED_BIT = PROMOTED_MARK.bit_length() - 1
_SHADOW_LANE = _LANE  # a shadowed candidate's lane: colder than any age


@functools.lru_cache(maxsize=16)
def _reps(lanes: int) -> tuple[int, int]:
    """For ``lanes`` 32-bit lanes: (1 in every lane, every bit set)."""
    ones = int.from_bytes(b"\1\0\0\0" * lanes, "little")
    return ones, ones * _LANE


class Policy:
    """The interface, and the victim search (shared; a policy gives the
    coldness of a page from its epoch: ``_age_key`` per page, ``_lanes`` for
    a chunk of slots at once)."""

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

    def _lanes(self, e: int, age: int, ones: int, full: int) -> int:
        """The chunk form of ``_age_key``: ``e`` and ``age`` hold a chunk's
        epochs and ages in 32-bit lanes (``ones``: 1 in each lane, ``full``:
        every bit); returns lanes of ``2 - key`` (the coldness plus 2), or 1
        for a page that goes after every other (key 1)."""
        return age + 2 * ones

    def select(self, cursor: SlotCursor, devs: list[Device], src: int, n: int, *,
               idle_before: int | None = None, now: int | None = None,
               whole_round: bool = False) -> list[tuple[Device, int]]:
        """Up to ``n`` victims at level ``src`` among ``devs``: the coldest
        of a window of candidates found from ``cursor``, in slot order.  With
        ``idle_before`` (an age in epochs), only pages not accessed for at
        least that long, in slot order (one walk round per request); ``now``
        is the epoch ages count from.  No await.

        The window: the clusters in use from the cursor on, until they hold
        CANDIDATES_PER_VICTIM * ``n`` candidates or SCAN_SLOTS slots were
        looked at; with ``whole_round`` further while none was found, one
        walk round at most, so that a request finds a page wherever one is
        (the watermarks' searches stay bounded: the next pass goes on from
        the cursor).  The ``n`` with the smallest
        keys go, ties to the lower (device, slot), as ``heapq.nsmallest`` of
        ``(key, device, slot)`` would choose them.  The keys are worked out a
        chunk (a cluster) at a time on the columns as big integers of 32-bit
        lanes, with no Python step per slot."""
        if not devs:
            return []
        if now is None:
            now = self.state.epoch
        if idle_before is not None:
            return self._select_idle(cursor, devs, src, n, idle_before, now)
        mask, want = movable(src)
        goal = n * CANDIDATES_PER_VICTIM
        total = sum(d.npages for d in devs)
        chunks: list[tuple[int, int, memoryview]] = []  # (device index, first slot, lanes)
        found = scanned = 0
        nowp = (now & AGE_MASK) + UNREAD_MARK  # above every masked epoch: no borrow
        for dev, start, end in cursor.walk(devs, total):
            lanes = end - start
            scanned += lanes
            ones, full = _reps(lanes)
            table = dev.table
            info = int.from_bytes(table.info[start:end], "little")
            diff = (info & mask * ones) ^ want * ones  # 0 in the lanes of candidates
            cand = ones ^ (((diff + _LOW31 * ones) >> 31) & ones)
            if cand:
                e = int.from_bytes(table.epoch[start:end], "little")
                age = (nowp * ones - (e & AGE_MASK * ones)) & AGE_MASK * ones
                v = self._lanes(e, age, ones, full)
                if src != POOL_LEVEL:  # shadowed pages (demoted, not read since) first
                    shadow = ((info >> _SHADOW_BIT) & ones) * _LANE
                    v = (v & (full ^ shadow)) | shadow
                v &= cand * _LANE
                found += cand.bit_count()
                chunks.append((devs.index(dev), start,
                               memoryview(v.to_bytes(4 * lanes, "little")).cast("I")))
            if found >= goal or (scanned >= SCAN_SLOTS and (found or not whole_round)):
                break
        if not found:
            self._selected(-1)
            return []
        counts: Counter[int] = Counter()
        for _, _, mv in chunks:
            counts.update(mv)
        del counts[0]
        out: list[tuple[Device, int]] = []
        if found <= n:  # every candidate, in the order found
            self._chosen(counts, 0)
            for di, start, mv in chunks:
                dev = devs[di]
                out += [(dev, s) for s in compress(range(start, start + len(mv)), mv)]
            return out
        # the cut: the key of the n-th coldest, and how many of its ties go
        taken = 0
        cut = ties_left = 0
        for k in sorted(counts, reverse=True):
            c = counts[k]
            if taken + c >= n:
                cut, ties_left = k, n - taken
                break
            taken += c
        self._chosen(counts, cut)
        chunks.sort(key=lambda ch: (ch[0], ch[1]))
        for di, start, mv in chunks:
            dev = devs[di]
            slots = range(start, start + len(mv))
            if not ties_left:
                out += [(dev, s) for s in compress(slots, map(cut.__lt__, mv))]
                continue
            ties = mv.tolist().count(cut)
            if ties <= ties_left:
                ties_left -= ties
                out += [(dev, s) for s in compress(slots, map(cut.__le__, mv))]
                continue
            for s in compress(slots, map(cut.__le__, mv)):
                if mv[s - start] == cut:
                    if not ties_left:
                        continue
                    ties_left -= 1
                out.append((dev, s))
        return out

    def _chosen(self, counts: Counter[int], cut: int) -> None:
        """``_selected`` of the victims whose lanes are ``cut`` or more."""
        colder = [k for k in counts if 2 <= k < _SHADOW_LANE and k >= cut]
        self._selected(max(colder) - 2 if colder else -1)

    def _select_idle(self, cursor: SlotCursor, devs: list[Device], src: int, n: int,
                     idle_before: int, now: int) -> list[tuple[Device, int]]:
        """``select`` with ``idle_before``: pages idle that long, in slot order."""
        mask, want = movable(src)
        out: list[tuple[Device, int]] = []
        oldest = -1
        key = self._age_key
        total = sum(d.npages for d in devs)
        for dev, start, end in cursor.walk(devs, total):
            info = dev.table.info
            epoch = dev.table.epoch
            stop = -1
            for s in range(start, end):
                i = info[s]
                if i & mask == want and not i & SHADOW:
                    e = epoch[s]
                    if (now - e) & AGE_MASK < idle_before:
                        continue
                    k = key(e, now)
                    if k <= 0:
                        oldest = max(oldest, -k)
                    out.append((dev, s))
                    if len(out) >= n:
                        stop = s + 1
                        break
            if stop >= 0:
                cursor.stop(dev, stop)
                break
        self._selected(oldest)
        return out

    def _selected(self, oldest: int) -> None:
        """What was chosen: ``oldest``, the largest ``-key`` of the victims
        not shadowed, or -1 (a policy that learns from it overrides this)."""


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

    def _lanes(self, e: int, age: int, ones: int, full: int) -> int:
        unread = (e >> _UNREAD_BIT) & ones
        read = ones ^ unread
        # read since written: READ_AGING * age + 1
        cold = age + (((READ_AGING - 1) * age + ones) & read * _LANE)
        if self.eviction_age >= AGE_MASK:
            young = ones
        else:  # age <= eviction_age, per lane
            young = ones ^ (((age + (_B31 - self.eviction_age - 1) * ones) >> 31) & ones)
        spared = (e >> _PROMOTED_BIT) & read & young  # just promoted, not read since
        return ((cold + 2 * ones) & (full ^ spared * _LANE)) | spared

    def _selected(self, oldest: int) -> None:
        if oldest >= 0:
            # a slow average: one batch does not decide the pool's age
            self.eviction_age = (3 * self.eviction_age + oldest + 3) // 4


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (ClassicPolicy, WorkingsetPolicy)}


def make_policy(name: str, state: StoreState) -> Policy:
    """The policy called ``name`` (config.POLICY_NAMES) over ``state``."""
    return POLICIES[name](state)
