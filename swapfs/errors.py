"""Errors of the store and its tiers.

The store raises only these; the FUSE adapter maps them to errnos in one place.
Messages are for logs and the CLI.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises."""


class OutOfRange(StoreError):
    """I/O past the end of a device."""


class NoSpace(StoreError):
    """The pool and every lower tier are full."""


class Corruption(StoreError):
    """A stored page failed its checksum."""


class BackingIOError(StoreError):
    """A backing file failed."""
