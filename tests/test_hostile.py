"""Hostile clients over real sockets, against an embedded hub and the ``trio-gw serve`` process.

Rules for this module:

* every test runs under ``trio.fail_after``; nothing sleeps hoping something
  happened: counters are polled until a condition holds (``poll``), under a hang
  guard that fails with the statistics it last saw;
* what no client library sends (resets, malformed requests and frames) is built
  by hand below; client frames are masked unless a test says otherwise;
* what a server sends is parsed by wsproto, as a client parses it;
* every attack ends with ``unharmed()``: the target still runs, the witness (a
  client connected before the attack) still gets messages, a new client
  connects, and the registry is back to its baseline with no handshake in
  progress and no connection error; for the process, ``/metrics`` agrees with
  ``/api/statistics``.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected, WebSocketConnection
from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

from trio_gw import HandlerManager, HubStatistics, Reply, Session, echo_backend
from trio_gw._frames import encode_frame

from ._gateway_support import GatewayProcess, gateway_process, http_backend, write_config
from .conftest import ENGINE_UNDER_TEST, TIMEOUT, client, receive_json, running_hub, wait_for

# Hostile clients, closes and slow consumers: on each engine (see conftest).
pytestmark = pytest.mark.usefixtures("each_engine")

KINDS = ["hub", "process"]
TEXT, CONTINUATION, CLOSE, PING = 0x1, 0x0, 0x8, 0x9
_markers = itertools.count()


# --- raw bytes: requests, frames, resets --------------------------------------------


def upgrade(target: str = "/?token=attacker", *, version: str = "1.1", key: bool = True) -> bytes:
    """A WebSocket upgrade request built by hand (dev mode takes the bearer header too)."""
    head = (
        f"GET {target} HTTP/{version}\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer attacker\r\n"
    )
    return (
        head + ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" if key else "") + "\r\n"
    ).encode()


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """One client frame built by hand (RFC 6455 5.2); masked, as a client's must be."""
    bit, n = (0x80 if mask else 0), len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    if n < 126:
        head += bytes([bit | n])
    else:
        head += bytes([bit | 126]) + struct.pack("!H", n)  # up to 64 KiB is enough here
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_frame(code: int) -> bytes:
    return frame(CLOSE, struct.pack("!H", code))


def parse_server_stream(data: bytes | bytearray) -> tuple[list[Frame], bool]:
    """Parse what a server sent with wsproto, as a client: its whole frames, and whether the
    stream ends inside a frame (or goes on after the close frame). A corrupt frame raises
    ``ParseFailed``."""
    proto = FrameProtocol(client=True, extensions=[])
    proto.receive_bytes(bytes(data))
    frames = list(proto.received_frames())
    cut = bool(proto._frame_decoder.buffer)  # a header cut short, or bytes after the close
    if frames and not frames[-1].frame_finished:
        frames.pop()  # a payload cut short
        cut = True
    return frames, cut


def close_code(frames: list[Frame]) -> int | None:
    """The code of the close frame, which must be the last frame and the only one."""
    closes = [f for f in frames if f.opcode is Opcode.CLOSE]
    assert len(closes) <= 1 and (not closes or frames[-1] is closes[0]), frames
    return int(closes[0].payload[0]) if closes else None


