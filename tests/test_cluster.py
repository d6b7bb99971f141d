"""A cluster of real ``trio-gw serve`` processes over a real Valkey server.

Rules: three (or two) gateway processes in dev mode on 127.0.0.1, one
``valkey-server`` (``tests/_valkey.py``); no mocks. Every test runs under
``trio.fail_after``; waits poll the admin API for a state, never for a time.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests._gateway_support import GatewayProcess, gateway_process
from tests._valkey import ValkeyServer, free_port
from tests.conftest import client, receive_json

# Three processes start and stop here; generous against hangs on a loaded machine.
TIMEOUT = 60

pytestmark = pytest.mark.slow


def node_env(url: str, node_id: str, **more: str) -> dict[str, str]:
    return {
        "TRIO_GW_BACKPLANE_URL": url,
        "TRIO_GW_BACKPLANE_NODE_ID": node_id,
        "TRIO_GW_BACKPLANE_PRESENCE_INTERVAL": "0.2",
        "TRIO_GW_BACKPLANE_PRESENCE_TTL": "1.5",
        "TRIO_GW_BACKPLANE_RECONNECT_MAX": "0.2",
        **more,
    }


@asynccontextmanager
async def cluster(
    url: str, count: int = 3, *args: str, **env: str
) -> AsyncIterator[list[GatewayProcess]]:
    """``count`` nodes n1..nN on ``url``, each ready (backplane up)."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                gateway_process(*args, env=node_env(url, f"n{i + 1}", **env))
            )
            for i in range(count)
        ]
        for node in nodes:
            await until(lambda node=node: ready(node))
        yield nodes


