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
serving rather than pull the floor from under the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
from typing import Callable

import trio

from . import fuse
from .config import Config
from .fs import SwapFS
from .store import Store
from .writeback import Writeback

log = logging.getLogger(__name__)

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
PR_SET_IO_FLUSHER = 57

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def protect_process(*, lock_memory: bool = True) -> list[str]:
    """mlockall and PR_SET_IO_FLUSHER; returns warnings for what failed."""
    warnings = []
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
        warnings.append(f"prctl(PR_SET_IO_FLUSHER) failed ({os.strerror(e)}); needs CAP_SYS_RESOURCE")
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
) -> None:
    """Mount swapfs at ``mountpoint`` and serve until it is unmounted.

    ``poll_us``: how long the session busy-polls /dev/fuse after a request
    before parking (see swapfs.fuse.Session).

    Raises fuse.MountError before anything is mounted if the mountpoint is
    unusable.  Returns once the kernel ended the connection.
    """
    store = Store(config)
    writeback = Writeback(store)
    ops = SwapFS(store, writeback=writeback)
    fd = fuse.mount(mountpoint, fsname="swapfs", subtype="swapfs", allow_other=allow_other)
    session = fuse.Session(ops, fd, poll_us=poll_us)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                async def run_session(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    try:
                        await session.run(task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()  # the kernel ended the connection

                await nursery.start(writeback.run)  # cancelled with the nursery
                conn = await nursery.start(run_session)
                log.info(
                    "swapfs mounted at %s: %d device(s), max_write %d, protocol 7.%d",
                    mountpoint, len(store.devices), conn.max_write, conn.proto_minor,
                )
                if on_ready is not None:
                    on_ready()
                sd_notify("READY=1")
                nursery.start_soon(_stop_on_signal, signals, mountpoint)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
        await store.aclose()
    log.info("swapfs at %s stopped", mountpoint)


async def _stop_on_signal(signals, mountpoint: str) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("SIGHUP ignored (configuration is read at mount time)")
            continue
        log.info("%s: unmounting %s", name, mountpoint)
        sd_notify("STOPPING=1")
        try:
            await trio.to_thread.run_sync(fuse.unmount, mountpoint)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                log.error(
                    "cannot unmount %s: busy (swapoff and detach loop devices first); still serving",
                    mountpoint,
                )
                continue
            log.error("unmount %s failed: %s; still serving", mountpoint, exc)
        except fuse.MountError as exc:
            log.error("unmount %s failed: %s; still serving", mountpoint, exc)
