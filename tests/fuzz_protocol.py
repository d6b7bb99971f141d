"""Fuzz the WebSocket side of a real ``trio-gw serve`` process with hypothesis.

Run by ``nox -s fuzz`` after the admin API fuzzer (``python tests/fuzz_protocol.py
--help`` for its options). Not a pytest module: ``nox -s tests`` never runs it.

What it sends, over plain sockets to a dev-mode gateway on 127.0.0.1 (small
handshake, close and heartbeat timeouts, a small ``max_message_size``):

* **handshakes**: valid upgrade requests mutated byte by byte (flip, insert,
  delete, duplicate, truncate), and requests built from parts: odd methods,
  request targets (``//[/``, very long, non-ASCII, percent garbage), HTTP
  versions, and the upgrade headers missing, duplicated or full of garbage;
* **frame streams** after a successful handshake: frames built by hand (every
  opcode, FIN and RSV bits, masked or not, extended lengths and lengths that
  lie, invalid UTF-8, close frames with any code and reason), valid ones built
  by wsproto, fragmented messages with control frames between the fragments,
  echo requests, raw bytes, and a server-initiated close (``POST
  /api/close/all``, code 4000) in the middle of the stream, between two chunks
  or from another thread while the chunks go out.

Each stream goes out in random chunks; then the fuzzer reads (answering the
server's close frame, or not), half-closes, closes or resets (SO_LINGER 0) at
a random point. Whatever the server sends back must be a well-formed response
or frame stream: no 5xx, no malformed frame, no 1011, nothing after a close
frame. When a stream holds a close/all, a well-behaved bystander session,
registered after the fuzz connection, must be closed with 4000 too.

After every example the process must still run, ``/healthz`` must answer, a
well-behaved client must get its echo, every connection must be gone from the
registry (``connections`` and ``handshakes_in_progress`` back to 0 within
``handshake_timeout + close_timeout`` and a margin), ``connection_errors``
(unexpected exceptions, counted by the hub's per-connection error boundary)
must not have grown, and the log must hold no traceback. At the end the
process must shut down cleanly on SIGTERM.

Both connection layers are fuzzed, one pass each with its own gateway
(``TRIO_GW_ENGINE``): ``--examples`` is split evenly between them, the first
engine gets ``--seed`` and the next ``--seed + 1`` (so together they send
different inputs), and each pass is checked and reported on its own.
``--engine`` fuzzes one of them only, with every example.

Examples are generated from a fixed seed (``--seed`` to explore others), so
every run sends the same inputs; timing still varies, and a finding that
depends on it is reported as flaky. A failure prints the client side of the
failing connection (every chunk, close/all and ending), the gateway's log
tail, and the command that runs that engine's pass again.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import orjson
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from trio_gw._config import ENGINES

SEED = 20261125
HANDSHAKE_TIMEOUT = 1.0
CLOSE_TIMEOUT = 1.0
MAX_MESSAGE_SIZE = 4096
# Connections must be gone within this long after the fuzzer let go of them.
SETTLE_TIMEOUT = HANDSHAKE_TIMEOUT + CLOSE_TIMEOUT + 3.0
IO_TIMEOUT = 5.0
GATEWAY_ENV = {
    "TRIO_GW_HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT),
    "TRIO_GW_CLOSE_TIMEOUT": str(CLOSE_TIMEOUT),
    "TRIO_GW_SHUTDOWN_TIMEOUT": "5",
    "TRIO_GW_MAX_MESSAGE_SIZE": str(MAX_MESSAGE_SIZE),
    # Fuzz connections that live a little while get pinged, and closed with
    # 4012 when they do not answer: the heartbeat is fuzzed too.
    "TRIO_GW_HEARTBEAT_INTERVAL": "0.25",
    "TRIO_GW_HEARTBEAT_TIMEOUT": "0.5",
}
# The start-up lines: one per listener, then "ready".
CLIENTS_LINE = re.compile(r"WebSocket clients on ws://127\.0\.0\.1:(\d+)/")
ADMIN_LINE = re.compile(r"admin API and dashboard on (http://127\.0\.0\.1:\d+)/")
READY_LINE = re.compile(r"\bready; ")
ECHO_REQUEST = {
    "type": "request",
    "payload": {"service": "s", "method": "m", "params": [1], "trace_id": "t"},
}
ECHO_TEXT = orjson.dumps(ECHO_REQUEST).decode()
# Close codes a server may put on the wire (RFC 6455 section 7.4).
SENDABLE_CLOSE_CODES = {*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)}


class GatewayDown(BaseException):
    """The gateway died or stopped answering: stop at once (no shrinking against a corpse)."""


# --- the gateway process -------------------------------------------------------------------


@attrs.define
class Gateway:
    """A ``trio-gw serve`` process, its stderr log (read by a thread) and its admin client."""

    process: subprocess.Popen[str]
    port: int
    admin: httpx.Client
    log: list[str]
    reader: threading.Thread

    @classmethod
    def start(cls, engine: str) -> Gateway:
        """A dev-mode gateway with the fuzzer's settings, on connection layer ``engine``."""
        trio_gw = str(Path(sys.executable).with_name("trio-gw"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_GW_")}
        process = subprocess.Popen(
            [trio_gw, "serve", "--port", "0", "--admin-port", "0", "--log-level", "INFO"],
            stderr=subprocess.PIPE,
            env={**env, **GATEWAY_ENV, "TRIO_GW_ENGINE": engine},
            encoding="utf-8",
            errors="replace",
        )
        assert process.stderr is not None
        log: list[str] = []
        for line in process.stderr:
            log.append(line)
            if READY_LINE.search(line):
                break
        startup = "".join(log)
        clients, admin_line = CLIENTS_LINE.search(startup), ADMIN_LINE.search(startup)
        if clients is None or admin_line is None:
            raise SystemExit("trio-gw exited before it was ready:\n" + startup)
        reader = threading.Thread(target=lambda: log.extend(process.stderr or []), daemon=True)
        reader.start()
        admin = httpx.Client(base_url=admin_line.group(1), timeout=IO_TIMEOUT)
        return cls(process, int(clients.group(1)), admin, log, reader)

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log[-lines:])

    def statistics(self) -> dict[str, Any]:
        answer = self.admin.get("/api/statistics")
        answer.raise_for_status()
        return answer.json()  # type: ignore[no-any-return]

    def close_all(self) -> None:
        # A client of its own: this may run in a thread beside the fuzzer's checks.
        answer = httpx.post(
            self.admin.base_url.join("/api/close/all"),
            json={"code": 4000, "reason": "fuzz"},
            timeout=IO_TIMEOUT,
        )
        answer.raise_for_status()

    def stop(self) -> int:
        self.admin.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(timeout=5)
        return code


# --- what the server sends back --------------------------------------------------------------


class ServerStream:
    """Checks what the server sends: an HTTP response head, then (after 101) a frame stream.

    Frames must be unmasked, with no RSV bits, a known opcode, minimal lengths,
    control frames whole and short, text valid UTF-8, a close frame with a
    sendable code, and nothing after the close frame.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.status: int | None = None
        self.head_done = False
        self.close_code: int | None = None
        self.closed = False
        self.pings: list[bytes] = []
        self.messages = 0
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = 0

    def feed(self, data: bytes) -> None:
        if self.closed:
            raise AssertionError(f"server sent {data[:64]!r} after its close frame")
        self.buffer += data
        if not self.head_done:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            status_line = head.split(b"\r\n", 1)[0]
            match = re.fullmatch(rb"HTTP/1\.1 (\d{3})(?: .*)?", status_line)
            assert match, f"malformed status line {status_line!r}"
            self.status = int(match.group(1))
            assert self.status < 500, f"server error: {head!r}"
            self.head_done = True
            self.buffer = rest if self.status == 101 else b""
        if self.status == 101:
            self._frames()
        else:
            self.buffer = b""  # a refusal's body

    def _frames(self) -> None:
        while not self.closed:
            frame = self._next_frame()
            if frame is None:
                return
            self._check(*frame)
        if self.buffer:
            raise AssertionError(f"server sent {self.buffer[:64]!r} after its close frame")

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        data = self.buffer
        if len(data) < 2:
            return None
        first, second = data[0], data[1]
        assert first & 0x70 == 0, f"server frame with RSV bits: {data[:16]!r}"
        assert not second & 0x80, f"masked server frame: {data[:16]!r}"
        length, offset = second & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                return None
            (length,), offset = struct.unpack("!H", data[2:4]), 4
            assert length > 125, f"non-minimal 16-bit length {length}"
        elif length == 127:
            if len(data) < 10:
                return None
            (length,), offset = struct.unpack("!Q", data[2:10]), 10
            assert 0xFFFF < length < 1 << 63, f"bad 64-bit length {length}"
        if len(data) < offset + length:
            return None
        self.buffer = data[offset + length :]
        return bool(first & 0x80), first & 0x0F, data[offset : offset + length]

    def _check(self, fin: bool, opcode: int, payload: bytes) -> None:
        assert opcode in (0, 1, 2, 8, 9, 10), f"server frame with opcode {opcode}"
        if opcode >= 8:
            assert fin and len(payload) <= 125, f"bad server control frame {opcode} {payload!r}"
            if opcode == 9:
                self.pings.append(payload)
            elif opcode == 8:
                self.closed = True
                assert len(payload) != 1, "server close frame with a 1-byte payload"
                if payload:
                    self.close_code = struct.unpack("!H", payload[:2])[0]
                    assert self.close_code in SENDABLE_CLOSE_CODES, f"close code {self.close_code}"
                    assert self.close_code != 1011, f"the server failed: 1011 {payload[2:]!r}"
                    payload[2:].decode("utf-8")  # raises on an invalid reason
                else:
                    self.close_code = 1005
            return
        if opcode == 0:
            assert self._fragments is not None, "server continuation frame with no message"
            self._fragments.append(payload)
        else:
            assert self._fragments is None, "server started a message inside another"
            self._fragments, self._fragment_opcode = [payload], opcode
        if fin:
            message = b"".join(self._fragments)
            if self._fragment_opcode == 1:
                message.decode("utf-8")
            self._fragments = None
            self.messages += 1


# --- the fuzzer's side of a connection ----------------------------------------------------


@attrs.frozen
class Ending:
    """How a fuzz connection ends, once ``stop_after`` chunks (None: all) went out.

    Reads for up to ``read_for`` seconds (less if the server closes first),
    answering the server's close frame if ``reply_close``, then closes (FIN),
    resets (RST), or half-closes before reading.
    """

    stop_after: int | None
    read_for: float
    reply_close: bool
    finish: str  # "close", "reset" or "half-close"


@attrs.frozen
class CloseAll:
    """A server-initiated close of every session (admin API, code 4000).

    ``after`` None: at this point of the stream, between two chunks. Else from
    another thread, ``after`` seconds from here, racing the chunks that follow.
    """

    after: float | None = None


@attrs.frozen
class Pause:
    """Let the server act before the next chunk."""

    seconds: float


Step = bytes | CloseAll | Pause


def is_close_all(step: Step) -> bool:
    return isinstance(step, CloseAll)


@attrs.define
class Tally:
    """What the run did, for the summary."""

    examples: collections.Counter[str] = attrs.Factory(collections.Counter)
    connections: int = 0
    statuses: collections.Counter[str] = attrs.Factory(collections.Counter)
    close_codes: collections.Counter[str] = attrs.Factory(collections.Counter)
    endings: collections.Counter[str] = attrs.Factory(collections.Counter)
    close_alls: int = 0
    bytes_sent: int = 0
    trace: list[str] = attrs.Factory(list)  # the connection now being fuzzed, for reports


def shown(data: bytes, limit: int = 200) -> str:
    """``repr(data)``, cut short for the report if it is long."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes in all)"


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def chunked(steps: list[Step], sizes: list[int]) -> Iterator[Step]:
    """Cut the bytes in ``steps`` into chunks of ``sizes`` (the rest whole), keeping markers."""
    sizes = list(sizes)
    for step in steps:
        if not isinstance(step, bytes):
            yield step
            continue
        data = step
        while data:
            size = sizes.pop(0) if sizes else len(data)
            yield data[:size]
            data = data[size:]


class Fuzzer:
    """Runs fuzz connections against one gateway and checks it after each."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.tally = Tally()
        self.report = ""

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.gateway.port), timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tally.connections += 1
        return sock

    def run(
        self,
        steps: list[Step],
        sizes: list[int],
        ending: Ending,
        stream: ServerStream,
        *,
        opening: bytes | None = None,
    ) -> None:
        """Send ``steps`` on a new connection in chunks, then end it as ``ending`` says.

        An ``opening`` handshake goes out whole first, and must be accepted (101).
        """
        tally = self.tally
        trace = tally.trace
        trace.clear()
        sock = self.connect()
        bystander: Bystander | None = None
        racers: list[threading.Thread] = []
        racer_errors: list[BaseException] = []
        closed_all = finished = False
        try:
            if opening is not None:
                trace.append(f"send {shown(opening)}, wait for 101")
                sock.sendall(opening)
                while not stream.head_done:
                    data = sock.recv(65536)
                    assert data, "the server closed the connection during a valid handshake"
                    stream.feed(data)
                assert stream.status == 101, f"a valid handshake was answered {stream.status}"
            if any(map(is_close_all, steps)):
                # Registered after the fuzz connection, so that it comes later
                # in the hub's registry, as another client's session would.
                bystander = Bystander(self.gateway.port)
            replier = FrameProtocol(client=True, extensions=[])
            replied = False

            def receive(data: bytes) -> None:
                nonlocal replied
                stream.feed(data)
                if stream.closed and ending.reply_close and not replied:
                    replied = True
                    code = stream.close_code if stream.close_code != 1005 else None
                    trace.append(f"reply close {code}")
                    with contextlib.suppress(OSError):
                        sock.sendall(replier.close(code))

            def close_all_later(after: float) -> None:
                time.sleep(after)
                try:
                    self.gateway.close_all()
                except httpx.HTTPError as exc:
                    racer_errors.append(exc)

            sent = 0
            for step in chunked(steps, sizes):
                if ending.stop_after is not None and sent >= ending.stop_after:
                    break
                if isinstance(step, CloseAll):
                    tally.close_alls += 1
                    closed_all = True
                    if step.after is None:
                        trace.append("POST /api/close/all (4000)")
                        self.gateway.close_all()
                    else:
                        trace.append(f"POST /api/close/all (4000) in {step.after}s, from a thread")
                        racers.append(threading.Thread(target=close_all_later, args=[step.after]))
                        racers[-1].start()
                elif isinstance(step, Pause):
                    trace.append(f"sleep {step.seconds}")
                    time.sleep(step.seconds)
                else:
                    trace.append(f"send {shown(step)}")
                    sent += 1
                    tally.bytes_sent += len(step)
                    try:
                        sock.sendall(step)
                    except OSError as exc:  # the server closed, reset or stopped reading
                        trace.append(f"send failed: {exc!r}")
                        break
                    drain(sock, receive)
            if ending.finish == "half-close":
                trace.append("shutdown(SHUT_WR)")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            outcome = read_until_eof(sock, time.monotonic() + ending.read_for, receive)
            trace.append(f"read: {outcome}; then {ending.finish}")
            tally.endings[f"{outcome}, {ending.finish}"] += 1
            finished = True
        finally:
            for racer in racers:
                racer.join()
            if ending.finish == "reset":
                reset(sock)
            else:
                sock.close()
            if bystander is not None and not (closed_all and finished):
                bystander.stop()
        if racer_errors:
            raise racer_errors[0]
        if bystander is not None and closed_all:
            bystander.expect_close(4000)
        if stream.status is not None:
            tally.statuses[str(stream.status)] += 1
        else:
            tally.statuses["no answer"] += 1
        if stream.closed:
            tally.close_codes[str(stream.close_code)] += 1

    # --- the checks after each example ---------------------------------------------------

    def check(self, errors_before: int, log_mark: int) -> None:
        """The gateway survived the example, works, and let go of every connection."""
        gateway = self.gateway
        self.check_running()
        try:
            answer = gateway.admin.get("/healthz")
            assert answer.status_code == 200, answer
        except (httpx.HTTPError, AssertionError) as exc:
            self.fail(f"/healthz failed: {exc!r}", fatal=True)
        try:
            echo_round_trip(gateway.port)
        except (OSError, AssertionError) as exc:
            self.fail(f"a well-behaved client's echo failed: {exc!r}", fatal=True)
        stats = self.wait_until_empty()
        if stats["connection_errors"] != errors_before:
            self.fail(f"connection_errors rose: {errors_before} -> {stats['connection_errors']}")
        tracebacks = [line for line in gateway.log[log_mark:] if "Traceback" in line]
        if tracebacks:
            self.fail("the gateway logged a traceback")

    def check_running(self) -> None:
        process = self.gateway.process
        if process.poll() is not None:
            self.fail(f"the gateway exited with {process.returncode}", fatal=True)

    def statistics(self) -> dict[str, Any]:
        try:
            return self.gateway.statistics()
        except httpx.HTTPError as exc:
            self.check_running()
            self.fail(f"/api/statistics failed: {exc!r}", fatal=True)
            raise  # not reached

    def wait_until_empty(self) -> dict[str, Any]:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            stats = self.statistics()
            if stats["connections"] == 0 and stats["handshakes_in_progress"] == 0:
                return stats
            if time.monotonic() > deadline:
                self.fail(f"connections left behind after {SETTLE_TIMEOUT}s: {stats}")
            time.sleep(0.01)

    def fail(self, what: str, *, fatal: bool = False) -> None:
        # Kept, not printed: hypothesis replays the (shrunk) failing example
        # last, so the report left at the end is the one to read.
        self.report = (
            f"FINDING: {what}\nthe connection (client side):\n  "
            + "\n  ".join(self.tally.trace)
            + f"\ngateway log tail:\n{self.gateway.tail()}"
        )
        if fatal:
            raise GatewayDown(what)
        raise AssertionError(what)

    def example(self, kind: str, body: Callable[[], None]) -> None:
        """Run one example and check the gateway afterwards."""
        self.tally.examples[kind] += 1
        self.check_running()
        errors_before = self.statistics()["connection_errors"]
        log_mark = len(self.gateway.log)
        try:
            body()
        except AssertionError as exc:  # what the server sent, or a bystander, is wrong
            self.fail(str(exc))
        except httpx.HTTPError as exc:
            self.fail(f"POST /api/close/all failed: {exc!r}")
        self.check(errors_before, log_mark)


def drain(sock: socket.socket, receive: Callable[[bytes], None]) -> None:
    """Read whatever the server sent so far, without waiting."""
    sock.setblocking(False)
    try:
        while data := sock.recv(65536):
            receive(data)
    except (BlockingIOError, OSError):
        pass
    finally:
        sock.settimeout(IO_TIMEOUT)


def read_until_eof(sock: socket.socket, deadline: float, receive: Callable[[bytes], None]) -> str:
    """Read until the server closes or ``deadline``; says which ("eof", "reset", "deadline")."""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:
            return "reset"
        if not data:
            return "eof"
        receive(data)
    return "deadline"


class Client:
    """A well-behaved WebSocket client (wsproto over a blocking socket) that answers pings."""

    def __init__(self, port: int, user: str) -> None:
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock.sendall(self.ws.send(Request(host="127.0.0.1", target=f"/?token={user}")))
        self._text = ""
        hello = self.receive()
        assert isinstance(hello, str), f"closed before the hello: {hello!r}"
        assert orjson.loads(hello)["payload"]["topic"] == "hello", hello

    def receive(self) -> str | CloseConnection:
        """The next whole text message, or the server's close (answered)."""
        while True:
            for event in self.ws.events():
                match event:
                    case AcceptConnection():
                        pass
                    case RejectConnection() | RejectData():
                        raise AssertionError(f"refused: {event!r}")
                    case Ping():
                        self.sock.sendall(self.ws.send(event.response()))
                    case TextMessage(data=text, message_finished=finished):
                        self._text += text
                        if finished:
                            text, self._text = self._text, ""
                            return text
                    case CloseConnection():
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            self.sock.sendall(self.ws.send(event.response()))
                        return event
                    case _:
                        raise AssertionError(f"unexpected event {event!r}")
            data = self.sock.recv(65536)
            assert data, "the server closed the connection without a close frame"
            self.ws.receive_data(data)

    def request(self) -> None:
        """One echoed request."""
        self.sock.sendall(self.ws.send(TextMessage(ECHO_TEXT)))
        answer = self.receive()
        assert isinstance(answer, str), f"the server closed instead of answering: {answer!r}"
        payload = orjson.loads(answer)
        assert payload["type"] == "response", payload
        assert payload["payload"]["result"] == [1], payload
        assert payload["payload"]["trace_id"] == "t", payload

    def close(self) -> None:
        """A clean close from the client's side."""
        self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        answer = self.receive()
        assert isinstance(answer, CloseConnection), f"no close reply, got {answer!r}"
        self.sock.close()


def echo_round_trip(port: int) -> None:
    """A well-behaved client: handshake, hello, one echoed request, a clean close."""
    client = Client(port, "probe")
    try:
        client.request()
        client.close()
    finally:
        client.sock.close()


class Bystander:
    """A well-behaved session beside a fuzz connection, to check that close/all reaches it.

    A thread reads it (answering the heartbeat's pings) until the server closes it.
    """

    def __init__(self, port: int) -> None:
        self.client = Client(port, "bystander")
        self.closed_with: CloseConnection | str | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while not isinstance(answer := self.client.receive(), CloseConnection):
                pass
            self.closed_with = answer
        except (OSError, AssertionError) as exc:
            self.closed_with = repr(exc)

    def stop(self) -> None:
        """Hang up (the close/all never went out); the reading thread sees EOF."""
        with contextlib.suppress(OSError):
            self.client.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=IO_TIMEOUT)
        self.client.sock.close()

    def expect_close(self, code: int) -> None:
        """Wait for the server's close frame; it must carry ``code``."""
        self.thread.join(timeout=CLOSE_TIMEOUT + 3.0)
        self.client.sock.close()
        closed = self.closed_with
        assert isinstance(closed, CloseConnection) and closed.code == code, (
            f"POST /api/close/all did not close a bystander session with {code}: {closed!r}"
        )


