"""RFC 6455 conformance on both engines, in the spirit of the Autobahn test suite.

Each case cites the section of RFC 6455 (or RFC 7692 for permessage-deflate) it
checks and, where there is one, the Autobahn case it follows. Clients are raw
sockets (``RawClient`` from ``test_hostile``): the upgrade is built by hand,
frames are built by hand (``frame``: any opcode, FIN, RSV bits, masked or not)
or by wsproto's client-side framer (valid frames, any length), and what the
server sends is parsed by wsproto as a client parses it, which also checks that
server frames are unmasked (5.1), use minimal lengths (5.2), carry valid UTF-8
in text (8.1) and that nothing follows the close frame (5.5.1).

Every hub here echoes: the callback records each decoded message and replies
with its JSON encoding as a binary frame, so that a message sent as the JSON
string ``"..."`` comes back byte for byte. Each test runs with a bystander
client connected first; when the test is done the bystander still gets its
echo, it is then the only session registered, and once it closes no session is
left and no connection error was counted.

Failing the connection (7.1.7) means here: a close frame with the code the RFC
asks for, last, then the server closes the TCP connection (``closed_with``).
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import pytest
import trio
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

from trio_gw import HandlerManager, Reply, Session

from .conftest import TIMEOUT, running_hub, wait_for
from .test_hostile import (
    CLOSE,
    CONTINUATION,
    PING,
    TEXT,
    RawClient,
    close_frame,
    connect,
    frame,
    parse_server_stream,
    read_to_end,
    upgrade,
)
from .test_session import port_of

BINARY, PONG = 0x2, 0xA
RSV1 = 0b100  # frame(rsv=...) takes RSV1..RSV3 as three bits
_users = itertools.count()


# --- the hub, its bystander, and what goes on the wire ----------------------------------


@attrs.define
class Conformance:
    """An echoing hub on one engine, the messages its callback got, and a bystander."""

    hub: HandlerManager
    port: int
    received: list[Any]
    clients: list[RawClient] = attrs.Factory(list)  # closed at the end, whatever happened
    bystander: RawClient = attrs.field(init=False)

    async def client(self) -> RawClient:
        """A new raw client, upgraded, its hello read."""
        raw = await RawClient.open(self.port, f"client{next(_users)}")
        self.clients.append(raw)
        return raw

    def closes(self, code: int) -> int:
        return self.hub.statistics().closes_by_code.get(code, 0)

    async def counted(self, code: int, before: int) -> None:
        """One more connection ended with ``code`` (counted once its task ends)."""
        with trio.move_on_after(TIMEOUT / 4):
            await wait_for(lambda: self.closes(code) > before)
        assert self.closes(code) == before + 1, self.hub.statistics().closes_by_code

    async def still_serves_the_bystander(self) -> None:
        """The bystander gets its echo, is the only session left, then closes cleanly."""
        marker = orjson.dumps(f"bystander {next(_users)}")
        raw = self.bystander
        await raw.stream.send_all(frame(TEXT, marker))
        await raw.read_until(lambda frames: marker in payloads(frames))
        await wait_for(lambda: self.hub.session_ids() == [raw.session_id])
        await raw.stream.send_all(close_frame(1000))
        await raw.closed_with(1000)
        await wait_for(lambda: not self.hub.session_ids())
        assert self.hub.statistics().connection_errors == 0


@asynccontextmanager
async def conformance(engine: str, **config: Any) -> AsyncIterator[Conformance]:
    """An echoing hub on ``engine`` (no heartbeat: no server pings in the streams), with its
    bystander connected; on a clean exit, checks that the bystander was unaffected."""
    received: list[Any] = []

    async def echo(reply: Reply, handler: Session, message: Any) -> None:
        received.append(message)
        await reply(handler, orjson.dumps(message))

    config.setdefault("heartbeat_interval", 0)
    async with running_hub(echo, engine=engine, **config) as (hub, url):
        c = Conformance(hub, port_of(url), received)
        try:
            c.bystander = await c.client()
            yield c
            await c.still_serves_the_bystander()
        finally:
            # After a failure (or a timeout): no unclosed socket, no wait for close frames.
            with trio.CancelScope(shield=True):
                for raw in c.clients:
                    await trio.aclose_forcefully(raw.stream)


def payload_bytes(f: Frame) -> bytes:
    payload = f.payload
    return payload.encode() if isinstance(payload, str) else bytes(payload)


def payloads(frames: list[Frame]) -> list[bytes]:
    """The payloads of the data frames (the server never fragments: one frame, one message)."""
    return [payload_bytes(f) for f in frames if f.opcode in (Opcode.TEXT, Opcode.BINARY)]


def json_string(size: int) -> bytes:
    """A JSON string of exactly ``size`` bytes (>= 2), its content not periodic."""
    body = b",".join(b"%d" % i for i in range(size))[: size - 2]
    return b'"' + body + b'"'


def fragments(opcode: int, payload: bytes, cuts: list[int], *, between: bytes = b"") -> bytes:
    """``payload`` as one message cut at ``cuts`` (RFC 6455 5.4): the first frame has
    ``opcode``, the others are continuations, FIN on the last; ``between`` goes between
    consecutive fragments (interleaved control frames)."""
    edges = [0, *cuts, len(payload)]
    pieces = [payload[a:b] for a, b in itertools.pairwise(edges)]
    out = []
    for i, piece in enumerate(pieces):
        out.append(frame(opcode if i == 0 else CONTINUATION, piece, fin=i == len(pieces) - 1))
    return between.join(out)


def close_body(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


async def close_cleanly(raw: RawClient, code: int = 1000) -> list[Frame]:
    """Close from the client side; the server answers with ``code``. The frames after the
    hello, the close answer included."""
    await raw.stream.send_all(close_frame(code))
    await raw.closed_with(code)
    return raw.frames()[1:]


async def fails(c: Conformance, data: bytes, code: int) -> list[Frame]:
    """A new client sends ``data``: the server fails the connection with ``code`` (RFC 6455
    7.1.7), records that code, and frees the session. The frames after the hello, the close
    frame included."""
    before = c.closes(code)
    raw = await c.client()
    await raw.stream.send_all(data)
    await raw.closed_with(code)
    await c.counted(code, before)
    await wait_for(lambda: raw.session_id not in c.hub.session_ids())
    return raw.frames()[1:]


async def fails_at_once(engine: str, data: bytes, code: int, **config: Any) -> None:
    """On a fresh hub: ``data`` gets a close frame with ``code`` and nothing else."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine, **config) as c:
            frames = await fails(c, data, code)
            assert [f.opcode for f in frames] == [Opcode.CLOSE], frames
            assert c.received == []


