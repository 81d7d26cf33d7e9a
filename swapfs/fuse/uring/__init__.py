"""FUSE over io_uring: the kernel hands requests to ring entries instead of /dev/fuse reads.

The transport only moves requests and replies; decoding, handlers, the errno rule
and the counters are the dispatcher's (swapfs/fuse/dispatch.py), shared with the
/dev/fuse session.  By concern:

* ``probe``: what the machine says (sysfs, ``enable_uring``, fusectl), the FUSE
  connection number of a mount, and aborting a connection;
* ``abi``: io_uring and FUSE-over-io_uring constants, structures, system calls;
* ``ring``: one io_uring instance with its rings mapped;
* ``transport``: the ring entries of one connection, their registration and the
  loop serving them.
"""

from .probe import (
    ENABLE_URING,
    FUSECTL,
    RegistrationFailed,
    TransportUnavailable,
    abort_connection,
    connection_id,
    enable_uring,
    possible_cpus,
    resolve,
    set_enable_uring,
    unavailable_reason,
)
from .ring import Ring
from .transport import UringTransport

TRANSPORTS = ("classic", "uring", "auto")

__all__ = [
    "ENABLE_URING",
    "FUSECTL",
    "TRANSPORTS",
    "RegistrationFailed",
    "Ring",
    "TransportUnavailable",
    "UringTransport",
    "abort_connection",
    "connection_id",
    "enable_uring",
    "possible_cpus",
    "resolve",
    "set_enable_uring",
    "unavailable_reason",
]