# --- strategies: handshakes -----------------------------------------------------------------

T = TypeVar("T")


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of ``choices``, picked in proportion to its weight; shrinks toward the first."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(table.__getitem__)


KEY = base64.b64encode(b"fuzz-key-16bytes")
BASE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"Host", b"127.0.0.1"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]
HEADER_VALUES: dict[bytes, list[bytes]] = {
    b"Host": [b"127.0.0.1", b"", b"[::1", b"evil.example.com", b"127.0.0.1:99999", b"a b"],
    b"Upgrade": [b"websocket", b"WebSocket", b"h2c", b"", b"websocket, h2c", b"web socket"],
    b"Connection": [b"Upgrade", b"keep-alive, Upgrade", b"close", b"", b"upgrade,upgrade"],
    b"Sec-WebSocket-Key": [KEY, b"", b"short", b"!" * 22 + b"==", KEY + KEY],
    b"Sec-WebSocket-Version": [b"13", b"8", b"", b"13, 8", b"9" * 30, b"-13"],
    b"Origin": [
        b"http://127.0.0.1",
        b"null",
        b"",
        b"http://[::1",
        b"file://",
        "http://é.example".encode(),
        b"http://\xff",
    ],
    b"Authorization": [
        b"Bearer fuzz",
        b"Bearer",
        b"Bearer ",
        b"Basic Zm9vOmJhcg==",
        b"Bearer:x",
        "Bearer ü".encode(),
        b"Bearer \xff\xfe",
        b"Bearer " + b"t" * 5000,
    ],
    b"Cookie": [
        b"Authorization=Bearer fuzz",
        b"Authorization=",
        b"a=b; ;;=; =c",
        b"Authorization=Bearer%20x%zz",
        b"\xff=\xfe",
        b"token=fuzz",
        b'Authorization="Bearer \\"x"',
    ],
    b"Sec-WebSocket-Protocol": [b"chat", b"", b",,,"],
    b"Sec-WebSocket-Extensions": [
        b"permessage-deflate",
        b"permessage-deflate; client_max_window_bits",
        b"x-unknown; a=b",
        b";;;",
    ],
    b"Content-Length": [b"0", b"5", b"-1", b"abc", b"99999999999999999999"],
    b"Transfer-Encoding": [b"chunked", b"gzip"],
}
OPTIONAL_HEADERS = [name for name in HEADER_VALUES if name not in dict(BASE_HEADERS)]

