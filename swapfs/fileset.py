"""The file tiers of a store, as one set: priority groups, allocation,
pinned objects, deferred frees, punching, and the codecs of stored objects.

Tier ``i`` (config order) is slot kind ``slots.file_kind(i)``.  Tiers of equal
priority form a group; groups are used highest priority first, and inside a
group allocation goes round-robin, segment by segment.  A file slot's handle
is its object's place in the tier (``FileTier.allocate``), its info word's
length field the object's payload length.

Objects hold pages as the pool held them (compressed by the codec their
header names, or raw): :meth:`FileTierSet.read_pages` verifies and
decompresses; a move copies objects as they are (:meth:`read_objects`).

Pins: an object being read (pread in a worker thread) is pinned.  Freeing a
pinned object (a write or discard of its slot meanwhile) is deferred until its
last pin goes, so its segment is never emptied and reused while a read of it
runs.  Pins and the swap cache share one key per file location
(:func:`swapfs.cache.file_key`).

Accounting: a tier's ``stored_pages`` counts allocated pages; pages written
but not yet owned by a slot (``inflight``) and deferred frees are not a
slot's, and :meth:`owned_pages` leaves them out, so that every stored page
is counted once at every moment.

Nothing here awaits except :meth:`punch`, :meth:`wait_for_room` and :meth:`maintain`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import trio

from .cache import KEY_PAGE_MASK, KEY_SHIFT, SwapCache, file_key
from .codec import CODECS_BY_ID, Codec
from .config import TierConfig
from .errors import Misuse
from .kernel import PAGE_SIZE
from .memory import StateMemory
from .slots import MAX_FILE_TIERS
from .tiers.file import RAW, ChecksumError, FileTier
from .tiers.remote.tier import RemoteTier

# A tier below the pool: a backing file, or segments on a Redis Cluster (the same objects,
# the same segment map; the same calls).
LowerTier = FileTier | RemoteTier


class Grant(NamedTuple):
    """File objects granted by :meth:`FileTierSet.allocate`: ``npages``
    objects of tier ``tier`` at ``handles`` (for the first ``npages``
    lengths asked, in order)."""

    tier: int
    handles: list[int]
    npages: int


class Decoder:
    """Page content from an object's codec id and payload."""

    def __init__(self) -> None:
        self._codecs: dict[int, Codec] = {}

    def codec(self, cid: int) -> Codec:
        c = self._codecs.get(cid)
        if c is None:
            cls = CODECS_BY_ID.get(cid)
            if cls is None:
                raise KeyError(cid)
            c = self._codecs[cid] = cls()
        return c

    def page(self, cid: int, payload: bytes) -> bytes:
        """The page an object holds; ValueError if it does not decode to one."""
        if cid == RAW:
            if len(payload) != PAGE_SIZE:
                raise ValueError(f"a raw object of {len(payload)} bytes")
            return payload
        try:
            out = self.codec(cid).decompress(payload)
        except KeyError:
            raise ValueError(f"unknown codec id {cid}") from None
        except Exception as e:  # lz4 and zstd raise their own errors
            raise ValueError(f"{CODECS_BY_ID[cid].name} cannot decompress it: {e}") from None
        if len(out) != PAGE_SIZE:
            raise ValueError(f"it decompresses to {len(out)} bytes")
        return out


