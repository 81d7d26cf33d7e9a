"""swapfs.fuse: the FUSE kernel protocol spoken directly over /dev/fuse, on trio.

A filesystem subclasses :class:`Operations` (see ops.py, the contract) and
is served by :func:`serve` (mount + :class:`Session` + unmount) or by
:func:`mount` and ``Session(ops, fd).run()`` separately.  Requests are decoded
and answered by one :class:`Dispatcher` (dispatch.py) under both transports:
the /dev/fuse session (session.py) and FUSE over io_uring (uring/).  See
docs/fuse.md.
"""

from .dispatch import Dispatcher, SessionStatistics
from .mount import MountError, is_mount_point, mount, unmount, unmount_quietly
from .ops import (
    ROOT_INODE,
    ConnectionInfo,
    DirEntry,
    EntryAttributes,
    FileInfo,
    ForgetItem,
    FUSEError,
    Operations,
    RequestContext,
    SetattrFields,
    StatvfsData,
)
from .session import Session, serve

__all__ = [
    "ROOT_INODE",
    "ConnectionInfo",
    "DirEntry",
    "Dispatcher",
    "EntryAttributes",
    "FileInfo",
    "ForgetItem",
    "FUSEError",
    "MountError",
    "Operations",
    "RequestContext",
    "Session",
    "SessionStatistics",
    "SetattrFields",
    "StatvfsData",
    "is_mount_point",
    "mount",
    "serve",
    "unmount",
    "unmount_quietly",
]
