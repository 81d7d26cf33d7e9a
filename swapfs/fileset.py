"""The file tiers of a store, as one set: priority groups, allocation,
pinned pages, deferred frees and punching.

Tier ``i`` (config order) is slot kind ``slots.file_kind(i)``.  Tiers of equal
priority form a group; groups are used highest priority first, and inside a
group allocation goes round-robin, cluster by cluster.

Pins: a page being read (pread in a worker thread) is pinned.  Freeing a
pinned page (a write or discard of its slot meanwhile) is deferred until its
last pin goes, so the page is never handed to another slot while a read of
it runs.  Pins and the swap cache share one key per file location
(:func:`swapfs.cache.file_key`).

Accounting: a tier's ``stored_pages`` counts allocated pages; pages written
but not yet owned by a slot (``inflight``) and deferred frees are not a
slot's, and :meth:`owned_pages` leaves them out, so that every stored page
is counted once at every moment.

Nothing here awaits except :meth:`punch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from .cache import KEY_PAGE_MASK, KEY_SHIFT, SwapCache, file_key
from .config import TierConfig
from .errors import Misuse
from .memory import StateMemory
from .slots import MAX_FILE_TIERS
from .tiers.file import FileTier


class Grant(NamedTuple):
    """File pages granted by :meth:`FileTierSet.allocate`: ``npages`` pages of
    tier ``tier`` as ``(first page, pages)`` runs."""

    tier: int
    runs: list[tuple[int, int]]
    npages: int


def to_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """Page numbers, in the given order, as ``(start, count)`` runs."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def run_pages(runs: Sequence[tuple[int, int]]) -> list[int]:
    """The page numbers of ``runs``, in order."""
    return [p for start, count in runs for p in range(start, start + count)]


class FileTierSet:
    """Open file tiers and the state shared across them."""

    def __init__(self, configs: Sequence[TierConfig], cache: SwapCache,
                 memory: StateMemory | None = None) -> None:
        if len(configs) > MAX_FILE_TIERS:
            raise Misuse(f"at most {MAX_FILE_TIERS} file tiers")
        self.cache = cache
        self.tiers: list[FileTier] = []
        try:
            for tc in configs:
                if tc.kind != "file":
                    raise Misuse(f"tier {tc.name!r}: kind {tc.kind!r}: only file tiers exist")
                tier = FileTier(tc.name, tc.path, tc.size, tc.priority, preallocate=tc.preallocate,
                                encrypt=tc.encrypt, force_init=tc.force_init, memory=memory)
                tier.open()
                self.tiers.append(tier)
        except BaseException:
            self.close()
            raise
        prios = sorted({t.priority for t in self.tiers}, reverse=True)
        # Groups of equal priority, highest first, as tier indexes.
        self.groups = [[i for i, t in enumerate(self.tiers) if t.priority == p] for p in prios]
        self._group_of = {ti: gi for gi, group in enumerate(self.groups) for ti in group}
        self._rr = [0] * len(self.groups)
        self._pins: dict[int, int] = {}
        self._deferred: set[int] = set()
        # Per tier: pages written or being written that no slot owns yet.
        self.inflight = [0] * len(self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    def __iter__(self) -> Iterator[FileTier]:
        return iter(self.tiers)

    def __getitem__(self, ti: int) -> FileTier:
        return self.tiers[ti]

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    # -- groups -------------------------------------------------------------

    def group_of(self, ti: int) -> int:
        """The priority group (0 = highest) of tier ``ti``."""
        return self._group_of[ti]

    @property
    def last_group(self) -> int:
        return len(self.groups) - 1

    def has_lower(self, ti: int) -> bool:
        """Some tier has a lower priority than tier ``ti``."""
        return self._group_of[ti] < len(self.groups) - 1

    # -- allocation ---------------------------------------------------------

    def allocate(self, n: int, exclude: set[int] | frozenset[int] = frozenset(),
                 min_group: int = 0) -> list[Grant]:
        """Up to ``n`` file pages, by priority, round-robin cluster by
        cluster among tiers of equal priority, from group ``min_group`` down,
        skipping tiers that are full or in ``exclude``."""
        grants: list[Grant] = []
        tiers = self.tiers
        for gi in range(min_group, len(self.groups)):
            group = self.groups[gi]
            misses = 0
            while n > 0 and misses < len(group):
                pos = self._rr[gi]
                ti = group[pos]
                tier = tiers[ti]
                switches = tier.cluster_switches
                runs = tier.allocate(n) if not (tier.full or ti in exclude) else []
                got = sum(count for _, count in runs)
                if got:
                    grants.append(Grant(ti, runs, got))
                    n -= got
                else:
                    misses += 1
                if not got or tier.cluster_switches != switches:
                    self._rr[gi] = (pos + 1) % len(group)
            if n == 0:
                break
        return grants

    # -- pins and frees -----------------------------------------------------

    def pin(self, ti: int, pages: Sequence[int]) -> list[int]:
        """Pin pages of tier ``ti``; returns their keys, for :meth:`unpin`."""
        pins = self._pins
        keys = [file_key(ti, p) for p in pages]
        for key in keys:
            pins[key] = pins.get(key, 0) + 1
        return keys

    def unpin(self, keys: Sequence[int]) -> None:
        """Drop one pin per key; a page whose free was deferred is freed
        with its last pin."""
        pins = self._pins
        for key in keys:
            c = pins[key] - 1
            if c:
                pins[key] = c
                continue
            del pins[key]
            if key in self._deferred:
                self._deferred.discard(key)
                self.tiers[key >> KEY_SHIFT].free((key & KEY_PAGE_MASK,))

    @property
    def pinned_pages(self) -> int:
        return len(self._pins)

    def free_page(self, ti: int, page: int) -> None:
        """A slot let go of ``page`` of tier ``ti``: drop its cached copy and
        free it, or defer the free while a read pins it."""
        key = file_key(ti, page)
        self.cache.invalidate(key)
        if self._pins and key in self._pins:
            self._deferred.add(key)
        else:
            self.tiers[ti].free((page,))

    def deferred_pages(self, ti: int) -> int:
        return sum(1 for key in self._deferred if key >> KEY_SHIFT == ti)

    def owned_pages(self, ti: int) -> int:
        """Pages of tier ``ti`` that slots hold: allocated pages less those
        in flight and those whose free waits for a read."""
        return self.tiers[ti].stored_pages - self.inflight[ti] - self.deferred_pages(ti)

    # -- punching -----------------------------------------------------------

    async def punch(self) -> None:
        """Punch the clusters that frees left entirely free, in every tier."""
        for tier in self.tiers:
            if tier.punch_pending:
                await tier.punch_free_clusters()
