"""The remote tier's client against real clusters (swapfs.testing.redis): routing, redirections
while a slot moves, credentials and TLS, a full node, a frozen master, a killed master with a
replica, a cluster stopped entirely.  Each failure test bounds how long the failure takes to
show."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import trio

from swapfs.testing.redis import LocalCluster, redis_server_missing
from swapfs.tiers.remote.client import (
    Cluster,
    RemoteAuthError,
    RemoteError,
    RemoteFull,
    RemoteTimeout,
    RemoteUnavailable,
    encode,
    key_slot,
    retrying,
    ssl_context,
)

pytestmark = pytest.mark.timeout(120)


def test_key_slot_matches_the_cluster_spec() -> None:
    # The cluster specification's examples: CRC16("123456789") = 0x31C3, and hash tags.
    assert key_slot(b"123456789") == 0x31C3 % 16384
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # empty tag: the whole key
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")
    assert key_slot(b"foo{bar}{zap}") == key_slot(b"bar")


def test_a_reload_counts_the_slots_served_by_another_master() -> None:
    """CLUSTER SLOTS replies loaded one after the other: a replica promoted in a master's
    place takes its index in the node list; the slots are counted as served elsewhere."""
    def node(port: int) -> list[object]:
        return [b"127.0.0.1", port, b"%040d" % port]

    c = Cluster(["127.0.0.1:7000"])
    before = [[0, 5460, node(7000), node(7003)], [5461, 10922, node(7001), node(7004)],
              [10923, 16383, node(7002), node(7005)]]
    c.load_slots(before, "127.0.0.1:7000")
    assert c.node_of(6000) == "127.0.0.1:7001" and c.stats.slot_changes == 0
    c.load_slots(before, "127.0.0.1:7000")
    assert c.stats.slot_changes == 0
    after = [before[0], [5461, 10922, node(7004)], before[2]]  # 7001 lost, 7004 promoted
    c.load_slots(after, "127.0.0.1:7000")
    assert c.node_of(6000) == "127.0.0.1:7004" and c.replicas[1] == 0
    assert c.stats.slot_changes == 10922 - 5461 + 1
    assert c.stats.refreshes == 3 and not c.stale


async def test_routing_and_pipelines_over_every_node(redis_cluster: LocalCluster) -> None:
    c = Cluster(redis_cluster.seeds[:1], timeout=2.0)
    try:
        keys = [b"t:route:%d" % i for i in range(200)]
        values = [os.urandom(100 + i) for i in range(200)]
        replies = await c.pipeline([(k, encode("SET", k, v)) for k, v in zip(keys, values)])
        assert replies == [b"OK"] * 200
        assert len({c.node_of(key_slot(k)) for k in keys}) == 3
        got = await c.pipeline([(k, encode("GET", k)) for k in keys])
        assert got == values
        assert await c.execute(keys[7], "GETRANGE", keys[7], 3, 9) == values[7][3:10]
        # Many tasks on the same connections at once: every reply reaches its caller.
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            results[i] = await c.execute(keys[i], "GET", keys[i])

        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(one, i)
        assert [results[i] for i in range(200)] == values
        # WAIT with the replicas each master has.
        r = await c.pipeline([(keys[0], encode("SET", keys[0], b"x"))], wait_replicas=1,
                             wait_ms=2000)
        assert r == [b"OK"]
        stats = c.sync_stats()
        assert stats.requests > 0 and stats.sent_bytes > sum(map(len, values))
    finally:
        await c.aclose()


def _move_slot(cluster: LocalCluster, slot: int, src: int, dst: int, *, finish: bool) -> None:
    """CLUSTER SETSLOT's migration of ``slot`` from port ``src`` to ``dst``: its keys moved
    with MIGRATE; with ``finish``, the slot assigned to ``dst`` everywhere (else it stays
    MIGRATING/IMPORTING: the ASK state)."""
    src_id, dst_id = cluster.node_id(src), cluster.node_id(dst)
    cluster.cli(dst, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
    cluster.cli(src, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
    while True:
        keys = cluster.cli(src, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
        if not keys:
            break
        args = ["MIGRATE", "127.0.0.1", str(dst), "", "0", "5000"]
        if cluster.password:
            args += ["AUTH2", cluster.user or "default", cluster.password]
        cluster.cli(src, *args, "KEYS", *keys)
    if finish:
        for p in cluster.master_ports():
            cluster.cli(p, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)


async def test_moved_and_ask_are_followed(redis_cluster: LocalCluster) -> None:
    key = b"t:{moving}:a"
    slot = key_slot(key)
    c = Cluster(redis_cluster.seeds, timeout=2.0)
    try:
        await c.execute(key, "SET", key, b"before")
        src = redis_cluster.port_of_slot(slot)
        dst = next(p for p in redis_cluster.master_ports() if p != src)
        # ASK: the slot is migrating and the key already moved.
        _move_slot(redis_cluster, slot, src, dst, finish=False)
        assert c.node_of(slot) == f"127.0.0.1:{src}"
        assert await c.execute(key, "GET", key) == b"before"
        assert c.stats.redirects == 1
        assert c.node_of(slot) == f"127.0.0.1:{src}"  # ASK does not change the map
        # MOVED: the migration done, the client's map is stale; it learns the new owner.
        for p in redis_cluster.master_ports():
            redis_cluster.cli(p, "CLUSTER", "SETSLOT", str(slot), "NODE",
                              redis_cluster.node_id(dst))
        assert await c.execute(key, "GET", key) == b"before"
        assert c.stats.redirects == 2
        assert c.node_of(slot) == f"127.0.0.1:{dst}"
        assert await c.pipeline([(key, encode("SET", key, b"after"))]) == [b"OK"]
        assert c.stats.redirects == 2
    finally:
        await c.aclose()
        # Give the slot back so the session's cluster stays as it was.
        _move_slot(redis_cluster, slot, dst, src, finish=True)


async def test_watch_learns_a_moved_slot_without_a_request(redis_cluster: LocalCluster) -> None:
    """The slot map follows the cluster off the request path: a slot given to another master
    is learnt by the periodic reload, before any request meets a MOVED."""
    key = b"t:{watched}:a"
    slot = key_slot(key)
    c = Cluster(redis_cluster.seeds, timeout=2.0)
    src = redis_cluster.port_of_slot(slot)
    dst = next(p for p in redis_cluster.master_ports() if p != src)
    moved = False
    try:
        await c.execute(key, "SET", key, b"v")
        refreshes = c.stats.refreshes
        assert c.node_of(slot) == f"127.0.0.1:{src}"
        async with trio.open_nursery() as n:
            n.start_soon(c.watch, 0.1)
            moved = True
            _move_slot(redis_cluster, slot, src, dst, finish=True)
            with trio.fail_after(10):
                while c.node_of(slot) != f"127.0.0.1:{dst}":
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
        assert c.stats.redirects == 0 and c.stats.refreshes > refreshes
        assert c.stats.slot_changes >= 1
        assert await c.execute(key, "GET", key) == b"v"
        assert c.stats.redirects == 0
    finally:
        await c.aclose()
        if moved:
            _move_slot(redis_cluster, slot, dst, src, finish=True)


async def test_a_closed_client_stops_watching(redis_cluster: LocalCluster) -> None:
    c = Cluster(redis_cluster.seeds, timeout=2.0)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(c.watch, 0.05)
            await trio.sleep(0.3)
            c.close_now()
    assert c.stats.refreshes >= 1


@pytest.fixture(scope="module")
def secure_cluster() -> Iterator[LocalCluster]:
    """3 masters, no replicas, TLS only, an ACL user with a password; small maxmemory."""
    why = redis_server_missing()
    if why:
        pytest.skip(why)
    with LocalCluster(masters=3, replicas=0, user="swapfs", password="s3cret-pass",
                      tls=True, maxmemory=8 << 20) as cluster:
        yield cluster


async def test_tls_and_acl_user(secure_cluster: LocalCluster) -> None:
    f = secure_cluster.tls_files()
    tls = ssl_context(f["tls_ca"], f["tls_cert"], f["tls_key"])
    c = Cluster(secure_cluster.seeds, user="swapfs", password="s3cret-pass", tls=tls,
                timeout=2.0)
    try:
        assert await c.execute(b"t:tls", "SET", b"t:tls", b"v") == b"OK"
        assert await c.execute(b"t:tls", "GET", b"t:tls") == b"v"
    finally:
        await c.aclose()


async def test_wrong_credentials_are_a_clear_error(secure_cluster: LocalCluster) -> None:
    f = secure_cluster.tls_files()
    tls = ssl_context(f["tls_ca"], f["tls_cert"], f["tls_key"])
    for user, password in (("swapfs", "wrong"), ("nobody", "s3cret-pass")):
        c = Cluster(secure_cluster.seeds, user=user, password=password, tls=tls, timeout=2.0)
        t = time.monotonic()
        with pytest.raises(RemoteAuthError, match=f"AUTH as {user} refused") as e:
            await c.execute(b"t:x", "GET", b"t:x")
        assert not e.value.retryable
        assert time.monotonic() - t < 2.0
        await c.aclose()
    # Without TLS, the TLS-only nodes are unreachable: an error, no hang.
    c = Cluster(secure_cluster.seeds, user="swapfs", password="s3cret-pass", timeout=0.5,
                connect_timeout=0.5)
    with trio.fail_after(10):
        with pytest.raises(RemoteError):
            await c.execute(b"t:x", "GET", b"t:x")
    await c.aclose()


async def test_a_full_node_says_full(secure_cluster: LocalCluster) -> None:
    f = secure_cluster.tls_files()
    tls = ssl_context(f["tls_ca"], f["tls_cert"], f["tls_key"])
    c = Cluster(secure_cluster.seeds, user="swapfs", password="s3cret-pass", tls=tls,
                timeout=5.0)
    value = os.urandom((1 << 20) - 64)
    try:
        with pytest.raises(RemoteFull, match="OOM"):
            for i in range(64):
                key = b"t:{full}:%d" % i
                (r,) = await c.pipeline([(key, encode("SET", key, value))])
                if isinstance(r, RemoteError):
                    raise r
        # Full is not a broken connection: reads and deletes go on.
        assert await c.execute(b"t:{full}:0", "GETRANGE", b"t:{full}:0", 0, 3) == value[:4]
        assert await c.execute(b"t:{full}:0", "UNLINK", b"t:{full}:0") == 1
    finally:
        await c.aclose()


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    """A cluster of 3 masters with a replica each, for one test that kills or freezes nodes."""
    why = redis_server_missing()
    if why:
        pytest.skip(why)
    with LocalCluster(masters=3, replicas=1) as cluster:
        yield cluster


@pytest.mark.slow
async def test_frozen_master_then_killed_master(own_cluster: LocalCluster) -> None:
    cluster = own_cluster
    c = Cluster(cluster.seeds, timeout=0.2, connect_timeout=0.5)
    key = b"t:victim"
    try:
        await c.pipeline([(key, encode("SET", key, b"kept"))], wait_replicas=1, wait_ms=2000)
        port = cluster.port_of_slot(key_slot(key))
        # Frozen (SIGSTOP, as a lost machine behaves): each call ends at its deadline.
        cluster.freeze(port)
        try:
            for _ in range(3):
                t = time.monotonic()
                with pytest.raises(RemoteTimeout):
                    await c.execute(key, "GET", key)
                assert time.monotonic() - t < 0.2 + 0.5 + 0.3
        finally:
            cluster.thaw(port)
        assert await retrying(lambda: c.execute(key, "GET", key), 5.0) == b"kept"
        # Killed: its replica is promoted (node timeout 2 s); a retrying read rides it out.
        retries: list[RemoteError] = []
        cluster.kill(port)
        t = time.monotonic()
        got = await retrying(lambda: c.execute(key, "GET", key), 15.0,
                             on_retry=retries.append)
        took = time.monotonic() - t
        assert got == b"kept"
        assert retries and all(e.retryable for e in retries)
        assert took < 10.0, f"failover took {took:.1f} s"
        assert c.node_of(key_slot(key)) != f"127.0.0.1:{port}"
    finally:
        await c.aclose()


@pytest.mark.slow
async def test_a_stopped_cluster_fails_within_the_bound() -> None:
    why = redis_server_missing()
    if why:
        pytest.skip(why)
    with LocalCluster(masters=3, replicas=0) as cluster:
        c = Cluster(cluster.seeds, timeout=0.2, connect_timeout=0.3)
        await c.execute(b"t:a", "SET", b"t:a", b"1")
        cluster.stop()
        t = time.monotonic()
        with pytest.raises((RemoteUnavailable, RemoteTimeout)):
            await retrying(lambda: c.execute(b"t:a", "GET", b"t:a"), 1.0)
        assert time.monotonic() - t < 1.0 + 2.0
        await c.aclose()
