"""Authenticated encryption of file-tier objects: AES-256-GCM with a key that lives only in
memory.

The nonce is the object's place and its segment's generation (``objects.NONCE``): an offset is
written once per generation of its segment, and a segment's generation grows each time it is
opened for appending, so a nonce never repeats under one key.  The object's header (slot
identity, generation, length, codec) is the associated data: a flipped bit anywhere, an object
copied to another offset or read from an older generation of its segment fails the tag.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256
TAG_BYTES = 16


def new_key() -> bytes:
    """A random AES-256 key."""
    return os.urandom(KEY_BYTES)


class ObjectCipher:
    """AES-256-GCM, one object per call (about 2 us for a page's worth of payload)."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes | None = None) -> None:
        """A cipher with ``key`` (32 bytes, as :func:`new_key` makes), or a new random one."""
        self._aead = AESGCM(key if key is not None else new_key())

    def seal(self, nonce: bytes, payload: bytes | memoryview, aad: bytes) -> bytes:
        """The ciphertext of ``payload`` followed by its 16-byte tag."""
        return self._aead.encrypt(nonce, bytes(payload), aad)

    def open(self, nonce: bytes, sealed: bytes | memoryview, aad: bytes) -> bytes | None:
        """The payload, or None if the tag does not match."""
        try:
            return self._aead.decrypt(nonce, bytes(sealed), aad)
        except InvalidTag:
            return None