async def until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``predicate`` (under the caller's fail_after)."""
    # Polling: the state lives in other processes, reachable only through their APIs.
    while not await predicate():  # noqa: ASYNC110
        await trio.sleep(0.05)


async def get(node: GatewayProcess, path: str) -> httpx.Response:
    async with node.admin(key=None) as admin:
        return await admin.get(path)


async def post(node: GatewayProcess, path: str, body: dict[str, Any]) -> Any:
    async with node.admin(key=None) as admin:
        response = await admin.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def ready(node: GatewayProcess) -> bool:
    return (await get(node, "/readyz")).status_code == 200


async def settled(node: GatewayProcess) -> bool:
    """Backplane up and every channel the node needs confirmed by the server."""
    backplane = (await get(node, "/api/statistics")).json()["backplane"]
    return bool(
        backplane["state"] == "up"
        and backplane["subscriptions"] == backplane["wanted_subscriptions"]
    )


async def users_seen_by(node: GatewayProcess) -> dict[str, dict[str, int]]:
    page = (await get(node, "/api/users")).json()
    return {item["user_id"]: item["nodes"] for item in page["items"]}


async def test_three_nodes_act_as_one(valkey: ValkeyServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            cluster(valkey.url) as (n1, n2, n3),
            client(n1.ws_url, "alice") as (alice1, _),
            client(n3.ws_url, "alice") as (alice3, _),
            client(n2.ws_url, "bob") as (bob2, _),
            client(n3.ws_url, "carol") as (carol3, hello_carol),
        ):
            expected = {"alice": {"n1": 1, "n3": 1}, "bob": {"n2": 1}, "carol": {"n3": 1}}
            for node in (n1, n2, n3):
                await until(lambda node=node: settled(node))
                await until(lambda node=node: _equals(users_seen_by(node), expected))

            # Presence, cluster-wide, from any node.
            sessions = (await get(n2, "/api/users/alice/sessions")).json()
            assert sessions["sessions"] == 2 and sessions["nodes"] == {"n1": 1, "n3": 1}
            assert sessions["items"] == [] and sessions["complete"]
            statistics = (await get(n1, "/api/statistics")).json()
            assert statistics["cluster"]["connections"] == 4
            assert statistics["cluster"]["users"] == 3
            assert statistics["cluster"]["nodes"] == {
                "n1": {"sessions": 1, "users": 1},
                "n2": {"sessions": 1, "users": 1},
                "n3": {"sessions": 2, "users": 2},
            }

            # Every admin call, made on a node that holds none of its recipients.
            reply = await post(n2, "/api/send/users", {"user_ids": ["alice"], "message": "hi"})
            assert reply == {"sessions": 2}
            assert await alice1.get_message() == "hi"
            assert await alice3.get_message() == "hi"
            session_id = hello_carol["session_id"]
            assert session_id.startswith("n3:")
            reply = await post(n1, "/api/send/session", {"session_id": session_id, "message": 1})
            assert reply == {"sessions": 1}
            assert await receive_json(carol3) == 1
            assert await post(n1, "/api/send/all", {"message": {"all": 1}}) == {"sessions": 4}
            for ws in (alice1, alice3, bob2, carol3):
                assert await receive_json(ws) == {"all": 1}
            # A session id naming no live node is unknown.
            async with n1.admin(key=None) as admin:
                missing = await admin.post(
                    "/api/send/session", json={"session_id": "n9:nope", "message": 1}
                )
            assert missing.status_code == 404

            await post(n1, "/api/close/session", {"session_id": session_id, "code": 4000})
            await until(
                lambda: _equals(
                    users_seen_by(n1), {k: v for k, v in expected.items() if k != "carol"}
                )
            )
            assert await post(n3, "/api/close/users", {"user_ids": ["bob"]}) == {"sessions": 1}
            await until(lambda: _equals(users_seen_by(n1), {"alice": {"n1": 1, "n3": 1}}))
            assert await post(n2, "/api/close/all", {}) == {"sessions": 2}
            for node in (n1, n2, n3):
                await until(lambda node=node: _equals(users_seen_by(node), {}))
            # Nothing was dropped on the way.
            for node in (n1, n2, n3):
                backplane = (await get(node, "/api/statistics")).json()["backplane"]
                assert backplane["publish_drops"] == 0 and backplane["receive_drops"] == 0


async def test_a_killed_node_leaves_presence(valkey: ValkeyServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with cluster(valkey.url, 1) as (n1,):
            async with gateway_process(env=node_env(valkey.url, "n2"), stop=False) as n2:
                async with client(n2.ws_url, "dave"):
                    await until(lambda: _equals(users_seen_by(n1), {"dave": {"n2": 1}}))
                    n2.process.send_signal(signal.SIGKILL)
                    await n2.process.wait()
                    # Within presence_ttl (1.5 s here) of its last heartbeat.
                    await until(lambda: _equals(users_seen_by(n1), {}))
            statistics = (await get(n1, "/api/statistics")).json()
            assert statistics["cluster"]["nodes"] == {"n1": {"sessions": 0, "users": 0}}
            assert valkey.command("SMEMBERS", "trio-gw:nodes") == [b"n1"]


async def test_redis_killed_and_restarted(valkey: ValkeyServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            cluster(valkey.url, 2) as (n1, n2),
            client(n1.ws_url, "erin") as (erin1, _),
            client(n2.ws_url, "erin") as (erin2, _),
        ):
            await until(lambda: settled(n1))
            await until(lambda: settled(n2))
            valkey.kill()
            for node in (n1, n2):
                await until(lambda node=node: _not(ready(node)))
            response = await get(n1, "/readyz")
            assert response.status_code == 503 and "backplane" in response.json()["reason"]
            assert "trio_gw_backplane_up 0.0" in (await get(n1, "/metrics")).text
            # Local delivery carries on; the other node's copy is a counted drop.
            assert await post(n1, "/api/send/users", {"user_ids": ["erin"], "message": "x"}) == {
                "sessions": 1
            }
            assert await erin1.get_message() == "x"
            users = (await get(n1, "/api/users")).json()
            assert users["complete"] is False

            valkey.start()
            for node in (n1, n2):
                await until(lambda node=node: ready(node))
                await until(lambda node=node: settled(node))
            await post(n1, "/api/send/users", {"user_ids": ["erin"], "message": "after"})
            assert await erin1.get_message() == "after"
            assert await erin2.get_message() == "after"

            # Both nodes listen to the broadcast channel again, as n1 counts them.
            async def both_counted() -> bool:
                metrics = (await get(n1, "/metrics")).text
                return "trio_gw_backplane_listening_nodes 2.0" in metrics

            await until(both_counted)
            metrics = (await get(n1, "/metrics")).text
            assert "trio_gw_backplane_up 1.0" in metrics
            assert "trio_gw_backplane_reconnects_total 1.0" in metrics
            assert "trio_gw_backplane_publish_drops_total 1.0" in metrics
            assert any("reconnected" in line and "outage" in line for line in n1.log), (
                "the outage window is logged"
            )
            # Nothing leaks: each node holds one subscriber connection again.
            clients = str(valkey.command("CLIENT", "LIST"))
            assert clients.count("cmd=subscribe") + clients.count("cmd=ping") <= 2 * 2


async def test_nodes_share_one_port_with_reuse_port(valkey: ValkeyServer) -> None:
    port = free_port()
    with trio.fail_after(TIMEOUT):
        async with cluster(valkey.url, 2, "--port", str(port), TRIO_GW_REUSE_PORT="true") as (
            n1,
            n2,
        ):
            assert n1.ws_url == n2.ws_url == f"ws://127.0.0.1:{port}"
            async with client(n1.ws_url, "fred") as (fred, hello):
                node = hello["session_id"].partition(":")[0]
                other = n2 if node == "n1" else n1
                await until(lambda: settled(other))
                await until(lambda: _equals(users_seen_by(other), {"fred": {node: 1}}))
                await post(other, "/api/send/users", {"user_ids": ["fred"], "message": "shared"})
                assert await fred.get_message() == "shared"


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


def test_the_cluster_example_runs_as_the_readme_shows() -> None:
    """examples/cluster/run.py, run as the README's "Running a cluster" shows it."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"```console\n\$ (python examples/cluster/run.py)\n(.*?)```", readme, re.S)
    assert block, "README lost its cluster example"
    command, printed = block.group(1), block.group(2)
    result = subprocess.run(
        [sys.executable, *command.split()[1:]],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    def nodes_unnamed(text: str) -> str:
        # The kernel picks the node that takes the client; the rest follows from it.
        return re.sub(r"\bn[123]\b", "n?", text)

    assert nodes_unnamed(result.stdout) == nodes_unnamed(printed)