async def connect(port: int, *, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf is not None:  # before connect, so that the window offered is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER (1, 0): the kernel sends an RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def read_to_end(stream: trio.SocketStream, into: bytearray) -> str:
    """Read until the server closes the TCP connection: "eof" or "reset"."""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return "reset"
        if not chunk:
            return "eof"
        into += chunk


async def http_answer(port: int, request: bytes, *, eof: bool = False) -> int | None:
    """Send raw bytes (then a FIN if ``eof``): the HTTP status answered, or None if the
    server closes without one."""
    stream = await connect(port)
    await stream.send_all(request)
    if eof:
        await stream.send_eof()
    data = bytearray()
    await read_to_end(stream, data)
    await stream.aclose()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else None


class RawClient:
    """A WebSocket client over a raw socket: a hand-built upgrade, then bytes; nothing automatic."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = bytearray()  # everything after the 101 response
        self.session_id = ""

    @classmethod
    async def open(cls, port: int, token: str, *, rcvbuf: int | None = None) -> RawClient:
        """Connect, upgrade and read the hello."""
        self = cls(await connect(port, rcvbuf=rcvbuf))
        await self.stream.send_all(upgrade(f"/?token={token}"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await self.stream.receive_some(4096)
            assert chunk, f"closed during the handshake: {head!r}"
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.received += rest
        await self.read_until(lambda frames: bool(frames))
        self.session_id = orjson.loads(self.frames()[0].payload)["payload"]["event"]["session_id"]
        return self

    def frames(self) -> list[Frame]:
        return parse_server_stream(self.received)[0]

    async def read_until(self, predicate: Callable[[list[Frame]], bool]) -> None:
        while not predicate(self.frames()):
            chunk = await self.stream.receive_some(65536)
            assert chunk, "the server closed the connection early"
            self.received += chunk

    async def closed_with(self, code: int) -> None:
        """The server sends a close frame with ``code``, last, then closes the TCP connection."""
        await read_to_end(self.stream, self.received)
        await self.stream.aclose()
        frames, cut = parse_server_stream(self.received)
        assert not cut and close_code(frames) == code, (frames[-3:], cut)


# --- the two targets ---------------------------------------------------------------


@attrs.define
class Target:
    """An embedded hub or a ``trio-gw serve`` process, seen through the same few verbs."""

    ws_url: str
    hub: HandlerManager | None = None
    gateway: GatewayProcess | None = None
    admin: httpx.AsyncClient | None = None
    client_kwargs: dict[str, Any] = attrs.Factory(dict)  # for wss://, the ssl_context
    witness: WebSocketConnection = attrs.field(init=False)  # connected before any attack

    @property
    def port(self) -> int:
        return int(self.ws_url.rpartition(":")[2])

    @property
    def api(self) -> httpx.AsyncClient:
        assert self.admin is not None, "the process's admin API"
        return self.admin

    async def stats(self) -> dict[str, Any]:
        """``/api/statistics`` of the process, or the hub's statistics in the same shape."""
        if self.hub is None:
            return dict((await self.api.get("/api/statistics")).json())
        s = self.hub.statistics()
        stats = {f.name: getattr(s, f.name) for f in attrs.fields(HubStatistics)}
        stats["closes_by_code"] = {str(k): v for k, v in s.closes_by_code.items()}
        stats["rejected_handshakes"] = dict(s.rejected_handshakes)
        return stats

    async def post(self, path: str, body: Any) -> None:
        answer = await self.api.post(path, json=body)
        assert answer.status_code == 200, answer.text


@asynccontextmanager
async def open_target(
    kind: str,
    tmp_path: Path,
    *args: str,
    callback: Any = echo_backend,
    client_kwargs: dict[str, Any] | None = None,
    **hub_config: Any,
) -> AsyncIterator[Target]:
    """An echoing hub (``running_hub``), or ``trio-gw serve`` in dev mode with ``[hub]`` set
    to ``hub_config`` and more command-line ``args``; with its witness connected."""
    async with AsyncExitStack() as stack:
        if kind == "hub":
            hub, url = await stack.enter_async_context(running_hub(callback, **hub_config))
            t = Target(url, hub=hub)
        else:
            hub_config.setdefault("engine", ENGINE_UNDER_TEST[0])
            table = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in hub_config.items())
            config = write_config(tmp_path, f"[hub]\n{table}")
            process = gateway_process("--config", str(config), *args)
            gateway = await stack.enter_async_context(process)
            admin = await stack.enter_async_context(gateway.admin(key=None))
            t = Target(gateway.ws_url, None, gateway, admin, client_kwargs or {})
        t.witness, _ = await stack.enter_async_context(
            client(t.ws_url, "witness", **t.client_kwargs)
        )
        yield t


def grew(before: dict[str, Any], after: dict[str, Any], field: str, key: str | None = None) -> int:
    """How much a counter (or one reason or code of a counter by reason or code) grew."""
    if key is None:
        return int(after[field] - before[field])
    return int(after[field].get(key, 0) - before[field].get(key, 0))


