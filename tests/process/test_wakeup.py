"""The CPU wake-up latency request (swapfs.wakeup) against a stand-in file:
what is written, when it is held and when it is given back."""

from __future__ import annotations

import struct

import pytest
import trio

from swapfs import wakeup
from swapfs.wakeup import NO_CONSTRAINT_US, WakeLatency


def written(path) -> list[int]:
    data = path.read_bytes()
    return [v for (v,) in struct.iter_unpack("=i", data)]


def test_open_asks_for_nothing_hold_and_release(tmp_path):
    path = tmp_path / "qos"
    path.write_bytes(b"")
    wake = WakeLatency(0, path=str(path))
    assert wake.open() is None
    assert written(path) == [NO_CONSTRAINT_US]
    wake.hold()
    wake.hold()  # already held: not written again
    assert wake.held and wake.holds == 1
    wake.release()
    wake.release()
    assert written(path) == [NO_CONSTRAINT_US, 0, NO_CONSTRAINT_US]
    wake.close()
    assert wake.fd is None and not wake.held
    wake.hold()  # closed: nothing happens, nothing raises
    assert written(path) == [NO_CONSTRAINT_US, 0, NO_CONSTRAINT_US]


def test_unusable_device_is_reported_not_raised(tmp_path):
    wake = WakeLatency(0, path=str(tmp_path / "missing" / "qos"))
    problem = wake.open()
    assert problem is not None and "missing" in problem
    wake.hold()
    assert not wake.held and wake.fd is None


@pytest.mark.parametrize("bad", [-1, NO_CONSTRAINT_US])
def test_latency_out_of_range(bad):
    with pytest.raises(ValueError):
        WakeLatency(bad)


async def test_held_while_requests_flow_released_when_idle(tmp_path, autojump_clock):
    path = tmp_path / "qos"
    path.write_bytes(b"")
    wake = WakeLatency(7, path=str(path))
    assert wake.open() is None
    count = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake.run, lambda: count)
        await trio.sleep(1)
        assert not wake.held  # no request yet: nothing asked
        for _ in range(20):  # requests arriving: held, once
            count += 1
            await trio.sleep(wakeup.SAMPLE_SECONDS)
        assert wake.held and wake.holds == 1
        await trio.sleep(wakeup.IDLE_SECONDS + 2 * wakeup.SAMPLE_SECONDS)
        assert not wake.held  # idle: given back
        count += 1
        await trio.sleep(2 * wakeup.SAMPLE_SECONDS)
        assert wake.held and wake.holds == 2
        nursery.cancel_scope.cancel()
    assert wake.fd is None  # closed on the way out: the kernel drops the request
    assert written(path) == [NO_CONSTRAINT_US, 7, NO_CONSTRAINT_US, 7]


async def test_min_rate_holds_only_above_the_rate(tmp_path, autojump_clock):
    path = tmp_path / "qos"
    path.write_bytes(b"")
    wake = WakeLatency(0, path=str(path), min_rate=1000)
    per_sample = round(1000 * wakeup.SAMPLE_SECONDS)
    assert wake.open() is None
    count = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake.run, lambda: count)
        await trio.sleep(wakeup.SAMPLE_SECONDS / 2)  # between the watcher's samples
        for _ in range(20):  # a trickle, below the rate: not worth the bound
            count += per_sample // 2
            await trio.sleep(wakeup.SAMPLE_SECONDS)
        assert not wake.held and wake.holds == 0
        for _ in range(5):  # at the rate: held
            count += per_sample
            await trio.sleep(wakeup.SAMPLE_SECONDS)
        assert wake.held and wake.holds == 1
        for _ in range(round(wakeup.IDLE_SECONDS / wakeup.SAMPLE_SECONDS) + 2):  # back to a trickle
            count += 1
            await trio.sleep(wakeup.SAMPLE_SECONDS)
        assert not wake.held  # given back
        nursery.cancel_scope.cancel()
    assert written(path) == [NO_CONSTRAINT_US, 0, NO_CONSTRAINT_US]


def test_min_rate_out_of_range():
    with pytest.raises(ValueError, match="rate"):
        WakeLatency(0, min_rate=-1)
