"""Reference peer: the ``websockets`` library with ``broadcast()``, the Python standard."""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve

from ._protocol import fanout_call, message, raise_fd_limit, rpc_response, user_draws

connections: dict[str, set[ServerConnection]] = defaultdict(set)
everyone: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    assert ws.request is not None
    user = ws.request.path.partition("token=")[2] or "anonymous"
    connections[user].add(ws)
    everyone.add(ws)
    try:
        await ws.send(orjson.dumps({"type": "event", "payload": {"topic": "hello"}}).decode())
        async for raw in ws:
            request = orjson.loads(raw)
            # rpc_fanout: broadcast() to every connection of the listed users
            # (no await, no backpressure, as for the other scenarios), then answer.
            call = fanout_call(request)
            if call is not None:
                users, push = call
                broadcast([peer for user in users for peer in connections.get(user, ())], push)
            await ws.send(orjson.dumps(rpc_response(request)).decode())
    finally:
        everyone.discard(ws)
        connections[user].discard(ws)
        if not connections[user]:
            del connections[user]


async def run_command(command: dict[str, Any]) -> None:
    if command["op"] == "fanout":
        loop = asyncio.get_running_loop()
        start, rate = loop.time(), command.get("rate")
        for seq in range(command["count"]):
            if rate:
                await asyncio.sleep(max(0.0, start + seq / rate - loop.time()))
            broadcast(everyone, message(seq, command["size"]).decode())
    elif command["op"] == "to_users":
        draws = user_draws(command["calls"], command["per_call"], command["users"], command["seed"])
        for seq, users in enumerate(draws):
            targets = [ws for user in users for ws in connections.get(user, ())]
            broadcast(targets, message(seq, command["size"]).decode())


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # Defaults as shipped (keepalive pings every 20 s), as a user would run it.
    async with serve(handler, "127.0.0.1", port, max_queue=16) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(orjson.dumps({"port": bound}).decode(), flush=True)
        while line := await reader.readline():
            command = orjson.loads(line)
            if command["op"] == "quit":
                return
            await run_command(command)
            print(orjson.dumps({"ok": True}).decode(), flush=True)


if __name__ == "__main__":
    raise_fd_limit()
    asyncio.run(main(int(sys.argv[1])))
