"""The remote tier: a file tier's log of segments, kept in a Redis Cluster's memory.

The same objects as the file tiers (swapfs.tiers.file.objects: a header naming the slot, the
pool's compressed bytes, an AES-256-GCM tag over both with the handle and the segment's
generation as nonce, a key that lives only in this machine's locked memory), in the same
segment map (swapfs.tiers.file.segments: handles, live bytes and generations per segment,
cleaning's victims).  What differs is where a segment is: the string value of the key
``<key_prefix><segment number>``, its slot (and so its node) spread by the key's CRC16.

* **Writes** (``write``): the objects of one call are sealed on the loop and sent as one
  pipelined batch per node: ``SETRANGE`` per run of consecutive objects, preceded, until a
  batch that did so is acknowledged, by a ``SETRANGE`` of the segment's last byte (a byte no
  object uses), which makes the server allocate the string at its final length once (a string
  that grows is reallocated with slack: up to twice its size).  A remote segment is a string of
  ``segment_bytes - 64`` bytes: with the server's string header the allocation is exactly
  ``segment_bytes``, a size class of its allocator (measured: 1 MiB - 64 B costs +0.1 % where
  1 MiB costs +25 %).  With ``replicas`` > 0 each batch ends with
  ``WAIT replicas timeout``; the call returns, and the caller frees its local copy, only when
  every batch is acknowledged and WAIT counted the replicas.  A failure a failover ends is
  retried (the batch resent whole: SETRANGE is idempotent) for up to ``read_deadline``; then,
  or at once for any other failure, the handles are freed and the call raises: ``TierFull`` when a node said OOM (``maxmemory`` with ``noeviction``: the
  next tier takes the page), ``TierIOError`` (EIO) for anything else.
* **Reads** (``read_objects``): one ``GETRANGE`` per object, pipelined, verified; a failure the
  cluster can end (a deadline, a lost connection, CLUSTERDOWN during a replica's promotion) is
  retried with growing pauses for up to ``read_deadline``, then EIO.  Bytes of another object,
  another generation or a lost key (an empty reply) fail the tag: ``ChecksumError``, counted.
* **Cleaning and discards**: as in a file tier (the writeback task cleans through
  swapfs.migrate); a segment left without live objects is deleted with ``UNLINK`` where a file
  tier punches it, then reused under a new generation.
* **Close** deletes the mount's keys (best effort, blocking, at unmount); a mount also deletes
  what a previous mount of the same prefix left before its first write.  A successor that
  adopted the state (failover) sweeps nothing and deletes every segment key at close.
* **Bookkeeping** is SegmentedTier's, the file tiers' rule (used pages, when cleaning is kicked
  and needed, when the tier is full), but for the cluster's OOM (full for a while) and a failed
  UNLINK (its segments stay queued, tried again later).
* **Background**: ``maintain`` (run by the daemon beside the writeback task) reloads the
  client's slot map every few seconds, off the request path.

Concurrency: one trio loop; ``allocate`` and ``free`` never await.  Remote calls go through
swapfs.tiers.remote.client, each bounded by ``timeout``.  ``read_now`` is a blocking read for
the consistency check only.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import ssl
import time
from array import array
from collections.abc import Iterable, Sequence

import hiredis
import trio

from ...errors import Misuse
from ...kernel import PAGE_SIZE as PAGE
from ...memory import StateMemory
from ...stats import FileTierStats
from ..file.cipher import KEY_BYTES, ObjectCipher, new_key
from ..file.errors import ChecksumError, TierFull, TierIOError
from ..file.objects import Bad, object_bytes, parse, seal, unseal
from ..file.segments import CLEAN_MAX_LIVE, HEAD, PENDING, SEALED, SegmentedTier, SegmentMap
from .client import (
    ERROR_KINDS,
    Cluster,
    RemoteError,
    RemoteFull,
    encode,
    key_slot,
    retrying,
    ssl_context,
)

log = logging.getLogger(__name__)

# Bytes a remote segment leaves unused so that the server's allocation is segment_bytes.
SEGMENT_SLACK = 64
# Segments kept back for cleaning, as in a file tier.
CLEAN_RESERVE = 2
# Remote read latency histogram: upper bounds in microseconds (the last bucket is "more").
LATENCY_BOUNDS_US = (100, 200, 500, 1000, 2000, 5000, 10000, 100000)
# After an OOM, the tier reports full for this long unless a delete made room first.
FULL_HOLD_SECONDS = 5.0
# After a failed UNLINK of emptied segments, the next try waits this long.
UNLINK_RETRY_SECONDS = 1.0


class _RemoteSegments(SegmentMap):
    """The segment map, with segments holding ``usable`` bytes of their ``segment_bytes``."""

    def __init__(self, *args: object, usable: int, **kw: object) -> None:
        self.usable = usable
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def seg_size(self, s: int) -> int:
        return min(super().seg_size(s), self.usable)


def default_prefix(name: str, mountpoint: str) -> str:
    """``swapfs:<machine id>:<mount>:<tier>:``: one machine's mount's keys, recognisable."""
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()[:12] or socket.gethostname()
    except OSError:
        machine = socket.gethostname()
    mount = (mountpoint or "-").strip("/").replace("/", "_").replace("{", "_").replace("}", "_")
    return f"swapfs:{machine}:{mount or 'root'}:{name}:"


class RemoteTier(SegmentedTier):
    """A tier of segments on a Redis Cluster.  See the module docstring."""

    kind = "redis"

    def __init__(self, name: str, size_bytes: int, priority: int, *, seeds: Sequence[str],
                 user: str = "", password_file: str = "", tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", key_prefix: str = "", timeout: float = 0.2,
                 read_deadline: float = 10.0, replicas: int = 1,
                 segment_bytes: int = 1 << 20, recompress: str = "", mountpoint: str = "",
                 memory: StateMemory | None = None) -> None:
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) \
                or size_bytes <= 0 or size_bytes % PAGE:
            raise Misuse(f"tier {name!r}: size {size_bytes!r} is not a positive whole "
                         f"number of {PAGE}-byte pages")
        self.name = name
        self.size_bytes = size_bytes
        self.priority = priority
        self.seeds = list(seeds)
        self.path = f"redis cluster {','.join(self.seeds)}"  # for messages
        self.user = user
        self.password_file = password_file
        self.tls_files = (tls_ca, tls_cert, tls_key)
        self.key_prefix = (key_prefix or default_prefix(name, mountpoint)).encode()
        self.timeout = timeout
        self.read_deadline = read_deadline
        self.replicas = replicas
        self.recompress = recompress
        self.encrypt = True
        self.capacity_pages = size_bytes // PAGE
        self.segment_bytes = min(segment_bytes, max(size_bytes, PAGE))
        self._memory = memory if memory is not None else StateMemory()
        self._map = _RemoteSegments(name, size_bytes, self.segment_bytes, reserve=CLEAN_RESERVE,
                                    recycle_at_once=False, memory=self._memory,
                                    usable=self.segment_bytes - SEGMENT_SLACK - 1)
        self.nsegments = self._map.nsegments
        # Per segment: a write that made its string at full length was acknowledged, in the
        # current generation.  Until then every batch writing to it makes it first (batches
        # may overtake each other; a string made shorter would grow with slack).
        self._sized = bytearray(self.nsegments)
        self._cipher: ObjectCipher | None = None
        self.client: Cluster | None = None
        self._swept = False
        self._inherited = False  # adopted from a predecessor (open)
        # Writes wait for the sweep: a write that overtook an UNLINK of its segment's old
        # key would be deleted with it.
        self._sweep_lock = trio.Lock()
        self._full_until = 0.0
        self._unlink_after = 0.0
        self.reads = 0
        self.writes = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.checksum_errors = 0
        self.io_errors = 0
        self.punched_segments = 0
        self.appended_bytes = 0
        self.cleaned_objects = 0
        self.cleaned_bytes = 0
        self.retries = 0
        self.failures = dict.fromkeys(ERROR_KINDS, 0)
        self.latency = array("Q", bytes(8 * (len(LATENCY_BOUNDS_US) + 1)))
        self._inflight = 0

    # -- open / close ---------------------------------------------------------------------------

    def open(self) -> None:
        """Read the password and TLS files and make the key (or take the one a predecessor
        left in the state memory).  Connections are made on first use."""
        if self.client is not None:
            raise Misuse(f"tier {self.name!r}: already open")
        where = f"tier {self.name!r}"
        password = ""
        if self.password_file:
            try:
                with open(self.password_file) as f:
                    password = f.readline().rstrip("\r\n")
            except OSError as e:
                raise OSError(e.errno, f"{where}: password_file {self.password_file}: "
                                       f"{e.strerror}") from e
            if not password:
                raise OSError(errno.EINVAL, f"{where}: password_file {self.password_file}: "
                                            f"empty")
        tls = None
        ca, cert, key = self.tls_files
        if ca or cert:
            try:
                tls = ssl_context(ca, cert, key)
            except (OSError, ssl.SSLError) as e:
                raise OSError(errno.EINVAL, f"{where}: TLS files: {e}") from e
        key_map = self._memory.reserve(f"tier.{self.name}.key", KEY_BYTES)
        if self._memory.adopted:
            k = bytes(key_map[:KEY_BYTES])
            if k == bytes(KEY_BYTES):
                raise OSError(errno.EINVAL, f"{where}: the state holds no key for the tier")
            # What the predecessor wrote is ours: no sweep, and close deletes every key (which
            # segments it left keys in is not known).  Its segments with live objects stay
            # sealed (rebuild); the others are made at full length again on their next write.
            self._swept = True
            self._inherited = True
        else:
            k = new_key()
            key_map[:KEY_BYTES] = k
        self._cipher = ObjectCipher(k)
        self._password = password
        self._tls = tls
        self.client = Cluster(self.seeds, user=self.user, password=password, tls=tls,
                              timeout=self.timeout, connect_timeout=max(self.timeout, 1.0))

    def rebuild(self, objects: Iterable[tuple[int, int]]) -> int:
        return self._map.rebuild((h, object_bytes(n, True)) for h, n in objects)

    def close(self) -> None:
        """Delete this mount's keys (blocking, best effort: logged if the cluster does not
        answer) and forget the key."""
        if self.client is None:
            return
        client, self.client = self.client, None
        self._cipher = None
        try:
            self._sync_delete(client, [s for s in range(self.nsegments) if self._inherited
                                       or self._map.fill[s] or self._sized[s]])
        except (OSError, RemoteError, hiredis.HiredisError) as e:
            log.warning("tier %r: cannot delete its keys at close: %s", self.name, e)
        client.close_now()

    @property
    def is_open(self) -> bool:
        return self.client is not None

    async def maintain(self) -> None:
        """The tier's background duty while it is open: the client's slot map reloaded every
        WATCH_SECONDS (swapfs.tiers.remote.client.Cluster.watch), off the request path."""
        client = self.client
        if client is not None:
            await client.watch()

    def _client(self) -> Cluster:
        if self.client is None:
            raise TierIOError(errno.EBADF, f"tier {self.name!r}: tier is closed")
        return self.client

    def seg_key(self, seg: int) -> bytes:
        return self.key_prefix + b"%d" % seg

    # -- bookkeeping (SegmentedTier's, but for the cluster's OOM and UNLINK's retries) ----------

    @property
    def room_bytes(self) -> int:
        """Bytes of objects the tier could still append, cleaning included (0 while the
        cluster said OOM): what the stats' headroom counts."""
        if time.monotonic() < self._full_until:
            return 0
        return self._map.room_bytes(CLEAN_MAX_LIVE)

    @property
    def punch_pending(self) -> bool:
        """Emptied segments wait for their UNLINK, and it is due: after a failed UNLINK not
        before the next try (callers loop on this)."""
        return bool(self._map.pending) and time.monotonic() >= self._unlink_after

    @property
    def full(self) -> bool:
        """For a while after a node said OOM (or until a delete made room), whatever the
        segments say; otherwise as a file tier (SegmentedTier._segments_full)."""
        return time.monotonic() < self._full_until or self._segments_full()

    @property
    def write_batches(self) -> int:
        return self.writes

    def allocate(self, lengths: Sequence[int], *, cleaning: bool = False,
                 survivors_of: int = -1) -> list[int]:
        if not lengths or time.monotonic() < self._full_until:
            return []
        for n in lengths:
            if not 0 < n <= PAGE:
                raise Misuse(f"tier {self.name!r}: an object of {n!r} bytes")
        return self._map.allocate((object_bytes(n, True) for n in lengths), cleaning,
                                  survivors_of)

    def free(self, handle: int, length: int) -> None:
        self._map.free(handle, object_bytes(length, True))

    # -- writes ----------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Before the first write: delete what an earlier mount of this prefix left (a mount
        that died without its close).  Every write waits until it is done."""
        async with self._sweep_lock:
            if not self._swept:
                await self._sweep_keys()
                self._swept = True

    async def _sweep_keys(self) -> None:
        client = self._client()
        keys = [self.seg_key(s) for s in range(self.nsegments)]
        for i in range(0, len(keys), 512):
            chunk = keys[i:i + 512]
            await retrying(lambda c=chunk: client.pipeline([(k, encode("UNLINK", k))
                                                           for k in c]),  # type: ignore[misc]
                           max(self.read_deadline, 1.0))

    async def write(self, handles: Sequence[int],
                    objects: Sequence[tuple[int, int, bytes]]) -> None:
        """Write ``objects`` (slot key, codec id, payload) at ``handles``; returns once every
        node acknowledged (and WAIT counted the replicas).  On failure the handles are freed
        and TierFull or TierIOError is raised."""
        if len(handles) != len(objects):
            raise Misuse(f"tier {self.name!r}: {len(objects)} objects for {len(handles)} handles")
        m = self._map
        cipher = self._cipher
        client = self._client()
        commands: list[tuple[bytes, bytes]] = []
        sized: list[int] = []  # segments this batch makes at full length
        run_seg, run_start, run_end, run_parts = -1, 0, 0, []  # type: ignore[var-annotated]
        total = 0

        def flush() -> None:
            if run_seg >= 0:
                k = self.seg_key(run_seg)
                commands.append((k, encode("SETRANGE", k, run_start, b"".join(run_parts))))

        try:
            for h, (key, codec, payload) in zip(handles, objects):
                n = len(payload)
                size = object_bytes(n, True)
                if not m.is_live(h, size):
                    raise Misuse(f"tier {self.name!r}: write of {n} bytes at {h}, not allocated")
                s = m.segment_of(h)
                off = h - s * self.segment_bytes
                parts = seal(cipher, h, m.gen[s], key, codec, payload)
                if s != run_seg or off != run_end:
                    flush()
                    if not self._sized[s] and s not in sized:
                        # The byte after the objects' room: never an object's, so this is
                        # harmless whenever it lands.
                        sized.append(s)
                        k = self.seg_key(s)
                        commands.append((k, encode("SETRANGE", k, m.seg_size(s), b"\0")))
                    run_seg, run_start, run_end, run_parts = s, off, off, []
                run_parts.extend(bytes(p) for p in parts)
                run_end += size
                total += size
            flush()
            if not self._swept:
                await self._sweep()
            await retrying(functools.partial(self._send, client, commands), self.read_deadline,
                           on_retry=self._retried)
        except RemoteError as e:
            self._failed(e)
            self._free_written(handles, objects)
            if isinstance(e, RemoteFull):
                self._full_until = time.monotonic() + FULL_HOLD_SECONDS
                raise TierFull(f"tier {self.name!r}: the cluster is full: {e}") from e
            self.io_errors += 1
            log.error("tier %r: write of %d objects failed: %s", self.name, len(handles), e)
            raise TierIOError(errno.EIO, f"tier {self.name!r}: write failed: {e}") from e
        except BaseException:
            self._free_written(handles, objects)
            raise
        for seg in sized:
            self._sized[seg] = 1
        self.writes += 1
        self.written_bytes += total
        self.appended_bytes += total

    async def _send(self, client: Cluster, commands: list[tuple[bytes, bytes]]) -> None:
        # Each batch may wait for the replicas as long again as the request itself.  A batch
        # is sent again whole after a failure a failover ends: SETRANGE is idempotent.
        replies = await client.pipeline(commands, wait_replicas=self.replicas,
                                        wait_ms=max(1, int(self.timeout * 1000)),
                                        budget=2 * self.timeout)
        for r in replies:
            if isinstance(r, RemoteError):
                raise r

    def _retried(self, e: RemoteError) -> None:
        self.retries += 1
        self._failed(e)

    def _failed(self, e: RemoteError) -> None:
        kind = getattr(e, "kind", "reply")
        self.failures[kind] = self.failures.get(kind, 0) + 1

    # -- reads -------------------------------------------------------------------------------

    def open_object(self, handle: int, length: int, key: int, buf: bytes | memoryview,
                    cipher: ObjectCipher | None = None) -> tuple[int, bytes]:
        m = self._map
        try:
            return unseal(cipher or self._cipher, handle, m.gen[m.segment_of(handle)], key,
                          length, buf)
        except Bad as e:
            self.checksum_errors += 1
            log.error("tier %r: object at %d (key %s) does not verify: %s", self.name, handle,
                      self.seg_key(m.segment_of(handle)).decode(errors="replace"), e)
            raise ChecksumError(handle, f"tier {self.name!r}: object at {handle}: "
                                        f"does not verify ({e})") from None

    def _getrange(self, handle: int, size: int) -> tuple[bytes, bytes]:
        s = self._map.segment_of(handle)
        off = handle - s * self.segment_bytes
        k = self.seg_key(s)
        return k, encode("GETRANGE", k, off, off + size - 1)

    async def read_objects(self, items: Sequence[tuple[int, int, int]]
                           ) -> list[tuple[int, bytes]]:
        if not items:
            return []
        sizes = [self._check_read(h, n) for h, n, _k in items]
        commands = [self._getrange(h, size) for (h, _n, _k), size in zip(items, sizes)]
        got = await self._read(commands)
        self.reads += len(items)
        self.read_bytes += sum(sizes)
        out: list[tuple[int, bytes]] = []
        bad: ChecksumError | None = None
        for (h, n, k), buf in zip(items, got):
            try:
                out.append(self.open_object(h, n, k, buf))
            except ChecksumError as e:
                bad = bad or e
        if bad is not None:
            raise bad
        return out

    async def _read(self, commands: list[tuple[bytes, bytes]]) -> list[bytes]:
        client = self._client()

        async def attempt() -> list[bytes]:
            replies = await client.pipeline(commands)
            for r in replies:
                if isinstance(r, RemoteError):
                    raise r
            return replies

        t = time.perf_counter()
        try:
            replies = await retrying(attempt, self.read_deadline, on_retry=self._retried)
        except RemoteError as e:
            self._failed(e)
            self.io_errors += 1
            log.error("tier %r: read of %d objects failed after %.1f s: %s", self.name,
                      len(commands), time.perf_counter() - t, e)
            raise TierIOError(errno.EIO, f"tier {self.name!r}: read failed: {e}") from e
        us = (time.perf_counter() - t) * 1e6
        i = 0
        while i < len(LATENCY_BOUNDS_US) and us > LATENCY_BOUNDS_US[i]:
            i += 1
        self.latency[i] += 1
        return [r if isinstance(r, bytes) else b"" for r in replies]

    def read_now(self, handle: int, length: int, key: int) -> tuple[int, bytes]:
        """One object, read blocking (for the consistency check, never on the serving path)."""
        size = self._check_read(handle, length)
        client = self._client()
        k, cmd = self._getrange(handle, size)
        addr = client.node_of(key_slot(k)) or client.seeds[0]
        (r,) = self._sync_batch(addr, [cmd])
        return self.open_object(handle, length, key, r if isinstance(r, bytes) else b"")

    # -- cleaning ----------------------------------------------------------------------------------

    async def read_segment(self, seg: int) -> list[tuple[int, int, int, bytes]]:
        m = self._map
        if m.state[seg] not in (HEAD, SEALED):
            return []
        n = m.fill[seg]
        gen = m.gen[seg]
        k = self.seg_key(seg)
        (data,) = await self._read([(k, encode("GETRANGE", k, 0, n - 1))])
        self.reads += 1
        self.read_bytes += n
        if m.gen[seg] != gen or m.state[seg] not in (HEAD, SEALED):
            return []
        base = seg * self.segment_bytes
        extra = object_bytes(0, True)
        return [(h, key, ln, data[pos:pos + ln + extra])
                for h, key, ln, pos in parse(data, base, gen, True)]

    async def punch_free_segments(self) -> int:
        """UNLINK every segment that frees emptied, and make it reusable (under a new
        generation, so nothing read from it before passes for what is written after).

        A segment whose UNLINK failed is not reused: it goes back to the queue for the next
        pass.  An UNLINK that timed out may still reach a frozen node when it wakes, and
        would then delete what a new generation had written there meanwhile."""
        m = self._map
        if not m.pending:
            return 0
        segs = m.take_pending()
        client = self._client()
        try:
            await client.pipeline([(self.seg_key(s), encode("UNLINK", self.seg_key(s)))
                                   for s in segs])
        except BaseException as e:
            if isinstance(e, RemoteError):
                self._failed(e)
                log.warning("tier %r: UNLINK of %d emptied segments failed (%s); tried again "
                            "later", self.name, len(segs), e)
            for s in segs:
                m.state[s] = PENDING
                m.pending.append(s)
            self._unlink_after = time.monotonic() + UNLINK_RETRY_SECONDS
            if isinstance(e, RemoteError):
                return 0
            raise
        self.punched_segments += len(segs)
        self._full_until = 0.0
        for s in segs:
            self._sized[s] = 0
        m.recycle(segs)
        return len(segs)

    # -- blocking calls (close, the consistency check) -----------------------------------------

    def _sync_batch(self, addr: str, commands: list[bytes]) -> list[object]:
        host, _, port = addr.rpartition(":")
        deadline = max(self.timeout, 1.0)
        with socket.create_connection((host, int(port)), timeout=deadline) as raw:
            sock: socket.socket = raw
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_hostname=host)
            if self._password:
                auth = [self.user, self._password] if self.user else [self._password]
                commands = [encode("AUTH", *auth), *commands]
            sock.sendall(b"".join(commands))
            reader = hiredis.Reader()
            out: list[object] = []
            while len(out) < len(commands):
                data = sock.recv(1 << 18)
                if not data:
                    raise OSError(errno.ECONNRESET, f"{addr} closed the connection")
                reader.feed(data)
                while (r := reader.gets()) is not False:
                    out.append(r)
        if self._password:
            if isinstance(out[0], hiredis.ReplyError):
                raise OSError(errno.EACCES, f"{addr}: AUTH refused: {out[0]}")
            out = out[1:]
        return out

    def _sync_delete(self, client: Cluster, segs: list[int]) -> None:
        if segs and client.stats.refreshes == 0:
            # The slot map was never loaded (a successor closed before any request).
            for seed in client.seeds:
                try:
                    (reply,) = self._sync_batch(seed, [encode("CLUSTER", "SLOTS")])
                except OSError:
                    continue
                if isinstance(reply, list):
                    client.load_slots(reply, seed)
                    break
        by_node: dict[str, list[bytes]] = {}
        for s in segs:
            k = self.seg_key(s)
            addr = client.node_of(key_slot(k))
            if addr is not None:
                by_node.setdefault(addr, []).append(encode("UNLINK", k))
        for addr, cmds in by_node.items():
            self._sync_batch(addr, cmds)

    # -- checks and stats -----------------------------------------------------------------------

    def check_invariants(self) -> None:
        self._map.check_invariants()

    @property
    def metadata_bytes(self) -> int:
        return self._map.metadata_bytes + self.nsegments

    def pages_per_node(self) -> dict[str, int]:
        """Live objects per node, as the slot map places their segments now."""
        out: dict[str, int] = {}
        client = self.client
        m = self._map
        for s in range(m.nsegments):
            if m.objects[s]:
                addr = (client.node_of(key_slot(self.seg_key(s))) if client else None) or "?"
                name = addr.replace(".", "_").replace(":", "_")
                out[name] = out.get(name, 0) + m.objects[s]
        return out

    def stats(self) -> FileTierStats:
        m = self._map
        free = m.free_segments
        user = self.appended_bytes - self.cleaned_bytes
        cs = self.client.sync_stats() if self.client else None
        lat = {f"le_{b}": self.latency[i] for i, b in enumerate(LATENCY_BOUNDS_US)}
        lat["more"] = self.latency[len(LATENCY_BOUNDS_US)]
        return FileTierStats(
            name=self.name, kind="redis", path=self.path, priority=self.priority,
            capacity_pages=self.capacity_pages, stored_pages=m.stored,
            free_pages=self.free_pages, disk_bytes=(m.nsegments - free) * self.segment_bytes,
            reads=self.reads, writes=self.writes, read_bytes=self.read_bytes,
            written_bytes=self.written_bytes, checksum_errors=self.checksum_errors,
            io_errors=self.io_errors, full=self.full, metadata_bytes=self.metadata_bytes,
            live_bytes=m.live_bytes, dead_bytes=m.dead_bytes,
            segments_used=m.nsegments - free, segments_free=free,
            segments_punch_pending=m.punch_queued, punched_segments=self.punched_segments,
            segment_bytes=self.segment_bytes,
            cleaned_objects=self.cleaned_objects, cleaned_bytes=self.cleaned_bytes,
            write_amplification=round(self.appended_bytes / user, 4) if user > 0 else 0.0,
            compression_ratio=round(m.stored * PAGE / m.live_bytes, 4) if m.live_bytes else 0.0,
            segment_switches=m.switches, write_batches=self.writes, encrypted=True,
            remote_requests=cs.requests if cs else 0,
            remote_sent_bytes=cs.sent_bytes if cs else 0,
            remote_received_bytes=cs.received_bytes if cs else 0,
            remote_errors=sum(self.failures.values()), remote_retries=self.retries,
            remote_redirects=cs.redirects if cs else 0,
            remote_refreshes=cs.refreshes if cs else 0,
            remote_slot_changes=cs.slot_changes if cs else 0,
            remote_failures=dict(self.failures), remote_read_latency_us=lat,
            remote_pages_per_node=self.pages_per_node())

