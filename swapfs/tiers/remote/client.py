"""A small Redis Cluster client on trio streams with hiredis's parser (the remote tier's data path).

Why our own: measured on loopback (scripts/bench-remote), a GET at depth 1 through trio streams
and hiredis's sans-I/O ``Reader`` takes about half the time of redis-py's synchronous client and
a third of the anyio-based clients', and a thread per request serializes on the GIL.  What the
tier needs is small: keys routed to their slot's master, pipelined batches, GETRANGE, WAIT.

Shape:

* :func:`key_slot`: CRC16 (XMODEM) of the key, or of its hash tag (``{...}``), mod 16384.
* :class:`Connection`: one TCP (or TLS) stream to one node, pipelined: any number of tasks
  send batches of commands on it at once, and replies are handed out in the order the batches
  were sent.  Whoever waits reads: the oldest waiting task reads the stream and hands each
  reply to its batch, then passes the reading on (no task of its own, so a reply at depth 1
  costs one wake-up).  A connection that fails, or on which a deadline expires, is closed and
  every batch waiting on it fails with :class:`RemoteUnavailable` or :class:`RemoteTimeout`.
* :class:`Cluster`: the slot map (from CLUSTER SLOTS, one unsigned short per slot), one
  connection per node made on first use (AUTH with the ACL user and password, TLS through
  ``trio.SSLStream``), commands grouped by node and sent as one pipeline per node, the nodes in
  parallel.  MOVED updates the map and resends, ASK resends once with ASKING, TRYAGAIN and
  CLUSTERDOWN and lost connections mark the map stale (refreshed before the next call) and
  raise.  Every call is bounded by ``timeout`` (a redirection is followed within it); what a
  failure means is the caller's choice: :func:`retrying` repeats a call on the failures that a
  failover ends, within a total time.  :meth:`Cluster.watch`, run in a task of its own (off
  the request path), also reloads the map every few seconds, each reload bounded: a failover
  or a slot moved is learnt even where no request failed on it (pages per node, a replica
  promoted under segments nobody read since).

Errors are typed (all :class:`RemoteError`, a StoreError): ``RemoteTimeout``,
``RemoteUnavailable`` (refused, reset, CLUSTERDOWN, TRYAGAIN), ``RemoteAuthError`` (wrong
password, no permission), ``RemoteFull`` (OOM under ``noeviction``), ``RemoteReplyError``
(anything else the server said).  ``retryable`` says which ones a failover can end.

Concurrency: one trio loop; the slot map and the connection table change only between awaits.
"""

from __future__ import annotations

import binascii
import logging
import os
import ssl
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
import trio

from ...errors import StoreError

__all__ = ["SLOTS", "Cluster", "Connection", "RemoteAuthError", "RemoteError", "RemoteFull",
           "RemoteReplyError", "RemoteTimeout", "RemoteUnavailable", "encode", "key_slot",
           "retrying"]

log = logging.getLogger(__name__)

SLOTS = 16384
MAX_REDIRECTS = 8
# Cluster.watch: how often the slot map is reloaded off the request path.
WATCH_SECONDS = 5.0
READ_CHUNK = 1 << 18
NO_NODE = 0xFFFF

Reply = Any  # bytes, int, list, None or hiredis.ReplyError


# -- errors ------------------------------------------------------------------------------------

class RemoteError(StoreError):
    """A remote call failed; ``node`` names the node (host:port) when one is known."""

    retryable = False

    def __init__(self, message: str, node: str = "") -> None:
        super().__init__(f"{node}: {message}" if node else message)
        self.node = node


class RemoteTimeout(RemoteError):
    """A call's deadline expired (a frozen node, a lost machine, a saturated link)."""

    retryable = True
    kind = "timeout"


class RemoteUnavailable(RemoteError):
    """The node refused or lost the connection, or the cluster said CLUSTERDOWN or TRYAGAIN."""

    retryable = True
    kind = "unavailable"


class RemoteAuthError(RemoteError):
    """AUTH failed (WRONGPASS), or the ACL user lacks a permission (NOPERM, NOAUTH)."""

    kind = "auth"


