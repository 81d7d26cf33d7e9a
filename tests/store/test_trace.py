"""Traces (swapfs/trace.py): the format, the recorder's bounded buffers, and
replay (swapfs/replay.py) through an in-process store."""

from __future__ import annotations

import os

import pytest
import trio

from swapfs import trace
from swapfs.config import parse_config
from swapfs.replay import Pages, replay, synthetic_templates
from swapfs.testing.traces import kernel_swap, write_kernel_swap
from swapfs.trace import (
    DISCARD,
    NO_TIER,
    READ,
    RECORD,
    WRITE,
    TraceError,
    Tracer,
    load,
    records,
    write_trace,
)

DEVICES = [("swap0", 1 << 30), ("émoji-ß", 4096 * 10)]


def test_format_round_trip(tmp_path):
    recs = [(0, 0, 1, WRITE, 0, NO_TIER, 0), (1500, 7, 3, READ, 1, 2, 1),
            (2 ** 40, 2 ** 32 - 1, 2 ** 32 - 1, DISCARD, 0, NO_TIER, 0)]
    path = str(tmp_path / "t.trace")
    size = write_trace(path, DEVICES, recs, start_ns=123)
    assert size == trace.HEADER.size + 2 * trace.DEVICE.size + 3 * RECORD.size
    header, body = load(path)
    assert header.version == trace.VERSION and header.start_ns == 123
    assert header.devices == tuple(DEVICES)
    assert list(records(body)) == recs
    # a record cut short (a recorder killed mid-write) is left out
    with open(path, "ab") as f:
        f.write(b"\1" * (RECORD.size - 1))
    assert list(records(load(path)[1])) == recs


@pytest.mark.parametrize("damage,message", [
    (lambda d: b"NOTTRACE" + d[8:], "not a swapfs trace"),
    (lambda d: d[:8] + (99).to_bytes(2, "little") + d[10:], "format version 99"),
    (lambda d: d[:10] + (24).to_bytes(2, "little") + d[12:], "24-byte records"),
    (lambda d: d[:30], "ends inside its device list"),
    (lambda d: d[:5], "too short"),
])
def test_bad_traces_are_refused_saying_why(tmp_path, damage, message):
    path = str(tmp_path / "t.trace")
    write_trace(path, DEVICES, [(0, 0, 1, WRITE, 0, NO_TIER, 0)])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(TraceError, match=message):
        load(path)


async def test_tracer_flushes_in_order_and_drops_when_behind(tmp_path):
    path = str(tmp_path / "t.trace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    tracer = Tracer(fd, DEVICES, buffer_records=4, path=path)
    await tracer.start()
    for k in range(40):  # the flusher runs between requests, as in the daemon
        tracer.record(WRITE, 0, k, 1, NO_TIER, 0)
        if k % 4 == 3:  # let the flusher's thread write the buffer that filled, however slow
            with trio.fail_after(10):
                while tracer._full is not None:
                    await trio.sleep(0.001)
        await trio.lowlevel.checkpoint()
    # no checkpoint: both buffers fill, the rest is dropped and counted
    for k in range(40, 60):
        tracer.record(READ, 1, k, 1, 0, 0)
    await tracer.close()
    assert tracer.recorded + tracer.dropped == 60
    # (the last flush left records 36..39 in a full buffer: one buffer of 4
    # more took 40..43)
    assert tracer.dropped == 16
    header, body = load(path)
    got = list(records(body))
    assert len(got) == tracer.recorded == 44
    assert [r[1] for r in got] == list(range(44))
    assert [r[3] for r in got] == [WRITE] * 40 + [READ] * 4
    times = [r[0] for r in got]
    assert times == sorted(times)


def test_synthetic_pages_compress_as_memory_does():
    import lz4.block

    templates = synthetic_templates()
    total = sum(len(lz4.block.compress(t, store_size=False)) for t in templates)
    assert 2.2 < 256 * 4096 / total < 2.8
    pages = Pages(templates)
    assert pages.page(0, 5, 1) == pages.page(0, 5, 1)
    assert pages.page(0, 5, 1) != pages.page(0, 5, 2) != pages.page(1, 5, 2)
    assert pages.page(0, 5, 0) == bytes(4096)


CONFIG = """
[pool]
max_bytes = "2M"
high_watermark = 0.8
low_watermark = 0.6

[[device]]
name = "swap0"
size = "64M"

[[tier]]
name = "ssd"
path = "/nonexistent/never-used.img"
size = "64M"
"""


def small_trace(tmp_path, pattern: str = "hot") -> str:
    path = str(tmp_path / f"{pattern}.trace")
    write_kernel_swap(path, pattern, pages=3000, ram=1000, hot=1600, accesses=20_000,
                      device_bytes=64 << 20)
    return path


def test_generators_are_deterministic():
    a = kernel_swap("phase", pages=500, ram=100, accesses=3000, seed=3)
    assert a == kernel_swap("phase", pages=500, ram=100, accesses=3000, seed=3)
    assert a != kernel_swap("phase", pages=500, ram=100, accesses=3000, seed=4)
    ops = {r[3] for r in a}
    assert ops == {READ, WRITE, DISCARD}


def test_replay_is_deterministic_and_checks_every_read(tmp_path):
    path = small_trace(tmp_path)
    config = parse_config(CONFIG)
    runs = [replay(path, config, policy=p).to_dict() for p in ("classic", "classic", "workingset")]
    for r in runs:
        del r["cpu_seconds"], r["wall_seconds"]
        assert r["wrong_pages"] == 0 and r["errors"] == 0
        assert r["pages_written"] > 0 and r["pages_read"] > 0
        assert r["moves"] > 0 and r["refaults"] > 0
        assert r["promotions"] <= r["refaults"]
        assert r["wasted_promotions"] <= r["promotions"]
        assert r["tier_written_bytes"]["ssd"] > 0  # compressed objects: less than a page each
    assert runs[0] == runs[1]
    assert runs[2]["policy"] == "workingset" and runs[0]["policy"] == "classic"
    # the same requests, served differently
    assert runs[2]["pages_read"] == runs[0]["pages_read"]
    assert runs[2]["promotions"] != runs[0]["promotions"]


def test_replay_refuses_a_trace_that_does_not_fit(tmp_path):
    path = str(tmp_path / "t.trace")
    write_trace(path, [("swap9", 4096)], [(0, 0, 1, WRITE, 0, NO_TIER, 0)])
    with pytest.raises(TraceError, match="device 'swap9' of the trace is not in the config"):
        replay(path, parse_config(CONFIG))
    write_trace(path, [("swap0", 1 << 30)], [(0, 0, 1, WRITE, 0, NO_TIER, 0)])
    with pytest.raises(TraceError, match="device 'swap0'.* in the trace"):
        replay(path, parse_config(CONFIG))
