"""The demo behind scripts/demo: mount, write and read pages, swap for real, show stats."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

from swapfs.testing import harness

PAGE = 4096
MiB = 1024 * 1024


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def swapfs(*args: str) -> subprocess.CompletedProcess:
    # swapoff reads every page back in; nothing else may take long
    return subprocess.run([sys.executable, "-m", "swapfs", *args], text=True, capture_output=True,
                          timeout=600 if args[0] == "swapoff" else 120)


def main() -> int:
    parser = argparse.ArgumentParser(description="Mount swapfs and show it working.")
    parser.add_argument("mountpoint", nargs="?", default="/tmp/swapfs-demo")
    parser.add_argument("--no-swap", action="store_true", help="skip the real kernel swap part")
    args = parser.parse_args()
    mnt = os.path.abspath(args.mountpoint)

    os.makedirs(mnt, exist_ok=True)
    if os.path.ismount(mnt):
        say(f"{mnt} is already mounted: unmounting the previous demo first")
        out = swapfs("unmount", mnt)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1

    say(f"swapfs mount {mnt}   (embedded default configuration)")
    out = swapfs("mount", mnt)
    print(out.stdout + out.stderr, end="")
    if out.returncode != 0:
        return 1
    dev = os.path.join(mnt, "swap0")
    print(f"$ ls -l {mnt}")
    print(subprocess.run(["ls", "-l", mnt], capture_output=True, text=True).stdout, end="")

    say("writing 4096 pages (16 MiB): text, zeros, a repeated pattern and random bytes")
    pages = []
    for i in range(4096):
        kind = i % 4
        if kind == 0:
            p = (b"page %08d of the swapfs demo; " % i * 200)[:PAGE]
        elif kind == 1:
            p = bytes(PAGE)
        elif kind == 2:
            p = (i.to_bytes(8, "little")) * 512
        else:
            p = os.urandom(PAGE)
        pages.append(p)
    fd = os.open(dev, os.O_RDWR)
    try:
        t0 = time.monotonic()
        for off in range(0, len(pages), 256):
            os.pwrite(fd, b"".join(pages[off:off + 256]), off * PAGE)
        t1 = time.monotonic()
        bad = 0
        for off in range(0, len(pages), 256):
            got = os.pread(fd, 256 * PAGE, off * PAGE)
            bad += sum(got[j * PAGE:(j + 1) * PAGE] != pages[off + j] for j in range(256))
        t2 = time.monotonic()
    finally:
        os.close(fd)
    print(f"wrote 16 MiB in {t1 - t0:.3f}s, read it back in {t2 - t1:.3f}s: "
          f"{'every byte matches' if bad == 0 else f'{bad} PAGES DIFFER'}")
    if bad:
        return 1

    say(f"swapfs stats {mnt}")
    print(swapfs("stats", mnt).stdout, end="")

    if args.no_swap:
        pass
    elif (why := harness.kernel_swap_unavailable()) is not None:
        say(f"skipping the real kernel swap part: {why}")
    else:
        say("the kernel swaps into swapfs: 384 MiB working set in a 128 MiB memory cgroup")
        # punch out the demo pages first so the swap area starts clean
        subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", "0", "-l", str(16 * MiB), dev], check=True)
        record_file = os.path.join(os.path.dirname(mnt), "swapfs-demo.jsonl")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record_file)
        # swap is machine-wide: one swapping run at a time; vm.page-cluster 0 as
        # README recommends (restored after)
        with harness.swap_lock(), harness.vm_page_cluster(0):
            out = swapfs("swapon", dev, "--priority", "32767")
            print(f"$ swapfs swapon {dev} --priority 32767\n{out.stdout}{out.stderr}", end="")
            if out.returncode != 0:
                return 1
            loop = out.stdout.strip()
            recorder = subprocess.Popen([sys.executable, "-m", "swapfs", "record", mnt, "-o", record_file,
                                         "--interval", "0.5"])
            try:
                peak: dict = {"stored": -1}

                def sample() -> None:
                    stats = harness.read_stats(mnt)
                    if stats["totals"]["stored_pages"] > peak["stored"]:
                        peak["stored"] = stats["totals"]["stored_pages"]
                        peak["stats"] = stats

                result = harness.run_swap_workload(
                    # 128 MiB: in smaller cgroups the kernel sometimes OOM-killed the
                    # workload once swap-ins were fast (tests/system/test_kernel_swap.py)
                    working_set_bytes=384 * MiB, limit_bytes=128 * MiB,
                    cgroup_name=f"swapfs-demo-{os.getpid()}", watch_device=loop, on_poll=sample,
                )
                print(f"{result.pages} pages filled and verified twice in {result.wall_seconds:.1f}s, "
                      f"peak {result.peak_swap_kib // 1024} MiB in swap, "
                      f"{'every byte matches' if result.bad_pages == 0 else f'{result.bad_pages} PAGES DIFFER'}")
                say("swapfs status")
                print(swapfs("status").stdout, end="")
                if "stats" in peak:
                    from swapfs.cli.stats import format_stats

                    say("swapfs stats at the workload's peak (the kernel frees the slots when it exits)")
                    print(format_stats(peak["stats"]))
            finally:
                recorder.terminate()
                recorder.wait()
                out = swapfs("swapoff", dev)
                print(f"$ swapfs swapoff {dev}\n{out.stdout}{out.stderr}", end="")
        out = swapfs("plot", record_file, "-o", os.path.join(os.path.dirname(mnt), "swapfs-demo.png"))
        say(f"swapfs plot {record_file}")
        print(out.stdout + out.stderr, end="")
        if result.bad_pages:
            return 1

    say(f"getfattr -d -m - {dev}   (the same counters, as xattrs)")
    print(subprocess.run(["getfattr", "-d", "-m", "-", dev], capture_output=True, text=True).stdout, end="")

    say(f"swapfs stats {mnt} --format prometheus   (the first lines)")
    print("".join(swapfs("stats", mnt, "--format", "prometheus").stdout.splitlines(True)[:9]), end="")

    say("swapfs is still mounted; to swap into it (as root):")
    print(f"  .venv/bin/swapfs swapon {dev} --priority 100      # prints /dev/loopN")
    print("  .venv/bin/swapfs status")
    print(f"  .venv/bin/swapfs stats {mnt}")
    print("and to stop:")
    print(f"  .venv/bin/swapfs swapoff {dev} && .venv/bin/swapfs unmount {mnt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
