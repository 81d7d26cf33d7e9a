"""Taking a live FUSE connection over from a server process that died or hands it off.

The mechanism (docs/failover.md has the whole design and its ordering rules):

* The keeper (:mod:`swapfs.keeper`) holds the /dev/fuse fd, the state's fds and the saved INIT
  parameters; :class:`KeeperClient` speaks to it.
* A successor gets them (:meth:`KeeperClient.get`), refuses a state version it cannot read,
  waits until the active server has exited (its pidfd, from the keeper, is readable), claims
  the connection (the keeper refuses a claim while the old server lives, and a second claim),
  writes FUSE_NOTIFY_RESEND (:func:`notify_resend`) and only then starts reading, with
  ``Session(resume=conn)``: every request the dead server read and did not answer comes back,
  with bit 63 (FUSE_UNIQUE_RESEND) set in ``unique``, and is answered like any other (the
  reply carries ``unique`` unchanged).
* :class:`FailoverServer` is that lifecycle for a server: a first start (mount, deposit,
  claim, INIT, save the INIT parameters), a takeover (fresh or hot standby), an upgrade
  hand-off (ask the old server to stop reading with SIGUSR2 through its pidfd), and the old
  server's side of it (stop reading, finish what it holds, exit without abort or unmount).

Only the classic transport takes part: a ring's entries belong to the process that registered
them and die with it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from ..keeper import KeeperError, recv_message, send_message
from . import wire
from .mount import mount
from .ops import ConnectionInfo, Operations
from .session import Session

log = logging.getLogger("swapfs.fuse.handoff")

FUSE_NOTIFY_RESEND = 7  # enum fuse_notify_code
FUSE_UNIQUE_RESEND = 1 << 63  # set in the unique of a resent request
FUSE_HAS_RESEND = 1 << 39  # offered in INIT by kernels that know the notification (need not be granted)
HANDOFF_SIGNAL = signal.SIGUSR2  # asks the active server to hand its connection off
FUSE_FD = "fuse"


class TakeoverRefused(Exception):
    """A successor that cannot (or must not yet) take the connection over."""


def notify_resend(fd: int) -> None:
    """FUSE_NOTIFY_RESEND: the kernel queues again every request read from this connection
    (any of its fds) and not answered.  Only once no process that read them can still answer:
    see docs/failover.md."""
    os.write(fd, wire.out_header.pack(wire.out_header.size, FUSE_NOTIFY_RESEND, 0))


def conn_to_json(conn: ConnectionInfo) -> dict[str, int]:
    return asdict(conn)


def conn_from_json(d: Mapping[str, Any]) -> ConnectionInfo:
    return ConnectionInfo(**{k: int(v) for k, v in d.items()})


def exited(pidfd: int, timeout: float | None = 0) -> bool:
    """True once the process of ``pidfd`` has exited (waiting up to ``timeout`` seconds)."""
    r, _, _ = select.select([pidfd], [], [], timeout)
    return bool(r)


@dataclass
class Holding:
    """What the keeper holds, as one successor received it (its own copies of the fds)."""

    fds: dict[str, int]
    meta: dict[str, Any]
    generation: int
    active: int | None  # pid of the server serving when this was fetched
    active_pidfd: int | None
    closed: bool = field(default=False, repr=False)

    @property
    def conn(self) -> ConnectionInfo:
        if "init" not in self.meta:
            raise TakeoverRefused("no saved INIT parameters: the connection was never negotiated")
        return conn_from_json(self.meta["init"])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in self.fds.values():
                os.close(fd)
            if self.active_pidfd is not None:
                os.close(self.active_pidfd)


class KeeperClient:
    """One connection to the keeper (blocking; each request is a local round trip)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.connect(os.fspath(path))
        except OSError as e:
            self.sock.close()
            raise KeeperError(f"keeper at {os.fspath(path)!r}: {e.strerror}") from None

    def close(self) -> None:
        self.sock.close()

    def request(self, message: dict[str, Any], fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        try:
            send_message(self.sock, message, list(fds))
            reply, got = recv_message(self.sock)
        except OSError as e:
            raise KeeperError(f"the keeper is gone ({e.strerror})") from None
        if reply is None:
            raise KeeperError("the keeper closed the connection")
        if not reply.get("ok"):
            for fd in got:
                os.close(fd)
            raise KeeperError(str(reply.get("error")))
        return reply, got

    def put(self, fds: Mapping[str, int], meta: Mapping[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"op": "put", "names": list(fds)}
        if meta is not None:
            msg["meta"] = dict(meta)
        self.request(msg, list(fds.values()))

    def get(self) -> Holding:
        reply, fds = self.request({"op": "get"})
        names = reply["names"]
        active_pidfd = fds[len(names)] if len(fds) > len(names) else None
        return Holding(dict(zip(names, fds)), reply["meta"], reply["generation"], reply["active"],
                       active_pidfd)

    def claim(self, generation: int, meta: Mapping[str, Any] | None = None) -> int:
        """Become the active server (and merge ``meta`` into the record, in the same step);
        the new generation.  KeeperError if refused."""
        msg: dict[str, Any] = {"op": "claim", "generation": generation}
        if meta:
            msg["meta"] = dict(meta)
        reply, _ = self.request(msg)
        return int(reply["generation"])

    def standby(self) -> None:
        self.request({"op": "standby"})

    def status(self) -> dict[str, Any]:
        return self.request({"op": "status"})[0]

    def exit(self) -> None:
        self.request({"op": "exit"})


OpsFactory = Callable[[Mapping[str, int] | None], tuple[Operations, dict[str, int]]]


class FailoverServer:
    """A server whose connection survives it.

    ``ops_factory(fds)`` builds the filesystem: with None (a first start) it creates its state
    and returns it as named fds to deposit with the keeper; with the held fds (a takeover) it
    maps the existing state.  ``version`` is the state layout this code writes; ``readable``
    the versions it can take over (default: ``version`` only).
    """

    def __init__(self, ops_factory: OpsFactory, keeper: str | os.PathLike[str], *, version: int,
                 readable: Sequence[int] | None = None, standby_cmd: Sequence[str] | None = None,
                 max_inflight: int = 64, poll_us: int = 0, poll_pressure: float = 1.0,
                 on_claimed: Callable[[], None] | None = None) -> None:
        self.ops_factory = ops_factory
        # A takeover's last step before the resend: the old server has exited and this one
        # holds the claim, so nothing else changes the state (a store's recovery goes here,
        # never in ops_factory, which a standby runs while the active server still writes).
        # An exception refuses the takeover (TakeoverRefused); the connection stays held.
        self.on_claimed = on_claimed
        self.keeper_path = keeper
        self.version = version
        self.readable = frozenset(readable if readable is not None else (version,))
        self.standby_cmd = list(standby_cmd) if standby_cmd else None
        self.max_inflight = max_inflight
        self.poll_us = poll_us
        self.poll_pressure = poll_pressure
        self.session: Session | None = None
        self.ops: Operations | None = None
        self.resumed_at: float | None = None  # monotonic time of the resend (a takeover)
        self.standby_proc: subprocess.Popen[bytes] | None = None

    # -- a first start -------------------------------------------------------

    async def start(self, mountpoint: str | os.PathLike[str], *,
                    task_status: trio.TaskStatus[ConnectionInfo] = trio.TASK_STATUS_IGNORED,
                    **mount_kwargs: Any) -> None:
        """Mount, deposit the fds, claim, negotiate INIT, save the INIT parameters, serve."""
        ops, state = self.ops_factory(None)
        client = KeeperClient(self.keeper_path)
        fd = mount(mountpoint, **mount_kwargs)
        try:
            # Before INIT: from now on the connection outlives this process.
            client.put({FUSE_FD: fd, **state}, {"version": self.version})
            client.claim(0)
        except BaseException:
            os.close(fd)  # unless the keeper took it, the connection ends; the caller unmounts
            raise
        finally:
            for sfd in state.values():
                os.close(sfd)

        def save_init(conn: ConnectionInfo) -> None:
            client.put({}, {"init": conn_to_json(conn)})
            client.close()

        try:
            await self._serve(self._session(ops, fd), save_init, task_status)
        finally:
            client.close()
            os.close(fd)

    # -- a takeover ----------------------------------------------------------

    def fetch(self) -> tuple[KeeperClient, Holding]:
        """The keeper's fds and record; TakeoverRefused (nothing changed) if the state's version
        cannot be read or the connection was never negotiated."""
        client = KeeperClient(self.keeper_path)
        holding = client.get()
        version = holding.meta.get("version")
        if version not in self.readable:
            holding.close()
            client.close()
            raise TakeoverRefused(f"state version {version} cannot be read by this server "
                                  f"(reads {sorted(self.readable)})")
        if FUSE_FD not in holding.fds:
            holding.close()
            client.close()
            raise TakeoverRefused("the keeper holds no FUSE connection")
        try:
            holding.conn  # noqa: B018 -- raises TakeoverRefused if INIT was never saved
        except TakeoverRefused:
            holding.close()
            client.close()
            raise
        return client, holding

    async def take_over(self, *, standby: bool = False, upgrade: bool = False,
                        task_status: trio.TaskStatus[ConnectionInfo] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the connection over once the active server has exited, then serve it.
        ``standby``: register as a standby and wait (indefinitely); ``upgrade``: ask the active
        server to hand off (after every check that could refuse has passed)."""
        client, holding = self.fetch()
        ops, _ = self.ops_factory(holding.fds)
        if standby:
            client.standby()
        while True:
            pidfd = holding.active_pidfd
            if upgrade and pidfd is not None:
                signal.pidfd_send_signal(pidfd, HANDOFF_SIGNAL)
                upgrade = False
            if pidfd is not None:
                await trio.lowlevel.wait_readable(pidfd)
            try:
                # The layout this server writes from now on, recorded with the claim.
                client.claim(holding.generation, {"version": self.version})
                break
            except KeeperError as e:
                if not standby:
                    holding.close()
                    client.close()
                    raise TakeoverRefused(str(e)) from None
                # Another server took over first: wait for that one instead.
                log.info("standby: %s; waiting on the new server", e)
                try:
                    fresh = client.get()
                except KeeperError as gone:  # unmounted: the keeper exited
                    holding.close()
                    client.close()
                    raise TakeoverRefused(str(gone)) from None
                for fd in fresh.fds.values():
                    os.close(fd)
                if holding.active_pidfd is not None:
                    os.close(holding.active_pidfd)
                holding.generation, holding.active = fresh.generation, fresh.active
                holding.active_pidfd = fresh.active_pidfd
        # The old server has exited and this one holds the claim: nothing can answer the
        # requests it read but this process.  Resend them, then read.
        fd = holding.fds.pop(FUSE_FD)
        if self.on_claimed is not None:
            try:
                self.on_claimed()
            except BaseException:
                os.close(fd)
                holding.close()
                client.close()
                raise
        try:
            notify_resend(fd)
        except OSError as e:  # ENODEV: unmounted or aborted meanwhile
            os.close(fd)
            holding.close()
            client.close()
            raise TakeoverRefused(f"the connection has ended ({e.strerror})") from None
        self.resumed_at = time.monotonic()
        conn = holding.conn
        holding.close()  # the state fds: ops_factory mapped what it needs
        client.close()
        try:
            await self._serve(self._session(ops, fd, resume=conn), None, task_status)
        finally:
            os.close(fd)

    # -- the old server's side of a hand-off -----------------------------------

    def _session(self, ops: Operations, fd: int, resume: ConnectionInfo | None = None) -> Session:
        self.ops = ops
        self.session = Session(ops, fd, max_inflight=self.max_inflight, poll_us=self.poll_us,
                               poll_pressure=self.poll_pressure, resume=resume)
        return self.session

    async def _serve(self, session: Session, on_started: Callable[[ConnectionInfo], None] | None,
                     task_status: trio.TaskStatus[ConnectionInfo]) -> None:
        """Serve until the connection ends or is handed off (HANDOFF_SIGNAL); after it was
        handed off the caller should exit at once (the successor waits for that)."""
        with trio.open_signal_receiver(HANDOFF_SIGNAL) as signals:
            async with trio.open_nursery() as nursery:

                async def run(task_status: trio.TaskStatus[ConnectionInfo]) -> None:
                    await session.run(task_status=task_status)
                    nursery.cancel_scope.cancel()

                conn = await nursery.start(run)
                if on_started is not None:
                    on_started(conn)
                self._start_standby()
                task_status.started(conn)
                async for _ in signals:
                    log.info("handing the connection off")
                    session.stop_reading()
                    break

    def _start_standby(self) -> None:
        if self.standby_cmd:
            self.standby_proc = subprocess.Popen(self.standby_cmd, stdin=subprocess.DEVNULL)