class RemoteFull(RemoteError):
    """The node is at its ``maxmemory`` and evicts nothing (OOM): the tier is full."""

    kind = "full"


class RemoteReplyError(RemoteError):
    """Any other error reply, or a reply of an unexpected shape."""

    kind = "reply"


ERROR_KINDS = ("timeout", "unavailable", "auth", "full", "reply")


def _classify(err: hiredis.ReplyError | str, node: str) -> RemoteError:
    text = str(err)
    head = text.split(" ", 1)[0]
    if head in ("CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN", "READONLY"):
        return RemoteUnavailable(text, node)
    if head in ("WRONGPASS", "NOPERM", "NOAUTH"):
        return RemoteAuthError(text, node)
    if head == "OOM":
        return RemoteFull(text, node)
    return RemoteReplyError(text, node)


# -- the wire ------------------------------------------------------------------------------------

def encode(*args: bytes | str | int | memoryview) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n" % len(a))
        out.append(bytes(a))
        out.append(b"\r\n")
    return b"".join(out)


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the cluster's key hash: binascii's crc_hqx from 0 (in C)."""
    return binascii.crc_hqx(data, 0)


def key_slot(key: bytes) -> int:
    """The cluster slot of ``key``: of its hash tag, the bytes between the first ``{`` and the
    next ``}``, when that is not empty."""
    s = key.find(b"{")
    if s >= 0:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    return crc16(key) % SLOTS


# -- one connection ---------------------------------------------------------------------------

class _Batch:
    """The replies of one pipelined batch, as they arrive."""

    __slots__ = ("n", "replies", "done", "event")

    def __init__(self, n: int) -> None:
        self.n = n
        self.replies: list[Reply] = []
        self.done = n == 0
        self.event = trio.Event()


@dataclass
class ConnStats:
    requests: int = 0      # batches sent (round trips)
    sent_bytes: int = 0
    received_bytes: int = 0


class Connection:
    """One pipelined stream to one node; see the module docstring."""

    def __init__(self, stream: trio.abc.Stream, node: str, stats: ConnStats) -> None:
        self.stream = stream
        self.node = node
        self.stats = stats
        self.reader = hiredis.Reader()
        self.pending: deque[_Batch] = deque()
        self.outbuf: list[bytes] = []
        self.sending = False
        self.reading = False
        self.broken: RemoteError | None = None

    @property
    def is_broken(self) -> bool:
        return self.broken is not None

    def close(self, why: RemoteError) -> None:
        """Fail every waiting batch with ``why`` and close the stream (a task reading or
        sending on it gets ClosedResourceError and fails the same way)."""
        if self.broken is None:
            self.broken = why
        for b in self.pending:
            b.event.set()
        self.pending.clear()
        self.outbuf.clear()
        stream: object = self.stream
        if not isinstance(stream, trio.SocketStream):
            # TLS: the raw transport under it is a SocketStream, closed the same way.
            stream = getattr(stream, "transport_stream", None)
        if isinstance(stream, trio.SocketStream):
            # Closing the socket is immediate (trio's aclose would checkpoint).  Outside a
            # trio run (a tier closed at teardown) nobody waits on it: the fd is let go.
            if trio.lowlevel.in_trio_run():
                stream.socket.close()
            else:
                fd = stream.socket.detach()
                if fd >= 0:
                    os.close(fd)

    async def execute(self, commands: Sequence[bytes]) -> list[Reply]:
        """Send the encoded ``commands`` as one batch and return their replies (error replies
        as hiredis.ReplyError values, in place).  Raises RemoteUnavailable if the connection is
        or becomes broken; a cancellation closes the connection."""
        if self.broken is not None:
            raise self.broken
        batch = _Batch(len(commands))
        self.pending.append(batch)
        self.outbuf.extend(commands)
        self.stats.requests += 1
        try:
            if not self.sending:
                await self._send()
            while not batch.done:
                if self.broken is not None:
                    raise self.broken
                if self.reading or self.pending[0] is not batch:
                    await batch.event.wait()
                    batch.event = trio.Event()
                    continue
                await self._read_until(batch)
        except BaseException as e:
            # A deadline (cancellation) or a failure of the stream: the replies still to come
            # could only be read by discarding them in order, and a node that misses a
            # deadline is likely gone; close, and let the next call reconnect.
            if batch.done:
                raise
            why = self.broken
            if why is None:
                why = RemoteTimeout("deadline expired", self.node) \
                    if isinstance(e, trio.Cancelled) else _connection_error(e, self.node)
            self.close(why)
            if isinstance(e, trio.Cancelled) or why is e:
                raise
            raise why from e
        return batch.replies

    async def _send(self) -> None:
        self.sending = True
        try:
            while self.outbuf and self.broken is None:
                data = b"".join(self.outbuf)
                self.outbuf.clear()
                self.stats.sent_bytes += len(data)
                await self.stream.send_all(data)
        finally:
            self.sending = False

    async def _read_until(self, mine: _Batch) -> None:
        self.reading = True
        try:
            reader = self.reader
            while not mine.done:
                data = await self.stream.receive_some(READ_CHUNK)
                if not data:
                    raise RemoteUnavailable("connection closed by the node", self.node)
                self.stats.received_bytes += len(data)
                reader.feed(data if isinstance(data, bytes) else bytes(data))
                while True:
                    r = reader.gets()
                    if r is False:
                        break
                    if not self.pending:
                        raise RemoteReplyError("a reply nobody asked for", self.node)
                    head = self.pending[0]
                    head.replies.append(r)
                    if len(head.replies) == head.n:
                        self.pending.popleft()
                        head.done = True
                        if head is not mine:
                            head.event.set()
        finally:
            self.reading = False
            # Pass the reading on to the oldest batch still waiting.
            if self.pending and self.broken is None:
                self.pending[0].event.set()


def _connection_error(e: BaseException, node: str) -> RemoteError:
    if isinstance(e, RemoteError):
        return e
    if isinstance(e, hiredis.ProtocolError):
        return RemoteReplyError(f"protocol error: {e}", node)
    return RemoteUnavailable(f"connection lost: {e!r}", node)


# -- the cluster -------------------------------------------------------------------------------

@dataclass
class ClientStats:
    """Counters of a Cluster; the tier renders them."""

    requests: int = 0           # round trips (one pipelined batch to one node)
    sent_bytes: int = 0
    received_bytes: int = 0
    redirects: int = 0          # MOVED and ASK followed
    refreshes: int = 0          # slot map reloads
    slot_changes: int = 0       # slots a reload found served by another master than before
    connects: int = 0


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{addr!r} is not host:port")
    return host.strip("[]"), int(port)


def ssl_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client context that verifies the nodes against ``ca`` (the system's CAs if empty)
    and presents ``cert``/``key`` when given (mutual TLS)."""
    ctx = ssl.create_default_context(cafile=ca or None)
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


