"""What only the wsproto engine does: permessage-deflate, and its own reading and writing.

The behaviour both engines share (hostile clients, closes, slow consumers,
RFC 6455 conformance) is tested on each engine elsewhere.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import orjson
import pytest
import trio
from wsproto.frame_protocol import Opcode

from trio_gw import Reply, Session, serve_hub
from trio_gw._frames import encode_frame
from trio_gw._wsproto_engine import DEFLATE_MIN_SIZE, StreamWriter, _Deflate

from .conftest import TIMEOUT, running_hub, wait_for
from .test_hostile import (
    PING,
    TEXT,
    RawClient,
    close_code,
    connect,
    frame,
    parse_server_stream,
    read_to_end,
    upgrade,
)
from .test_session import port_of

OFFER = "permessage-deflate; client_max_window_bits"


async def echo(reply: Reply, handler: Session, message: Any) -> None:
    await reply(handler, {"echo": message})


async def open_raw(port: int, target: str, extra: bytes = b"") -> tuple[trio.SocketStream, bytes]:
    """Upgrade by hand (plus ``extra`` bytes in the same write); the 101's head, and after."""
    stream = await connect(port)
    await stream.send_all(upgrade(target) + extra)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return stream, head + b"\r\n\r\n" + rest


def offering(request: bytes, header: bytes) -> bytes:
    """``request`` with one more header line."""
    return request.replace(b"\r\n\r\n", b"\r\n" + header + b"\r\n")


def deflate_frame(payload: bytes, *, bits: int = 15) -> bytes:
    """A masked client text frame compressed with permessage-deflate (RSV1 set)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits)
    body = (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    return frame(TEXT, body, rsv=0b100)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each whole server frame in ``data`` (unmasked, by hand)."""
    frames, at = [], 0
    while at + 2 <= len(data):
        first, n = data[at], data[at + 1] & 0x7F
        at += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[at : at + 2])
            at += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[at : at + 8])
            at += 8
        if at + n > len(data):
            break
        frames.append((first, data[at : at + n]))
        at += n
    return frames


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


async def test_a_frame_sent_with_the_request_is_not_lost() -> None:
    """A client that sends its first frame in the same write as its upgrade (before the
    101) still has it processed: wsproto keeps it, and the engine feeds it on."""
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo) as (_, url):
            stream, data = await open_raw(port_of(url), "/?token=eager", frame(TEXT, b'"early"'))
            rest = bytearray(data.partition(b"\r\n\r\n")[2])
            while len(parse_server_stream(rest)[0]) < 2:
                rest += await stream.receive_some(65536)
            hello, answer = parse_server_stream(rest)[0][:2]
            assert orjson.loads(hello.payload)["payload"]["topic"] == "hello"
            assert orjson.loads(answer.payload) == {"echo": "early"}
            await stream.aclose()