async def echoed(c: Conformance, raw: RawClient, data: bytes, *expected: bytes) -> list[Frame]:
    """Send ``data``; the echoes of ``expected`` (JSON strings) arrive, in order. The frames
    after the hello."""
    seen = len(payloads(raw.frames()))
    await raw.stream.send_all(data)
    await raw.read_until(lambda frames: len(payloads(frames)) >= seen + len(expected))
    assert payloads(raw.frames())[seen:] == list(expected)
    assert c.received[-len(expected) :] == [orjson.loads(e) for e in expected]
    return raw.frames()[1:]


# --- 1. framing: lengths, masking (RFC 6455 5.1, 5.2, 5.6) ------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_message_lengths_at_the_encoding_boundaries(
    engine: str, kind: str, size: int
) -> None:
    """5.2: a payload of up to 125 bytes has a 7-bit length, up to 65535 a 16-bit one, more
    a 64-bit one (Autobahn 1.1.1-1.1.6, 1.2.1-1.2.6). The message arrives intact, and the
    echo of the same size is framed with the minimal length (the parser checks it). A
    0-byte message is delivered too: it is not JSON, so the hub answers with an error."""
    message = json_string(size) if size else b""
    framer = FrameProtocol(client=True, extensions=[])
    data = framer.send_data(message.decode() if kind == "text" else message)
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(data)
            await raw.read_until(lambda frames: len(frames) == 2)
            answer = raw.frames()[1]
            if size:
                assert answer.opcode is Opcode.BINARY and payload_bytes(answer) == message
                assert c.received == [orjson.loads(message)]
            else:
                assert orjson.loads(answer.payload)["error"] == "JSONDecodeError"
                assert c.received == []
                assert c.hub.statistics().bad_messages == 1
            await close_cleanly(raw)


async def test_a_frame_that_arrives_in_pieces_is_reassembled(engine: str) -> None:
    """5.2 frames are a byte stream: a header and payload written a few bytes at a time
    (Autobahn 1.1.7-1.1.8, "chopped") make the same message."""
    message = json_string(300)
    data = frame(TEXT, message)
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            for i in range(0, len(data), 3):
                await raw.stream.send_all(data[i : i + 3])
                await trio.lowlevel.checkpoint()
            await raw.read_until(lambda frames: len(frames) == 2)
            assert payloads(raw.frames())[1:] == [message]
            await close_cleanly(raw)


async def test_any_masking_key_is_accepted(engine: str) -> None:
    """5.3: the masking key is any 32-bit value, all zeros included, and a new one per frame
    (here: per fragment of one message)."""
    message = json_string(40)
    zero_key = bytes([0x81, 0x80 | len(message)]) + b"\0\0\0\0" + message
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await echoed(c, raw, zero_key, message)
            await echoed(c, raw, fragments(TEXT, message, [10, 20, 30]), message)
            await close_cleanly(raw)


async def test_an_unmasked_client_frame_fails_the_connection(engine: str) -> None:
    """5.1: "a server MUST close the connection upon receiving a frame that is not masked",
    with 1002 (7.4.1)."""
    await fails_at_once(engine, frame(TEXT, json_string(10), mask=False), 1002)


