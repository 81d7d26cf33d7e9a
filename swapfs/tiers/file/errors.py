"""The file tier's errors: each a StoreError, so the store and the FUSE adapter see one tree.

``TierRefused`` is also an OSError: it is raised by ``FileTier.open`` like the open's own
failures, with a message naming the tier, the path and what was found there.
"""

from __future__ import annotations

from ...errors import StoreError


class TierFull(StoreError):
    """No free page in the tier, or its filesystem reported ENOSPC."""


class TierIOError(StoreError):
    """A pread/pwrite (or preadv/pwritev) on the backing file failed; ``errno`` says why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class ChecksumError(StoreError):
    """A page read back does not match the checksum recorded when it was written."""

    def __init__(self, page: int, message: str) -> None:
        super().__init__(message)
        self.page = page


class TierRefused(StoreError, OSError):
    """The backing file is not ours to use: another live mount holds it (EBUSY), or it holds
    data without a swapfs signature (EEXIST).  Nothing in the file was changed."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)