async def test_compression_is_negotiated_only_when_on_and_offered() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo, compression=True) as (_, url):
            stream, head = await open_raw(port_of(url), "/?token=a", b"")  # offers nothing
            assert b"sec-websocket-extensions" not in head.lower()
            await stream.aclose()
            ext = f"Sec-WebSocket-Extensions: {OFFER}\r\n".encode()
            stream = await connect(port_of(url))
            await stream.send_all(
                upgrade("/?token=b").replace(b"\r\n\r\n", b"\r\n" + ext + b"\r\n")
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            line = next(
                h for h in head.lower().split(b"\r\n") if h.startswith(b"sec-websocket-ext")
            )
            # Each message compressed on its own, both ways, and a small client window:
            # no compressor or decompressor outlives the message it works on.
            assert b"permessage-deflate" in line
            assert b"server_no_context_takeover" in line
            assert b"client_no_context_takeover" in line
            assert b"client_max_window_bits=12" in line
            await stream.aclose()
        async with running_hub(echo) as (_, url):  # compression off (the default)
            stream = await connect(port_of(url))
            await stream.send_all(
                upgrade("/?token=c").replace(b"\r\n\r\n", b"\r\n" + ext + b"\r\n")
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            assert b"sec-websocket-extensions" not in head.lower().partition(b"\r\n\r\n")[0]
            await stream.aclose()


async def test_compressed_messages_both_ways_with_the_websockets_client() -> None:
    """The ``websockets`` client negotiates permessage-deflate and round-trips messages
    large and small through the hub (compressed both ways, decompressed correctly)."""

    def talk(url: str) -> tuple[str | None, list[Any]]:
        from websockets.sync.client import connect as ws_connect

        answers = []
        with ws_connect(f"{url}/?token=zip", open_timeout=5, compression="deflate") as ws:
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
            ws.recv(timeout=5)  # hello
            for text in ("small", "x" * 5000, "é" * 3000, "y" * 200):
                ws.send(orjson.dumps(text).decode())
                answers.append(orjson.loads(ws.recv(timeout=5)))
        return extensions, answers

    with trio.fail_after(TIMEOUT):
        async with running_hub(echo, compression=True) as (hub, url):
            extensions, answers = await trio.to_thread.run_sync(talk, url)
            assert extensions is not None and "permessage-deflate" in extensions
            assert answers == [{"echo": t} for t in ("small", "x" * 5000, "é" * 3000, "y" * 200)]
            await wait_for(lambda: hub.statistics().sessions_closed == 1)
            assert hub.statistics().closes_by_code == {1000: 1}


async def test_a_message_for_many_is_compressed_once_and_small_ones_not_at_all() -> None:
    """Three compressing clients get the same compressed frame (RSV1 set), which inflates
    to the message; a message under DEFLATE_MIN_SIZE goes uncompressed."""
    ext = f"Sec-WebSocket-Extensions: {OFFER}\r\n".encode()
    with trio.fail_after(TIMEOUT):
        async with running_hub(compression=True) as (hub, url):
            streams = []
            for i in range(3):
                stream = await connect(port_of(url))
                request = upgrade(f"/?token=u{i}").replace(b"\r\n\r\n", b"\r\n" + ext + b"\r\n")
                await stream.send_all(request)
                streams.append(stream)
            await wait_for(lambda: hub.statistics().connections == 3)
            big = {"data": "z" * 4000}
            await hub.send_message_to_all(big)
            await hub.send_message_to_all("tiny")
            wires = []
            for stream in streams:
                data = b""
                while len(server_frames(data.partition(b"\r\n\r\n")[2])) < 3:
                    data += await stream.receive_some(65536)
                frames = server_frames(data.partition(b"\r\n\r\n")[2])
                _, (first, payload), (tiny_first, tiny) = frames[:3]
                assert first & 0x40, "RSV1: compressed"
                assert orjson.loads(inflate(payload)) == big
                assert not tiny_first & 0x40 and tiny == b"tiny"
                wires.append(payload)
                await stream.aclose()
            assert wires[0] == wires[1] == wires[2]
            assert len(wires[0]) < 200


def test_frame_deflated_is_computed_once_per_window() -> None:
    message = encode_frame("w" * 1000)
    first = message.deflated(15, DEFLATE_MIN_SIZE)
    assert message.deflated(15, DEFLATE_MIN_SIZE) is first
    assert first[0] == 0xC1 and len(first) < len(message.wire)
    assert inflate(first[2:]) == b"w" * 1000
    small = encode_frame("w")
    assert small.deflated(15, DEFLATE_MIN_SIZE) is small.wire


async def test_a_deflate_bomb_is_closed_1009_without_inflating_it() -> None:
    """16 MiB of zeros in a 16 KiB compressed frame, with max_message_size 64 KiB: 1009,
    the process stays small, and the witness is unaffected."""
    ext = f"Sec-WebSocket-Extensions: {OFFER}\r\n".encode()
    bomb = deflate_frame(b"0" * (16 << 20))
    assert len(bomb) < 64 << 10
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo, compression=True, max_message_size=64 << 10) as (hub, url):
            witness = await RawClient.open(port_of(url), "witness")
            stream = await connect(port_of(url))
            request = upgrade("/?token=bomber").replace(b"\r\n\r\n", b"\r\n" + ext + b"\r\n")
            await stream.send_all(request + bomb)
            received = bytearray()
            await read_to_end(stream, received)
            await stream.aclose()
            frames = server_frames(bytes(received).partition(b"\r\n\r\n")[2])
            assert frames[-1][0] & 0x0F == Opcode.CLOSE.value
            assert struct.unpack("!H", frames[-1][1][:2])[0] == 1009
            await wait_for(lambda: hub.statistics().closes_by_code.get(1009) == 1)
            await witness.stream.send_all(frame(TEXT, b'"still here"'))
            await witness.read_until(lambda frames: len(frames) >= 2)
            assert orjson.loads(witness.frames()[1].payload) == {"echo": "still here"}
            await witness.stream.aclose()


async def test_a_pong_waits_for_the_frame_half_written_before_it() -> None:
    """A client with a tiny receive buffer is sent 512 KiB (written in part inline) and pings
    meanwhile: the pong is held and follows the whole data frame; every byte parses."""
    with trio.fail_after(TIMEOUT):
        # A queue large enough that the sender does not wait for this client.
        async with running_hub(echo, heartbeat_interval=0, outbound_queue_bytes=4 << 20) as (
            hub,
            url,
        ):
            raw = await RawClient.open(port_of(url), "tiny", rcvbuf=4096)
            session = hub.get_handler(raw.session_id)
            assert session is not None
            writer = session._writer
            assert isinstance(writer, StreamWriter)
            await hub.send_message(raw.session_id, "m" * (512 << 10))
            await wait_for(lambda: writer._batch is not None)  # half out, the rest queued
            await raw.stream.send_all(frame(PING, b"are you there"))
            await wait_for(lambda: writer.holding)  # the pong waits for a frame boundary
            await raw.read_until(lambda frames: any(f.opcode is Opcode.PONG for f in frames))
            frames = raw.frames()
            kinds = [f.opcode for f in frames]
            assert kinds == [Opcode.TEXT, Opcode.TEXT, Opcode.PONG], kinds
            assert frames[1].payload == "m" * (512 << 10)
            assert frames[2].payload == b"are you there"
            assert close_code(frames) is None
            await raw.stream.aclose()


# --- found by the attack review ------------------------------------------------------


async def test_a_ping_flood_from_a_client_that_does_not_read_holds_one_pong() -> None:
    """Thousands of pings from a client that never reads: the hub holds at most one pong
    (RFC 6455 5.5.3: a pong may answer only the latest ping), not one per ping; once the
    client reads, what it gets parses, and it ends with a pong."""
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo, heartbeat_interval=0) as (hub, url):
            raw = await RawClient.open(port_of(url), "flood", rcvbuf=4096)
            session = hub.get_handler(raw.session_id)
            assert session is not None
            writer = session._writer
            assert isinstance(writer, StreamWriter)
            ping = frame(PING, b"p" * 125)
            for _ in range(100):
                await raw.stream.send_all(ping * 100)  # 10,000 pings, 1.3 MB
            await wait_for(lambda: writer.holding)
            assert len(writer._held_pong) <= 127
            assert len(writer._take_held()) <= 2 * 127 + 127
            await raw.stream.send_all(ping)
            await raw.read_until(
                lambda frames: len(frames) > 1 and frames[-1].opcode is Opcode.PONG
            )
            assert close_code(raw.frames()) is None
            assert hub.statistics().connection_errors == 0
            await raw.stream.aclose()


