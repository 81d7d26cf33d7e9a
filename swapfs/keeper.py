"""The keeper: a small process that holds a mount's file descriptors while its server dies.

A FUSE connection outlives its server as long as some process holds the /dev/fuse fd: requests
then wait (in D state, as swap does) instead of failing.  The keeper is that process.  It holds
every fd a server gives it under a name -- ``fuse`` (the /dev/fuse fd), clones of it, memfds of
the state, backing files -- plus a small JSON record (the INIT parameters the connection was
negotiated with, the version of the state layout), and hands them to a server that asks.  It
never reads /dev/fuse and never touches the mount: it only polls the ``fuse`` fd for an error
(the connection ended: unmounted or aborted), then closes everything and exits.  It imports
only the standard library, locks its memory and sets its oom_score_adj to -1000 where permitted.

Run: ``python -m swapfs.keeper SOCKET [--restart CMD ...]``; it prints ``ready`` once SOCKET
(a SOCK_SEQPACKET unix socket, mode 0600) listens.

Protocol: one JSON object per message, fds as SCM_RIGHTS beside it; every request gets one
reply ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.

* ``{"op": "put", "names": [...], "meta": {...}}`` with one fd per name: hold them (an fd under
  a name already held replaces it); ``meta`` (optional) is merged into the record.
* ``{"op": "get"}``: the reply carries ``names``, ``meta``, ``generation`` and ``active`` (the
  pid of the server that serves now, or null) with the named fds, then, if there is an active
  server, a pidfd of it (the successor waits on that one: no pid can be reused under it).
* ``{"op": "claim", "generation": g, "meta": {...}}``: the sender (its pid from SO_PEERCRED) becomes the active
  server.  Refused unless ``g`` is the current generation (else someone else took over since
  the sender looked) and the previous active server has exited (its pidfd is readable): this
  is where two servers at once, and a resend while the old one still reads, are ruled out.
  ``meta`` (optional) is merged into the record with the claim (a successor's state version).
  The reply carries the new generation.
* ``{"op": "standby"}``: the sender waits to take over (counted, and the restart is delayed).
* ``{"op": "drop", "names": [...]}``, ``{"op": "status"}``, ``{"op": "exit"}`` (close all, exit).

With ``--restart CMD``, when the active server exits and nobody has claimed after
``--restart-delay`` seconds (longer while a live standby is registered), the keeper starts CMD
(a fresh server, which takes over as a standby would); again after a backoff if that one exits
without claiming.

Under systemd the fd store replaces this process: the server sends ``FDSTORE=1`` and
``FDNAME=<name>`` with each fd over $NOTIFY_SOCKET (sd_notify with SCM_RIGHTS), the record as
a memfd named ``meta``; the unit sets ``FileDescriptorStoreMax=`` (at least the number of
names), ``FileDescriptorStorePreserve=yes`` and ``Restart=always``, and a restarted server gets
them back through $LISTEN_FDS / $LISTEN_FDNAMES.  The claim is then systemd's own: it starts
one server at a time, after the previous one's main process has exited.  A hot standby is not
possible there (one main process per unit); the restart stall is that of a fresh process.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

MAX_MESSAGE = 64 * 1024
MAX_FDS = 250  # below the kernel's SCM_MAX_FD (253)
POLL_ERR = select.POLLERR | select.POLLHUP | select.POLLNVAL


class KeeperError(Exception):
    """A request the keeper refused, or a keeper that cannot be reached."""


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    fds = fds or []
    if len(data) > MAX_MESSAGE or len(fds) > MAX_FDS:
        raise KeeperError("message too large")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the fds that came with it; (None, []) at end of stream."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise KeeperError("message or fds truncated")
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def _peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid)


def _exited(pidfd: int) -> bool:
    r, _, _ = select.select([pidfd], [], [], 0)
    return bool(r)


def lock_memory() -> str:
    """mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) and oom_score_adj -1000; what failed,
    or "".  ONFAULT: the pages in use stay resident, and what is touched later is locked as it
    is touched, without populating every mapping (all of libpython's) up front."""
    problems = []
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlockall(1 | 2 | 4) != 0:
            problems.append(f"mlockall: {os.strerror(ctypes.get_errno())}")
    except OSError as e:
        problems.append(f"mlockall: {e}")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        problems.append(f"oom_score_adj: {e.strerror}")
    return "; ".join(problems)


def _set_name(name: bytes) -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    except OSError:
        pass


class Keeper:
    def __init__(self, path: str, restart: list[str] | None = None, restart_delay: float = 0.05,
                 standby_grace: float = 2.0) -> None:
        self.path = path
        self.fds: dict[str, int] = {}
        self.meta: dict[str, Any] = {}
        self.generation = 0
        self.active: int | None = None
        self.active_pidfd: int | None = None
        self.standbys: dict[int, int] = {}  # pid -> pidfd
        self.clients: dict[int, socket.socket] = {}
        self.restart = restart
        self.restart_delay = restart_delay
        self.standby_grace = standby_grace
        self.orphaned_at: float | None = None  # when the active server exited, unclaimed
        self.spawned: subprocess.Popen[bytes] | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self.spawn_backoff = 0.0
        self.running = True
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    # -- requests --------------------------------------------------------------

    def handle(self, sock: socket.socket, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        try:
            if op == "put":
                names = msg.get("names", [])
                if len(names) != len(fds):
                    raise KeeperError(f"{len(names)} names for {len(fds)} fds")
                for name, fd in zip(names, fds):
                    old = self.fds.pop(name, None)
                    if old is not None:
                        os.close(old)
                    self.fds[name] = fd
                fds = []
                self.meta.update(msg.get("meta") or {})
                send_message(sock, {"ok": True})
            elif op == "get":
                names = list(self.fds)
                out = [self.fds[n] for n in names]
                if self.active_pidfd is not None:
                    out.append(self.active_pidfd)
                send_message(sock, {"ok": True, "names": names, "meta": self.meta,
                                    "generation": self.generation, "active": self.active}, out)
            elif op == "claim":
                self.claim(sock, msg.get("generation"))
                self.meta.update(msg.get("meta") or {})
                send_message(sock, {"ok": True, "generation": self.generation})
            elif op == "standby":
                pid = _peer_pid(sock)
                if pid not in self.standbys:
                    self.standbys[pid] = os.pidfd_open(pid)
                send_message(sock, {"ok": True})
            elif op == "drop":
                for name in msg.get("names", []):
                    if name in self.fds:
                        os.close(self.fds.pop(name))
                send_message(sock, {"ok": True})
            elif op == "status":
                self.reap_standbys()
                send_message(sock, {"ok": True, "names": list(self.fds), "meta": self.meta,
                                    "generation": self.generation, "active": self.active,
                                    "standbys": sorted(self.standbys), "pid": os.getpid()})
            elif op == "exit":
                send_message(sock, {"ok": True})
                self.running = False
            else:
                raise KeeperError(f"unknown request {op!r}")
        except (KeeperError, OSError, TypeError, ValueError) as e:
            try:
                send_message(sock, {"ok": False, "error": str(e)})
            except OSError:
                pass
        finally:
            for fd in fds:
                os.close(fd)

    def claim(self, sock: socket.socket, generation: Any) -> None:
        pid = _peer_pid(sock)
        if generation != self.generation:
            raise KeeperError(f"generation {generation} is stale (now {self.generation}): "
                              f"another server took over")
        if self.active_pidfd is not None and not _exited(self.active_pidfd):
            raise KeeperError(f"the active server (pid {self.active}) has not exited")
        if "fuse" not in self.fds:
            raise KeeperError("no FUSE connection is held")
        probe = select.poll()
        probe.register(self.fds["fuse"], 0)
        if probe.poll(0):
            raise KeeperError("the FUSE connection has ended")
        pidfd = os.pidfd_open(pid)
        if self.active_pidfd is not None:
            os.close(self.active_pidfd)
        self.active, self.active_pidfd = pid, pidfd
        self.generation += 1
        self.orphaned_at = None
        self.spawn_backoff = 0.0
        if self.spawned is not None and self.spawned.pid == pid:
            self.spawned = None
        if pid in self.standbys:
            os.close(self.standbys.pop(pid))

    # -- the loop --------------------------------------------------------------

    def reap_standbys(self) -> None:
        for pid, pidfd in list(self.standbys.items()):
            if _exited(pidfd):
                os.close(pidfd)
                del self.standbys[pid]

    def connection_ended(self) -> bool:
        """The held connection has ended (unmounted, aborted): nothing to restart for."""
        fuse = self.fds.get("fuse")
        if fuse is None:
            return False
        probe = select.poll()
        probe.register(fuse, 0)
        return bool(probe.poll(0))

    def maybe_restart(self) -> None:
        self.children = [c for c in self.children if c.poll() is None]  # reaps them
        if self.restart is None or self.active_pidfd is None or not _exited(self.active_pidfd):
            return
        now = time.monotonic()
        if self.orphaned_at is None:
            self.orphaned_at = now
        if self.spawned is not None:
            if self.spawned.poll() is None:
                return  # starting: it will claim
            self.spawned = None
            self.spawn_backoff = min(max(self.spawn_backoff * 2, 0.5), 10.0)
            self.orphaned_at = now
        self.reap_standbys()
        delay = self.restart_delay + self.spawn_backoff + (self.standby_grace if self.standbys else 0)
        if now - self.orphaned_at >= delay and not self.connection_ended():
            # In the keeper's process group: whoever stops the keeper's group stops them too.
            self.spawned = subprocess.Popen(self.restart, stdin=subprocess.DEVNULL)
            self.children.append(self.spawned)

    def serve(self) -> None:
        poll = select.poll()
        poll.register(self.listener, select.POLLIN)
        fuse_watched: int | None = None
        while self.running:
            fuse = self.fds.get("fuse")
            if fuse != fuse_watched:
                if fuse_watched is not None:
                    poll.unregister(fuse_watched)
                if fuse is not None:
                    poll.register(fuse, 0)  # errors only: the keeper never reads requests
                fuse_watched = fuse
            waiting = self.restart is not None and self.active_pidfd is not None
            for fd, ev in poll.poll(50 if waiting else 1000):
                if fd == self.listener.fileno():
                    conn, _ = self.listener.accept()
                    self.clients[conn.fileno()] = conn
                    poll.register(conn, select.POLLIN)
                elif fd == fuse_watched:
                    if ev & POLL_ERR:
                        self.running = False  # unmounted or aborted: nothing left to keep
                elif fd in self.clients:
                    sock = self.clients[fd]
                    try:
                        msg, fds = recv_message(sock) if ev & select.POLLIN else (None, [])
                    except (OSError, KeeperError, ValueError):
                        msg, fds = None, []
                    if msg is None:
                        poll.unregister(fd)
                        del self.clients[fd]
                        sock.close()
                    else:
                        self.handle(sock, msg, fds)
            self.maybe_restart()

    def run(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o077)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        self.listener.listen(16)
        problems = lock_memory()
        if problems:
            print(f"swapfs-keeper: {problems}", file=sys.stderr, flush=True)
        print("ready", flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)  # whoever read "ready" may close the pipe
        os.dup2(devnull, 1)
        os.close(devnull)
        try:
            self.serve()
        finally:
            self.listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
            for fd in self.fds.values():
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m swapfs.keeper",
                                description="hold a swapfs mount's fds while its server restarts")
    p.add_argument("socket")
    p.add_argument("--restart-delay", type=float, default=0.05,
                   help="seconds after the active server's exit before a fresh one is started")
    p.add_argument("--standby-grace", type=float, default=2.0,
                   help="more seconds to wait while a standby is registered")
    p.add_argument("--restart", nargs=argparse.REMAINDER,
                   help="command starting a fresh server when the active one exits unreplaced")
    a = p.parse_args(argv)
    _set_name(b"swapfs-keeper")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    Keeper(a.socket, a.restart or None, a.restart_delay, a.standby_grace).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