class FileTierSet:
    """Open file tiers and the state shared across them."""

    def __init__(self, configs: Sequence[TierConfig], cache: SwapCache,
                 memory: StateMemory | None = None) -> None:
        if len(configs) > MAX_FILE_TIERS:
            raise Misuse(f"at most {MAX_FILE_TIERS} file tiers")
        self.cache = cache
        self.tiers: list[LowerTier] = []
        try:
            for tc in configs:
                tier: LowerTier
                if tc.kind == "redis":
                    tier = RemoteTier(tc.name, tc.size, tc.priority, seeds=tc.seeds, user=tc.user,
                                      password_file=tc.password_file, tls_ca=tc.tls_ca,
                                      tls_cert=tc.tls_cert, tls_key=tc.tls_key,
                                      key_prefix=tc.key_prefix, timeout=tc.timeout,
                                      read_deadline=tc.read_deadline, replicas=tc.replicas,
                                      segment_bytes=tc.segment_bytes, recompress=tc.recompress,
                                      memory=memory)
                elif tc.kind == "file":
                    tier = FileTier(tc.name, tc.path, tc.size, tc.priority,
                                    preallocate=tc.preallocate, encrypt=tc.encrypt,
                                    force_init=tc.force_init, memory=memory,
                                    segment_bytes=tc.segment_bytes, recompress=tc.recompress)
                else:
                    raise Misuse(f"tier {tc.name!r}: unknown kind {tc.kind!r}")
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
        # Frees waiting for a read's pin to go: key -> payload length.
        self._deferred: dict[int, int] = {}
        # Per tier: objects written or being written that no slot owns yet.
        self.inflight = [0] * len(self.tiers)
        self.decoder = Decoder()
        # Called (no await) when a tier runs low on free segments: the
        # writeback task's kick, which cleans (set by the store).
        self.kick_cleaning: Callable[[], None] | None = None
        # Set (and replaced) each time cleaning made room: what a write that
        # found every tier out of room waits for (``wait_for_room``).
        self._room = trio.Event()

    def __len__(self) -> int:
        return len(self.tiers)

    def __iter__(self) -> Iterator[LowerTier]:
        return iter(self.tiers)

    def __getitem__(self, ti: int) -> LowerTier:
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

    def allocate(self, lengths: Sequence[int], exclude: set[int] | frozenset[int] = frozenset(),
                 min_group: int = 0) -> list[Grant]:
        """Objects of ``lengths`` payload bytes, in order, as many as there is
        room for, by priority, round-robin segment by segment among tiers of
        equal priority, from group ``min_group`` down, skipping tiers that
        are full or in ``exclude``.  The grants cover a prefix of
        ``lengths``, in order."""
        grants: list[Grant] = []
        tiers = self.tiers
        pos = 0
        n = len(lengths)
        for gi in range(min_group, len(self.groups)):
            group = self.groups[gi]
            misses = 0
            while pos < n and misses < len(group):
                rr = self._rr[gi]
                ti = group[rr]
                tier = tiers[ti]
                switches = tier.segment_switches
                handles = (tier.allocate(lengths[pos:])
                           if not (tier.full or ti in exclude) else [])
                got = len(handles)
                if got:
                    grants.append(Grant(ti, handles, got))
                    pos += got
                else:
                    misses += 1
                if not got or tier.segment_switches != switches:
                    self._rr[gi] = (rr + 1) % len(group)
                if tier.low_on_segments and self.kick_cleaning is not None:
                    self.kick_cleaning()
            if pos == n:
                break
        return grants

    def give_back(self, grant: Grant, lengths: Sequence[int]) -> None:
        """Free the objects of ``grant`` (never written; ``lengths``: theirs)."""
        tier = self.tiers[grant.tier]
        for h, n in zip(grant.handles, lengths):
            tier.free(h, n)

    # -- waiting for cleaning ----------------------------------------------

    @property
    def cleanable(self) -> bool:
        """Some tier is out of room but not full: cleaning can make room."""
        return any(not t.full and t.cleaning_victims() for t in self.tiers)

    async def wait_for_room(self, seconds: float) -> bool:
        """Ask the writeback task to clean and wait until it made room (True)
        or ``seconds`` passed (False).  For writes only: a read never
        waits for cleaning."""
        if self.kick_cleaning is None or not self.cleanable:
            return False
        room = self._room
        self.kick_cleaning()
        with trio.move_on_after(seconds):
            await room.wait()
        return room.is_set()

    def room_made(self) -> None:
        """Cleaning freed segments: wake the writes waiting for room."""
        self._room.set()
        self._room = trio.Event()

    # -- pins and frees -----------------------------------------------------

    def pin(self, ti: int, pages: Sequence[int]) -> list[int]:
        """Pin objects (by handle) of tier ``ti``; returns their keys, for
        :meth:`unpin`."""
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
            n = self._deferred.pop(key, 0)
            if n:
                self.tiers[key >> KEY_SHIFT].free(key & KEY_PAGE_MASK, n)

    @property
    def pinned_pages(self) -> int:
        return len(self._pins)

    def free_page(self, ti: int, handle: int, length: int) -> None:
        """A slot let go of its object at ``handle`` of tier ``ti`` (``length``
        payload bytes): drop its cached copy and free it, or defer the free
        while a read pins it."""
        key = file_key(ti, handle)
        self.cache.invalidate(key)
        if self._pins and key in self._pins:
            self._deferred[key] = length
        else:
            self.tiers[ti].free(handle, length)

    def deferred_pages(self, ti: int) -> int:
        return sum(1 for key in self._deferred if key >> KEY_SHIFT == ti)

    def deferred_objects(self, ti: int) -> list[tuple[int, int]]:
        """``(handle, length)`` of tier ``ti``'s objects whose free waits for a read."""
        return [(key & KEY_PAGE_MASK, n) for key, n in self._deferred.items()
                if key >> KEY_SHIFT == ti]

    def owned_pages(self, ti: int) -> int:
        """Pages of tier ``ti`` that slots hold: allocated pages less those
        in flight and those whose free waits for a read."""
        return self.tiers[ti].stored_pages - self.inflight[ti] - self.deferred_pages(ti)

    # -- punching -----------------------------------------------------------

    @property
    def punch_pending(self) -> bool:
        """Some tier has emptied segments waiting for their punch."""
        return any(t.punch_pending for t in self.tiers)

    # -- background duties -------------------------------------------------

    async def maintain(self) -> None:
        """Every tier's background duty (a remote tier's slot map reloads), side by side,
        until cancelled; returns at once when no tier has one."""
        duties = [t.maintain for t in self.tiers if isinstance(t, RemoteTier)]
        if not duties:
            return
        async with trio.open_nursery() as nursery:
            for duty in duties:
                nursery.start_soon(duty)

    async def punch(self) -> None:
        """Punch the segments that frees left without live objects, in every
        tier."""
        for tier in self.tiers:
            if tier.punch_pending:
                await tier.punch_free_segments()

    # -- reading -------------------------------------------------------------

    async def read_pages(self, ti: int, items: Sequence[tuple[int, int, int]]) -> list[bytes]:
        """The pages of objects ``(handle, length, slot key)`` of tier ``ti``,
        verified and decompressed; ChecksumError if one does not verify or
        decode."""
        tier = self.tiers[ti]
        objs = await tier.read_objects(items)
        page = self.decoder.page
        out = []
        for (h, _n, _k), (cid, payload) in zip(items, objs):
            try:
                out.append(page(cid, payload))
            except ValueError as e:
                tier.checksum_errors += 1
                raise ChecksumError(h, f"tier {tier.name!r}: {tier.path}: object at {h}: "
                                       f"{e}") from None
        return out

    def read_page_now(self, ti: int, handle: int, length: int, key: int) -> bytes:
        """One page, read, verified and decompressed synchronously (for the
        consistency check, never on the serving path)."""
        cid, payload = self.tiers[ti].read_now(handle, length, key)
        return self.decoder.page(cid, payload)
