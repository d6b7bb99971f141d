"""The trio_gw hub under test.

``python -m benchmarks.server_hub PORT [--writer fast|portable] [--engine wsproto|trio-websocket]``

With ``--backplane-url URL --node-id ID`` it is one node of a cluster (a
``RedisBackplane``); it reports its port once the backplane is subscribed, and
the ``settle`` command waits until its subscriptions are confirmed again.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import orjson
import trio

import trio_gw
from trio_gw import HubConfig, Session

from ._protocol import fanout_call, message, raise_fd_limit, rpc_response, user_draws

_GC = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}
_gc_started = [0.0]
_gc_forced = [False]


def _gc_timer(phase: str, info: dict[str, Any]) -> None:
    # Full collections cost ~100 ms with thousands of sessions: reported, so
    # that a run's CPU can be told apart from its collector's.
    if _gc_forced[0]:
        return  # the settle command's own collection, outside any measured window
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        generation = info["generation"]
        _GC["collections"][generation] += 1
        _GC["seconds"][generation] += time.perf_counter() - _gc_started[0]


gc.callbacks.append(_gc_timer)


async def settle(backplane: Any) -> None:
    """Wait until a backplane (if any) is up with every subscription confirmed."""
    # Polling: the backplane offers no event for it, and this is the harness's side.
    while backplane is not None and not backplane.in_sync:  # noqa: ASYNC110
        await trio.sleep(0.01)


async def warm_up(hub: trio_gw.HandlerManager) -> None:
    """One message to every session, written: each session then has its writer.

    A session makes its outbound queue and writer task when a frame first has
    to wait for the socket, and keeps them; without this, a run's first burst
    would pay that once-per-session set-up (and the collection the new
    objects bring on) as if it were the cost of its deliveries.
    """
    before = hub.statistics()
    await hub.send_message_to_all({"warmup": True})
    # Polling: the writers report no event; bounded by the harness's timeout.
    while hub.statistics().messages_out < before.messages_out + before.connections:  # noqa: ASYNC110
        await trio.sleep(0.01)


async def control(hub: trio_gw.HandlerManager, backplane: Any = None) -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    while True:
        chunk = await stdin.receive_some()
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            command = orjson.loads(line)
            op = command["op"]
            if op == "quit":
                return
            if op == "fanout":
                start, rate = trio.current_time(), command.get("rate")
                for seq in range(command["count"]):
                    if rate:
                        await trio.sleep_until(start + seq / rate)
                    await hub.send_message_to_all(message(seq, command["size"]).decode())
            elif op == "settle":
                if command.get("warm"):
                    await warm_up(hub)
                await settle(backplane)
                _gc_forced[0] = True
                try:
                    gc.collect()
                finally:
                    _gc_forced[0] = False
            elif op == "to_users":
                draws = user_draws(
                    command["calls"], command["per_call"], command["users"], command["seed"]
                )
                for seq, users in enumerate(draws):
                    await hub.send_message_to_user_ids(
                        users, message(seq, command["size"]).decode()
                    )
            stats = hub.statistics()
            reply = {
                "ok": True,
                "drops": stats.drops,
                "slow_closes": stats.slow_consumer_closes,
                "in": stats.messages_in,
                "out": stats.messages_out,
                "connections": stats.connections,
                "gc": {
                    "collections": list(_GC["collections"]),
                    "seconds": [round(t, 4) for t in _GC["seconds"]],
                },
            }
            if backplane is not None:
                b = backplane.statistics()
                reply["backplane"] = {
                    "published": b.published,
                    "publish_batches": b.publish_batches,
                    "publish_drops": b.publish_drops,
                    "received": b.received,
                    "receive_drops": b.receive_drops,
                }
            sys.stdout.write(orjson.dumps(reply).decode() + "\n")
            sys.stdout.flush()


async def main(
    port: int, writer: str, engine: str | None, backplane_url: str | None, node_id: str
) -> None:
    hub: trio_gw.HandlerManager

    async def on_message(reply: Any, handler: Session, decoded: Any) -> None:
        # rpc_fanout: one send to every session of the listed users, then the answer.
        call = fanout_call(decoded)
        if call is not None:
            users, push = call
            await hub.send_message_to_user_ids(users, push)
        await reply(handler, rpc_response(decoded))

    # Without --engine the hub's default is used (an older checkout measured
    # with --baseline has no engine setting).
    extra: dict[str, Any] = {} if engine is None else {"engine": engine}
    config = HubConfig(
        port=port,
        writer=writer,
        max_connections=20_000,
        handshake_timeout=60,
        hub_queue_size=8192,
        **extra,
    )
    backplane = None if backplane_url is None else trio_gw.RedisBackplane(backplane_url, node_id)
    async with (
        trio_gw.open_hub(
            "bench",
            node_id,
            on_message,
            config=config,
            authorizer=trio_gw.dev_authorizer,
            backplane=backplane,
        ) as hub,
        trio.open_nursery() as nursery,
    ):
        bound = await nursery.start(trio_gw.serve_hub, hub)
        with trio.fail_after(30):
            await settle(backplane)
        sys.stdout.write(orjson.dumps({"port": bound}).decode() + "\n")
        sys.stdout.flush()
        await control(hub, backplane)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--writer", default="fast", choices=["fast", "portable"])
    parser.add_argument("--engine", default=None, choices=["wsproto", "trio-websocket"])
    parser.add_argument("--backplane-url", help="a node of a cluster on this Redis/Valkey")
    parser.add_argument("--node-id", default="bench", help="this node's id")
    args = parser.parse_args()
    raise_fd_limit()
    run_args = (args.port, args.writer, args.engine, args.backplane_url, args.node_id)
    profile = os.environ.get("TRIO_GW_BENCH_PROFILE")
    if profile:
        # Profile the server: TRIO_GW_BENCH_PROFILE=out.prof python -m benchmarks ...
        import cProfile

        cProfile.run("trio.run(main, *run_args)", profile)
    else:
        trio.run(main, *run_args)