class Cluster:
    """A Redis Cluster reached through ``seeds`` (host:port); see the module docstring."""

    def __init__(self, seeds: Sequence[str], *, user: str = "", password: str = "",
                 tls: ssl.SSLContext | None = None, timeout: float = 0.2,
                 connect_timeout: float = 1.0) -> None:
        if not seeds:
            raise ValueError("a cluster needs at least one seed (host:port)")
        for s in seeds:
            _split_addr(s)
        self.seeds = list(seeds)
        self.user = user
        self.password = password
        self.tls = tls
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.nodes: list[str] = []                     # node index -> host:port (masters)
        self.replicas: list[int] = []                  # node index -> replicas it has
        self.slots = array("H", [NO_NODE]) * SLOTS     # slot -> node index
        self.conns: dict[str, Connection] = {}
        self.stale = True
        self.closed = False  # by close_now or aclose: watch ends
        self.stats = ClientStats()
        self._conn_stats = ConnStats()
        self._connecting: dict[str, trio.Event] = {}
        # When each node last failed (a deadline, a lost connection): the slot map is asked
        # of the others first, so that a frozen node (whose kernel still accepts connections)
        # cannot hold every refresh until the cluster has replaced it.
        self._failed_at: dict[str, float] = {}

    # -- the map ---------------------------------------------------------------------------

    def node_of(self, slot: int) -> str | None:
        i = self.slots[slot]
        return None if i == NO_NODE else self.nodes[i]

    def _node_index(self, addr: str) -> int:
        try:
            return self.nodes.index(addr)
        except ValueError:
            self.nodes.append(addr)
            self.replicas.append(0)
            return len(self.nodes) - 1

    def min_replicas(self) -> int:
        """The fewest replicas any master serving slots has (0 without replicas)."""
        used = set(self.slots) - {NO_NODE}
        return min((self.replicas[i] for i in used), default=0)

    async def refresh(self) -> None:
        """Reload the slot map from the first node that answers (known masters first, then
        the seeds).  Raises the last failure if none does."""
        last: RemoteError | None = None
        candidates = sorted(dict.fromkeys(self.nodes + self.seeds),
                            key=lambda a: self._failed_at.get(a, 0.0))
        for addr in candidates:
            try:
                with trio.fail_after(self.timeout + self.connect_timeout):
                    conn = await self._conn(addr)
                    (reply,) = await conn.execute([encode("CLUSTER", "SLOTS")])
            except trio.TooSlowError:
                last = RemoteTimeout("no answer to CLUSTER SLOTS", addr)
                self._drop(addr, last)
                continue
            except RemoteAuthError:
                raise
            except RemoteError as e:
                last = e
                self._drop(addr, e)
                continue
            except trio.Cancelled:
                # The caller's deadline ended the refresh on this node: ask it last next time.
                self._drop(addr, RemoteTimeout("no answer to CLUSTER SLOTS", addr))
                raise
            if isinstance(reply, hiredis.ReplyError):
                last = _classify(reply, addr)
                if isinstance(last, RemoteAuthError):
                    raise last
                continue
            self.load_slots(reply, addr)
            return
        raise last or RemoteUnavailable("no seed answers")

    async def reload(self, bound: float | None = None) -> bool:
        """``refresh`` within ``bound`` seconds (default: twice what one node may take),
        quietly: False if no node answered in time (the next reload, or the next request
        that fails, tries again)."""
        if bound is None:
            bound = 2 * (self.timeout + self.connect_timeout)
        with trio.move_on_after(bound):
            try:
                await self.refresh()
            except RemoteError as e:
                log.debug("slot map reload failed: %s", e)
                return False
            return True
        return False

    async def watch(self, interval: float = WATCH_SECONDS) -> None:
        """Reload the slot map every ``interval`` seconds (each reload bounded, see
        ``reload``) until the client is closed.  Run it in a task of its own: requests never
        wait for it."""
        while not self.closed:
            await trio.sleep(interval)
            if self.closed:
                return
            try:
                await self.reload()
            except Exception:  # a reply of an unexpected shape: never the mount's end
                log.exception("slot map reload failed")

    def load_slots(self, reply: list[Any], via: str) -> None:
        """Take the slot map from ``reply``, CLUSTER SLOTS as node ``via`` answered it."""
        slots = array("H", [NO_NODE]) * SLOTS
        nodes: list[str] = []
        replicas: list[int] = []
        via_host = _split_addr(via)[0]
        for entry in reply:
            lo, hi, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if master[0] else via_host
            if host == "?":
                continue
            addr = f"{host}:{int(master[1])}"
            if addr in nodes:
                i = nodes.index(addr)
            else:
                nodes.append(addr)
                replicas.append(len(entry) - 3)
                i = len(nodes) - 1
            replicas[i] = len(entry) - 3
            slots[lo:hi + 1] = array("H", [i]) * (hi - lo + 1)
        if self.stats.refreshes:
            self._note_changes(nodes, slots)
        self.nodes, self.replicas, self.slots = nodes, replicas, slots
        self.stats.refreshes += 1
        self.stale = False

    def _note_changes(self, nodes: list[str], slots: array[int]) -> None:
        """Count (and log) the slots the new map gives another master than the old one."""
        old_nodes, old = self.nodes, self.slots
        if old == slots and old_nodes == nodes:
            return
        # A node's index may differ between the maps, and one index name another node: compare
        # the nodes, through each new index's old one (NO_NODE stays NO_NODE).
        was_index = {addr: i for i, addr in enumerate(old_nodes)}
        as_old = [was_index.get(addr, -1) for addr in nodes]
        moved: dict[str, int] = {}
        for s in range(SLOTS):
            b = slots[s]
            if (NO_NODE if b == NO_NODE else as_old[b]) != old[s]:
                now = "none" if b == NO_NODE else nodes[b]
                moved[now] = moved.get(now, 0) + 1
        if moved:
            n = sum(moved.values())
            self.stats.slot_changes += n
            log.info("slot map: %d slot(s) served elsewhere now (%s)", n,
                     ", ".join(f"{c} to {a}" for a, c in sorted(moved.items())))

    # -- connections -------------------------------------------------------------------------

    async def _conn(self, addr: str) -> Connection:
        c = self.conns.get(addr)
        if c is not None and not c.is_broken:
            return c
        ev = self._connecting.get(addr)
        if ev is not None:
            await ev.wait()
            c = self.conns.get(addr)
            if c is not None and not c.is_broken:
                return c
            raise RemoteUnavailable("connection failed", addr)
        ev = self._connecting[addr] = trio.Event()
        try:
            c = await self._connect(addr)
            self.conns[addr] = c
            return c
        finally:
            del self._connecting[addr]
            ev.set()

    async def _connect(self, addr: str) -> Connection:
        host, port = _split_addr(addr)
        self.stats.connects += 1
        try:
            with trio.fail_after(self.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                if self.tls is not None:
                    tls = trio.SSLStream(stream, self.tls, server_hostname=host)
                    await tls.do_handshake()
                    stream = tls
        except trio.TooSlowError:
            raise RemoteTimeout("connect timed out", addr) from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise RemoteUnavailable(f"cannot connect: {e}", addr) from None
        conn = Connection(stream, addr, self._conn_stats)
        if self.password:
            auth = [self.user, self.password] if self.user else [self.password]
            try:
                with trio.fail_after(self.connect_timeout):
                    (r,) = await conn.execute([encode("AUTH", *auth)])
            except trio.TooSlowError:
                raise RemoteTimeout("AUTH timed out", addr) from None
            if isinstance(r, hiredis.ReplyError):
                conn.close(RemoteAuthError(str(r), addr))
                raise RemoteAuthError(f"AUTH as {self.user or 'default'} refused: {r}", addr)
        return conn

    def _drop(self, addr: str, why: RemoteError) -> None:
        self._failed_at[addr] = trio.current_time() if trio.lowlevel.in_trio_run() else 0.0
        c = self.conns.pop(addr, None)
        if c is not None:
            c.close(why)

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """Close every connection (no await: also outside a trio run) and end ``watch``."""
        self.closed = True
        for addr in list(self.conns):
            self._drop(addr, RemoteUnavailable("client closed", addr))

    def sync_stats(self) -> ClientStats:
        """The counters, connection totals included."""
        s = self.stats
        s.requests = self._conn_stats.requests
        s.sent_bytes = self._conn_stats.sent_bytes
        s.received_bytes = self._conn_stats.received_bytes
        return s

    # -- calls ---------------------------------------------------------------------------------

    async def execute(self, key: bytes, *args: bytes | str | int | memoryview) -> Reply:
        """One command whose key is ``key`` (it is routed by it; ``args`` are the whole
        command, key included).  An error reply raises its RemoteError."""
        cmd = encode(*args)
        # The common case without the pipeline's bookkeeping: the map is fresh, the node's
        # connection is up, and the reply is not a redirection.
        conn = None if self.stale else self.conns.get(self.node_of(key_slot(key)) or "")
        if conn is not None and not conn.is_broken:
            try:
                with trio.fail_after(self.timeout):
                    (r,) = await conn.execute([cmd])
            except trio.TooSlowError:
                self.stale = True
                err: RemoteError = RemoteTimeout("deadline expired", conn.node)
                self._drop(conn.node, err)
                raise err from None
            except RemoteError:
                self.stale = True
                self._drop(conn.node, RemoteUnavailable("connection lost", conn.node))
                raise
            if not isinstance(r, hiredis.ReplyError):
                return r
            if not str(r).startswith(("MOVED ", "ASK ")):
                e = _classify(r, conn.node)
                if isinstance(e, RemoteUnavailable):
                    self.stale = True
                raise e
        (r,) = await self.pipeline([(key, cmd)])
        if isinstance(r, RemoteError):
            raise r
        return r

    async def pipeline(self, commands: Sequence[tuple[bytes, bytes]], *,
                       wait_replicas: int = 0, wait_ms: int = 100,
                       budget: float | None = None) -> list[Reply]:
        """Run ``commands`` (routing key, encoded command): grouped by node, one batch per node,
        the nodes in parallel; redirections followed.  Returns one reply per command, an error
        reply as its RemoteError (not raised); a node's failure (connection, deadline) raises.
        With ``wait_replicas``, each batch ends with ``WAIT wait_replicas wait_ms`` and a
        command whose node's WAIT counted fewer replicas gets RemoteUnavailable.  ``budget``:
        this call's deadline, if not the client's."""
        deadline = trio.current_time() + (self.timeout if budget is None else budget)
        if not self.stale and not wait_replicas:
            fast = await self._one_node(commands, deadline)
            if fast is not None:
                return fast
        out: list[Reply] = [None] * len(commands)
        todo: list[tuple[int, bytes, bool]] = [(i, cmd, False) for i, (_, cmd) in enumerate(commands)]
        routes: dict[int, str] = {}
        for _hop in range(MAX_REDIRECTS + 1):
            if self.stale:
                with trio.move_on_at(deadline):
                    await self.refresh()
                if self.stale:
                    raise RemoteTimeout("no node answered the slot map in time") \
                        if trio.current_time() >= deadline else \
                        RemoteUnavailable("slot map unavailable")
            by_node: dict[str, list[tuple[int, bytes, bool]]] = {}
            for i, cmd, asking in todo:
                addr = routes.get(i) if asking else None
                if addr is None:
                    addr = self.node_of(key_slot(commands[i][0]))
                if addr is None:
                    out[i] = RemoteUnavailable(f"slot {key_slot(commands[i][0])} has no node")
                    continue
                by_node.setdefault(addr, []).append((i, cmd, asking))
            todo = []
            results: dict[str, list[Reply] | RemoteError] = {}

            if len(by_node) == 1:
                ((addr, items),) = by_node.items()
                results[addr] = await self._node_batch(addr, items, deadline, wait_replicas,
                                                       wait_ms)
            else:
                async with trio.open_nursery() as n:
                    for addr, items in by_node.items():
                        n.start_soon(self._node_batch_into, results, addr, items, deadline,
                                     wait_replicas, wait_ms)
            for addr, items in by_node.items():
                res = results[addr]
                if isinstance(res, RemoteError):
                    raise res
                for (i, cmd, _), r in zip(items, res, strict=True):
                    if isinstance(r, hiredis.ReplyError):
                        text = str(r)
                        if text.startswith(("MOVED ", "ASK ")):
                            kind, slot, where = text.split(" ")
                            self.stats.redirects += 1
                            if kind == "MOVED":
                                self.slots[int(slot)] = self._node_index(where)
                                todo.append((i, cmd, False))
                            else:
                                routes[i] = where
                                todo.append((i, cmd, True))
                            continue
                        err = _classify(r, addr)
                        if isinstance(err, RemoteUnavailable):
                            self.stale = True
                        out[i] = err
                    else:
                        out[i] = r
            if not todo:
                return out
        raise RemoteUnavailable(f"more than {MAX_REDIRECTS} redirections")

    async def _one_node(self, commands: Sequence[tuple[bytes, bytes]],
                        deadline: float) -> list[Reply] | None:
        """The common case without the general path's bookkeeping: every command's node is
        one node with a live connection, and no reply is a redirection or an error the map
        must learn from.  None (nothing learnt, nothing to undo: the general path sends the
        batch again, and every command the tier sends is idempotent) otherwise."""
        node = self.node_of(key_slot(commands[0][0]))
        conn = self.conns.get(node or "")
        if conn is None or conn.is_broken:
            return None
        for key, _ in commands[1:]:
            if self.node_of(key_slot(key)) != node:
                return None
        res = await self._node_batch(conn.node, [(i, cmd, False) for i, (_, cmd)
                                                 in enumerate(commands)], deadline, 0, 0)
        if isinstance(res, RemoteError):
            raise res
        out: list[Reply] = []
        for r in res:
            if isinstance(r, hiredis.ReplyError):
                e = _classify(r, conn.node)
                if isinstance(e, RemoteReplyError) and str(r).startswith(("MOVED ", "ASK ")):
                    return None
                if isinstance(e, RemoteUnavailable):
                    self.stale = True
                out.append(e)
            else:
                out.append(r)
        return out

    async def _node_batch_into(self, results: dict[str, list[Reply] | RemoteError], addr: str,
                               items: list[tuple[int, bytes, bool]], deadline: float,
                               wait_replicas: int, wait_ms: int) -> None:
        results[addr] = await self._node_batch(addr, items, deadline, wait_replicas, wait_ms)

    async def _node_batch(self, addr: str, items: list[tuple[int, bytes, bool]], deadline: float,
                          wait_replicas: int, wait_ms: int) -> list[Reply] | RemoteError:
        cmds: list[bytes] = []
        for _, cmd, asking in items:
            if asking:
                cmds.append(b"*1\r\n$6\r\nASKING\r\n")
            cmds.append(cmd)
        if wait_replicas:
            cmds.append(encode("WAIT", wait_replicas, wait_ms))
        try:
            with trio.fail_at(deadline):
                conn = await self._conn(addr)
                replies = await conn.execute(cmds)
        except trio.TooSlowError:
            self.stale = True
            err: RemoteError = RemoteTimeout("deadline expired", addr)
            self._drop(addr, err)
            return err
        except RemoteAuthError as e:
            return e
        except RemoteError as e:
            self.stale = True
            self._drop(addr, e)
            return e
        out: list[Reply] = []
        k = 0
        for _, _, asking in items:
            if asking:
                k += 1  # ASKING's +OK
            out.append(replies[k])
            k += 1
        if wait_replicas:
            acked = replies[k]
            if isinstance(acked, hiredis.ReplyError) or acked < wait_replicas:
                # The writes are on the master but not (yet) on a replica: not durable.
                why = RemoteUnavailable(f"WAIT: {acked} of {wait_replicas} replicas", addr)
                out = [why if not isinstance(r, hiredis.ReplyError) else r for r in out]
        return out


T = TypeVar("T")


async def retrying(call: Callable[[], Awaitable[T]], total: float, *,
                   on_retry: Callable[[RemoteError], None] | None = None,
                   first_pause: float = 0.05, max_pause: float = 0.5) -> T:
    """``call()`` again on the failures a failover ends (``retryable``), with growing pauses,
    until ``total`` seconds have passed; then the last failure is raised."""
    end = trio.current_time() + total
    pause = first_pause
    while True:
        try:
            return await call()
        except RemoteError as e:
            left = end - trio.current_time()
            if not e.retryable or left <= 0:
                raise
            if on_retry is not None:
                on_retry(e)
            await trio.sleep(min(pause, left))
            pause = min(pause * 2, max_pause)


def error_kind(e: RemoteError) -> str:
    return getattr(e, "kind", "reply")


def nodes_of(keys: Iterable[bytes], cluster: Cluster) -> dict[str, int]:
    """How many of ``keys`` each node serves now."""
    out: dict[str, int] = {}
    for k in keys:
        addr = cluster.node_of(key_slot(k)) or "?"
        out[addr] = out.get(addr, 0) + 1
    return out

