"""Driving the kernel's swap against a swap device: for tests, benchmarks, the demo.

Context managers that always undo what they did (a loop device with direct
I/O, swapon, a memory cgroup), and the verifying workload: a child process,
confined to a memory cgroup far smaller than its working set, that fills
pages with known contents, reads them all back and checks every byte.  The
kernel must swap to keep it alive, so the pages go through the swap device.

Everything here needs root.  Nothing here knows swapfs internals: the same
code runs the workload over zram for comparison.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import system
from ..system import active_swaps, read_stats

__all__ = ["active_swaps", "read_stats"]  # re-exported: the tests and the demo use them from here

CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
CGROUP_V2 = "/sys/fs/cgroup"


# What failed: a system command (losetup, mkswap, swapon, swapoff), a check
# after it, or the workload.
HarnessError = system.CommandFailed


def is_root() -> bool:
    return os.geteuid() == 0


def memory_cgroup_kind() -> str | None:
    """'v1', 'v2' or None: which memory controller this machine offers."""
    if os.path.exists(os.path.join(CGROUP_V1_MEMORY, "memory.limit_in_bytes")):
        return "v1"
    try:
        with open(os.path.join(CGROUP_V2, "cgroup.controllers")) as f:
            if "memory" in f.read().split():
                return "v2"
    except OSError:
        pass
    return None


def kernel_swap_unavailable() -> str | None:
    """Why the kernel swap workload cannot run here, or None if it can."""
    if not is_root():
        return "needs root"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices"
    if memory_cgroup_kind() is None:
        return "no memory cgroup controller"
    for tool in ("losetup", "mkswap", "swapon", "swapoff"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in ("/sbin", "/usr/sbin", "/bin", "/usr/bin")):
            return f"{tool} not installed"
    return None


@contextlib.contextmanager
def loop_device(path: str | os.PathLike[str], *, direct_io: bool = True,
                tune: bool = True) -> Iterator[str]:
    """Attach a loop device over ``path`` (direct I/O by default, checked),
    its queue tuned as ``swapfs swapon`` tunes it unless ``tune`` is False;
    always detach it."""
    dev = system.attach_loop(path, direct_io=direct_io)
    try:
        if tune:
            problems = system.tune_loop_queue(dev)
            if problems:
                raise HarnessError(f"{dev}: " + "; ".join(problems))
        yield dev
    finally:
        system.detach_loop(dev)


# Swap devices are machine-wide: while one run's device is on, the kernel may
# send another run's pages to it.  Runs that swap (tests in several checkouts,
# the demo, benchmarks) take this lock for as long as their swap is on.
SWAP_LOCK = "/run/lock/swapfs-swap.lock"


@contextlib.contextmanager
def swap_lock() -> Iterator[None]:
    """Hold the machine-wide lock of swapfs's swap users (blocks until free)."""
    os.makedirs(os.path.dirname(SWAP_LOCK), exist_ok=True)
    fd = os.open(SWAP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def swap_on(dev: str, *, priority: int = 32767, discard: bool = True,
            page_cluster: int | None = 0) -> Iterator[str]:
    """mkswap and swapon ``dev`` under :func:`swap_lock`; always swapoff
    (which reads every page back in).  ``page_cluster``: vm.page-cluster while
    swap is on (restored after; None: left as it is).  0, as README
    recommends: swap readahead charges up to 8 pages per fault to the
    workload's memory cgroup, and in a tight cgroup that charge is where the
    kernel gave up and OOM-killed the workload."""
    with swap_lock(), vm_page_cluster(page_cluster):
        yield from _swap_on(dev, priority=priority, discard=discard)


@contextlib.contextmanager
def vm_page_cluster(value: int | None) -> Iterator[int]:
    """vm.page-cluster set to ``value`` for the block (None: left as it is),
    restored after; yields the value in force."""
    path = "/proc/sys/vm/page-cluster"
    with open(path) as f:
        old = int(f.read())
    if value is None or value == old:
        yield old
        return
    with open(path, "w") as f:
        f.write(str(value))
    try:
        yield value
    finally:
        with open(path, "w") as f:
            f.write(str(old))


@contextlib.contextmanager
def uring_ready() -> Iterator[str | None]:
    """What the io_uring transport needs of the machine, for the block, as
    root: the fuse module's enable_uring set to Y, fusectl mounted (what
    systemd's sys-fs-fuse-connections.mount does at boot; a bare machine
    lacks it); both restored after.  Yields None, or why the transport still
    cannot be used."""
    from ..fuse import uring

    state = uring.enable_uring()
    if state is None:
        yield f"kernel without FUSE over io_uring ({uring.ENABLE_URING} does not exist)"
        return
    if state != "Y" and not is_root():
        yield f"{uring.ENABLE_URING} is {state} and setting it needs root"
        return
    mounted = False
    try:
        if state != "Y":
            uring.set_enable_uring("Y")
        if not os.path.ismount(uring.FUSECTL) and is_root():
            mounted = subprocess.run(["mount", "-t", "fusectl", "fusectl", uring.FUSECTL],
                                     capture_output=True).returncode == 0
        yield uring.unavailable_reason()  # fusectl not mounted is one of its reasons
    finally:
        if state != "Y":
            uring.set_enable_uring(state)
        if mounted:
            subprocess.run(["umount", uring.FUSECTL], capture_output=True)


def _swap_on(dev: str, *, priority: int, discard: bool) -> Iterator[str]:
    system.swap_on(dev, priority=priority, discard="both" if discard else "off")
    try:
        yield dev
    finally:
        system.swap_off(dev)


@contextlib.contextmanager
def memory_cgroup(name: str, limit_bytes: int) -> Iterator[str]:
    """A memory cgroup limited to ``limit_bytes``; yields its cgroup.procs path.
    Removed afterwards (its processes must have exited)."""
    kind = memory_cgroup_kind()
    if kind == "v1":
        path = os.path.join(CGROUP_V1_MEMORY, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_bytes))
        with contextlib.suppress(OSError), open(os.path.join(path, "memory.swappiness"), "w") as f:
            f.write("100")
    elif kind == "v2":
        path = os.path.join(CGROUP_V2, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.max"), "w") as f:
            f.write(str(limit_bytes))
    else:
        raise HarnessError("no memory cgroup controller")
    try:
        yield os.path.join(path, "cgroup.procs")
    finally:
        for _ in range(100):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def zram_unavailable() -> str | None:
    if not is_root():
        return "needs root"
    if not os.path.exists("/sys/block/zram0"):
        return "no zram0 (the zram module is not loaded)"
    with open("/sys/block/zram0/disksize") as f:
        if int(f.read()) != 0:
            return "zram0 is in use"
    return None


@contextlib.contextmanager
def zram_device(size_bytes: int, algorithm: str = "lz4") -> Iterator[str]:
    """Configure /dev/zram0 (must be unused); always reset it afterwards."""
    base = "/sys/block/zram0"
    with open(f"{base}/comp_algorithm", "w") as f:
        f.write(algorithm)
    with open(f"{base}/disksize", "w") as f:
        f.write(str(size_bytes))
    try:
        yield "/dev/zram0"
    finally:
        with open(f"{base}/reset", "w") as f:
            f.write("1")


def zram_mm_stat() -> dict[str, int]:
    """/sys/block/zram0/mm_stat: orig_data_size, compr_data_size, mem_used_total, ..."""
    names = ["orig_data_size", "compr_data_size", "mem_used_total", "mem_limit",
             "mem_used_max", "same_pages", "pages_compacted", "huge_pages"]
    with open("/sys/block/zram0/mm_stat") as f:
        values = [int(v) for v in f.read().split()]
    return dict(zip(names, values))


# -- the verifying workload --------------------------------------------------

# The child fills `pages` pages; page i holds its index and a seed, then a
# window of random words (compresses about 3:1 with lz4) that starts at a
# different place for each page; every
# `same_every`-th page is all zeros (a freed heap page looks like that).  It
# then reads every page back, twice in a different order, and checks it.
# Its progress is timed page by page: `stall` is the longest time between two
# pages (a swap-in or a reclaim that waited on the swap device shows there).
CHILD = r"""
import os, struct, sys, time, random
pages, seed, same_every = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
PAGE = 4096
words = [b"swap", b"page", b"slot", b"tier", b"pool", b"zram", b"lz4 ", b"disk"]
rng = random.Random(seed)
text = b"".join(rng.choice(words) for _ in range(64 * 1024 // 4))
span = len(text) - PAGE
def page(i):
    if same_every and i % same_every == 0:
        return bytes(PAGE)
    off = (i * 7919 + seed * 104729) % span
    return struct.pack("<QQ", i, seed) + text[off:off + PAGE - 16]
clock = time.monotonic
t0 = last = clock()
stall = 0.0
buf = bytearray(pages * PAGE)
for i in range(pages):
    buf[i * PAGE:(i + 1) * PAGE] = page(i)
    now = clock()
    if now - last > stall:
        stall = now - last
    last = now
t1 = clock()
bad = 0
for rnd in range(2):
    order = list(range(pages))
    random.Random(seed + rnd).shuffle(order)
    for i in order:
        if buf[i * PAGE:(i + 1) * PAGE] != page(i):
            bad += 1
            if bad < 5:
                print("MISMATCH page", i, file=sys.stderr)
        now = clock()
        if now - last > stall:
            stall = now - last
        last = now
t2 = clock()
print(f"RESULT pages={pages} bad={bad} fill={t1 - t0:.3f} verify={t2 - t1:.3f} stall={stall:.3f}")
sys.exit(1 if bad else 0)
"""


@dataclass
class WorkloadResult:
    pages: int
    bad_pages: int
    wall_seconds: float
    fill_seconds: float
    verify_seconds: float
    peak_swap_kib: int
    output: str
    oom_killed: bool = False  # (with oom_ok) killed before it printed its result
    # The longest time between two pages the workload filled or checked (its own clock).
    max_stall_seconds: float = 0.0


def run_swap_workload(
    *,
    working_set_bytes: int,
    limit_bytes: int,
    cgroup_name: str = "swapfs-workload",
    seed: int = 1,
    same_every: int = 16,
    timeout: float = 600,
    watch_device: str | None = None,
    on_poll: Callable[[], None] | None = None,
    oom_ok: bool = False,
) -> WorkloadResult:
    """Run the verifying page workload in a memory cgroup of ``limit_bytes``.

    ``watch_device``: a swap device whose /proc/swaps usage is sampled to
    report the peak swapped KiB.  ``on_poll`` is called at every sample
    (every 50 ms) while the workload runs.  ``oom_ok``: a workload the
    cgroup's OOM killer ended is a result (``oom_killed``, the wrong pages it
    reported before), not an error."""
    pages = working_set_bytes // 4096
    peak = 0
    with memory_cgroup(cgroup_name, limit_bytes) as procs:
        # The shell puts itself in the cgroup, then becomes the child: the
        # calling process (and the swapfs daemon) stay outside it.
        script = f'echo $$ > {procs} && exec "$0" -c "$1" {pages} {seed} {same_every}'
        start = time.monotonic()
        child = subprocess.Popen(
            ["sh", "-c", script, sys.executable, CHILD],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            while child.poll() is None:
                if watch_device:
                    swap = active_swaps().get(watch_device)
                    peak = max(peak, swap.used_kib if swap else 0)
                if on_poll is not None:
                    on_poll()
                if time.monotonic() - start > timeout:
                    raise HarnessError(f"swap workload still running after {timeout}s")
                time.sleep(0.05)
        finally:
            if child.poll() is None:
                child.kill()
            output = child.communicate()[0]
        wall = time.monotonic() - start
    result = None
    for line in output.splitlines():
        if line.startswith("RESULT "):
            result = dict(kv.split("=") for kv in line.split()[1:])
    if result is None and oom_ok and child.returncode == -9:
        return WorkloadResult(pages=0, bad_pages=output.count("MISMATCH"), wall_seconds=wall,
                              fill_seconds=0.0, verify_seconds=0.0, peak_swap_kib=peak,
                              output=output, oom_killed=True)
    if result is None:
        raise HarnessError(f"swap workload died (status {child.returncode}): {output.strip()[-2000:]}")
    return WorkloadResult(
        pages=int(result["pages"]),
        bad_pages=int(result["bad"]),
        wall_seconds=wall,
        fill_seconds=float(result["fill"]),
        verify_seconds=float(result["verify"]),
        peak_swap_kib=peak,
        output=output,
        max_stall_seconds=float(result.get("stall", 0.0)),
    )

