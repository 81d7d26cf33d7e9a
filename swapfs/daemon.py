"""The swapfs daemon's lifecycle: protect the process, mount, serve, unmount.

The daemon sits in the kernel's reclaim path (the kernel swaps *into* it),
so before mounting it locks its memory and marks itself an I/O flusher;
see docs/operations.md.  Everything the mount owns lives in one
AsyncExitStack-shaped block in :func:`serve_mount`: the store, the FUSE
session, the signal watcher.

A crash does not unmount: a dead mount answers ENOTCONN, where an empty
directory would read as zeros and lie.  A clean stop (SIGTERM, SIGINT,
``swapfs unmount``) unmounts first; if the kernel still uses a device (swap
on a loop device over it), unmounting fails with EBUSY and the daemon keeps
serving rather than pull the floor from under the kernel: it says why in the
log and in systemd's STATUS=, retries every few seconds (and at each new
signal), and sends STOPPING=1 only once the unmount succeeded.  SIGHUP
re-reads the configuration file and applies what can change live.

With failover (the default of ``swapfs mount``), :func:`serve_failover` does the
same through :class:`swapfs.fuse.handoff.FailoverServer`: the store's memory is
shared (memfds that the keeper holds with the /dev/fuse fd); a successor (a hot
standby, a fresh daemon the keeper starts, or ``swapfs upgrade``) adopts it,
recovers, and takes the connection over; SIGUSR2 hands the connection off.  The
writeback task, the CPU wake-up bound, the signals, the log and sd_notify move
with the connection.  See docs/failover.md.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from . import fuse, kernel, system
from .config import Config, ConfigError, load_config
from .errors import StoreError
from .fs import SwapFS
from .fuse.handoff import FailoverServer, TakeoverRefused
from .keeper import KeeperError
from .store import Store
from .wakeup import WakeLatency
from .writeback import Writeback

log = logging.getLogger(__name__)

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
PR_SET_NAME = 15
PR_SET_IO_FLUSHER = 57
PROCESS_NAME = b"swapfs"
STANDBY_NAME = b"swapfs-standby"  # a hot standby, until it takes over
OOM_SCORE_ADJ = -1000
# While a stop waits for swap to go off: how often the unmount is retried.
STOP_RETRY_SECONDS = 2.0

_libc = kernel.libc()


def protect_process(*, lock_memory: bool = True) -> list[str]:
    """Name the process ``swapfs`` (ps, top, the OOM killer's log); mlockall,
    PR_SET_IO_FLUSHER and oom_score_adj -1000 (the processes whose pages it
    holds must be killed first, under systemd or not; root or CAP_SYS_RESOURCE);
    returns warnings for what failed (the daemon logs them and ``swapfs mount``
    prints them)."""
    warnings = []
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)
    try:  # root, or CAP_SYS_RESOURCE
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError as exc:
        warnings.append(f"cannot set oom_score_adj {OOM_SCORE_ADJ} ({exc.strerror}): the OOM "
                        "killer may pick the daemon before the processes whose pages it holds; "
                        "needs root or CAP_SYS_RESOURCE")
    if lock_memory:
        # MCL_ONFAULT: lock pages as they are touched, so reserved-but-unused
        # address space (thread stacks, arenas) costs nothing until used.
        if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
            e = ctypes.get_errno()
            warnings.append(
                f"mlockall failed ({os.strerror(e)}): the daemon's memory may be swapped out "
                "under pressure; run as root or raise RLIMIT_MEMLOCK"
            )
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        warnings.append(f"prctl(PR_SET_IO_FLUSHER) failed ({os.strerror(e)}): the daemon's own "
                        "allocations may recurse into I/O reclaim; needs CAP_SYS_RESOURCE and "
                        "Linux 5.6+")
    return warnings


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


async def serve_mount(
    config: Config,
    mountpoint: str,
    *,
    on_ready: Callable[[], None] | None = None,
    allow_other: bool = False,
    poll_us: int = 0,
    poll_pressure: float = 1.0,
    cpu_latency_us: int | None = None,
    cpu_latency_min_rate: int = 0,
    config_path: str | None = None,
    transport: str = "classic",
) -> None:
    """Mount swapfs at ``mountpoint`` and serve until it is unmounted.

    ``poll_us``: how long the session busy-polls /dev/fuse after a request
    before parking, while tasks wait for a CPU less than ``poll_pressure`` of
    the time (see swapfs.fuse.Session).  ``cpu_latency_us``: the CPU
    wake-up latency asked of the kernel while requests flow (see
    swapfs.wakeup; None: never asked), and only while they arrive at
    ``cpu_latency_min_rate`` per second or more.  ``config_path``: the file
    SIGHUP re-reads (None: the embedded default, nothing to reload).
    ``transport``: how FUSE requests arrive: "classic" (/dev/fuse), "uring"
    (FUSE over io_uring, or fuse.MountError naming the reason) or "auto"
    (io_uring when every check passes, else classic); the log says which.

    Raises fuse.MountError before anything is mounted if the mountpoint is
    unusable.  Returns once the kernel ended the connection.
    """
    store = Store(config)
    writeback = Writeback(store)
    ops = SwapFS(store, writeback=writeback, mountpoint=mountpoint)
    sessions: list[fuse.Session] = []
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                async def run_session(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    try:
                        # A mount that served stays when the session ends: a dead mount says
                        # ENOTCONN (the signal handler unmounts before asking to stop).
                        await fuse.serve(ops, mountpoint, task_status=task_status, poll_us=poll_us,
                                         poll_pressure=poll_pressure, transport=transport,
                                         session_callback=sessions.append, unmount_after_serving=False, fsname="swapfs",
                                         subtype="swapfs", allow_other=allow_other)
                    finally:
                        nursery.cancel_scope.cancel()  # the kernel ended the connection

                await nursery.start(writeback.run)  # cancelled with the nursery
                nursery.start_soon(store.maintain)  # the tiers' background duties
                conn = await nursery.start(run_session)
                session = sessions[0]
                log.info(
                    "swapfs mounted at %s: %d device(s), max_write %d, protocol 7.%d, transport %s",
                    mountpoint, len(store.devices), conn.max_write, conn.proto_minor,
                    session.transport_used,
                )
                if cpu_latency_us is not None:
                    _start_wake_latency(nursery, session, cpu_latency_us, cpu_latency_min_rate)
                if on_ready is not None:
                    on_ready()
                sd_notify(f"READY=1\nSTATUS=serving {len(store.devices)} device(s) at {mountpoint}")
                nursery.start_soon(_handle_signals, signals, mountpoint, store, config_path)
    except BaseExceptionGroup as group:
        # A session that failed before serving (a transport refused at INIT, a
        # registration that failed): its MountError, not the nursery's wrapper.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], fuse.MountError):
            raise group.exceptions[0] from None
        raise
    finally:
        await store.aclose()
    log.info("swapfs at %s stopped", mountpoint)


ROLES = ("start", "takeover", "standby", "upgrade")


def set_process_name(name: bytes) -> None:
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


async def serve_failover(
    config: Config,
    mountpoint: str,
    *,
    keeper: str,
    role: str = "start",
    standby_cmd: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    on_ready: Callable[[], None] | None = None,
    allow_other: bool = False,
    poll_us: int = 0,
    poll_pressure: float = 1.0,
    cpu_latency_us: int | None = None,
    cpu_latency_min_rate: int = 0,
    config_path: str | None = None,
) -> bool:
    """Serve ``mountpoint`` with failover through the keeper at ``keeper``.

    ``role``: "start" creates the store in shared memory, mounts and deposits the
    state with the keeper; "takeover" (a fresh daemon the keeper started),
    "standby" (waits on the active daemon's exit) and "upgrade" (asks the active
    daemon to hand off, after every check that can refuse) adopt the held state,
    recover it and take the connection over.  A state that cannot be served
    (StoreError, a layout version this code does not read) raises TakeoverRefused
    before anything changes: the successor never serves an empty store.
    ``standby_cmd``: started once this daemon serves (a hot standby).  ``meta``:
    merged into the keeper's record (how to start a successor).

    Returns True if the connection was handed off (the caller must then exit at
    once, without tearing the store down: its memory is the successor's), False
    once the kernel ended the connection (unmounted).
    """
    from .memory import STATE_VERSION, StateMemory

    made: list[tuple[Store, Writeback]] = []

    def ops_factory(fds: Mapping[str, int] | None) -> tuple[fuse.Operations, dict[str, int]]:
        if fds is None:
            memory = StateMemory(shared=True)
            store = Store(config, memory=memory)
            state = {name: os.dup(fd) for name, fd in memory.fds().items()}  # the server closes these
        else:
            # Mapped now (a standby: in advance); recovered once the connection is this
            # process's (recover below), never while the active daemon still writes.
            adopted = {name: os.dup(fd) for name, fd in fds.items() if name != "fuse"}
            try:
                memory = StateMemory.adopt(adopted)
            except StoreError as exc:
                for fd in adopted.values():
                    os.close(fd)
                raise TakeoverRefused(f"the state cannot be served: {exc}") from None
            try:
                store = Store(config, memory=memory)
            except StoreError as exc:
                raise TakeoverRefused(f"the state cannot be served: {exc}") from None
            state = {}
        writeback = Writeback(store)
        made.append((store, writeback))
        return SwapFS(store, writeback=writeback, mountpoint=mountpoint), state

    def recover() -> None:
        store = made[0][0]
        try:
            recovery = store.recover()
        except StoreError as exc:
            log.error("the state cannot be served: %s; this daemon refuses the takeover and the "
                      "mount waits (a page that reads as zeros would be worse)", exc)
            raise TakeoverRefused(f"the state cannot be served: {exc}") from None
        log.info("state recovered in %.3f s: %d page(s), %d leaked object(s) and %d leaked file "
                 "page(s) freed", recovery.seconds, recovery.pages, recovery.leaked_objects,
                 recovery.leaked_file_pages)

    server = FailoverServer(ops_factory, keeper, version=STATE_VERSION, standby_cmd=standby_cmd,
                            poll_us=poll_us, poll_pressure=poll_pressure, on_claimed=recover)
    if role == "standby":
        set_process_name(STANDBY_NAME)
    killed_at = time.monotonic()
    handed_off = False
    try:
        async with trio.open_nursery() as nursery:
            async def run_server(task_status: trio.TaskStatus[fuse.ConnectionInfo] = trio.TASK_STATUS_IGNORED
                                 ) -> None:
                try:
                    if role == "start":
                        await server.start(mountpoint, task_status=task_status, fsname="swapfs",
                                           subtype="swapfs", allow_other=allow_other)
                    else:
                        await server.take_over(standby=role == "standby", upgrade=role == "upgrade",
                                               task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()  # unmounted, or handed off

            conn = await nursery.start(run_server)
            store, writeback = made[0]
            session = server.session
            assert session is not None
            set_process_name(PROCESS_NAME)
            if role == "start":
                log.info("swapfs mounted at %s: %d device(s), max_write %d, protocol 7.%d, "
                         "transport %s, failover through the keeper at %s", mountpoint,
                         len(store.devices), conn.max_write, conn.proto_minor,
                         session.transport_used, keeper)
                if meta:
                    _keeper_put_meta(keeper, meta)
            else:
                waited = (server.resumed_at or time.monotonic()) - killed_at
                log.info("swapfs at %s taken over (%s): serving %d device(s) again, protocol 7.%d, "
                         "transport %s%s", mountpoint, role, len(store.devices), conn.proto_minor,
                         session.transport_used,
                         "" if role == "standby" else f", {waited:.3f} s after this process started")
            await nursery.start(writeback.run)  # cancelled with the nursery
            nursery.start_soon(store.maintain)  # the tiers' background duties
            if cpu_latency_us is not None:
                _start_wake_latency(nursery, session, cpu_latency_us, cpu_latency_min_rate)
            if on_ready is not None:
                on_ready()
            sd_notify(f"MAINPID={os.getpid()}\nREADY=1\n"
                      f"STATUS=serving {len(store.devices)} device(s) at {mountpoint}")
            nursery.start_soon(_signals_task, mountpoint, store, config_path)
        handed_off = server.session is not None and server.session.handed_off
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], (fuse.MountError,
                                                                             TakeoverRefused,
                                                                             KeeperError)):
            raise group.exceptions[0] from None
        raise
    finally:
        # After a hand-off the memory is the successor's: nothing is torn down.
        if made and not (server.session is not None and server.session.handed_off):
            await made[0][0].aclose()
    if handed_off:
        log.info("swapfs at %s handed off to its successor", mountpoint)
    else:
        log.info("swapfs at %s stopped", mountpoint)
    return handed_off


def _keeper_put_meta(keeper: str, meta: Mapping[str, Any]) -> None:
    from .fuse.handoff import KeeperClient
    from .keeper import KeeperError

    try:
        client = KeeperClient(keeper)
        try:
            client.put({}, meta)
        finally:
            client.close()
    except KeeperError as exc:
        log.warning("cannot record how to restart the daemon with the keeper: %s", exc)


async def _signals_task(mountpoint: str, store: Store, config_path: str | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        await _handle_signals(signals, mountpoint, store, config_path)


def _start_wake_latency(nursery: trio.Nursery, session: fuse.Session, latency_us: int,
                        min_rate: int = 0) -> None:
    wake = WakeLatency(latency_us, min_rate=min_rate)
    problem = wake.open()
    if problem:
        log.warning("CPU wake-up latency not bounded (%s): swap-ins may wait longer on "
                    "sleeping CPUs", problem)
        return
    log.info("CPU wake-up latency: at most %d us asked of the kernel while requests flow%s", latency_us,
             f" at {min_rate}/s or more" if min_rate else "")
    nursery.start_soon(wake.run, lambda: session.statistics().requests)


def reload_config(store: Store, config_path: str | None) -> str:
    """SIGHUP: re-read the configuration and apply what can change live (the
    pool's watermarks); returns what was done, for the log."""
    if config_path is None:
        return "no configuration file (embedded default): nothing to reload"
    try:
        new = load_config(config_path)
    except ConfigError as exc:
        return f"configuration not reloaded: {exc}"
    old = store.config
    changed = []
    if store.set_pool_watermarks(new.pool.high_watermark, new.pool.low_watermark):
        changed.append(f"pool watermarks high {new.pool.high_watermark} low {new.pool.low_watermark}")
    # Everything else is fixed at mount: the pool's size and codec, devices, tiers.
    fixed = []
    if new.pool.max_bytes != old.pool.max_bytes:
        fixed.append("pool.max_bytes")
    if (new.pool.algorithm, new.pool.level) != (old.pool.algorithm, old.pool.level):
        fixed.append("pool.algorithm/level")
    if new.pool.accept_ratio != old.pool.accept_ratio:
        fixed.append("pool.accept_ratio")
    if [(d.name, d.size, d.writeback) for d in new.devices] != [
            (d.name, d.size, d.writeback) for d in old.devices]:
        fixed.append("devices")
    if new.tiers != old.tiers:
        fixed.append("tiers")
    parts = ["applied: " + ", ".join(changed) if changed else "no live setting changed"]
    if fixed:
        parts.append("needs a remount to change: " + ", ".join(fixed))
    return "; ".join(parts)


async def _handle_signals(signals, mountpoint: str, store: Store, config_path: str | None) -> None:
    """SIGHUP reloads; SIGTERM and SIGINT ask to stop: unmount as soon as the
    kernel no longer uses the mount (the session then ends and the daemon exits)."""
    stop_asked = trio.Event()
    retry = trio.Event()

    async def wait_for_signals() -> None:
        nonlocal retry
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("SIGHUP: %s", reload_config(store, config_path))
                continue
            log.info("%s: unmounting %s", name, mountpoint)
            stop_asked.set()
            retry.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_signals)
        await stop_asked.wait()
        last_reason = None
        while True:
            try:
                await trio.to_thread.run_sync(fuse.unmount, mountpoint)
            except fuse.MountError as exc:
                reason = system.busy_reason(mountpoint) or str(exc)
                if reason != last_reason:
                    log.error("cannot unmount %s: %s; still serving, retrying every %.0f s",
                              mountpoint, reason, STOP_RETRY_SECONDS)
                    last_reason = reason
                sd_notify(f"STATUS=waiting to unmount {mountpoint}: {reason}")
                retry = trio.Event()
                with trio.move_on_after(STOP_RETRY_SECONDS):
                    await retry.wait()
                continue
            log.info("unmounted %s", mountpoint)
            sd_notify(f"STOPPING=1\nSTATUS=unmounted {mountpoint}")
            nursery.cancel_scope.cancel()
            return