async def test_an_unmasked_control_frame_fails_the_connection(engine: str) -> None:
    """5.1 applies to control frames too: an unmasked ping gets no pong, but 1002."""
    await fails_at_once(engine, frame(PING, b"p", mask=False), 1002)


# --- 2. pings and pongs (RFC 6455 5.5.2, 5.5.3) ------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125)), b"\xff\xfe\x00" * 41])
async def test_a_ping_is_answered_with_its_payload(engine: str, payload: bytes) -> None:
    """5.5.2, 5.5.3: a ping with 0 to 125 bytes, text or binary, is answered by a pong with
    the same application data (Autobahn 2.1-2.4)."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(frame(PING, payload))
            await raw.read_until(lambda frames: len(frames) == 2)
            pong = raw.frames()[1]
            assert pong.opcode is Opcode.PONG and payload_bytes(pong) == payload
            await close_cleanly(raw)


@pytest.mark.parametrize("opcode", [PING, PONG])
async def test_a_ping_or_pong_of_126_bytes_fails_the_connection(engine: str, opcode: int) -> None:
    """5.5: "All control frames MUST have a payload length of 125 bytes or less": 1002, and
    no pong (Autobahn 2.5)."""
    await fails_at_once(engine, frame(opcode, b"p" * 126), 1002)


async def test_unsolicited_pongs_are_ignored(engine: str) -> None:
    """5.5.3: "A Pong frame MAY be sent unsolicited ... A response to an unsolicited Pong
    frame is not expected." (Autobahn 2.6-2.8): no answer, and the next message is echoed."""
    message = json_string(20)
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            data = frame(PONG, b"") + frame(PONG, b"unsolicited") + frame(TEXT, message)
            frames = await echoed(c, raw, data, message)
            assert [f.opcode for f in frames] == [Opcode.BINARY]
            await close_cleanly(raw)


async def test_many_pings_the_last_one_is_answered(engine: str) -> None:
    """5.5.3: an endpoint MAY answer only the most recent of several pings, so the pongs
    answer some of the pings, in order, the last one included (Autobahn 2.10)."""
    pings = [b"ping %d" % i for i in range(10)]
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(b"".join(frame(PING, p) for p in pings))
            await raw.read_until(
                lambda frames: bool(frames) and payload_bytes(frames[-1]) == pings[-1]
            )
            pongs = [payload_bytes(f) for f in raw.frames()[1:]]
            assert all(f.opcode is Opcode.PONG for f in raw.frames()[1:])
            assert pongs == [p for p in pings if p in pongs]  # in order, no duplicates
            await close_cleanly(raw)


# --- 3. reserved bits (RFC 6455 5.2) -----------------------------------------------------


@pytest.mark.parametrize("rsv", range(1, 8))
async def test_rsv_bits_without_an_extension_fail_the_connection(engine: str, rsv: int) -> None:
    """5.2: RSV1-3 "MUST be 0 unless an extension is negotiated that defines meanings for
    non-zero values. If a nonzero value is received and none of the negotiated extensions
    defines the meaning of such a nonzero value, the receiving endpoint MUST _Fail the
    WebSocket Connection_" (Autobahn 3.1-3.7). A valid message goes first and a ping
    after: the ping is not answered, since nothing follows the close frame (5.5.1)."""
    first, second = json_string(10), json_string(12)
    data = frame(TEXT, first) + frame(TEXT, second, rsv=rsv) + frame(PING, b"after")
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            frames = await fails(c, data, 1002)
            # The first message's echo may be dropped when the connection fails first.
            assert [payload_bytes(f) for f in frames[:-1]] in ([], [first]), frames
            assert orjson.loads(second) not in c.received


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
async def test_rsv_bits_on_a_control_frame_fail_the_connection(engine: str, opcode: int) -> None:
    """5.2: the RSV rule holds for control frames too (Autobahn 3.6)."""
    payload = close_body(1000) if opcode == CLOSE else b"x"
    await fails_at_once(engine, frame(opcode, payload, rsv=0b010), 1002)


# --- 4. opcodes (RFC 6455 5.2) -----------------------------------------------------------


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
@pytest.mark.parametrize("payload", [b"", b"reserved"])
async def test_a_reserved_opcode_fails_the_connection(
    engine: str, opcode: int, payload: bytes
) -> None:
    """5.2: opcodes 0x3-0x7 are reserved for non-control frames, 0xB-0xF for control frames;
    "If an unknown opcode is received, the receiving endpoint MUST _Fail the WebSocket
    Connection_" (Autobahn 4.1.1-4.2.5): 1002."""
    await fails_at_once(engine, frame(opcode, payload), 1002)


# --- 5. fragmentation (RFC 6455 5.4) -----------------------------------------------------