garbage = st.binary(max_size=48)
header_garbage = st.one_of(
    garbage,  # may hold CR, LF, NUL, colons
    st.text(max_size=24).map(lambda t: t.encode("utf-8")),
)


def header_value(name: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(HEADER_VALUES[name]), header_garbage)


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for name, value in BASE_HEADERS:
        match draw(st.sampled_from(["keep"] * 9 + ["drop", "change", "duplicate"])):
            case "keep":
                headers.append((name, value))
            case "change":
                headers.append((name, draw(header_value(name))))
            case "duplicate":
                headers += [(name, value), (name, draw(header_value(name)))]
    for name in OPTIONAL_HEADERS:
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
            headers.append((name, draw(header_value(name))))
    headers += draw(st.lists(st.tuples(header_garbage, header_garbage), max_size=2))
    if draw(st.booleans()):
        headers = draw(st.permutations(headers))
    case = draw(st.sampled_from(["as is", "lower", "upper"]))
    if case != "as is":
        headers = [(getattr(n, case)(), v) for n, v in headers]
    return headers


targets = st.one_of(
    st.just(b"/?token=fuzz"),
    st.just(b"/"),  # the token comes from a header, or not at all
    st.sampled_from(
        [
            b"//[/",
            b"//[/?token=a",
            b"/?token=%zz",
            b"/?token=%",
            b"/%ff%00?token=a%00b",
            b"*",
            b"http://127.0.0.1/?token=a",
            b"/?token=a&token=b",
            b"/?token=",
            b"/?token",
            b"/#x?token=x",
            b"",
            b"?token=a",
            b"//evil.example.com/?token=a",
            b"/\\?token=a",
            b"/?token=%F0%9F%92%A9",
            b"/?token=%ED%A0%80",
        ]
    ),
    st.text(max_size=30).map(lambda t: b"/?token=" + t.encode("utf-8")),
    st.binary(max_size=30).map(lambda b: b"/?token=" + b),
    st.lists(
        st.sampled_from([b"%", b"%z", b"%ff", b"%00", b"%2", b"%%", b"%E2%82", b"&", b"=", b";"]),
        max_size=12,
    ).map(lambda parts: b"/?token=x" + b"".join(parts)),
    st.sampled_from([100, 4000, 8200, 16500, 70000]).map(lambda n: b"/?token=" + b"a" * n),
)
methods = weighted(
    (6, st.just(b"GET")),
    (3, st.sampled_from([b"POST", b"HEAD", b"get", b"CONNECT", b"PRI", b""])),
    (1, garbage),
)
versions = weighted(
    (6, st.just(b"HTTP/1.1")),
    (
        3,
        st.sampled_from(
            [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/11", b"http/1.1", b""]
        ),
    ),
    (1, garbage),
    (1, st.just(b"HTTP/1.1 extra")),
)


def handshake(target: bytes = b"/?token=fuzz") -> bytes:
    """A valid upgrade request."""
    lines = [b"GET " + target + b" HTTP/1.1"] + [n + b": " + v for n, v in BASE_HEADERS]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@st.composite
def structured_requests(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    request_line = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
    lines = [request_line] + [n + b": " + v for n, v in draw(header_lists())]
    return eol.join(lines) + eol + eol + draw(st.sampled_from([b"", b"", b"\x81\x00"]) | garbage)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(handshake(b"/?token=mutant"))
    if draw(st.booleans()):  # a frame right behind the request, in the same chunk
        data += FrameProtocol(client=True, extensions=[]).send_data(ECHO_TEXT)
    operations = st.tuples(
        st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate"]),
        st.integers(0, 1 << 16),
        st.binary(min_size=1, max_size=8),
    )
    for operation, where, what in draw(st.lists(operations, min_size=1, max_size=6)):
        at = where % (len(data) + 1)
        match operation:
            case "flip" if at < len(data):
                data[at] ^= 1 << (what[0] % 8)
            case "insert":
                data[at:at] = what
            case "delete":
                del data[at : at + 1 + what[0] % 16]
            case "duplicate":
                data[at:at] = data[at : at + 1 + what[0] % 32]
            case "truncate":
                data = data[:at]
    return bytes(data)


def chunk_sizes() -> st.SearchStrategy[list[int]]:
    return st.one_of(
        st.just([]),  # each step whole
        st.lists(st.integers(1, 700), max_size=10),
        st.integers(1, 4).map(lambda n: [n] * 60),  # byte by byte (the first bytes)
    )


def endings(max_chunks: int = 12) -> st.SearchStrategy[Ending]:
    return st.builds(
        Ending,
        stop_after=st.one_of(st.none(), st.none(), st.integers(0, max_chunks)),
        read_for=st.sampled_from([0.0, 0.0, 0.05, 0.05, 0.2, 0.2, 0.5, 1.5]),
        reply_close=st.booleans(),
        finish=st.sampled_from(["close", "reset", "reset", "half-close"]),
    )


# --- strategies: frame streams ---------------------------------------------------------------


@attrs.frozen
class RawFrame:
    """A frame built by hand: any header bits, any length encoding, a length that may lie."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    mask: bytes
    payload: bytes
    length_form: str = "minimal"  # "minimal", "16" or "64": how the length is written
    declared: int | None = None  # the length the header claims, if not the payload's

    def wire(self) -> bytes:
        length = len(self.payload) if self.declared is None else self.declared
        first = self.fin << 7 | self.rsv << 4 | self.opcode
        mask_bit = 0x80 if self.masked else 0
        if self.length_form == "64" or length > 0xFFFF:
            header = bytes([first, mask_bit | 127]) + struct.pack("!Q", length % (1 << 64))
        elif self.length_form == "16" or length > 125:
            header = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
        else:
            header = bytes([first, mask_bit | length])
        if not self.masked:
            return header + self.payload
        mask = self.mask
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(self.payload))
        return header + mask + masked


INVALID_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82"]
CLOSE_CODES = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011]
CLOSE_CODES += [1012, 1013, 1014, 1015, 1016, 0, 999, 2999, 3000, 3999, 4000, 4999, 5000, 65535]

utf8_payloads = st.text(max_size=40).map(lambda t: t.encode("utf-8"))
invalid_utf8_payloads = st.tuples(utf8_payloads, st.sampled_from(INVALID_UTF8), utf8_payloads).map(
    b"".join
)
payloads = weighted(
    (1, st.just(b"")),
    (2, st.binary(max_size=64)),
    (2, utf8_payloads),
    (2, invalid_utf8_payloads),
    (1, st.just(ECHO_TEXT.encode())),
    (1, st.sampled_from([b"{", b"null", b"[]", b'{"type":"request"}', b'{"type":"auth"}'])),
    (
        2,  # at and over the extended-length boundaries and max_message_size
        st.sampled_from([125, 126, 127, 1000, MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1, 70000]).map(
            lambda n: b"x" * n
        ),
    ),
)
close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.tuples(
        # Never 1011 from the client: the server echoes a client's close code,
        # and an echoed 1011 could not be told from the server's own failure.
        st.one_of(st.sampled_from(CLOSE_CODES), st.integers(0, 65535)).filter(
            lambda code: code != 1011
        ),
        st.one_of(utf8_payloads, invalid_utf8_payloads, st.just(b"r" * 124)),
    ).map(lambda c: struct.pack("!H", c[0]) + c[1]),
)
masks = st.binary(min_size=4, max_size=4)


@st.composite
def raw_frames(draw: st.DrawFn) -> RawFrame:
    opcode = draw(weighted((4, st.sampled_from([0, 1, 2, 8, 9, 10])), (1, st.integers(0, 15))))
    payload = draw(close_payloads if opcode == 8 else payloads)
    declared = draw(
        weighted(
            (8, st.none()),
            (1, st.integers(0, 300)),
            (1, st.sampled_from([126, 127, 0xFFFF, 0x10000, 1 << 31, (1 << 63) - 1, 1 << 63])),
        )
    )
    return RawFrame(
        fin=draw(weighted((3, st.just(True)), (1, st.just(False)))),
        rsv=draw(weighted((6, st.just(0)), (1, st.integers(1, 7)))),
        opcode=opcode,
        masked=draw(weighted((6, st.just(True)), (1, st.just(False)))),
        mask=draw(masks),
        payload=payload,
        length_form=draw(weighted((6, st.just("minimal")), (1, st.sampled_from(["16", "64"])))),
        declared=declared,
    )


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    """A whole message or control frame from wsproto's client-side framer."""
    framer = FrameProtocol(client=True, extensions=[])
    kind = draw(
        st.sampled_from(["request", "request", "text", "binary", "big", "ping", "pong", "close"])
    )
    match kind:
        case "request":
            return bytes(framer.send_data(ECHO_TEXT))
        case "text":
            return bytes(framer.send_data(draw(st.text(max_size=60))))
        case "binary":
            return bytes(framer.send_data(draw(st.binary(max_size=60))))
        case "big":  # around max_message_size: the largest accepted, and 1009
            size = draw(st.sampled_from([MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1, 70000]))
            return bytes(framer.send_data("x" * size))
        case "ping":
            return bytes(framer.ping(draw(st.binary(max_size=125))))
        case "pong":
            return bytes(framer.pong(draw(st.binary(max_size=125))))
    code = draw(st.sampled_from([None, 1000, 1001, 1003, 1008, 3000, 4000, 4999]))
    reason = draw(st.text(max_size=20)) if code is not None else None
    return bytes(framer.close(code, reason))


@st.composite
def fragmented_messages(draw: st.DrawFn) -> bytes:
    """A message in fragments (valid or not), with control frames between them."""
    text = draw(st.booleans())
    if text:
        data = draw(st.one_of(st.just(ECHO_TEXT.encode()), utf8_payloads, invalid_utf8_payloads))
    else:
        data = draw(st.binary(max_size=80))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), min_size=1, max_size=5)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    mask = draw(masks)
    frames: list[bytes] = []
    for i, piece in enumerate(pieces):
        opcode = (1 if text else 2) if i == 0 else 0
        last = i == len(pieces) - 1
        frames.append(RawFrame(last, 0, opcode, True, mask, piece).wire())
        if not last:
            for control in draw(st.lists(control_frames(), max_size=2)):
                frames.append(control)
    if draw(st.integers(0, 9)) == 0:
        frames.pop()  # never finished
    return b"".join(frames)