async def test_over_tls_the_client_close_is_answered() -> None:
    """Over wss the writer has no socket of its own: the answer to the client's close
    frame waits for the writer task, which now runs before the connection ends."""
    import ssl

    import trustme
    from trio_websocket import open_websocket_url

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo) as (hub, _), trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_hub(
                    hub, port=0, ssl_context=server_context, task_status=task_status
                )
            )
            async with open_websocket_url(
                f"wss://127.0.0.1:{port}/?token=tls", ssl_context=client_context
            ) as ws:
                await ws.get_message()  # hello
                await ws.send_message('"over tls"')
                assert orjson.loads(await ws.get_message()) == {"echo": "over tls"}
            assert ws.closed is not None and ws.closed.code == 1000  # the server answered
            await wait_for(lambda: hub.statistics().sessions_closed == 1)
            assert hub.statistics().closes_by_code == {1000: 1}
            nursery.cancel_scope.cancel()


async def test_compressed_messages_cannot_bypass_the_inbound_queue() -> None:
    """Frames of 1 KiB that inflate to 1 MiB each, to a slow callback: no more than about
    ``inbound_queue_size`` of them are inflated and waiting (the rest stays unread)."""
    release = trio.Event()

    async def slow(reply: Reply, handler: Session, message: Any) -> None:
        await release.wait()

    ext = f"Sec-WebSocket-Extensions: {OFFER}\r\n".encode()
    one = deflate_frame(b'"' + b"a" * ((1 << 20) - 100) + b'"')
    with trio.fail_after(TIMEOUT):
        async with running_hub(slow, compression=True, inbound_queue_size=4) as (hub, url):
            stream = await connect(port_of(url))
            await stream.send_all(offering(upgrade("/?token=zipper"), ext))
            await wait_for(lambda: hub.statistics().connections == 1)
            for _ in range(60):
                await stream.send_all(one)
            (session_id,) = hub.session_ids()
            session = hub.get_handler(session_id)
            assert session is not None
            await wait_for(lambda: session._conn.inbound_backlog() >= 4)
            await trio.sleep(0.2)  # were it to read on, it would have by now
            assert session._conn.inbound_backlog() <= 4 + 2  # one slice may finish two more
            release.set()
            await stream.aclose()