@pytest.mark.parametrize(
    "cuts",
    [[1], [0], [41], [10, 20, 30], list(range(1, 42)), [0, 0, 20, 20, 42]],
    ids=["2", "empty_first", "empty_last", "4", "one_byte_each", "empty_fragments"],
)
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
async def test_a_fragmented_message_is_reassembled(
    engine: str, opcode: int, cuts: list[int]
) -> None:
    """5.4: a message in 2 to 42 fragments, empty ones included (a fragment may carry no
    payload), is delivered as one message (Autobahn 5.3-5.5, 6.1.2)."""
    message = json_string(42)
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await echoed(c, raw, fragments(opcode, message, cuts), message)
            await close_cleanly(raw)


async def test_a_ping_between_fragments_is_answered_and_the_message_is_whole(
    engine: str,
) -> None:
    """5.4: "Control frames MAY be injected in the middle of a fragmented message", and
    5.5.2: each is answered with its payload "as soon as is practical", so while the
    message is still open (Autobahn 5.6-5.9, 5.19). The next ping is sent once the pong
    arrived, so that 5.5.3's leave to answer only the latest of several does not apply."""
    message = json_string(60)
    steps = [
        (frame(TEXT, message[:20], fin=False) + frame(PING, b"first"), [b"first"]),
        (
            frame(CONTINUATION, message[20:40], fin=False) + frame(PING, b"second"),
            [b"first", b"second"],
        ),
    ]
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            for data, pongs in steps:
                expected = 1 + len(pongs)
                await raw.stream.send_all(data)
                await raw.read_until(lambda frames, n=expected: len(frames) == n)
                frames = raw.frames()[1:]
                assert [(f.opcode, payload_bytes(f)) for f in frames] == [
                    (Opcode.PONG, p) for p in pongs
                ]
            assert c.received == []
            await echoed(c, raw, frame(CONTINUATION, message[40:]), message)
            await close_cleanly(raw)


async def test_a_pong_between_fragments_is_ignored(engine: str) -> None:
    """5.4 and 5.5.3: an unsolicited pong between fragments gets no answer and does not
    disturb the message."""
    message = json_string(30)
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            data = fragments(TEXT, message, [10, 20], between=frame(PONG, b"pong"))
            frames = await echoed(c, raw, data, message)
            assert [f.opcode for f in frames] == [Opcode.BINARY]
            await close_cleanly(raw)


@pytest.mark.parametrize(
    "data",
    [
        frame(CONTINUATION, b'"x"'),
        frame(CONTINUATION, b'"x', fin=False) + frame(CONTINUATION, b'"'),
        frame(TEXT, b'"a"') + frame(CONTINUATION, b'"b"'),
    ],
    ids=["alone", "fragmented", "after_a_whole_message"],
)
async def test_a_continuation_with_no_message_started_fails_the_connection(
    engine: str, data: bytes
) -> None:
    """5.4: continuation frames only follow a first frame with FIN clear; one with no
    message to continue is a protocol error, 1002 (Autobahn 5.9-5.14). The whole message
    before it may be echoed first."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            frames = await fails(c, data, 1002)
            assert payloads(frames) in ([], [b'"a"']), frames
            assert "x" not in c.received and "b" not in c.received


@pytest.mark.parametrize("second", [TEXT, BINARY])
async def test_a_new_message_inside_a_fragmented_one_fails_the_connection(
    engine: str, second: int
) -> None:
    """5.4: "the fragments of one message MUST NOT be interleaved between the fragments of
    another message": a text or binary frame while a message is open is a protocol error,
    1002 (Autobahn 5.15-5.18); neither message is delivered."""
    data = frame(TEXT, b'"open', fin=False) + frame(second, b'"other"')
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            frames = await fails(c, data, 1002)
            assert payloads(frames) == []
            assert c.received == []


@pytest.mark.parametrize("opcode", [PING, PONG])
async def test_a_fragmented_control_frame_fails_the_connection(engine: str, opcode: int) -> None:
    """5.5: "Control frames themselves MUST NOT be fragmented": a ping or pong with FIN
    clear is a protocol error, 1002, and the ping is not answered (Autobahn 5.1, 5.2)."""
    data = frame(opcode, b"a", fin=False) + frame(CONTINUATION, b"b")
    await fails_at_once(engine, data, 1002)


# --- 6. UTF-8 (RFC 6455 5.6, 8.1) --------------------------------------------------------

# A Greek word, a 3-byte and a 4-byte code point, and U+10FFFF, the largest (Autobahn 6.2, 6.5).
VALID_TEXT = orjson.dumps("κόσμε € 𝄞 \U0010ffff end")
# Text messages that are not UTF-8 (Autobahn 6.3, 6.6-6.21).
INVALID_UTF8 = {
    "0xff": b'"ok \xff"',
    "lone_continuation_byte": b'"ok \x80"',
    "overlong_slash": b'"ok \xc0\xaf"',
    "surrogate": b'"ok \xed\xa0\x80"',
    "above_u10ffff": b'"ok \xf4\x90\x80\x80"',
    "sequence_not_continued": b'"ok \xe2\x82("',
    "sequence_cut_short_at_the_end": b'"ok"\xe2\x82',
}


async def test_valid_multibyte_text_is_delivered(engine: str) -> None:
    """5.6: text is UTF-8; 2-, 3- and 4-byte sequences are delivered as they are (Autobahn
    6.2.1, 6.5)."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await echoed(c, raw, frame(TEXT, VALID_TEXT), VALID_TEXT)
            await close_cleanly(raw)