async def poll(t: Target, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Wait until the statistics satisfy ``predicate``; a hang guard fails with what it saw."""
    stats = await t.stats()
    with trio.move_on_after(TIMEOUT / 4):
        while not predicate(stats):
            await trio.sleep(0.01)
            stats = await t.stats()
    assert predicate(stats), stats
    return stats


async def settle(t: Target, baseline: int = 1) -> dict[str, Any]:
    """Registry back to ``baseline``, no handshake in progress, no connection error; for the
    process, ``/metrics`` says the same as ``/api/statistics``."""
    hub = t.hub
    stats = await poll(
        t,
        lambda s: (
            s["connections"] == baseline
            and s["handshakes_in_progress"] == 0
            and (hub is None or hub._live_connections == baseline)
        ),
    )
    assert stats["connection_errors"] == 0, stats
    if hub is None:
        text = (await t.api.get("/metrics")).text
        samples = {
            (s.name, *s.labels.values()): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("trio_gw_connections",)] == baseline
        assert samples[("trio_gw_handshakes_in_progress",)] == 0
        for name in ("connection_errors", "handshakes_aborted", "drops", "slow_consumer_closes"):
            assert samples[(f"trio_gw_{name}_total",)] == stats[name], name
        for reason, n in stats["rejected_handshakes"].items():
            assert samples[("trio_gw_rejected_handshakes_total", reason)] == n, reason
        for code, n in stats["closes_by_code"].items():
            assert samples[("trio_gw_closes_total", code)] == n, code
    return stats


async def unharmed(t: Target, baseline: int = 1) -> dict[str, Any]:
    """Checks (1), (2) and the registry part of (4) after an attack; returns the statistics."""
    marker = f"still there {next(_markers)}"
    if t.hub is not None:
        assert t.hub.running
        await t.hub.send_message_to_all(marker)
    else:
        assert t.gateway is not None and t.gateway.process.poll() is None
        assert (await t.api.get("/healthz")).status_code == 200
        await t.post("/api/send/all", {"message": marker})
    while await t.witness.get_message() != marker:
        pass
    async with client(t.ws_url, "newcomer", **t.client_kwargs) as (_, hello):
        assert hello["user_id"] == "newcomer"
    return await settle(t, baseline)


def burst_message(n: int) -> dict[str, Any]:
    return {"n": n, "pad": "x" * 1000}


async def burst_until(
    hub: HandlerManager, witness: WebSocketConnection, done: Callable[[], bool]
) -> int:
    """Send 1 kB messages to all, 20 at a time, until ``done()``; the witness reads each
    round, in order, before the next is sent. Returns how many were sent."""
    sent = 0
    while not done():
        for _ in range(20):
            await hub.send_message_to_all(burst_message(sent))
            sent += 1
        for n in range(sent - 20, sent):
            assert await receive_json(witness) == burst_message(n)
    return sent


# --- before the upgrade -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_requests_that_are_no_valid_upgrade(kind: str, tmp_path: Path) -> None:
    """``GET //[/`` (urlsplit: "Invalid IPv6 URL"), an HTTP/1.0 upgrade and a plain ``GET /``
    that is no upgrade: HTTP 400, counted as bad_request. Random bytes then a FIN: 4xx or
    closed unanswered, counted as bad_request if they were refused as HTTP, else as aborted."""
    garbage = random.Random(7).randbytes(512)
    with trio.fail_after(TIMEOUT):
        async with open_target(kind, tmp_path) as t:
            before = await t.stats()
            assert await http_answer(t.port, upgrade("//[/")) == 400
            assert await http_answer(t.port, upgrade(version="1.0")) == 400
            # wsproto decodes these headers without catching a non-ASCII value.
            for header in (b"Sec-WebSocket-Extensions: \x80", b"Sec-WebSocket-Protocol: \xc3\xa9"):
                assert await http_answer(t.port, upgrade()[:-2] + header + b"\r\n\r\n") == 400
            for request, eof in ((garbage, True), (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False)):
                status = await http_answer(t.port, request, eof=eof)
                assert status is None or 400 <= status < 500, status
            after = await unharmed(t)
    refused = grew(before, after, "rejected_handshakes", "bad_request")
    assert refused >= 5
    assert refused + grew(before, after, "handshakes_aborted") == 6
    assert grew(before, after, "sessions_opened") == 1  # the newcomer


@pytest.mark.parametrize("kind", KINDS)
async def test_resets_during_the_opening_handshake(kind: str, tmp_path: Path) -> None:
    """RST after connect, after part of the request line, after a whole upgrade request, and
    after one without Sec-WebSocket-Key; 50 of each, 8 at a time. Each is counted once: as
    an aborted handshake, as a session that opened and closed with 1006 (a whole request),
    or as a bad request (the one without a key, if it was read before the reset)."""
    per_stage, stages = 50, [b"", b"GET /?tok", upgrade(), upgrade(key=False)]
    total = per_stage * len(stages)
    with trio.fail_after(3 * TIMEOUT):
        async with open_target(kind, tmp_path) as t:
            before = await t.stats()
            limiter = trio.CapacityLimiter(8)

            async def attack(data: bytes) -> None:
                async with limiter:
                    stream = await connect(t.port)
                    await stream.send_all(data)
                    await reset(stream)

            async with trio.open_nursery() as nursery:
                for data in stages * per_stage:
                    nursery.start_soon(attack, data)

            def counted(s: dict[str, Any]) -> int:
                return (
                    grew(before, s, "handshakes_aborted")
                    + grew(before, s, "sessions_opened")
                    + grew(before, s, "rejected_handshakes", "bad_request")
                )

            stats = await poll(
                t,
                lambda s: counted(s) >= total and s["sessions_opened"] == s["sessions_closed"] + 1,
            )
            await unharmed(t)
    assert counted(stats) == total, stats
    opened = grew(before, stats, "sessions_opened")
    assert opened <= per_stage  # only a whole request can open a session
    assert grew(before, stats, "closes_by_code", "1006") == opened
    assert grew(before, stats, "rejected_handshakes", "bad_request") <= per_stage
    others = {k: v for k, v in stats["rejected_handshakes"].items() if k != "bad_request"}
    assert others == {k: v for k, v in before["rejected_handshakes"].items() if k != "bad_request"}


@pytest.mark.parametrize("kind", KINDS)
async def test_silent_sockets_hold_slots_and_closed_ones_do_not(kind: str, tmp_path: Path) -> None:
    """max_connections=5: four silent TCP sockets and the witness fill it, so an upgrade is
    refused (503, or closed unanswered); once they close, a client connects. Then 50
    connect-then-close sockets hold nothing: with a handshake timeout longer than the test,
    ``handshakes_in_progress`` returns to 0 only if each slot is freed at the FIN."""
    limit = 5
    with trio.fail_after(2 * TIMEOUT):
        async with open_target(kind, tmp_path, max_connections=limit, handshake_timeout=600) as t:
            before = await t.stats()
            silent = [await connect(t.port) for _ in range(limit - 1)]
            await poll(t, lambda s: s["handshakes_in_progress"] == limit - 1)
            assert await http_answer(t.port, upgrade()) in (503, None)
            refused = await t.stats()
            assert grew(before, refused, "rejected_handshakes", "connection_limit") == 1
            for stream in silent:
                await stream.aclose()
            assert grew(before, await settle(t), "handshakes_aborted") == limit - 1
            async with client(t.ws_url, "after-silent"):
                pass
            for _ in range(50):
                await (await connect(t.port)).aclose()
            await settle(t)
            await unharmed(t)


@pytest.mark.parametrize("kind", KINDS)
async def test_slowloris_is_dropped_at_the_handshake_timeout(kind: str, tmp_path: Path) -> None:
    """A request head that never ends, and a socket that never sends a byte, are closed once
    handshake_timeout passes, and counted as ``rejected_handshakes["handshake_timeout"]``."""
    with trio.fail_after(TIMEOUT):
        async with open_target(kind, tmp_path, handshake_timeout=0.5) as t:
            before = await t.stats()
            for data in (b"GET /?token=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""):
                stream = await connect(t.port)
                await stream.send_all(data)
                assert await read_to_end(stream, bytearray()) in ("eof", "reset")
                await stream.aclose()
            after = await unharmed(t)
    assert grew(before, after, "rejected_handshakes", "handshake_timeout") == 2


async def test_tls_port_survives_plaintext_and_resets(tmp_path: Path) -> None:
    """On the wss:// port: an upgrade request in plaintext, a ClientHello cut short by an RST,
    and a whole ClientHello then an RST: each is an aborted handshake."""
    ca, cert, key = trustme.CA(), tmp_path / "cert.pem", tmp_path / "key.pem"
    issued = ca.issue_cert("127.0.0.1")
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    outgoing = ssl.MemoryBIO()
    tls = trusted.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="127.0.0.1")
    with suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    client_hello = outgoing.read()
    tls_args = ("--tls-cert", str(cert), "--tls-key", str(key))
    with trio.fail_after(TIMEOUT):
        async with open_target(
            "process", tmp_path, *tls_args, client_kwargs={"ssl_context": trusted}
        ) as t:
            before = await t.stats()
            assert await http_answer(t.port, upgrade()) is None
            for data in (client_hello[:20], client_hello):
                stream = await connect(t.port)
                await stream.send_all(data)
                await reset(stream)
            stats = await poll(t, lambda s: grew(before, s, "handshakes_aborted") >= 3)
            await unharmed(t)
    assert grew(before, stats, "handshakes_aborted") == 3


# --- protocol errors and closes ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_protocol_errors_get_a_close_frame(kind: str, tmp_path: Path) -> None:
    """Frames RFC 6455 forbids get a close frame (1002, or 1007 for invalid UTF-8), then the
    server closes TCP."""
    attacks = {
        "unmasked": (frame(TEXT, b'"x"', mask=False), 1002),
        "rsv_bits": (frame(TEXT, b'"x"', rsv=0b100), 1002),
        "reserved_opcode": (frame(0x3, b"x"), 1002),
        "control_frame_of_126_bytes": (frame(PING, b"p" * 126), 1002),
        "fragmented_ping": (frame(PING, b"p", fin=False) + frame(CONTINUATION, b"q"), 1002),
        "invalid_utf8": (frame(TEXT, b'"\xff\xfe"'), 1007),
        "invalid_utf8_across_fragments": (
            frame(TEXT, b'"ok', fin=False)
            + frame(CONTINUATION, b"\xe2\x82", fin=False)  # the start of a 3-byte sequence,
            + frame(CONTINUATION, b'\x28"'),  # not continued
            1007,
        ),
    }
    with trio.fail_after(2 * TIMEOUT):
        async with open_target(kind, tmp_path) as t:
            before = await t.stats()
            for name, (data, code) in attacks.items():
                raw = await RawClient.open(t.port, name)
                await raw.stream.send_all(data)
                await raw.closed_with(code)
            after = await unharmed(t)
    assert grew(before, after, "closes_by_code", "1002") == 5
    assert grew(before, after, "closes_by_code", "1007") == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("code", [4000, 1009])
async def test_client_answers_the_close_frame_with_pings_and_garbage(
    kind: str, code: int, tmp_path: Path
) -> None:
    """The server closes (4000 through the API, or 1009 for a message over max_message_size)
    and the client answers the close frame with a ping, a ping storm, a text frame or
    garbage instead of a close frame: it got the close frame with the code, last, and the
    server closes TCP."""
    answers = {
        "ping": frame(PING, b"p"),
        "ping_storm": b"".join(frame(PING, b"%d" % i) for i in range(100)),
        "text": frame(TEXT, b'"late"'),
        "garbage": random.Random(3).randbytes(64),
    }
    with trio.fail_after(2 * TIMEOUT):
        async with open_target(kind, tmp_path, close_timeout=1, max_message_size=1000) as t:
            before = await t.stats()
            for name, answer in answers.items():
                raw = await RawClient.open(t.port, name)
                if code == 1009:
                    await raw.stream.send_all(frame(TEXT, b'"' + b"x" * 2000 + b'"'))
                elif t.hub is not None:
                    t.hub.close(raw.session_id, code=4000)
                else:
                    await t.post("/api/close/session", {"session_id": raw.session_id, "code": 4000})
                await raw.read_until(lambda frames: frames[-1].opcode is Opcode.CLOSE)
                # After a 1009 the server reads no more: it may have reset already.
                with suppress(trio.BrokenResourceError):
                    await raw.stream.send_all(answer)
                await raw.closed_with(code)
            after = await unharmed(t)
    assert grew(before, after, "closes_by_code", str(code)) == len(answers)


# --- what a client sends, and what is sent to it ----------------------------------------


async def test_request_fields_of_the_wrong_type_are_named(tmp_path: Path) -> None:
    """A request whose service is null, whose method is a list, or whose trace_id is a
    number: a ``bad_request`` response naming the field."""
    cases = [
        ({"service": None, "method": "m", "trace_id": "t"}, "payload.service"),
        ({"service": "s", "method": ["a", "b"], "trace_id": "t"}, "payload.method"),
        ({"service": "s", "method": "m", "trace_id": 5}, "payload.trace_id"),
    ]
    with trio.fail_after(TIMEOUT):
        async with open_target("process", tmp_path) as t, client(t.ws_url, "asker") as (ws, _):
            for payload, field in cases:
                await ws.send_message(
                    orjson.dumps({"type": "request", "payload": payload}).decode()
                )
                error = (await receive_json(ws))["payload"]["error"]
                assert error["code"] == "bad_request" and field in error["message"], error
            await unharmed(t, baseline=2)


async def test_backend_reply_larger_than_the_outbound_queue(tmp_path: Path) -> None:
    """A real backend echoes 20 kB of params to a client whose queue holds 16 kB: the client
    gets ``backend_reply_too_large`` with its trace_id, and its connection stays usable."""

    def request(trace_id: str, params: Any) -> str:
        payload = {"service": "s", "method": "m", "params": params, "trace_id": trace_id}
        return orjson.dumps({"type": "request", "payload": payload}).decode()

    with trio.fail_after(TIMEOUT):
        async with (
            http_backend() as backend,
            open_target(
                "process", tmp_path, "--backend-url", backend.url, outbound_queue_bytes=16384
            ) as t,
            client(t.ws_url, "asker") as (ws, _),
        ):
            await ws.send_message(request("t-big", "x" * 20_000))
            big = (await receive_json(ws))["payload"]
            await ws.send_message(request("t-small", [1]))
            small = (await receive_json(ws))["payload"]
            metrics = (await t.api.get("/metrics")).text
            await unharmed(t, baseline=2)
    assert big["trace_id"] == "t-big" and big["error"]["code"] == "backend_reply_too_large"
    assert small["trace_id"] == "t-small" and small["result"]["params"] == [1]
    assert 'trio_gw_backend_errors_total{code="backend_reply_too_large"} 1.0' in metrics


async def test_callback_reply_larger_than_the_outbound_queue(tmp_path: Path) -> None:
    """A callback replies with more than outbound_queue_bytes: the hub counts it as a callback
    error and answers an error frame; the connection stays usable."""

    async def reply_n_bytes(reply: Reply, handler: Session, message: Any) -> None:
        await reply(handler, "x" * message)

    with trio.fail_after(TIMEOUT):
        async with (
            open_target("hub", tmp_path, callback=reply_n_bytes, outbound_queue_bytes=4096) as t,
            client(t.ws_url, "asker") as (ws, _),
        ):
            before = await t.stats()
            await ws.send_message("10000")
            error = await receive_json(ws)
            await ws.send_message("3")
            assert await ws.get_message() == "xxx"
            after = await unharmed(t, baseline=2)
    assert error["error"] == "ValueError"
    assert grew(before, after, "callback_errors") == 1


@pytest.mark.parametrize("resume", ["at_once", "after_the_server_gave_up"])
async def test_stalled_reader_is_closed_4008_and_its_stream_stays_whole(
    resume: str, tmp_path: Path
) -> None:
    """A client with a small receive buffer reads its hello, then stops reading while 1 kB
    messages go to all: it is closed as a slow consumer (4008), and the witness gets every
    message in order. What the stalled client then reads is, byte for byte, its hello and
    whole frames in order, ended by a 4008 close frame or by the end of the stream (possibly
    inside the next frame, if the socket was full): never a corrupt frame."""
    with trio.fail_after(3 * TIMEOUT):
        async with open_target(
            "hub", tmp_path, outbound_queue_bytes=64 << 10, close_timeout=1
        ) as t:
            hub = t.hub
            assert hub is not None
            before = await t.stats()
            stalled = await RawClient.open(t.port, "stalled", rcvbuf=4096)
            await burst_until(hub, t.witness, lambda: hub.statistics().slow_consumer_closes > 0)
            if resume == "after_the_server_gave_up":
                await poll(t, lambda s: grew(before, s, "closes_by_code", "4008") == 1)
            await read_to_end(stalled.stream, stalled.received)
            await stalled.stream.aclose()
            after = await unharmed(t)
    frames, cut = parse_server_stream(stalled.received)
    code = close_code(frames)
    messages = [orjson.loads(f.payload) for f in frames[1:] if f.opcode is Opcode.TEXT]
    assert messages == [burst_message(n) for n in range(len(messages))]
    whole = b"".join(encode_frame(f.payload).wire for f in frames[: len(messages) + 1])
    assert stalled.received.startswith(whole)
    if code is not None:
        assert code == 4008 and not cut
    else:
        rest = bytes(stalled.received[len(whole) :])
        assert encode_frame(burst_message(len(messages))).wire.startswith(rest)
    assert grew(before, after, "slow_consumer_closes") == 1
    assert grew(before, after, "closes_by_code", "4008") == 1


@pytest.mark.parametrize("more_traffic", [True, False])
@pytest.mark.parametrize("then", ["close_frame", "oversized_message", "rsv_bits"])
async def test_a_stalled_client_that_starts_closing_is_still_cut_off(
    then: str, more_traffic: bool, tmp_path: Path
) -> None:
    """A client stops reading until the hub's write to it is stuck, then sends a close frame,
    a message over max_message_size or a bad frame: trio-websocket's answer waits behind the
    stuck write and marks the connection closed. The slot is still freed within the
    timeouts, whether more messages make it a slow consumer or the heartbeat finds it."""
    attack = {
        "close_frame": close_frame(1000),
        "oversized_message": frame(TEXT, b"x" * 2000),
        "rsv_bits": frame(TEXT, b"x", rsv=4),
    }[then]
    with trio.fail_after(3 * TIMEOUT):
        async with open_target(
            "hub",
            tmp_path,
            outbound_queue_bytes=64 << 10,
            close_timeout=0.5,
            heartbeat_interval=1.0,
            heartbeat_timeout=0.5,
            max_message_size=1024,
        ) as t:
            hub = t.hub
            assert hub is not None
            before = await t.stats()
            stalled = await RawClient.open(t.port, "stalled", rcvbuf=4096)
            session = hub.get_handler(stalled.session_id)
            assert session is not None
            n = 0
            while session._writer._batch is None:  # type: ignore[attr-defined]
                await hub.send_message(stalled.session_id, burst_message(n))
                n += 1
                if n % 20 == 0:
                    await trio.lowlevel.checkpoint()
            await stalled.stream.send_all(attack)
            while more_traffic and not session.closing:
                await hub.send_message(stalled.session_id, burst_message(n))
                n += 1
                if n % 20 == 0:
                    await trio.lowlevel.checkpoint()
            await wait_for(lambda: session._ended)
            await stalled.stream.aclose()
            after = await unharmed(t)
    assert grew(before, after, "connection_errors") == 0
    assert sum(after["closes_by_code"].values()) > sum(before["closes_by_code"].values())


async def test_a_graceful_close_delivers_replies_queued_behind_a_busy_actor(
    tmp_path: Path,
) -> None:
    """hub.close() drains a session: a callback in flight replies while the hub's actor is
    busy (its reply goes through the actor's queue), and the reply still arrives before the
    close frame, every time."""
    gate = trio.Event()

    async def answer_later(reply: Reply, handler: Session, message: Any) -> None:
        await gate.wait()
        handler._hub.close("node1:nobody")  # any queued command keeps the actor busy
        await reply(handler, "answer")

    with trio.fail_after(3 * TIMEOUT):
        async with running_hub(answer_later, close_timeout=TIMEOUT) as (hub, url):
            for attempt in range(10):
                gate = trio.Event()
                raw = await RawClient.open(int(url.rpartition(":")[2]), f"u{attempt}")
                await raw.stream.send_all(frame(TEXT, b"{}"))
                await wait_for(lambda n=attempt + 1: hub.statistics().messages_in == n)
                hub.close(raw.session_id, code=4000)
                await hub.flush()
                gate.set()
                await raw.read_until(lambda frames: frames[-1].opcode is Opcode.CLOSE)
                opcodes = [f.opcode for f in raw.frames()]
                assert opcodes == [Opcode.TEXT, Opcode.TEXT, Opcode.CLOSE], opcodes
                assert raw.frames()[1].payload == "answer"
                await raw.stream.aclose()
            await wait_for(lambda: hub.statistics().connections == 0)
            assert hub.statistics().drops == 0


async def test_vanished_client_with_queued_data(tmp_path: Path) -> None:
    """A client stops reading until messages queue up for it, then resets: every message is
    either written or counted in drops, and nothing is left behind."""
    with trio.fail_after(2 * TIMEOUT):
        async with open_target("hub", tmp_path) as t:
            assert t.hub is not None
            raw = await RawClient.open(t.port, "vanishing", rcvbuf=4096)
            session = t.hub.get_handler(raw.session_id)
            assert session is not None
            before = await t.stats()
            sent = await burst_until(t.hub, t.witness, lambda: session.queued_bytes > 0)
            await reset(raw.stream)

            def accounted(s: dict[str, Any]) -> int:
                return grew(before, s, "messages_out") + grew(before, s, "drops")

            stats = await poll(t, lambda s: s["connections"] == 1 and accounted(s) >= 2 * sent)
            await unharmed(t)
    assert accounted(stats) == 2 * sent  # to the witness and to the vanished client
    assert grew(before, stats, "drops") > 0
    assert grew(before, stats, "closes_by_code", "1006") == 1


async def test_messages_before_a_close_frame_are_still_processed(tmp_path: Path) -> None:
    """A client sends 5 messages and a close frame at once: the callback still processes all
    5 (once the connection is gone), and the 5 replies are counted as drops."""
    processed: list[Any] = []
    gate = trio.Event()

    async def record(reply: Reply, handler: Session, message: Any) -> None:
        processed.append(message)
        await gate.wait()
        await reply(handler, {"done": message})

    with trio.fail_after(TIMEOUT):
        async with open_target("hub", tmp_path, callback=record) as t:
            before = await t.stats()
            raw = await RawClient.open(t.port, "quitter")
            messages = b"".join(frame(TEXT, b"%d" % i) for i in range(5))
            await raw.stream.send_all(messages + close_frame(1000))
            await raw.closed_with(1000)
            gate.set()
            await wait_for(lambda: len(processed) == 5)
            stats = await poll(t, lambda s: grew(before, s, "drops") >= 5)
            await unharmed(t)
    assert processed == [0, 1, 2, 3, 4]
    assert grew(before, stats, "drops") == 5
    assert grew(before, stats, "closes_by_code", "1000") == 1


async def test_shutdown_delivers_the_reply_of_a_callback_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hub shuts down while a callback waits; once released, its reply reaches the client
    before the 1001 close frame, and nothing is logged as an error."""
    started, release, stop = trio.Event(), trio.Event(), trio.Event()

    async def slow(reply: Reply, handler: Session, message: Any) -> None:
        started.set()
        await release.wait()
        await reply(handler, {"late": message})

    async def run_hub(*, task_status: trio.TaskStatus[Any]) -> None:
        async with running_hub(slow) as (hub, url):
            task_status.started((hub, url))
            await stop.wait()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            hub, url = await nursery.start(run_hub)
            raw = await RawClient.open(int(url.rpartition(":")[2]), "patient")
            await raw.stream.send_all(frame(TEXT, b'"q"'))
            await started.wait()
            stop.set()  # leaves the open_hub block: shutdown starts
            await wait_for(lambda: not hub.running)
            release.set()
            await raw.read_until(lambda frames: frames[-1].opcode is Opcode.CLOSE)
            await raw.stream.send_all(close_frame(1001))
            await raw.closed_with(1001)
    assert [f.opcode for f in raw.frames()] == [Opcode.TEXT, Opcode.TEXT, Opcode.CLOSE]
    assert orjson.loads(raw.frames()[1].payload) == {"late": "q"}
    errors = [
        r for r in caplog.records if r.name.startswith("trio_gw") and r.levelno >= logging.ERROR
    ]
    assert errors == []
    assert hub.statistics().callback_errors == 0


# --- the process's admin API and logs -------------------------------------------------------


async def test_admin_api_refuses_a_hostile_web_page(tmp_path: Path) -> None:
    """Dev mode, no API key: a DNS-rebinding page (``Host: evil.example.com``) cannot list
    sessions, a cross-site text/plain POST cannot close them, and the dashboard forbids
    sniffing and framing."""
    with trio.fail_after(TIMEOUT):
        async with open_target("process", tmp_path) as t:
            rebound = await t.api.get("/api/sessions", headers={"host": "evil.example.com"})
            forged = await t.api.post(
                "/api/close/all",
                content=b'{"code": 1000}',
                headers={"origin": "http://evil.example.com", "content-type": "text/plain"},
            )
            page = await t.api.get("/")
            await unharmed(t)  # the witness was not closed
    assert rebound.status_code in (403, 421), rebound.text
    assert forged.status_code in (403, 421), forged.text
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


async def test_user_id_with_a_newline_cannot_forge_a_log_line(tmp_path: Path) -> None:
    """Dev mode, ``?token=a%0Ab``: the user ``a\\nb`` connects and the text log shows the id
    escaped, on one line (refusing it would do as well); no line starts with ``b``."""
    user_id, refused = None, None
    with trio.fail_after(TIMEOUT):
        async with open_target("process", tmp_path, "--log-format", "text") as t:
            try:
                async with client(t.ws_url, "a%0Ab") as (_, hello):
                    user_id = hello["user_id"]
            except ConnectionRejected as exc:
                refused = exc.status_code
            await unharmed(t)
            assert t.gateway is not None
            log = list(t.gateway.log)
    assert not any(line.startswith("b") for line in log)
    if refused is not None:
        assert 400 <= refused < 500
    else:
        assert user_id == "a\nb"
        assert any(r"(user a\nb) registered" in line for line in log)