async def test_a_deflate_offer_with_a_bad_window_size_is_declined() -> None:
    """``client_max_window_bits=abc`` used to raise inside wsproto: now the offer is
    declined (the 101 names no extension) and nothing reaches the error boundary."""
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo, compression=True) as (hub, url):
            for offer in ("client_max_window_bits=abc", "server_max_window_bits=", "x; y=1"):
                header = f"Sec-WebSocket-Extensions: permessage-deflate; {offer}\r\n".encode()
                stream = await connect(port_of(url))
                await stream.send_all(offering(upgrade("/?token=odd"), header))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)
                assert head.startswith(b"HTTP/1.1 101 "), head
                assert b"sec-websocket-extensions" not in head.lower().partition(b"\r\n\r\n")[0]
                await stream.aclose()
            await wait_for(lambda: hub.statistics().sessions_closed == 3)
            assert hub.statistics().connection_errors == 0


async def test_a_ping_between_compressed_fragments_leaves_the_message_whole() -> None:
    """RFC 6455 5.4 allows a control frame between fragments; in a compressed message it
    used to end the inflating, and the rest was read as plain text (1007)."""
    ext = f"Sec-WebSocket-Extensions: {OFFER}\r\n".encode()
    text = b'"' + b"hello world " * 50 + b'"'
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    body = (compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    half = len(body) // 2
    fragments = (
        frame(TEXT, body[:half], fin=False, rsv=0b100)
        + frame(PING, b"between")
        + frame(0x0, body[half:])
    )
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo, compression=True) as (hub, url):
            stream = await connect(port_of(url))
            await stream.send_all(offering(upgrade("/?token=frag"), ext) + fragments)
            data = b""
            while len(server_frames(data.partition(b"\r\n\r\n")[2])) < 3:
                data += await stream.receive_some(65536)
            frames = server_frames(data.partition(b"\r\n\r\n")[2])[:3]
            assert (Opcode.PONG.value | 0x80, b"between") in frames
            texts = [
                orjson.loads(inflate(payload) if first & 0x40 else payload)
                for first, payload in frames
                if first & 0x0F == Opcode.TEXT.value
            ]
            assert {"echo": text[1:-1].decode()} in texts
            assert hub.statistics().closes_by_code == {}
            await stream.aclose()


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        ("permessage-deflate", "server_no_context_takeover; client_no_context_takeover"),
        (
            "permessage-deflate; client_max_window_bits",
            "server_no_context_takeover; client_no_context_takeover; client_max_window_bits=12",
        ),
        (
            "permessage-deflate; client_max_window_bits=10; server_max_window_bits=11",
            "server_no_context_takeover; client_no_context_takeover; "
            "server_max_window_bits=11; client_max_window_bits=10",
        ),
        ("permessage-deflate; server_max_window_bits=8", None),  # zlib cannot compress so
        ("permessage-deflate; server_max_window_bits", None),  # RFC 7692 7.1.2.1
        ("permessage-deflate; client_max_window_bits=16", None),
        ("permessage-deflate; client_max_window_bits=abc", None),
        ("permessage-deflate; client_no_context_takeover=1", None),
        ("permessage-deflate; x=1", None),
        ("permessage-deflate; client_max_window_bits; client_max_window_bits", None),
    ],
)
def test_deflate_offers_are_answered_or_declined(offer: str, answer: str | None) -> None:
    """The hub's answer to each offer (RFC 7692 7): always no context takeover both ways."""
    extension = _Deflate(1 << 20)
    assert extension.accept(offer) == answer
    assert extension.enabled() is (answer is not None)