async def test_code_points_split_across_fragments_are_delivered(engine: str) -> None:
    """5.6, 8.1: validity is a property of the whole message, so a code point may be split
    between fragments. Cut at every byte, each multi-byte sequence is split (Autobahn
    6.2.3, 6.2.4)."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            data = fragments(TEXT, VALID_TEXT, list(range(1, len(VALID_TEXT))))
            await echoed(c, raw, data, VALID_TEXT)
            await close_cleanly(raw)


@pytest.mark.parametrize("bad", list(INVALID_UTF8.values()), ids=list(INVALID_UTF8))
async def test_invalid_utf8_in_a_text_frame_fails_the_connection(engine: str, bad: bytes) -> None:
    """8.1: an endpoint that finds text is not valid UTF-8 "MUST _Fail the WebSocket
    Connection_"; 7.4.1: with 1007. The same bytes in a binary message are just bytes:
    they are delivered (and, not being JSON, answered with an error)."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            await fails(c, frame(TEXT, bad), 1007)
            assert c.received == []
            raw = await c.client()
            await raw.stream.send_all(frame(BINARY, bad))
            await raw.read_until(lambda frames: len(frames) == 2)
            assert orjson.loads(raw.frames()[1].payload)["error"] == "JSONDecodeError"
            await close_cleanly(raw)


@pytest.mark.parametrize(
    "pieces",
    [
        [b'"ok \xe2\x82', b'\x28"'],  # a 3-byte sequence not continued
        [b'"ok \xf0\x9d', b"\x84", b'\xff"'],  # a 4-byte one, broken in its third fragment
        [b'"ok \xe2\x82', b""],  # cut short by the end of the message
    ],
    ids=["not_continued", "broken_later", "cut_short_at_the_end"],
)
async def test_invalid_utf8_spread_over_fragments_fails_the_connection(
    engine: str, pieces: list[bytes]
) -> None:
    """8.1, 7.4.1: a sequence that is invalid only once the fragments are put together
    is invalid UTF-8 too: 1007 (Autobahn 6.4)."""
    cuts = list(itertools.accumulate(len(p) for p in pieces[:-1]))
    await fails_at_once(engine, fragments(TEXT, b"".join(pieces), cuts), 1007)


async def test_invalid_utf8_fails_before_the_message_ends(engine: str) -> None:
    """8.1: the endpoint fails the connection when it "finds that the byte stream is not,
    in fact, a valid UTF-8 stream", which it can tell from the first fragment: that
    fragment alone, FIN clear, gets 1007 without waiting for the rest (Autobahn
    6.4.1-6.4.4, the strict "fail fast" outcome)."""
    await fails_at_once(engine, frame(TEXT, b'"ok \xff more', fin=False), 1007)


# --- 7. closing (RFC 6455 5.5.1, 7) ------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011])
@pytest.mark.parametrize("reason", [b"", b"a reason", "à bientôt".encode(), b"r" * 123])
async def test_a_close_frame_is_answered_with_its_code(
    engine: str, code: int, reason: bytes
) -> None:
    """5.5.1: "If an endpoint receives a Close frame and did not previously send a Close
    frame, the endpoint MUST send a Close frame in response ... it typically echos the
    status code it received", and closes the TCP connection (7.1.1); any valid code, with
    no reason, a UTF-8 one, or the longest that fits a control frame (123 bytes)
    (Autobahn 7.1.1, 7.3.3-7.3.5, 7.7)."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(frame(CLOSE, close_body(code, reason)))
            await raw.closed_with(code)
            assert [f.opcode for f in raw.frames()[1:]] == [Opcode.CLOSE]
            await wait_for(lambda: raw.session_id not in c.hub.session_ids())


@pytest.mark.parametrize("code", [3000, 3999, 4000, 4999])
async def test_a_close_with_a_registered_or_private_code_is_answered(
    engine: str, code: int
) -> None:
    """7.4.2: 3000-3999 are for libraries and frameworks, 4000-4999 private; both are valid
    on the wire, and echoed (Autobahn 7.7.10-7.7.13)."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(frame(CLOSE, close_body(code, b"bye")))
            await raw.closed_with(code)
            assert [f.opcode for f in raw.frames()[1:]] == [Opcode.CLOSE]


