"""The store: the facade over the state layer and the I/O paths.

Usable without FUSE: the FUSE adapter (swapfs/fs.py) translates requests to
``Store.read``, ``Store.write`` and ``Store.discard`` and maps the errors of
swapfs.errors to errnos.  Only the adapter, the writeback task, the
daemon and trace replay (swapfs/replay.py) import this module.

:class:`Store` is built in floors, each a module of its own:

* :mod:`swapfs.state` -- the state layer: devices, slot tables, pool, file
  tiers, counters, clocks and the operations that change a slot;
* :mod:`swapfs.read_path` -- reads, refaults;
* :mod:`swapfs.write_path` -- writes (staging, the one-step commit,
  sub-page writes), discard, promotion;
* this module -- the facade, and the only module that imports every part
  of the store: moving pages between tiers is :mod:`swapfs.migrate` (the
  mechanism; :mod:`swapfs.writeback` is the policy, run by the daemon),
  recompression :mod:`swapfs.recompress`, stats are assembled by
  :mod:`swapfs.store_stats`, the consistency check is
  :mod:`swapfs.invariants`; each of those works on the state alone.

Everything runs in the trio loop.  The methods are ``async def`` because
file tiers await worker threads, but the pool path never awaits: a request
served from the pool goes from start to end in one step, so the FUSE layer
answers it inline.  Which state relies on that is written down in
docs/store.md and docs/writeback.md.
"""

from __future__ import annotations

from . import invariants, recovery, store_stats
from .config import Config
from .memory import StateMemory
from .migrate import Migrator
from .recompress import Recompressor
from .recovery import Recovery
from .state import CACHE_PAGES, Device
from .stats import Stats
from .write_path import WritePath

__all__ = ["CACHE_PAGES", "Device", "Recovery", "Store"]


class Store(WritePath):
    """Devices over a compressed memory pool and, below it, file tiers: the
    state (:class:`swapfs.state.StoreState`), the paths that serve I/O, and
    migration, recompression, stats and checks."""

    def __init__(self, config: Config, *, cache_pages: int = CACHE_PAGES,
                 memory: StateMemory | None = None) -> None:
        """The store of ``config``; its truth in ``memory`` (private memory
        if None; ``StateMemory(shared=True)`` for a daemon that survives
        itself; ``StateMemory.adopt(fds)`` for its successor, which then
        calls :meth:`recover` before serving).  StoreError if the memory
        cannot hold this configuration's state."""
        super().__init__(config, cache_pages=cache_pages, memory=memory)
        self._migrator = Migrator(self)
        self.recompressor = Recompressor(self)

    def recover(self) -> Recovery:
        """Check the adopted state and rebuild what is derived from it
        (see :mod:`swapfs.recovery`); StoreError if it cannot be served."""
        return recovery.recover(self)

    def device_stored_pages(self, dev: Device) -> int:
        """Slots of ``dev`` holding a page (same-filled ones included)."""
        return dev.stored_pages

    async def aclose(self) -> None:
        self.files.close()

    async def maintain(self) -> None:
        """The tiers' background duties (a remote tier reloads its cluster's slot map), until
        cancelled: the daemon runs it in a task of its own beside the writeback task."""
        await self.files.maintain()

    async def migrate(self, victims: list[tuple[Device, int]], src: int) -> int:
        """Move the pages of ``victims`` from level ``src`` (0: the pool,
        1 + i: file tier i) down; see :mod:`swapfs.migrate`."""
        return await self._migrator.migrate(victims, src)

    async def clean(self, ti: int, segments: int = 1, max_live: float | None = None) -> int:
        """Clean up to ``segments`` segments of file tier ``ti``; see
        :meth:`swapfs.migrate.Migrator.clean`."""
        return await self._migrator.clean(ti, segments, max_live)

    def stats(self) -> Stats:
        return store_stats.collect(self)

    def check_invariants(self, *, quiescent: bool = True) -> None:
        """Walk every table; InvariantError naming the first discrepancy
        (see :func:`swapfs.invariants.check_store`)."""
        invariants.check_store(self, quiescent=quiescent)
