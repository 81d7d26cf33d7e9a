"""The Debian package, for real: scripts/package builds it (once for this module), lintian
passes it, `dpkg -i` installs it on this machine, and the installed files work on their own:
`/usr/bin/swapfs check-config --print-default`, the generator writing units, a mount served
by /usr/lib/swapfs that a reinstall hands over to the new code (data intact, daemon
replaced, nothing unmounted), a removal refused while it serves, the manual pages and the
bash completion; then `dpkg --purge` leaves nothing (every file `dpkg -L` listed, the
private tree, the units).  Whatever fails, the package is purged and its processes ended."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapfs import system

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/usr/lib/swapfs"
EXE = "/usr/bin/swapfs"
SMALL = '[pool]\nmax_bytes = "32M"\n\n[[device]]\nname = "swap0"\nsize = "16M"\n'


def run(cmd: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    """dpkg, waiting while another dpkg or apt run on this machine holds the lock."""
    deadline = time.monotonic() + 300
    while True:
        out = run(["dpkg", *args], timeout=300)
        if "lock" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


def installed() -> bool:
    out = run(["dpkg-query", "-W", "-f=${Status}", "swapfs"])
    return out.returncode == 0 and "installed" in out.stdout.split()[-1:]


def package_pids() -> list[int]:
    """Processes running the package's Python (daemons, keepers, standbys)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv0 = f.read().split(b"\0", 1)[0]
            except OSError:
                continue
            if argv0.startswith(PREFIX.encode() + b"/"):
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Built once; installed by the tests that need it; purged at the end whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("installs a package on this machine: needs root")
    for tool in ("dpkg-deb", "dpkg-shlibdeps", "/usr/bin/python3"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is missing (scripts/setup installs dpkg-dev)")
    if installed() or os.path.lexists(PREFIX):
        pytest.skip("a swapfs package is installed on this machine: this test would remove it")
    started = time.monotonic()
    out = run([str(REPO / "scripts" / "package")], timeout=480, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"built (\S+\.deb)", out.stdout)
    assert match, out.stdout
    print(f"scripts/package: {time.monotonic() - started:.1f} s; {out.stdout.strip()}")
    try:
        yield REPO / match.group(1)
    finally:
        for pid in package_pids():  # only this package's: the test installed it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if installed() or os.path.lexists(PREFIX):
            dpkg("--purge", "swapfs")


def test_lintian_passes(deb: Path) -> None:
    if not shutil.which("lintian"):
        pytest.skip("lintian is missing (scripts/setup installs it)")
    out = run(["lintian", "--fail-on", "error,warning", str(deb)], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    tags = [line for line in out.stdout.splitlines() if re.match(r"^[EWIP]: ", line)]
    assert tags == [], tags


def test_control_and_contents(deb: Path) -> None:
    info = run(["dpkg-deb", "-f", str(deb), "Depends", "Version"]).stdout
    assert re.search(r"python3 \(>= 3\.\d+\), python3 \(<< 3\.\d+\)", info), info
    files = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ("./usr/bin/swapfs", "./usr/lib/systemd/system/swapfs@.service",
                 "./usr/lib/systemd/system-generators/swapfs-generator",
                 "./etc/swapfs/main.toml.example", "./usr/share/man/man8/swapfs.8.gz",
                 "./usr/share/man/man5/swapfs.toml.5.gz",
                 "./usr/share/bash-completion/completions/swapfs",
                 "./usr/share/zsh/vendor-completions/_swapfs"):
        assert f" {path}\n" in files or f" {path} ->" in files, path
    # run time only: no pip, no test tools, no plotting, no byte code
    for absent in ("/pip/", "/pytest/", "/matplotlib/", "/mypy/", "__pycache__", ".pyc"):
        assert absent not in files, absent
    conffiles = run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout
    assert conffiles.split() == ["/etc/swapfs/main.toml.example"]


def test_install_use_upgrade_and_purge(deb: Path, tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    etc_before = os.path.lexists("/etc/swapfs")  # an admin's, not the package's
    out = dpkg("-i", str(deb))
    assert out.returncode == 0, out.stdout + out.stderr
    listed = [p for p in run(["dpkg", "-L", "swapfs"]).stdout.splitlines() if p.strip()]
    assert EXE in listed and f"{PREFIX}/pyvenv.cfg" in listed

    # The installed files alone, from a directory far from the checkout
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}

    def swapfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([EXE, *args], timeout=timeout, env=env, cwd=tmp_path)

    out = swapfs("check-config", "--print-default")
    assert out.returncode == 0 and "[[device]]" in out.stdout, out.stderr
    example = tmp_path / "main.toml"
    example.write_text(Path("/etc/swapfs/main.toml.example").read_text())
    out = swapfs("check-config", str(example))
    assert out.returncode == 0, out.stderr

    # The package owns the units: install-units (for a checkout) refuses to add a second set
    out = swapfs("install-units")
    assert out.returncode != 0 and "Debian package" in out.stderr, out.stdout + out.stderr

    # The generator, as systemd runs it, into a temp dir with a configuration
    conf, normal = tmp_path / "etc-swapfs", tmp_path / "normal"
    conf.mkdir()
    normal.mkdir()
    (conf / "main.toml").write_text(example.read_text())
    out = run(["/usr/lib/systemd/system-generators/swapfs-generator", str(normal), str(tmp_path),
               str(tmp_path)], env={**env, "SWAPFS_CONFIG_DIR": str(conf)})
    assert out.returncode == 0, out.stderr
    unit = (normal / "swapfs@main.service").read_text()
    assert f"ExecStart={EXE} mount --foreground" in unit
    assert f"ExecStart={EXE} swapon" in (normal / "swapfs-swap@main-swap0.service").read_text()
    assert (normal / "swap.target.wants" / "swapfs@main.service").is_symlink()
    template = Path("/usr/lib/systemd/system/swapfs@.service").read_text()
    assert f"ExecStart={EXE} mount --foreground --mkdir --config /etc/swapfs/%I.toml" in template

    # The manual pages render; the bash completion loads and completes
    for page in ("/usr/share/man/man8/swapfs.8.gz", "/usr/share/man/man5/swapfs.toml.5.gz"):
        out = run(["man", "-l", "-Tutf8", page], env={**env, "MANWIDTH": "80"})
        assert out.returncode == 0 and "swapfs" in out.stdout, out.stderr
        assert "warning" not in out.stderr, out.stderr
    out = run(["bash", "-c", "source /usr/share/bash-completion/completions/swapfs && "
               "COMP_WORDS=(swapfs check-c) COMP_CWORD=1 && _shtab_swapfs && echo ${COMPREPLY[@]}"],
              env=env)
    assert out.returncode == 0 and out.stdout.split() == ["check-config"], out.stdout + out.stderr
    if shutil.which("zsh"):  # Debian's zsh reads vendor-completions
        out = run(["zsh", "-f", "-c", f"autoload -U compinit; compinit -u -d {tmp_path}/zdump; "
                   "print ${_comps[swapfs]}"], env=env)
        assert out.stdout.strip() == "_swapfs", out.stdout + out.stderr

    # A mount from the installed files, with its keeper; a write read back byte for byte
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    log = tmp_path / "daemon.log"
    data = os.urandom(1 << 20)
    (tmp_path / "data").write_bytes(data)
    try:
        out = swapfs("mount", "--config", str(cfg), "--log-file", str(log), str(mnt), timeout=60)
        assert out.returncode == 0, out.stderr + (log.read_text() if log.exists() else "")
        first = int(re.search(r"daemon pid (\d+)", out.stdout).group(1))  # type: ignore[union-attr]
        out = run(["dd", f"if={tmp_path / 'data'}", f"of={mnt / 'swap0'}", "bs=64k", "oflag=direct",
                   "conv=notrunc,fsync", "status=none"], timeout=30)
        assert out.returncode == 0, out.stderr

        # A recording works; plotting it needs matplotlib, which the package leaves out, and says so
        rec = tmp_path / "run.jsonl"
        out = swapfs("record", str(mnt), "-o", str(rec), "--interval", "0.2", "--count", "2", timeout=30)
        assert out.returncode == 0, out.stderr
        out = swapfs("plot", str(rec), "-o", str(tmp_path / "run.png"))
        assert out.returncode != 0 and "needs matplotlib" in out.stderr, out.stdout + out.stderr

        # Removing the package under a live mount is refused, and changes nothing
        out = dpkg("--remove", "swapfs")
        assert out.returncode != 0 and "unmount it first" in out.stderr, out.stdout + out.stderr
        assert installed() and os.path.exists(EXE)

        # A reinstall (an upgrade) hands the mount to the installed code: new daemon, same data
        out = dpkg("-i", str(deb))
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"swapfs at {mnt} upgraded" in out.stdout, out.stdout + out.stderr
        assert system.wait_for_exit(first, 10), "the old daemon still runs after the upgrade"
        back = subprocess.run(["dd", f"if={mnt / 'swap0'}", "bs=64k", f"count={len(data) >> 16}",
                               "iflag=direct", "status=none"], capture_output=True, timeout=30)
        assert back.returncode == 0 and back.stdout == data, "read back differs after the upgrade"

        out = swapfs("unmount", str(mnt), timeout=60)
        assert out.returncode == 0, out.stderr
        assert not system.is_mounted(mnt)
        assert package_pids() == [], "a process of the package outlived its unmount"
    finally:
        if system.is_mounted(mnt):
            for pid in package_pids():  # the test's own daemon and keeper
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            run(["umount", "-l", str(mnt)])
    assert "Traceback" not in log.read_text(), log.read_text()

    # Purge: nothing of the package is left
    out = dpkg("--purge", "swapfs")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not installed()
    left = [p for p in listed if os.path.lexists(p) and not os.path.isdir(p)]
    assert left == [], left
    for path in (PREFIX, EXE, "/usr/lib/systemd/system/swapfs@.service",
                 "/usr/lib/systemd/system-generators/swapfs-generator", "/usr/share/doc/swapfs",
                 "/etc/swapfs/main.toml.example", *(["/etc/swapfs"] if not etc_before else [])):
        assert not os.path.lexists(path), path