async def test_an_empty_close_frame_is_answered(engine: str) -> None:
    """5.5.1: the close body is optional; with none, the close code is 1005 (7.1.5), which
    MUST NOT be sent (7.4.1). So the answer is an empty close frame (read as 1005) or
    1000, then the server closes TCP (Autobahn 7.3.1)."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(frame(CLOSE))
            await read_to_end(raw.stream, raw.received)
            await raw.stream.aclose()
            frames, cut = parse_server_stream(raw.received)
            assert not cut and [f.opcode for f in frames[1:]] == [Opcode.CLOSE], frames
            assert frames[-1].payload[0] in (1005, 1000), frames[-1]


async def test_a_close_body_of_one_byte_fails_the_connection(engine: str) -> None:
    """5.5.1: a close body, if any, starts with a 2-byte code; one byte is malformed: 1002
    (Autobahn 7.3.2)."""
    await fails_at_once(engine, frame(CLOSE, b"\x03"), 1002)


async def test_a_close_frame_of_126_bytes_fails_the_connection(engine: str) -> None:
    """5.5: a control frame carries 125 bytes at most, so a code and a 124-byte reason is a
    protocol error: 1002 (Autobahn 7.3.6)."""
    await fails_at_once(engine, frame(CLOSE, close_body(1000, b"r" * 124)), 1002)


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
async def test_a_close_with_a_reserved_or_invalid_code_fails_the_connection(
    engine: str, code: int
) -> None:
    """7.4.1, 7.4.2: 0-999 are not used, 1004 is reserved, 1005, 1006 and 1015 MUST NOT be
    sent in a close frame, 1016-2999 are reserved for the protocol, and nothing above 4999
    is defined: a close frame with one of them is a protocol error, 1002 (Autobahn 7.9)."""
    await fails_at_once(engine, frame(CLOSE, close_body(code, b"x")), 1002)


async def test_a_close_reason_that_is_not_utf8_fails_the_connection(engine: str) -> None:
    """5.5.1: the reason is UTF-8 encoded, and 8.1: invalid UTF-8 MUST fail the connection.
    The code is 1007, the one 7.4.1 gives for "data within a message that was not
    consistent with the type of the message (e.g., non-UTF-8 [RFC3629] data ...)"
    (Autobahn 7.5.1)."""
    await fails_at_once(engine, frame(CLOSE, close_body(1000, b"bad \xce\xba\xe1\xbd")), 1007)


async def test_nothing_but_the_close_answer_follows_a_close(engine: str) -> None:
    """1.4: "after receiving a control frame indicating the connection should be closed, a
    peer discards any further data received"; 5.5.1: nothing is sent after the close frame.
    A ping and a text message sent after our close get no pong and no echo; the message
    does not reach the callback (Autobahn 7.1.2-7.1.4)."""
    late = json_string(10)
    data = close_frame(1000) + frame(PING, b"late") + frame(TEXT, late) + close_frame(1001)
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(data)
            await raw.closed_with(1000)
            assert [f.opcode for f in raw.frames()[1:]] == [Opcode.CLOSE]
            await wait_for(lambda: raw.session_id not in c.hub.session_ids())
            assert c.received == []


async def test_a_close_between_fragments_is_answered_and_the_message_dropped(
    engine: str,
) -> None:
    """5.4: a close may come between fragments; 5.5.1 and 1.4: it is answered, and the
    unfinished message (and its continuation, sent after the close) is discarded (Autobahn
    7.1.5)."""
    data = frame(TEXT, b'"half', fin=False) + close_frame(1000) + frame(CONTINUATION, b' done"')
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(data)
            await raw.closed_with(1000)
            assert [f.opcode for f in raw.frames()[1:]] == [Opcode.CLOSE]
            await wait_for(lambda: raw.session_id not in c.hub.session_ids())
            assert c.received == []


@pytest.mark.parametrize("code", [1000, 1001, 4000, 4999])
@pytest.mark.parametrize("answer", ["same_code", "empty_close"])
async def test_a_close_the_server_starts_carries_its_code(
    engine: str, code: int, answer: str
) -> None:
    """7.1.2, 5.5.1: the server starts the closing handshake with its code and reason. A
    ping the client sends before it answers gets no pong (1.4: "After sending a control
    frame indicating the connection should be closed, a peer does not send any further
    data"); once the client's close arrives (with the same code or with none, 5.5.1), the
    server closes the TCP connection (7.1.1). The code is recorded as sent."""
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            before = c.closes(code)
            raw = await c.client()
            c.hub.close(raw.session_id, code=code, reason="server says bye")
            await raw.read_until(lambda frames: frames[-1].opcode is Opcode.CLOSE)
            assert raw.frames()[-1].payload == (code, "server says bye")
            reply = close_frame(code) if answer == "same_code" else frame(CLOSE)
            await raw.stream.send_all(frame(PING, b"too late") + reply)
            await raw.closed_with(code)
            assert [f.opcode for f in raw.frames()[1:]] == [Opcode.CLOSE]
            await c.counted(code, before)


async def test_messages_before_a_close_are_delivered(engine: str) -> None:
    """5.5.1: the close frame ends the stream, not what came before it: a message sent in
    the same write as the close reaches the callback."""
    message = json_string(16)
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await raw.stream.send_all(frame(TEXT, message) + close_frame(1000))
            await raw.closed_with(1000)
            await wait_for(lambda: c.received == [orjson.loads(message)])


# --- 9, lightly: larger messages, many fragments (RFC 6455 5.4) ---------------------------


@pytest.mark.parametrize("pieces", [1, 64])
async def test_a_large_message_in_one_frame_or_many(engine: str, pieces: int) -> None:
    """5.4: a 256 KiB message in one frame or in 64 fragments is delivered whole
    (Autobahn 9.1, 9.3, lightly)."""
    message = json_string(256 << 10)
    framer = FrameProtocol(client=True, extensions=[])
    step = len(message) // pieces
    data = b"".join(
        framer.send_data(message[i : i + step].decode(), fin=i + step >= len(message))
        for i in range(0, len(message), step)
    )
    with trio.fail_after(TIMEOUT):
        async with conformance(engine) as c:
            raw = await c.client()
            await echoed(c, raw, data, message)
            await close_cleanly(raw)


# --- max_message_size: 1009 (RFC 6455 7.4.1) ---------------------------------------------

LIMIT = 1024


async def test_a_message_of_max_message_size_is_delivered(engine: str) -> None:
    """max_message_size is the largest message accepted: one of exactly that size, in one
    frame or in fragments, is delivered."""
    message = json_string(LIMIT)
    with trio.fail_after(TIMEOUT):
        async with conformance(engine, max_message_size=LIMIT) as c:
            raw = await c.client()
            await echoed(c, raw, frame(TEXT, message), message)
            await echoed(c, raw, fragments(TEXT, message, list(range(16, LIMIT, 16))), message)
            await close_cleanly(raw)


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
@pytest.mark.parametrize("how", ["one_frame", "many_fragments", "announced"])
async def test_a_message_over_max_message_size_fails_with_1009(
    engine: str, opcode: int, how: str
) -> None:
    """7.4.1: 1009 "indicates that an endpoint is terminating the connection because it has
    received a message that is too big for it to process". Over max_message_size by one
    byte in one frame, in 65 fragments of 16 bytes each (each fragment small), or a
    frame that announces 2 GiB and sends only the first ``LIMIT + 1`` bytes (the server
    does not wait for the rest)."""
    message = json_string(LIMIT + 1)
    if how == "one_frame":
        data = frame(opcode, message)
    elif how == "many_fragments":
        data = fragments(opcode, message, list(range(16, LIMIT + 1, 16)))
    else:
        key = b"\x01\x02\x03\x04"
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", 1 << 31) + key
        data = head + bytes(b ^ key[i % 4] for i, b in enumerate(message))
    await fails_at_once(engine, data, 1009, max_message_size=LIMIT)


# --- permessage-deflate (RFC 7692), on the wsproto engine only -----------------------------

OFFER = "permessage-deflate; client_max_window_bits"


def deflate(message: bytes) -> bytes:
    """RFC 7692 7.2.1: raw DEFLATE, sync-flushed, its final 00 00 ff ff removed. A fresh
    compressor per message with zlib's smallest window (9 bits); the messages here repeat
    only at short range, so their back-references fit any client_max_window_bits (8-15)
    the server may ask for."""
    compressor = zlib.compressobj(wbits=-9)
    data = compressor.compress(message) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


class DeflateClient(RawClient):
    """A raw client that may offer permessage-deflate; parses with what was agreed."""

    extensions: str | None = None  # the server's Sec-WebSocket-Extensions, if any

    @classmethod
    async def offer(cls, c: Conformance, offer: str | None) -> DeflateClient:
        """Connect to ``c``'s hub, offering ``offer``; read the 101 and the hello."""
        request = upgrade(f"/?token=deflate{next(_users)}")
        if offer is not None:
            request = request[:-2] + f"Sec-WebSocket-Extensions: {offer}\r\n\r\n".encode()
        self = cls(await connect(c.port))
        c.clients.append(self)
        await self.stream.send_all(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await self.stream.receive_some(4096)
            assert chunk, f"closed during the handshake: {head!r}"
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        for line in head.decode().split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions":
                assert self.extensions is None, f"two extension headers: {head!r}"
                self.extensions = value.strip()
        self.received += rest
        await self.read_until(bool)
        return self

    def frames(self) -> list[Frame]:
        extensions = []
        if self.extensions is not None:
            extension = PerMessageDeflate()
            extension.finalize(self.extensions)
            extensions.append(extension)
        proto = FrameProtocol(client=True, extensions=extensions)
        proto.receive_bytes(bytes(self.received))
        frames = list(proto.received_frames())
        return frames if not frames or frames[-1].frame_finished else frames[:-1]

    def first_bytes(self) -> list[int]:
        """The first header byte of each whole frame the server sent (FIN, RSV, opcode)."""
        data, out = bytes(self.received), []
        while len(data) >= 2:
            length, offset = data[1] & 0x7F, 2
            if length == 126:
                (length,), offset = struct.unpack("!H", data[2:4]), 4
            elif length == 127:
                (length,), offset = struct.unpack("!Q", data[2:10]), 10
            if len(data) < offset + length:
                break
            out.append(data[0])
            data = data[offset + length :]
        return out


@pytest.mark.parametrize(
    ("compression", "offer"),
    [(True, OFFER), (True, "permessage-deflate"), (True, None), (False, OFFER)],
    ids=["offered_with_window_bits", "offered", "not_offered", "compression_off"],
)
async def test_permessage_deflate_is_agreed_only_when_offered_and_enabled(
    compression: bool, offer: str | None
) -> None:
    """RFC 7692 5: the server accepts an offer with a response that names the extension, and
    here always ``server_no_context_takeover`` (5.1, 7.1.1.1: memory per connection stays
    bounded); a ``client_max_window_bits`` parameter only if the client offered it
    (7.1.2.2). No offer, or compression off: no extension header (RFC 6455 9.1)."""
    with trio.fail_after(TIMEOUT):
        async with conformance("wsproto", compression=compression) as c:
            raw = await DeflateClient.offer(c, offer)
            if compression and offer is not None:
                assert raw.extensions is not None
                params = [p.strip() for p in raw.extensions.split(";")]
                assert params[0] == "permessage-deflate", raw.extensions
                assert "server_no_context_takeover" in params, raw.extensions
                window = [p for p in params if p.startswith("client_max_window_bits")]
                if "client_max_window_bits" not in offer:
                    assert window == [], raw.extensions
                for p in window:
                    assert 8 <= int(p.partition("=")[2]) <= 15, raw.extensions
            else:
                assert raw.extensions is None
            assert orjson.loads(raw.frames()[0].payload)["payload"]["topic"] == "hello"
            await raw.stream.send_all(close_frame(1000))
            await read_to_end(raw.stream, raw.received)
            await raw.stream.aclose()
            assert raw.frames()[-1].payload[0] == 1000


async def test_compressed_messages_round_trip() -> None:
    """RFC 7692 6, 7.2: a message compressed by hand (RSV1 on its only frame), the same
    compressed message in three fragments (RSV1 on the first only, 6.1), and an
    uncompressed one (RSV1 clear) are all delivered; the echoes decompress, and a large
    compressible one comes back compressed (RSV1 set, fewer bytes on the wire)."""
    small, large = orjson.dumps("compressed é"), orjson.dumps("x" * 8000)
    with trio.fail_after(TIMEOUT):
        async with conformance("wsproto", compression=True) as c:
            raw = await DeflateClient.offer(c, OFFER)
            assert raw.extensions is not None
            packed = deflate(small)
            third = len(packed) // 3
            data = (
                frame(TEXT, packed, rsv=RSV1)
                + frame(TEXT, packed[:third], fin=False, rsv=RSV1)
                + frame(CONTINUATION, packed[third : 2 * third], fin=False)
                + frame(CONTINUATION, packed[2 * third :])
                + frame(TEXT, small)
                + frame(TEXT, deflate(large), rsv=RSV1)
            )
            await raw.stream.send_all(data)
            await raw.read_until(lambda frames: len(frames) == 5)
            assert payloads(raw.frames())[1:] == [small, small, small, large]
            assert c.received == [orjson.loads(small)] * 3 + [orjson.loads(large)]
            assert raw.first_bytes()[4] & 0x40, "the large echo was not compressed"
            assert len(raw.received) < len(large)
            await raw.stream.send_all(close_frame(1000))
            await read_to_end(raw.stream, raw.received)
            await raw.stream.aclose()
            assert raw.frames()[-1].payload[0] == 1000


@pytest.mark.parametrize("where", ["ping", "continuation", "rsv2"])
async def test_rsv1_where_permessage_deflate_forbids_it_fails_the_connection(where: str) -> None:
    """RFC 7692 6: "An endpoint MUST NOT set the 'Per-Message Compressed' bit of control
    frames and non-first fragments of a data message. An endpoint receiving such a frame
    MUST _Fail the WebSocket Connection_": 1002, even with the extension agreed. RSV2,
    which permessage-deflate does not define, still fails it (RFC 6455 5.2)."""
    if where == "ping":
        data = frame(PING, b"p", rsv=RSV1)
    elif where == "rsv2":
        data = frame(TEXT, b'"x"', rsv=0b010)
    else:
        data = frame(TEXT, deflate(b'"ab"'), fin=False, rsv=RSV1) + frame(
            CONTINUATION, b"", rsv=RSV1
        )
    with trio.fail_after(TIMEOUT):
        async with conformance("wsproto", compression=True) as c:
            raw = await DeflateClient.offer(c, OFFER)
            assert raw.extensions is not None
            await raw.stream.send_all(data)
            await read_to_end(raw.stream, raw.received)
            await raw.stream.aclose()
            frames = raw.frames()
            assert [f.opcode for f in frames[1:]] == [Opcode.CLOSE], frames
            assert frames[-1].payload[0] == 1002
            assert c.received == []
            await wait_for(lambda: raw.session_id not in c.hub.session_ids())
