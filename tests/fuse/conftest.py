"""Fixtures mounting tests/fuse/memfs.py with swapfs.fuse in the test's own trio loop.

The test serves its own mount, so every blocking syscall on the mount must
run in a thread (``sync``) or a subprocess (``sh``): calling os.stat on the
mount from the event loop would deadlock the loop that answers it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from swapfs.fuse import ConnectionInfo, Session, serve, unmount_quietly

from .memfs import MemFS

MiB = 1 << 20


@dataclass
class Mounted:
    path: Path
    fs: MemFS
    session: Session
    conn: ConnectionInfo
    cancel_scope: trio.CancelScope
    done: trio.Event  # set when serve() has returned

    def p(self, name: str) -> str:
        return str(self.path / name)


async def sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking call in a thread."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


async def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return await trio.run_process(list(cmd), capture_stdout=True, capture_stderr=True, check=check)


def default_files() -> dict[bytes, bytes | int]:
    return {
        b"hello": b"hello, world\n",
        b"data": bytes(range(256)) * (16 * MiB // 256),
        b"small": b"x" * 100,
    }


def read_file(path: str, size: int = -1) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def proc_mounts() -> str:
    with open("/proc/mounts") as f:
        return f.read()


def _cleanup(path: Path) -> None:
    unmount_quietly(path)


@pytest.fixture(params=["classic", "uring"])
def transport(request) -> str:
    """Every test that mounts runs on both transports."""
    if request.param == "uring":
        request.getfixturevalue("uring_enabled")
    return request.param


@pytest.fixture
def mount_memfs(tmp_path: Path, transport: str):
    """An async context factory: ``async with mount_memfs(fs, **serve_kwargs) as m``,
    on the test's transport (``transport`` in serve_kwargs overrides it)."""
    from contextlib import asynccontextmanager

    made: list[Path] = []

    @asynccontextmanager
    async def factory(fs: MemFS | None = None, **kwargs: Any):
        fs = fs if fs is not None else MemFS(default_files())
        mp = tmp_path / f"mnt{len(made)}"
        mp.mkdir()
        made.append(mp)
        kwargs.setdefault("default_permissions", False)
        kwargs.setdefault("transport", transport)
        sessions: list[Session] = []
        done = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await serve(fs, mp, task_status=task_status, session_callback=sessions.append, **kwargs)
            finally:
                done.set()

        try:
            async with trio.open_nursery() as nursery:
                conn = await nursery.start(run)
                m = Mounted(mp, fs, sessions[0], conn, nursery.cancel_scope, done)
                if kwargs["transport"] == "uring":  # never a silent fallback
                    assert m.session.transport_used == "uring", m.session.transport_reason
                try:
                    yield m
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            await sync(_cleanup, mp)

    yield factory
    for mp in made:  # last resort, if a test escaped the context
        unmount_quietly(mp)


@pytest.fixture
async def mounted(mount_memfs):
    async with mount_memfs() as m:
        yield m
