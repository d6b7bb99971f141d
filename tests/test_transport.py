"""The fast writer's dependency on trio-websocket internals (trio_gw/_transport.py).

If this file fails after a trio-websocket upgrade, the fast writer's
assumptions no longer hold: read trio_gw/_transport.py before changing the pin.
"""

from __future__ import annotations

import importlib.metadata

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trio_gw._frames import encode_frame
from trio_gw._transport import TESTED_TRIO_WEBSOCKET, FastWriter, fast_writer_supported, make_writer

from .conftest import TIMEOUT, client, running_hub


def test_pinned_version_is_the_tested_one() -> None:
    assert importlib.metadata.version("trio-websocket") == TESTED_TRIO_WEBSOCKET


async def test_internals_are_present_on_a_live_connection() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub() as (hub, url), client(url, "a") as (_, hello):
            session = hub.get_handler(hello["session_id"])
            assert session is not None
            assert fast_writer_supported(session._ws)
            assert isinstance(session._writer, FastWriter)


async def test_falls_back_when_internals_are_missing() -> None:
    class Stripped:
        """Looks like a connection without the internals."""

    assert not fast_writer_supported(Stripped())  # type: ignore[arg-type]
    writer = make_writer(Stripped(), fast=True)  # type: ignore[arg-type]
    assert type(writer).__name__ == "PortableWriter"


async def test_fast_writer_bytes_are_what_wsproto_parses() -> None:
    """Frames built once by encode_frame arrive intact through a real client."""
    messages = ["", "é" * 70000, b"\x00" * 126, b"\xff" * 65536, {"k": [1, 2, 3]}]
    with trio.fail_after(TIMEOUT):
        async with running_hub() as (hub, url):
            async with open_websocket_url(f"{url}/?token=z") as ws:
                await ws.get_message()  # hello
                sid = hub.session_ids()[0]
                for message in messages:
                    await hub.send_message(sid, message)
                got = [await ws.get_message() for _ in messages]
            assert got[:4] == messages[:4]
            assert got[4] == '{"k":[1,2,3]}'
            assert encode_frame("é").wire == b"\x81\x02" + "é".encode()
    assert isinstance(ws, WebSocketConnection)