def control_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(
            lambda opcode, payload, mask: RawFrame(True, 0, opcode, True, mask, payload).wire(),
            st.sampled_from([9, 10]),
            st.binary(max_size=20),
            masks,
        ),
        st.builds(
            lambda p, mask: RawFrame(True, 0, 8, True, mask, p).wire(), close_payloads, masks
        ),
        st.builds(lambda p, mask: RawFrame(False, 0, 9, True, mask, p).wire(), payloads, masks),
    )


def request_bursts() -> st.SearchStrategy[bytes]:
    """Many echo requests at once: the inbound queue fills and replies pile up."""
    framer = FrameProtocol(client=True, extensions=[])
    return st.integers(2, 40).map(lambda n: bytes(framer.send_data(ECHO_TEXT)) * n)


close_alls = st.builds(CloseAll, st.sampled_from([None, 0.0, 0.002, 0.02]))
pauses = st.sampled_from([0.001, 0.01, 0.05]).map(Pause)
# Valid traffic (mostly): the connection gets somewhere before the fuzzing proper.
benign_actions: st.SearchStrategy[Step] = weighted(
    (4, valid_frames()),
    (2, fragmented_messages()),
    (1, request_bursts()),
    (1, close_alls),
    (1, pauses),
)
actions: st.SearchStrategy[Step] = weighted(
    (4, valid_frames()),
    (4, raw_frames().map(RawFrame.wire)),
    (2, fragmented_messages()),
    (1, request_bursts()),
    (1, garbage),
    (1, close_alls),
    (1, pauses),
)
frame_streams = st.tuples(
    st.lists(benign_actions, max_size=6), st.lists(actions, min_size=1, max_size=8)
).map(lambda parts: parts[0] + parts[1])


