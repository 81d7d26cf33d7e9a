"""A local Redis Cluster on 127.0.0.1, for the tests, the demo and the benchmarks.

:class:`LocalCluster` starts ``masters`` masters with ``replicas`` replicas each, one
``redis-server`` per node in its own directory under ``dir``, with the settings a remote tier
wants (README, "A remote tier on Redis Cluster"): ``cluster-require-full-coverage no`` and
``cluster-allow-reads-when-down yes`` (a lost node costs its slots, not the cluster), a node
timeout of 2 s (a replica is promoted within a few seconds), ``maxmemory`` with ``noeviction``
(a full cluster refuses writes rather than dropping pages), no persistence (no RDB, no AOF).
Optionally an ACL user with a password (written to ``dir/password``, the file a tier's
``password_file`` names) and TLS (a CA, a server certificate for 127.0.0.1 and a client pair,
made with openssl under ``dir/tls``).

``start`` waits until every node reports ``cluster_state:ok`` and every replica is attached;
``stop`` kills every node it started (SIGKILL after a grace period) and removes the directory it
created.  ``status`` reads what a directory holds (``cluster.json``) and asks each node, so the
script ``scripts/redis-cluster`` can stop a cluster another process started.

Node control for failure tests: ``kill(port)`` (SIGKILL), ``freeze``/``thaw`` (SIGSTOP/SIGCONT),
``restart(port)``.  Everything talks to the nodes with ``redis-cli`` or a bare socket, never with
the tier's client, so the client's tests do not test the client with itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

__all__ = ["ClusterError", "LocalCluster", "redis_server_missing"]

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"
STATE_FILE = "cluster.json"
NODE_TIMEOUT_MS = 2000


class ClusterError(Exception):
    """The cluster could not be started, reached or stopped; the message says why."""


def redis_server_missing() -> str | None:
    """Why no local cluster can run here (for a skip), or None."""
    for tool in (REDIS_SERVER, REDIS_CLI):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs Debian's redis-server)"
    return None


def _free_base_port(count: int) -> int:
    """A base port with ``count`` ports and their cluster bus ports (+10000) free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count + 10000 > 65535:
            continue
        if all(_port_free(p) and _port_free(p + 10000) for p in range(base, base + count)):
            return base
    raise ClusterError("no free range of ports found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class LocalCluster:
    """A local cluster; see the module docstring.  Use as a context manager, or call
    ``start`` and ``stop`` (``stop`` is safe to call twice and after a failed start)."""

    dir: str = ""
    masters: int = 3
    replicas: int = 1
    base_port: int = 0
    maxmemory: int = 256 << 20
    user: str = ""
    password: str = ""
    tls: bool = False
    pids: dict[int, int] = field(default_factory=dict)
    owns_dir: bool = False

    def __post_init__(self) -> None:
        # The processes this object started (not saved: another process only has the pids).
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- what the cluster is -------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return list(range(self.base_port, self.base_port + self.masters * (1 + self.replicas)))

    @property
    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    @property
    def password_file(self) -> str:
        return os.path.join(self.dir, "password") if self.password else ""

    @property
    def tls_dir(self) -> str:
        return os.path.join(self.dir, "tls")

    def tls_files(self) -> dict[str, str]:
        """The client's files: ``tls_ca``, ``tls_cert``, ``tls_key`` ({} without TLS)."""
        if not self.tls:
            return {}
        d = self.tls_dir
        return {"tls_ca": os.path.join(d, "ca.crt"), "tls_cert": os.path.join(d, "client.crt"),
                "tls_key": os.path.join(d, "client.key")}

    def node_dir(self, port: int) -> str:
        return os.path.join(self.dir, str(port))

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        why = redis_server_missing()
        if why:
            raise ClusterError(why)
        if not self.dir:
            self.dir = tempfile.mkdtemp(prefix="swapfs-redis-")
            self.owns_dir = True
        else:
            if os.path.exists(os.path.join(self.dir, STATE_FILE)):
                raise ClusterError(f"{self.dir} already holds a cluster (stop it first)")
            self.owns_dir = not os.path.exists(self.dir)
            os.makedirs(self.dir, exist_ok=True)
        n = self.masters * (1 + self.replicas)
        if self.base_port == 0:
            self.base_port = _free_base_port(n)
        try:
            if self.password and self.password_file:
                with open(os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                  0o600), "w") as f:
                    f.write(self.password + "\n")
            if self.tls:
                self._make_certs()
            for port in self.ports:
                self._start_node(port)
            self._save()
            deadline = time.monotonic() + timeout
            for port in self.ports:
                self._wait_ping(port, deadline)
            self._create()
            self.wait_ok(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise

    def _config(self, port: int) -> str:
        lines = [
            f"port {0 if self.tls else port}",
            "bind 127.0.0.1",
            "protected-mode no",
            "daemonize no",
            f"dir {self.node_dir(port)}",
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {NODE_TIMEOUT_MS}",
            "cluster-require-full-coverage no",
            "cluster-allow-reads-when-down yes",
            "cluster-replica-validity-factor 0",
            f"maxmemory {self.maxmemory}",
            "maxmemory-policy noeviction",
            'save ""',
            "appendonly no",
            "repl-diskless-sync-delay 0",
            "logfile redis.log",
            "loglevel notice",
        ]
        if self.password:
            # The default user stays for the cluster's own traffic and redis-cli here; the
            # tier's user is limited to what a tier does.
            lines += [f"masterauth {self.password}", f"masteruser {self.user or 'default'}"]
            if self.user:
                lines.append(f"user {self.user} on >{self.password} ~* &* +@all")
                lines.append(f"user default on >{self.password} ~* &* +@all")
            else:
                lines.append(f"requirepass {self.password}")
        if self.tls:
            d = self.tls_dir
            lines += [f"tls-port {port}", f"tls-cert-file {d}/server.crt",
                      f"tls-key-file {d}/server.key", f"tls-ca-cert-file {d}/ca.crt",
                      "tls-cluster yes", "tls-replication yes", "tls-auth-clients optional"]
        return "\n".join(lines) + "\n"

    def _start_node(self, port: int) -> None:
        d = self.node_dir(port)
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, "redis.conf")
        with open(conf, "w") as f:
            f.write(self._config(port))
        # Own session: a Ctrl-C to the test run does not reach the nodes before stop() does.
        p = subprocess.Popen([REDIS_SERVER, conf], cwd=d, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.pids[port] = p.pid
        self._procs[p.pid] = p

    def restart(self, port: int, timeout: float = 20.0) -> None:
        """Start a node that was killed again, from its directory (it rejoins with its
        nodes.conf)."""
        self._start_node(port)
        self._save()
        self._wait_ping(port, time.monotonic() + timeout)

    def _save(self) -> None:
        state = asdict(self)
        state["pids"] = {str(k): v for k, v in self.pids.items()}
        tmp = os.path.join(self.dir, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, os.path.join(self.dir, STATE_FILE))

    @classmethod
    def load(cls, dir: str) -> LocalCluster:
        """The cluster a directory holds (started by ``start``, maybe in another process)."""
        try:
            with open(os.path.join(dir, STATE_FILE)) as f:
                state = json.load(f)
        except FileNotFoundError:
            raise ClusterError(f"{dir} holds no cluster ({STATE_FILE} missing)") from None
        state["pids"] = {int(k): v for k, v in state["pids"].items()}
        return cls(**state)

    def stop(self, grace: float = 3.0) -> None:
        """Stop every node started here and remove the directory if it was ours.  Safe to
        call twice."""
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for pid in list(self.pids.values()):
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._reap(pid)
        self.pids = {}
        if self.dir and os.path.isdir(self.dir):
            if self.owns_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, STATE_FILE))

    # -- talking to nodes --------------------------------------------------------------------------

    def cli(self, port: int, *args: str, timeout: float = 10.0, check: bool = True) -> str:
        """``redis-cli`` against one node; its output (stripped)."""
        cmd = [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port)]
        if self.password:
            cmd += ["--user", self.user or "default", "--pass", self.password, "--no-auth-warning"]
        if self.tls:
            f = self.tls_files()
            cmd += ["--tls", "--cacert", f["tls_ca"], "--cert", f["tls_cert"], "--key", f["tls_key"]]
        try:
            r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"redis-cli on port {port} timed out: {' '.join(args)}") from None
        if check and (r.returncode != 0 or r.stdout.startswith(("ERR", "(error)"))):
            raise ClusterError(f"redis-cli on port {port} {' '.join(args)}: "
                               f"{(r.stdout + r.stderr).strip()}")
        return r.stdout.strip()

    def _wait_ping(self, port: int, deadline: float) -> None:
        while True:
            pid = self.pids.get(port)
            if pid is not None and not _alive(pid):
                raise ClusterError(f"redis-server on port {port} exited: see "
                                   f"{self.node_dir(port)}/redis.log")
            try:
                if self.cli(port, "PING", timeout=2, check=False) == "PONG":
                    return
            except ClusterError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"redis-server on port {port} does not answer")
            time.sleep(0.05)

    def _create(self) -> None:
        args = ["--cluster", "create", *self.seeds, "--cluster-replicas", str(self.replicas),
                "--cluster-yes"]
        self.cli(self.ports[0], *args, timeout=60)

    def info(self, port: int, section: str = "") -> dict[str, str]:
        out = self.cli(port, "CLUSTER", "INFO") if section == "cluster" else \
            self.cli(port, "INFO", *([section] if section else []))
        info: dict[str, str] = {}
        for line in out.splitlines():
            k, sep, v = line.strip().partition(":")
            if sep:
                info[k] = v
        return info

    def wait_ok(self, timeout: float = 30.0, ports: list[int] | None = None) -> None:
        """Until every live node listed (all by default) says cluster_state:ok and knows
        every master's replicas."""
        deadline = time.monotonic() + timeout
        ports = ports if ports is not None else self.ports
        want = self.masters * (1 + self.replicas)
        last = ""
        while True:
            try:
                ok = True
                for p in ports:
                    ci = self.info(p, "cluster")
                    if ci.get("cluster_state") != "ok" or int(ci.get("cluster_known_nodes", 0)) < want:
                        ok = False
                        last = f"port {p}: {ci.get('cluster_state')}, " \
                               f"{ci.get('cluster_known_nodes')} nodes known"
                        break
                if ok and self.replicas:
                    # Every node's CLUSTER SLOTS lists every replica (a replica is listed
                    # once it has synced and the others heard of it).
                    for p in ports:
                        out = self.cli(p, "CLUSTER", "SLOTS").split()
                        known = sum(1 for w in out if len(w) == 40) - self.masters
                        if known < self.masters * self.replicas:
                            ok = False
                            last = f"port {p}: {known} replicas known"
                            break
                if ok:
                    return
            except ClusterError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster not ok within {timeout:.0f} s: {last}")
            time.sleep(0.1)

    def role(self, port: int) -> str:
        return self.info(port, "replication").get("role", "")

    def master_ports(self) -> list[int]:
        return [p for p in self.ports if self.pids.get(p) and _alive(self.pids[p])
                and self.role(p) == "master"]

    def node_id(self, port: int) -> str:
        return self.cli(port, "CLUSTER", "MYID")

    def port_of_slot(self, slot: int, via: int | None = None) -> int:
        """The port of the master serving ``slot``, as node ``via`` sees it."""
        via = via if via is not None else self.master_ports()[0]
        for line in self.cli(via, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for r in parts[8:]:
                if r.startswith("["):
                    continue
                lo, _, hi = r.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return int(parts[1].split(":")[1].split("@")[0])
        raise ClusterError(f"no master serves slot {slot}")

    def memory_used(self) -> int:
        """Bytes of ``used_memory`` summed over the live masters."""
        return sum(int(self.info(p, "memory")["used_memory"]) for p in self.master_ports())

    def flushall(self) -> None:
        for p in self.master_ports():
            self.cli(p, "FLUSHALL")

    # -- failures ----------------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        pid = self.pids.pop(port)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._reap(pid)
        self._save()

    def freeze(self, port: int) -> None:
        os.kill(self.pids[port], signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        os.kill(self.pids[port], signal.SIGCONT)

    def _reap(self, pid: int) -> None:
        """Wait for a killed node: a child of ours is reaped, another process's is waited for
        until /proc says it is gone."""
        proc = self._procs.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            return
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def status(self) -> list[dict[str, object]]:
        """One record per node: port, pid, alive, role, cluster_state (or the error)."""
        out: list[dict[str, object]] = []
        for port in self.ports:
            pid = self.pids.get(port)
            rec: dict[str, object] = {"port": port, "pid": pid,
                                      "alive": bool(pid and _alive(pid))}
            if rec["alive"]:
                try:
                    rec["role"] = self.role(port)
                    rec["cluster_state"] = self.info(port, "cluster").get("cluster_state", "")
                except ClusterError as e:
                    rec["error"] = str(e)
            out.append(rec)
        return out

    # -- TLS -----------------------------------------------------------------------------------

    def _make_certs(self) -> None:
        d = self.tls_dir
        os.makedirs(d, exist_ok=True)

        def ssl(*args: str) -> None:
            r = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True)
            if r.returncode != 0:
                raise ClusterError(f"openssl {args[0]}: {r.stderr.strip()}")

        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=swapfs test CA", "-keyout", "ca.key", "-out", "ca.crt")
        with open(os.path.join(d, "san.cnf"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        for who in ("server", "client"):
            ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=swapfs test {who}",
                "-keyout", f"{who}.key", "-out", f"{who}.csr")
            ssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", f"{who}.crt")


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False




@contextlib.contextmanager
def local_cluster(**kw: object) -> Iterator[LocalCluster]:
    """A started cluster, always stopped."""
    c = LocalCluster(**kw)  # type: ignore[arg-type]
    c.start()
    try:
        yield c
    finally:
        c.stop()
