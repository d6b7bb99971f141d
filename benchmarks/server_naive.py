"""Reference peer: the thinnest trio-websocket server, a dict and a ``send_message`` loop."""

from __future__ import annotations

import sys
from collections import defaultdict
from contextlib import suppress
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from ._protocol import fanout_call, message, raise_fd_limit, rpc_response, user_draws

connections: dict[str, set[WebSocketConnection]] = defaultdict(set)
everyone: set[WebSocketConnection] = set()


async def handler(request: WebSocketRequest) -> None:
    user = request.path.partition("token=")[2] or "anonymous"
    ws = await request.accept()
    connections[user].add(ws)
    everyone.add(ws)
    try:
        await ws.send_message(
            orjson.dumps({"type": "event", "payload": {"topic": "hello"}}).decode()
        )
        while True:
            decoded = orjson.loads(await ws.get_message())
            # rpc_fanout: await send_message on every connection of the listed
            # users in turn, then answer.
            call = fanout_call(decoded)
            if call is not None:
                users, push = call
                await send_to([peer for user in users for peer in connections.get(user, ())], push)
            await ws.send_message(orjson.dumps(rpc_response(decoded)).decode())
    except ConnectionClosed:
        pass
    finally:
        everyone.discard(ws)
        connections[user].discard(ws)


async def send_to(targets: list[WebSocketConnection], text: str) -> None:
    for ws in targets:
        with suppress(ConnectionClosed):
            await ws.send_message(text)


async def run_command(command: dict[str, Any]) -> None:
    if command["op"] == "fanout":
        start, rate = trio.current_time(), command.get("rate")
        for seq in range(command["count"]):
            if rate:
                await trio.sleep_until(start + seq / rate)
            await send_to(list(everyone), message(seq, command["size"]).decode())
    elif command["op"] == "to_users":
        draws = user_draws(command["calls"], command["per_call"], command["users"], command["seed"])
        for seq, users in enumerate(draws):
            targets = [ws for user in users for ws in connections.get(user, ())]
            await send_to(targets, message(seq, command["size"]).decode())


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", port, None)
        print(orjson.dumps({"port": server.port}).decode(), flush=True)
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        buffer = b""
        while chunk := await stdin.receive_some():
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = orjson.loads(line)
                if command["op"] == "quit":
                    nursery.cancel_scope.cancel()
                    return
                await run_command(command)
                print(orjson.dumps({"ok": True}).decode(), flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    raise_fd_limit()
    trio.run(main, int(sys.argv[1]))
