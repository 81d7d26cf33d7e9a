"""Same content stored once: the pool's index of compressed objects by hash.

With ``[pool] dedup = true`` every compressed (not huge) pool object is
entered here under the xxh3-64 hash of its compressed bytes.  A write whose
compressed page hashes to an entry of the same length, and whose bytes equal
the object's (compared in full: a hash collision never shares another
page's data), takes a reference to that object instead of a new one.

**The index** is an open-addressing table (linear probing, backward-shift
deletion) of 64-bit words in a private mapping (derived state: recovery
rebuilds it, swapfs/recovery.py): no Python object per
entry.  A word is ``tag << (LEN_BITS + hbits) | length << hbits | handle >> 4``
(pool handles are 8 past a 16-byte aligned header, so ``handle >> 4`` loses
nothing): the tag is the top bits of the hash, the bucket is taken from the
top bits of the hash too, so the table regrows from its own words while its
size fits in the tag (beyond that, from the pool's bytes).  The table holds
at most 3/4 of its words, doubles when fuller and halves below 1/8 (never
under MIN_WORDS): 8 bytes per word, 11 to 21 bytes per object.  It follows
the objects stored, never the devices' capacity.  Regrowing rehashes every
entry in one step (about 0.2 us each; see docs/store.md).

**Reference counts** live in the object's header (the pool's 8-byte word
before each object, ``Pool.header``): an object with one reference keeps
its owner slot there; once shared, the header is ``SHARED | references``,
where SHARED is the pool's PINNED bit: the pool then leaves the object where
it is and never reads the rest (see swapfs/tiers/pool.py).  This module
alone encodes and decodes that header (``share``, ``release``, ``refs``).  A reference is dropped by the store's free paths
(discard, overwrite, demotion by writeback, a write given back); the last one
removes the entry and frees the object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import InvariantError
from .memory import reserve
from .tiers.pool import HEADER, MAX_OBJECT, OBJECT_BYTES, PINNED, Pool

LEN_BITS = 13  # payload lengths up to 4096
MIN_WORDS = 1024
_LEN_MASK = (1 << LEN_BITS) - 1
# A shared object's header: SHARED | references (the pool's "do not move" bit).
SHARED = PINNED
_REFS_MASK = SHARED - 1


def xxh3_hash() -> Callable[[Any], int]:
    import xxhash
    return xxhash.xxh3_64_intdigest


class DedupIndex:
    """The hash index and reference counts of one pool's compressed objects."""

    def __init__(self, pool: Pool, hash_fn: Callable[[Any], int] | None = None) -> None:
        self.pool = pool
        self.hash = hash_fn or xxh3_hash()
        # Bits of handle >> 4 (pool address space / 16).
        self.hbits = (pool.reserve_pages * 4096 >> 4).bit_length()
        self.tag_shift = LEN_BITS + self.hbits
        self.tag_bits = 64 - self.tag_shift
        self._hmask = (1 << self.hbits) - 1
        self.entries = 0
        # References beyond each object's first (pages stored without an
        # object of their own), their payload and their class bytes.
        self.extra_refs = 0
        self.saved_payload = 0
        self.saved_bytes = 0
        self.hits = 0  # writes that found their content stored (ever)
        self.collisions = 0  # hash matches whose bytes differed (ever)
        self.not_indexed = 0  # objects left out: the index could not grow
        self.rehashes = 0
        self._alloc(MIN_WORDS)

    def _alloc(self, nwords: int) -> None:
        self._map = reserve(nwords * 8)
        self.words = memoryview(self._map).cast("Q")
        self.nwords = nwords
        self.bits = nwords.bit_length() - 1
        self.shift = 64 - self.bits
        self.mask = nwords - 1

    def metadata_bytes(self) -> int:
        return self.nwords * 8

    # -- lookups ------------------------------------------------------------

    def find(self, hv: int, data: object, n: int) -> int:
        """The handle of an indexed object of ``n`` bytes equal to ``data``
        (whose hash is ``hv``), or -1."""
        words = self.words
        mask = self.mask
        tag_shift = self.tag_shift
        hbits = self.hbits
        tag = hv >> tag_shift
        raw = self.pool.raw
        b = hv >> self.shift
        while True:
            w = words[b]
            if not w:
                return -1
            if w >> tag_shift == tag and (w >> hbits) & _LEN_MASK == n:
                h = (w & self._hmask) << 4 | HEADER
                if raw[h:h + n] == data:
                    return h
                self.collisions += 1
            b = (b + 1) & mask

    def _home(self, w: int) -> int:
        """The bucket of word ``w``."""
        if self.bits <= self.tag_bits:
            return w >> self.shift
        h = (w & self._hmask) << 4 | HEADER
        n = (w >> self.hbits) & _LEN_MASK
        return self.hash(self.pool.mem[h:h + n]) >> self.shift

    # -- changes --------------------------------------------------------------

    def insert(self, hv: int, h: int, n: int) -> None:
        """Enter the new object ``h`` of ``n`` bytes, hash ``hv``.  If the
        index cannot grow (no memory), the object is left out: it is then
        never shared, which is allowed."""
        if (self.entries + 1) * 4 > self.nwords * 3:
            try:
                self._resize(self.nwords * 2)
            except OSError:
                self.not_indexed += 1
                return
        words = self.words
        mask = self.mask
        b = hv >> self.shift
        while words[b]:
            b = (b + 1) & mask
        words[b] = hv >> self.tag_shift << self.tag_shift | n << self.hbits | h >> 4
        self.entries += 1

    def remove(self, h: int, n: int) -> None:
        """Remove the entry of object ``h`` (``n`` bytes), if indexed."""
        words = self.words
        mask = self.mask
        want = n << self.hbits | h >> 4
        low = (1 << self.tag_shift) - 1
        b = self.hash(self.pool.mem[h:h + n]) >> self.shift
        while True:
            w = words[b]
            if not w:
                return  # left out when the index could not grow
            if w & low == want:
                break
            b = (b + 1) & mask
        # Backward-shift deletion: pull later words of the run into the hole.
        i = b
        j = b
        shift = self.shift if self.bits <= self.tag_bits else 0
        while True:
            j = (j + 1) & mask
            w = words[j]
            if not w:
                break
            k = w >> shift if shift else self._home(w)
            if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
                words[i] = w
                i = j
        words[i] = 0
        self.entries -= 1
        if self.nwords > MIN_WORDS and self.entries * 8 < self.nwords:
            try:
                self._resize(self.nwords // 2)
            except OSError:
                pass

    def moved(self, old: int, new: int, n: int) -> None:
        """Compaction moved the unshared object ``old`` to ``new`` (same bytes)."""
        words = self.words
        mask = self.mask
        want = n << self.hbits | old >> 4
        low = (1 << self.tag_shift) - 1
        b = self.hash(self.pool.mem[new:new + n]) >> self.shift
        while True:
            w = words[b]
            if not w:
                return
            if w & low == want:
                words[b] = w & ~self._hmask | new >> 4
                return
            b = (b + 1) & mask

    def _resize(self, nwords: int) -> None:
        old = self.words
        old_map = self._map
        self._alloc(nwords)  # OSError: nothing changed
        self.rehashes += 1
        words = self.words
        mask = self.mask
        home = self._home
        for w in old:
            if w:
                b = home(w)
                while words[b]:
                    b = (b + 1) & mask
                words[b] = w
        old.release()
        old_map.close()

    # -- references -----------------------------------------------------------

    def share(self, h: int, n: int) -> None:
        """One more reference to the indexed object ``h`` of ``n`` bytes."""
        pool = self.pool
        w = pool.header(h)
        pool.set_header(h, w + 1 if w & SHARED else SHARED | 2)
        self.extra_refs += 1
        self.saved_payload += n
        self.saved_bytes += OBJECT_BYTES[n]
        self.hits += 1

    def release(self, h: int, n: int) -> bool:
        """Drop a reference to object ``h`` of ``n`` bytes (``n <= MAX_OBJECT``);
        True if it was the last one (the entry is gone; the caller frees the
        object)."""
        pool = self.pool
        w = pool.header(h)
        if w & SHARED and w & _REFS_MASK > 1:
            pool.set_header(h, w - 1)
            self.extra_refs -= 1
            self.saved_payload -= n
            self.saved_bytes -= OBJECT_BYTES[n]
            return False
        self.remove(h, n)
        return True

    def refs(self, h: int, n: int) -> int:
        """References to object ``h`` of ``n`` bytes by its header (1 unless shared)."""
        if n > MAX_OBJECT:
            return 1
        w = self.pool.header(h)
        return w & _REFS_MASK if w & SHARED else 1

    def is_shared(self, h: int, n: int) -> bool:
        """The object's header is a reference count (it has been shared; it
        stays so, and unmovable, until freed)."""
        return n <= MAX_OBJECT and bool(self.pool.header(h) & SHARED)

    def check(self) -> dict[int, int]:
        """InvariantError unless every word names a live object whose bytes
        hash to it, each at most once, found by a lookup; returns handle ->
        length of the entries."""
        seen: dict[int, int] = {}
        mem = self.pool.mem
        count = 0
        collisions = self.collisions
        for b, w in enumerate(self.words):
            if not w:
                continue
            count += 1
            h = (w & self._hmask) << 4 | HEADER
            n = (w >> self.hbits) & _LEN_MASK
            if h in seen:
                raise InvariantError(f"dedup: object {h:#x} is indexed twice")
            seen[h] = n
            data = bytes(mem[h:h + n])
            hv = self.hash(data)
            if hv >> self.tag_shift != w >> self.tag_shift:
                raise InvariantError(f"dedup: object {h:#x} does not hash to its entry")
            if self.find(hv, data, n) < 0:
                raise InvariantError(f"dedup: object {h:#x} (bucket {b}) is not found")
        self.collisions = collisions
        if count != self.entries:
            raise InvariantError(f"dedup: {self.entries} entries counted, {count} held")
        return seen
