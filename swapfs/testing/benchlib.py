"""Shared benchmark helpers: loop devices, fio jobs, served mounts, tables.

Used by the benchmark scripts (scripts/bench, bench-fuse, bench-density):
``from swapfs.testing import benchlib``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .. import system
from .harness import loop_device  # noqa: F401  (re-exported for the bench scripts)


@dataclass(frozen=True)
class FioResult:
    iops: float
    mbps: float  # MB/s (10^6 bytes)
    lat_us: float  # mean completion latency
    p50_us: float = 0.0  # completion latency percentiles
    p99_us: float = 0.0
    p999_us: float = 0.0
    ios: int = 0  # I/Os completed (ramp time excluded)


@dataclass(frozen=True)
class FioJob:
    name: str
    rw: str  # randread, randwrite, read, write
    bs: str
    iodepth: int
    metric: str  # "iops" or "mbps": the figure that matters for this job


STANDARD_SUITE: tuple[FioJob, ...] = (
    FioJob("4k randread qd1", "randread", "4k", 1, "iops"),
    FioJob("4k randread qd16", "randread", "4k", 16, "iops"),
    FioJob("4k randwrite qd1", "randwrite", "4k", 1, "iops"),
    FioJob("4k randwrite qd16", "randwrite", "4k", 16, "iops"),
    FioJob("1M seq read", "read", "1M", 4, "mbps"),
    FioJob("1M seq write", "write", "1M", 4, "mbps"),
)


def run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, text=True, capture_output=True, **kw)


def run_fio(
    target: str,
    *,
    rw: str,
    bs: str,
    iodepth: int = 1,
    runtime: float = 5,
    ramp: float = 1,
    size: str | None = None,
    ioengine: str = "libaio",
    extra: Iterable[str] = (),
) -> FioResult:
    """One fio job on ``target`` (direct I/O, time based); IOPS and MB/s from its JSON."""
    cmd = [
        "fio",
        "--name=job",
        f"--filename={target}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--ioengine={ioengine}",
        "--direct=1",
        "--time_based",
        f"--runtime={runtime}",
        f"--ramp_time={ramp}",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
        "--percentile_list=50:99:99.9",
        *extra,
    ]
    if size:
        cmd.append(f"--size={size}")
    out = run(cmd).stdout
    data = json.loads(out[out.index("{") :])
    job = data["jobs"][0]
    side = job["write"] if "write" in rw and "read" not in rw else job["read"]
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    return FioResult(iops=side["iops"], mbps=side["bw_bytes"] / 1e6, lat_us=clat.get("mean", 0.0) / 1000,
                     p50_us=pct.get("50.000000", 0) / 1000, p99_us=pct.get("99.000000", 0) / 1000,
                     p999_us=pct.get("99.900000", 0) / 1000, ios=side.get("total_ios", 0))


def run_suite(
    target: str,
    *,
    runtime: float = 5,
    jobs: Sequence[FioJob] = STANDARD_SUITE,
    warmup: float = 2,
    log=None,
) -> dict[str, FioResult]:
    """Run ``jobs`` on ``target`` after an unrecorded warm-up (random 4k reads
    and writes at depth 4 for ``warmup`` seconds each)."""
    if warmup > 0:
        for rw in ("randwrite", "randread"):
            run_fio(target, rw=rw, bs="4k", iodepth=4, runtime=warmup, ramp=0)
    results = {}
    for job in jobs:
        results[job.name] = run_fio(target, rw=job.rw, bs=job.bs, iodepth=job.iodepth, runtime=runtime)
        if log:
            r = results[job.name]
            log(f"    {job.name:<20} {r.iops:10.0f} IOPS {r.mbps:9.1f} MB/s")
    return results


def is_mounted(path: str) -> bool:
    return system.is_mounted(os.path.realpath(path))


@contextlib.contextmanager
def served(cmd: Sequence[str], mountpoint: str, *, timeout: float = 30) -> Iterator[subprocess.Popen]:
    """Run a FUSE server process that prints "ready" once mounted; stop it with
    SIGTERM afterwards and make sure the mount is gone."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{cmd[0]} did not start (said {line!r}, rc={proc.poll()})")
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mountpoint} not mounted")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def summarize(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(value: float, metric: str) -> str:
    return f"{value:,.0f}" if metric == "iops" else f"{value:,.1f}"


def print_latencies(
    job: str,
    results: dict[str, dict[str, list[FioResult]]],
    names: Sequence[str],
    file=sys.stdout,
) -> None:
    """Completion latency percentiles of ``job`` (median over rounds) per implementation."""
    print(f"\n{job}: completion latency, us (median of rounds)", file=file)
    print(f"{'':<24} {'p50':>8} {'p99':>8} {'p99.9':>8} {'mean':>8}", file=file)
    for n in names:
        rs = results[n].get(job, [])
        if not rs:
            continue
        med = [statistics.median(getattr(r, k) for r in rs) for k in ("p50_us", "p99_us", "p999_us", "lat_us")]
        print(f"{n:<24} " + " ".join(f"{v:8.1f}" for v in med), file=file)


def print_table(
    jobs: Sequence[FioJob],
    results: dict[str, dict[str, list[FioResult]]],
    names: Sequence[str],
    file=sys.stdout,
) -> None:
    """``results[impl][job.name]`` is one FioResult per round.  Prints median
    (min-max) per implementation and the ratio of medians first/second."""
    cols = [f"{n} median (min-max)" for n in names]
    head = f"{'job':<20} {'unit':<5} " + " ".join(f"{c:>30}" for c in cols)
    if len(names) == 2:
        head += f" {'ratio':>7}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for job in jobs:
        unit = "IOPS" if job.metric == "iops" else "MB/s"
        medians = []
        cells = []
        for n in names:
            vals = [getattr(r, job.metric) for r in results[n][job.name]]
            med, lo, hi = summarize(vals)
            medians.append(med)
            cells.append(f"{fmt(med, job.metric)} ({fmt(lo, job.metric)}-{fmt(hi, job.metric)})")
        line = f"{job.name:<20} {unit:<5} " + " ".join(f"{c:>30}" for c in cells)
        if len(names) == 2:
            line += f" {medians[0] / medians[1]:>6.2f}x" if medians[1] else "      -"
        print(line, file=file)