# --- the fuzz tests --------------------------------------------------------------------------


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # reproducible from the seed alone, and nothing written to the tree
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )


def make_tests(fuzzer: Fuzzer, examples: int, fuzz_seed: int) -> list[Callable[[], None]]:
    """The two hypothesis tests, bound to ``fuzzer``'s gateway."""

    @seed(fuzz_seed)
    @fuzz_settings(examples * 2 // 5)
    @given(
        request=st.one_of(structured_requests(), mutated_requests()),
        sizes=chunk_sizes(),
        ending=endings(),
    )
    @example(request=handshake(), sizes=[], ending=Ending(None, 0.2, True, "close"))
    @example(request=handshake(b"//[/"), sizes=[], ending=Ending(None, 0.2, True, "reset"))
    @example(request=handshake()[:-2], sizes=[], ending=Ending(None, 1.5, False, "close"))
    def fuzz_handshakes(request: bytes, sizes: list[int], ending: Ending) -> None:
        fuzzer.example("handshake", lambda: fuzzer.run([request], sizes, ending, ServerStream()))

    @seed(fuzz_seed)
    @fuzz_settings(examples * 3 // 5)
    @given(
        steps=frame_streams,
        sizes=chunk_sizes(),
        ending=endings(),
    )
    @example(steps=[CloseAll(), b"\x89\x80abcd"], sizes=[], ending=Ending(None, 0.2, True, "close"))
    @example(  # over max_message_size: 1009
        steps=[RawFrame(True, 0, 2, True, b"mask", b"x" * (MAX_MESSAGE_SIZE + 1)).wire()],
        sizes=[100, 1000],
        ending=Ending(None, 0.2, True, "close"),
    )
    @example(  # invalid UTF-8 across two fragments, a ping between them: 1007
        steps=[
            RawFrame(False, 0, 1, True, b"mask", b"ok \xe2\x82").wire(),
            RawFrame(True, 0, 9, True, b"mask", b"ping").wire(),
            RawFrame(True, 0, 0, True, b"mask", b"\xff").wire(),
        ],
        sizes=[3, 3, 3],
        ending=Ending(None, 0.2, True, "close"),
    )
    @example(  # a protocol error, then a server-initiated close at once
        steps=[b"\x00\x80\x00\x00\x00\x00", CloseAll()],
        sizes=[],
        ending=Ending(None, 0.05, False, "reset"),
    )
    def fuzz_frames(steps: list[Step], sizes: list[int], ending: Ending) -> None:
        def connection() -> None:
            fuzzer.run(steps, sizes, ending, ServerStream(), opening=handshake(b"/?token=fuzzer"))

        fuzzer.example("frames", connection)

    return [fuzz_handshakes, fuzz_frames]


def fuzz_engine(engine: str, examples: int, fuzz_seed: int) -> bool:
    """One pass against a gateway on ``engine``; prints its report. True if nothing was found."""
    started = time.monotonic()
    gateway = Gateway.start(engine)
    fuzzer = Fuzzer(gateway)
    failed: BaseException | None = None
    try:
        for test in make_tests(fuzzer, examples, fuzz_seed):
            test()
        stats = fuzzer.wait_until_empty()
        fuzzer.tally.trace[:] = ["(after all examples)"]
        if stats["connection_errors"]:
            fuzzer.fail(f"connection_errors = {stats['connection_errors']}")
    except (Exception, GatewayDown) as exc:
        failed = exc
        stats = {}
    exit_code = gateway.stop()
    tracebacks = sum("Traceback" in line for line in gateway.log)
    tally = fuzzer.tally
    print(
        f"protocol fuzz, engine {engine}, seed {fuzz_seed}: "
        f"{sum(tally.examples.values())} examples ({dict(tally.examples)}), "
        f"{tally.connections} fuzz connections, {tally.bytes_sent} bytes sent, "
        f"{tally.close_alls} server-initiated closes, {time.monotonic() - started:.1f}s",
        f"answers: {dict(tally.statuses)}",
        f"server close codes: {dict(tally.close_codes)}",
        f"endings: {dict(tally.endings)}",
        f"final statistics: {stats}",
        f"gateway: exit {exit_code}, {tracebacks} traceback(s) in its log",
        sep="\n",
    )
    if failed is not None or exit_code != 0 or tracebacks:
        if failed is not None:
            print(f"{fuzzer.report}\nFAILED: {repr(failed)[:1000]}", file=sys.stderr)
        elif exit_code != 0 or tracebacks:
            print("".join(gateway.log[-200:]), file=sys.stderr)
        print(
            f"engine {engine} FAILED; again with: python tests/fuzz_protocol.py "
            f"--engine {engine} --examples {examples} --seed {fuzz_seed}",
            file=sys.stderr,
        )
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--examples",
        type=int,
        default=600,
        help="examples in all, split evenly between the engines (default 600)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help=f"hypothesis seed of the first engine; the second gets seed + 1 ({SEED})",
    )
    parser.add_argument(
        "--engine",
        choices=[*ENGINES, "all"],
        default="all",
        help="the connection layer to fuzz (hub.engine); default all, one pass each",
    )
    args = parser.parse_args(argv)
    engines = ENGINES if args.engine == "all" else (args.engine,)
    per_engine = max(1, args.examples // len(engines))
    passed = {
        engine: fuzz_engine(engine, per_engine, args.seed + n) for n, engine in enumerate(engines)
    }
    outcomes = (f"{engine} {'ok' if ok else 'FAILED'}" for engine, ok in passed.items())
    print("protocol fuzz:", ", ".join(outcomes))
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
