"""A short run of the fuzzer (swapfs.testing.fuzz: the real session, SwapFS, store, file
tiers and writeback behind a socketpair), and proof that its checks fail when they should."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
import trio

from swapfs.fs import SwapFS
from swapfs.fuse import FUSEError, Session
from swapfs.testing.fuzz import Fuzzer, FuzzFailure

pytestmark = pytest.mark.timeout(120)


def fuzz(seed: int, requests: int, **kw: Any) -> Any:
    return trio.run(Fuzzer(seed=seed, requests=requests, **kw).run)


@pytest.mark.parametrize("seed", [1, 2])
def test_short_fuzz_run(seed: int, tmp_path: Any) -> None:
    st = fuzz(seed, 3000, tier_dir=str(tmp_path))
    assert st.requests >= 3000
    assert st.valid and st.mutated and st.garbage and st.storm_messages
    assert st.bytes_verified > 0 and st.invariant_checks >= 4
    assert os.listdir(tmp_path) == []  # its backing files are gone


@pytest.mark.slow
def test_overlapping_sub_page_writes_in_flight(tmp_path: Any) -> None:
    # Concurrent 512-byte writes into one file-tier page, as FUSE async DIO
    # delivers them: each is a read-modify-write across an await (this seed
    # lost one of them before the store tracked partly written slots).
    st = fuzz(1, 20000, tier_dir=str(tmp_path), overlap=True)
    assert st.bytes_verified > 0


def test_fuzz_catches_wrong_bytes(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    real = SwapFS.read

    async def corrupt(self: SwapFS, fh: int, offset: int, size: int) -> Any:
        data = bytearray(await real(self, fh, offset, size))
        if len(data) > 100 and any(data):
            data[100] ^= 1
        return data

    monkeypatch.setattr(SwapFS, "read", corrupt)
    with pytest.raises(FuzzFailure, match="seed 7.*wrong bytes"):
        fuzz(7, 3000, tier_dir=str(tmp_path))


def test_fuzz_catches_a_missing_reply(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    real = Session._send

    def drop(self: Session, unique: int, reply: Any) -> None:
        if unique % 50 == 0:
            return
        real(self, unique, reply)

    monkeypatch.setattr(Session, "_send", drop)
    with pytest.raises(FuzzFailure, match="no reply"):
        fuzz(3, 1000, hang_seconds=2, tier_dir=str(tmp_path))


def test_fuzz_catches_eio_for_a_valid_request(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Any) -> None:
    async def eio(self: SwapFS, fh: int, offset: int, length: int, mode: int) -> None:
        raise FUSEError(errno.EIO)

    monkeypatch.setattr(SwapFS, "fallocate", eio)
    with pytest.raises(FuzzFailure, match="EIO for a well-formed request"):
        fuzz(4, 3000, tier_dir=str(tmp_path))
