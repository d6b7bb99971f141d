"""trio_gw/_transport.py: the trio-websocket internals it relies on, and the upstream bugs.

If this file fails after a trio-websocket or wsproto upgrade, the transport's
assumptions no longer hold: read trio_gw/_transport.py before changing the pin.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request
from wsproto.utilities import LocalProtocolError

from trio_gw._frames import encode_frame
from trio_gw._transport import (
    TESTED_TRIO_WEBSOCKET,
    FastWriter,
    ServerProtocol,
    fast_writer_supported,
    inbound_backlog,
    make_writer,
    server_internals_supported,
)

from .conftest import TIMEOUT, client, running_hub


def test_pinned_version_is_the_tested_one() -> None:
    assert importlib.metadata.version("trio-websocket") == TESTED_TRIO_WEBSOCKET


async def test_internals_are_present_on_a_live_connection() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(engine="trio-websocket") as (hub, url),
            client(url, "a") as (_, hello),
        ):
            session = hub.get_handler(hello["session_id"])
            assert session is not None
            assert fast_writer_supported(session._conn._ws)
            assert isinstance(session._writer, FastWriter)
            assert isinstance(session._conn._ws._recv_channel, trio.MemoryReceiveChannel)
            assert inbound_backlog(session._conn._ws) == 0


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
        async with running_hub(engine="trio-websocket") as (hub, url):
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


# --- the server connection: trio-websocket internals and the upstream bugs ---------
#
# Each test below first shows the bug with wsproto's stock server connection (what
# trio-websocket 0.12.2 uses), then that ServerProtocol answers it. When an upgrade
# fixes a bug upstream, its "stock" half fails here: drop the workaround then.


def test_server_internals_are_present() -> None:
    assert server_internals_supported()


def open_server(protocol: WSConnection) -> WSConnection:
    """Drive ``protocol`` through a real upgrade built by a wsproto client; returns the client."""
    client_side = WSConnection(ConnectionType.CLIENT)
    protocol.receive_data(client_side.send(Request(host="h", target="/")))
    (request,) = protocol.events()
    assert isinstance(request, Request)
    client_side.receive_data(protocol.send(AcceptConnection()))
    assert isinstance(next(client_side.events()), AcceptConnection)
    return client_side


def test_a_ping_after_our_close_frame_is_not_answered() -> None:
    stock, ours = WSConnection(ConnectionType.SERVER), ServerProtocol()
    for server in (stock, ours):
        client_side = open_server(server)
        server.send(CloseConnection(code=4000))  # the hub closes: LOCAL_CLOSING
        server.receive_data(client_side.send(Ping(b"p")))
        (ping,) = server.events()
        assert isinstance(ping, Ping)
        if server is stock:
            # trio-websocket answers every ping; wsproto refuses the pong and the
            # LocalProtocolError used to escape trio-websocket's reader task.
            with pytest.raises(LocalProtocolError):
                server.send(ping.response())
        else:
            assert server.send(ping.response()) == b""
            assert server.send(CloseConnection(code=1009)) == b""  # 1009 after close, too


def test_a_frame_that_breaks_the_protocol_is_answered_with_a_close_frame() -> None:
    rsv_frame = b"\x91\x82" + b"\x00" * 4 + b"hi"  # RSV1 set, masked "hi"
    invalid_utf8 = b"\x81\x82" + b"\x00" * 4 + b"\xff\xfe"
    for data, code in ((rsv_frame, 1002), (invalid_utf8, 1007)):
        stock, ours = WSConnection(ConnectionType.SERVER), ServerProtocol()
        for server in (stock, ours):
            client_side = open_server(server)
            server.receive_data(data)
            (event,) = server.events()
            assert isinstance(event, CloseConnection) and event.code == code
            if server is stock:
                # wsproto stays OPEN, so trio-websocket sends no close frame.
                assert server.state is ConnectionState.OPEN
            else:
                # trio-websocket answers a close in REMOTE_CLOSING: with our code.
                assert server.state is ConnectionState.REMOTE_CLOSING
                client_side.receive_data(server.send(event.response()))
                (answer,) = client_side.events()
                assert isinstance(answer, CloseConnection) and answer.code == code
                assert server.state is ConnectionState.LOCAL_CLOSING


def test_the_http_version_of_the_upgrade_is_read() -> None:
    head = b"Host: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    head += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    for line, version in ((b"GET / HTTP/1.0\r\n", b"1.0"), (b"GET /x HTTP/1.1\r\n", b"1.1")):
        server = ServerProtocol()
        for byte in range(len(line + head)):  # byte by byte, as a slow client sends it
            server.receive_data((line + head)[byte : byte + 1])
        assert isinstance(next(server.events()), Request)
        assert server.http_version == version


def test_control_frames_are_held_while_a_frame_is_half_written() -> None:
    """While an inline write is half out, a pong trio-websocket frames must not be written
    into the middle of it: ``send`` holds it, and it is released to follow the frame.
    """
    protocol = ServerProtocol()
    client_side = open_server(protocol)
    protocol.hold_control_frames()
    assert protocol.send(Pong(b"p")) == b""
    assert protocol.send(CloseConnection(1000)) == b""
    held = protocol.release_held()
    client_side.receive_data(encode_frame("half").wire + held)
    events = list(client_side.events())
    assert [type(e).__name__ for e in events] == ["TextMessage", "Pong", "CloseConnection"]
    assert protocol.release_held() == b""  # nothing is held any more
    assert protocol.state is ConnectionState.LOCAL_CLOSING  # the held close frame counted
