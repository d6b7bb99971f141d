"""The default connection layer: trio streams driven through wsproto directly.

trio-websocket runs a reader task per connection, a lock around every write
and a queue between its reader and the application. This engine runs none of
them; a connection is the task that uses it:

* **Reading.** ``get_message`` reads the socket itself, feeds wsproto, and
  answers what the client sends besides messages (pings, close frames,
  protocol errors) on the spot. So an idle connection is one parked task: the
  session's dispatcher, waiting in ``get_message``. While the dispatcher is in
  a callback nothing reads that client: TCP pushes back on it, and the hub's
  heartbeat does not ping it.
* **Writing.** ``StreamWriter`` writes frames built once for every recipient
  (``_frames``). The session's writer task is the only task that waits on the
  socket. Anyone else (an inline write, a pong, a close frame) writes only with
  a non-blocking send while that writer has nothing half written; a rest the
  socket does not take is handed to the writer (``on_blocked``), and control
  frames that come while a frame is half out are held and written right after
  it, so no control frame ever lands inside a data frame.
* **The handshake.** wsproto's ``H11Handshake`` (h11 under it, with its
  limits) reads and checks the request, and builds the 101 or the refusal.
  After the handshake only wsproto's frame-level ``Connection`` is kept.
* **permessage-deflate** (RFC 7692, ``HubConfig.compression``). The hub always
  answers with ``server_no_context_takeover`` and ``client_no_context_takeover``:
  each message is compressed on its own, so a message for many recipients is
  compressed once (``Frame.deflated``), and no compressor or decompressor
  outlives the message it works on. Inflating is bounded by
  ``max_message_size``.

Only public APIs of trio, h11 and wsproto are used.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections import deque
from collections.abc import Callable
from contextlib import suppress

import h11
import trio
from wsproto import ConnectionType
from wsproto.connection import Connection as WsprotoProtocol
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.handshake import H11Handshake, server_extensions_handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError, generate_accept_token

from ._close_codes import CloseCode
from ._connection import CloseWrite, ConnectionEnded, NoRequest
from ._frames import Frame
from ._nonblocking import whole_frames, write_nowait

__all__ = ["StreamWriter", "WsprotoConnection", "WsprotoUpgrade", "open_wsproto_connection"]

logger = logging.getLogger("trio_gw")

# One read takes at most this much; a client's bytes beyond it wait in the kernel.
_RECEIVE_SIZE = 64 * 1024
# h11 refuses a request head larger than this (its default) with 400; only
# this much of what was read is kept, to find the request line and its end.
_MAX_REQUEST_HEAD = 16 * 1024
# Messages shorter than this are sent uncompressed even when deflate is on:
# compressing them costs more than the bytes it saves.
DEFLATE_MIN_SIZE = 128
# With compression, received bytes are fed to wsproto this many at a time.
_DEFLATE_SLICE = 2048
# The window the client may compress with, when it lets us choose
# (client_max_window_bits); inflating needs a window of 2**bits bytes.
_CLIENT_WINDOW_BITS = 12


class _Deflate(Extension):
    """permessage-deflate (RFC 7692) as the hub speaks it, on wsproto's extension API.

    The hub always answers ``server_no_context_takeover`` and
    ``client_no_context_takeover``: every message is compressed on its own
    (the hub compresses a message once for all its recipients, see
    ``Frame.deflated``), and a client message is inflated by a decompressor
    made for it and dropped after it. Inflating stops at ``max_size``: a small
    frame that would inflate to gigabytes fails with 1009 as soon as it passes
    the limit. A control frame between the fragments of a compressed message
    (RFC 6455 5.4) passes through and leaves the message's inflating alone.

    (wsproto's own ``PerMessageDeflate`` keeps compressors per connection,
    inflates without a bound, lets a control frame between fragments end the
    inflating, and raises on a window size that is no number.)
    """

    name = "permessage-deflate"

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._enabled = False
        #: The window the server compresses with (what the client allowed).
        self.deflate_bits = 15
        self._inflate_bits = 15  # the window the client compresses with
        self._decompressor: zlib._Decompress | None = None  # of the message being read
        self._control = False  # the frame being read is a control frame
        self._inflated = 0

    def enabled(self) -> bool:
        """True once an offer was accepted."""
        return self._enabled

    def offer(self) -> bool | str:
        """A server makes no offer."""
        return False

    def accept(self, offer: str) -> bool | str | None:
        """Answer an offer, or decline it (None) if it is malformed (RFC 7692 7)."""
        parameters = _deflate_parameters(offer)
        if parameters is None:
            return None
        answer = ["server_no_context_takeover", "client_no_context_takeover"]
        server_bits = parameters.get("server_max_window_bits")
        if server_bits is not None:
            if not 9 <= server_bits <= 15:  # zlib cannot compress with a window of 8
                return None
            self.deflate_bits = server_bits
            answer.append(f"server_max_window_bits={server_bits}")
        if "client_max_window_bits" in parameters:
            offered = parameters["client_max_window_bits"] or 15
            if not 8 <= offered <= 15:
                return None
            bits = min(offered, _CLIENT_WINDOW_BITS)
            # A window of 8 is inflated with 9 (a larger window reads any smaller one).
            self._inflate_bits = max(bits, 9)
            answer.append(f"client_max_window_bits={bits}")
        self._enabled = True
        return "; ".join(answer)

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        """RSV1 marks the first frame of a compressed message, and nothing else."""
        self._control = opcode.iscontrol()
        if self._control or opcode is Opcode.CONTINUATION:
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else RsvBits(True, False, False)
        self._inflated = 0
        self._decompressor = zlib.decompressobj(-self._inflate_bits) if rsv.rsv1 else None
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        """Inflate at most what is left of ``max_size``."""
        decompressor = self._decompressor
        if self._control or decompressor is None:
            return data
        return self._inflate(decompressor, data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        """The end of a compressed message: the rest of the inflating, and no decompressor."""
        decompressor = self._decompressor
        if self._control or not fin or decompressor is None:
            return None
        self._decompressor = None
        return self._inflate(decompressor, b"\x00\x00\xff\xff")  # RFC 7692 7.2.2

    def _inflate(self, decompressor: zlib._Decompress, data: bytes) -> bytes | CloseReason:
        try:
            out = decompressor.decompress(data, self._max_size - self._inflated + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if decompressor.unconsumed_tail or self._inflated > self._max_size:
            return CloseReason.MESSAGE_TOO_BIG
        return out


def _deflate_parameters(offer: str) -> dict[str, int | None] | None:
    """A permessage-deflate offer's parameters, or None if one is unknown, repeated or bad."""
    parameters: dict[str, int | None] = {}
    for parameter in offer.split(";")[1:]:
        name, equals, raw = (part.strip() for part in parameter.partition("="))
        value = raw.strip('"')
        if name in parameters or name not in _DEFLATE_PARAMETERS:
            return None
        if not equals:
            if name == "server_max_window_bits":
                return None  # RFC 7692 7.1.2.1: it takes a value
            parameters[name] = None
        elif _DEFLATE_PARAMETERS[name] and value.isdigit() and len(value) <= 2:
            parameters[name] = int(value)
        else:
            return None
    return parameters


_DEFLATE_PARAMETERS = {  # name: whether it takes a value
    "client_no_context_takeover": False,
    "server_no_context_takeover": False,
    "client_max_window_bits": True,
    "server_max_window_bits": True,
}


_SWITCHING_PROTOCOLS = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)

# What a handshake holds once the connection is accepted (see ``_release``).
_SPENT_HANDSHAKE = H11Handshake(ConnectionType.SERVER)
_SPENT_REQUEST = Request(host="-", target="/")


class WsprotoUpgrade:
    """A client's opening handshake, read with h11 and checked by wsproto."""

    __slots__ = (
        "_compression",
        "_handshake",
        "_http_version",
        "_limits",
        "_request",
        "_stream",
        "_trailing",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        request: Request,
        http_version: bytes | None,
        handshake: H11Handshake,
        trailing: bytes,
        limits: tuple[int, int],
        compression: bool,
    ) -> None:
        self._stream = stream
        self._request = request
        self._http_version = http_version
        self._handshake = handshake
        self._trailing = trailing
        self._limits = limits
        self._compression = compression

    @property
    def path(self) -> str:
        """See ``Upgrade.path``."""
        return self._request.target

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """See ``Upgrade.headers``."""
        return list(self._request.extra_headers)

    @property
    def http_version(self) -> bytes | None:
        """See ``Upgrade.http_version``."""
        return self._http_version

    async def accept(self) -> WsprotoConnection | None:
        """See ``Upgrade.accept``.

        The 101 is built here from what wsproto checked (its accept token and
        its extension negotiation): through ``H11Handshake.send`` it costs
        about a third of an accept, for a fixed response.
        """
        max_message_size, inbound_queue_size = self._limits
        extensions: list[Extension] = [_Deflate(max_message_size)] if self._compression else []
        request, trailing = self._request, self._trailing
        key = next((v for k, v in request.extra_headers if k == b"sec-websocket-key"), b"")
        head = [_SWITCHING_PROTOCOLS, generate_accept_token(key), b"\r\n"]
        if extensions:
            offers = [offer for offer in request.extensions if isinstance(offer, str)]
            agreed = server_extensions_handshake(offers, extensions)
            if agreed:
                head += [b"Sec-WebSocket-Extensions: ", agreed, b"\r\n"]
        head.append(b"\r\n")
        protocol = WsprotoProtocol(ConnectionType.SERVER, extensions)
        # Only the frame-level connection is kept: the HTTP parser and the
        # request would otherwise stay alive as long as the connection.
        self._release()
        try:
            stream = self._stream
            await _send(
                stream,
                stream.socket if isinstance(stream, trio.SocketStream) else None,
                b"".join(head),
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        deflate = next((e for e in extensions if isinstance(e, _Deflate) and e.enabled()), None)
        connection = WsprotoConnection(
            self._stream,
            protocol,
            max_message_size=max_message_size,
            inbound_queue_size=inbound_queue_size,
            deflate_bits=deflate.deflate_bits if deflate is not None else None,
        )
        if trailing:
            connection._feed(trailing)
        return connection

    def _release(self) -> None:
        self._handshake = _SPENT_HANDSHAKE
        self._request = _SPENT_REQUEST
        self._trailing = b""

    async def reject(self, status: int, body: bytes) -> None:
        """See ``Upgrade.reject``."""
        handshake = self._handshake
        head = handshake.send(
            RejectConnection(
                status_code=status,
                headers=[
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
                has_body=True,
            )
        )
        data = head + handshake.send(RejectData(data=body, body_finished=True))
        await _send_quietly(self._stream, data)

    async def aclose(self) -> None:
        """Nothing to release: the hub closes the stream."""


class StreamWriter:
    """Writes pre-built frames to one connection; see the module docstring.

    The same contract as ``_transport.FastWriter``: ``write`` is for the
    session's writer task; ``write_nowait``, control frames and
    ``write_close_nowait`` never wait.
    """

    __slots__ = (
        "_batch",
        "_busy",
        "_cut_whole",
        "_deflate_bits",
        "_held_close",
        "_held_ping",
        "_held_pong",
        "_held_rest",
        "_sent",
        "_socket",
        "_stream",
        "close_frame",
        "on_blocked",
    )

    def __init__(self, stream: trio.abc.Stream, deflate_bits: int | None) -> None:
        self._stream = stream
        # Plain TCP (not TLS): writes go straight to the socket without waiting.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._deflate_bits = deflate_bits
        # While a write is half done: the frames being written and how many
        # bytes of them went out.
        self._batch: list[Frame] | None = None
        self._sent = 0
        self._cut_whole = 0
        # Control frames waiting for a frame boundary: the rest of one that went
        # out in part (it goes first), the latest pong (RFC 6455 5.5.3 lets a
        # pong answer only the latest ping, so a ping flood holds one), a
        # ping of our own, and a close frame. Bounded: at most four control frames.
        self._held_rest = b""
        self._held_pong = b""
        self._held_ping = b""
        self._held_close = b""
        self._busy = False  # the writer task is in ``write`` or ``resume``
        #: Called when bytes wait that only the writer task can write (it then
        #: calls ``resume``): the session queues a resume for its writer.
        self.on_blocked: Callable[[], None] | None = None
        #: Frames a close (None if one went out already); set by the connection.
        self.close_frame: Callable[[int, str], bytes | None] | None = None

    @property
    def holding(self) -> bool:
        """True while control frames wait for the writer."""
        return bool(self._held_rest or self._held_pong or self._held_ping or self._held_close)

    def _take_held(self) -> bytes:
        held = self._held_rest + self._held_pong + self._held_ping + self._held_close
        self._held_rest = self._held_pong = self._held_ping = self._held_close = b""
        return held

    def hold(self, data: bytes, kind: str) -> None:
        """Keep a control frame ("pong", "ping" or "close") for the writer.

        Each kind replaces one held before: a pong need only answer the latest ping.
        """
        if kind == "close":
            self._held_close = data
        elif kind == "ping":
            self._held_ping = data
        else:
            self._held_pong = data

    @property
    def exact(self) -> bool:
        """See ``FrameWriter.exact``."""
        return self._socket is not None

    def _wire(self, frame: Frame) -> bytes:
        bits = self._deflate_bits
        return frame.wire if bits is None else frame.deflated(bits, DEFLATE_MIN_SIZE)

    def _join(self, frames: list[Frame]) -> bytes:
        if len(frames) == 1:
            return self._wire(frames[0])
        return b"".join([self._wire(f) for f in frames])

    def write_nowait(self, frame: Frame) -> bool | None:
        """See ``FastWriter.write_nowait``."""
        sock = self._socket
        if sock is None or self._busy or self._batch is not None or self.holding:
            return False
        wire = self._wire(frame)
        sent = write_nowait(sock, wire)
        if sent == len(wire):
            return True
        if sent <= 0:
            return False  # full, or broken: the writer finds out
        self._batch = [frame]
        self._sent = sent
        return None

    def write_control_nowait(self, data: bytes, kind: str = "pong") -> None:
        """Write a control frame now if nothing is half written; else hold it for the writer."""
        sock = self._socket
        if self._busy or self._batch is not None or self.holding or sock is None:
            self.hold(data, kind)
            if not self._busy:
                self._blocked()
            return
        sent = write_nowait(sock, data)
        if 0 <= sent < len(data):
            self._held_rest = data[sent:]  # the rest goes before anything else
            self._blocked()

    def _blocked(self) -> None:
        if self.on_blocked is not None:
            self.on_blocked()

    async def resume(self) -> bool:
        """Finish what was left half written, then the held control frames.

        Returns:
            False if a frame ``write_nowait`` left half written could not be
            finished (the connection can no longer be written), else True.
        """
        self._busy = True
        try:
            batch, whole = self._batch, True
            if batch is not None:
                data = self._wire(batch[0])
                whole = await self._write_slowly(batch, data, self._sent) == 1
            self._cut_whole = 0
            await self._write_held()
            return whole
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            self._busy = False

    async def _write_held(self) -> None:
        while self.holding:
            await self._send_all(self._take_held())

    async def _send_all(self, data: bytes) -> None:
        sock = self._socket
        if sock is None:
            await self._stream.send_all(data)
            return
        view, sent = memoryview(data), 0
        while sent < len(data):
            n = write_nowait(sock, view[sent:])
            if n < 0:
                raise trio.BrokenResourceError
            sent += n
            if sent < len(data):
                await trio.lowlevel.wait_writable(sock)

    async def write(self, frames: list[Frame]) -> int:
        """See ``FrameWriter.write``."""
        self._busy = True
        try:
            if self.holding:
                await self._write_held()
            data = self._join(frames)
            sock = self._socket
            if sock is None:
                await self._stream.send_all(data)
                written = len(frames)
            else:
                sent = write_nowait(sock, data)
                if sent < 0:
                    return 0
                written = (
                    len(frames)
                    if sent == len(data)
                    else await self._write_slowly(frames, data, sent)
                )
            if self.holding:
                await self._write_held()
            return written
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._batch is not frames:
                return 0
            self._batch = None
            return whole_frames([len(self._wire(f)) for f in frames], self._sent)
        finally:
            self._busy = False

    async def _write_slowly(self, frames: list[Frame], data: bytes, sent: int) -> int:
        sock = self._socket
        assert sock is not None
        view = memoryview(data)
        self._batch = frames
        self._sent = sent
        while sent < len(data):
            # Raises ClosedResourceError once the stream is closed (an abort).
            await trio.lowlevel.wait_writable(sock)
            if self._batch is not frames:
                whole, self._cut_whole = self._cut_whole, 0
                return whole  # cut off by write_close_nowait
            n = write_nowait(sock, view[sent:])
            if n < 0:
                self._batch = None
                return whole_frames([len(self._wire(f)) for f in frames], sent)
            sent += n
            self._sent = sent
        self._batch = None
        return len(frames)

    def write_close_nowait(self, code: int, reason: str) -> CloseWrite:
        """See ``FrameWriter.write_close_nowait``."""
        sock, batch = self._socket, self._batch
        if sock is None:
            return CloseWrite.BLOCKED
        if batch is None and self._busy:
            return CloseWrite.BLOCKED  # the writer is writing held bytes: progress unknown
        close_frame = self.close_frame(code, reason) if self.close_frame is not None else None
        if close_frame is None:  # a close frame went out already
            return CloseWrite.NOT_SENT if batch is None else CloseWrite.BLOCKED
        rest = b""
        if batch is not None:
            # Finish the frame in progress, then stop: the writer writes
            # nothing more of its batch.
            whole = whole_frames([len(self._wire(f)) for f in batch], self._sent)
            wires = [self._wire(f) for f in batch]
            end = sum(len(w) for w in wires[: whole + 1])
            rest = b"".join(wires)[self._sent : end]
            self._batch = None
            self._cut_whole = whole + (1 if rest else 0)
        data = rest + self._take_held() + close_frame
        if write_nowait(sock, data) != len(data):
            return CloseWrite.BLOCKED
        return CloseWrite.SENT


class WsprotoConnection:
    """An open connection on wsproto; see the module docstring and ``Connection``."""

    __slots__ = (
        "_closed_event",
        "_inbound_limit",
        "_max_message_size",
        "_messages",
        "_parts",
        "_peer_code",
        "_pong",
        "_protocol",
        "_room",
        "_size",
        "_stream",
        "_unfed",
        "ended",
        "on_end",
        "writer",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: WsprotoProtocol,
        *,
        max_message_size: int,
        inbound_queue_size: int,
        deflate_bits: int | None,
    ) -> None:
        self._stream = stream
        self._protocol = protocol
        self._max_message_size = max_message_size
        self.writer = StreamWriter(stream, deflate_bits)
        self.writer.close_frame = self.close_frame
        self.on_end: Callable[[], None] | None = None
        #: True once the client closed, left or broke the protocol.
        self.ended = False
        self._peer_code: int | None = None
        # Made on first use: an idle connection holds none of these.
        self._messages: deque[str | bytes] | None = None
        self._parts: list[str] | list[bytes] | None = None  # of a message still arriving
        self._size = 0
        self._pong: trio.Event | None = None
        self._closed_event: trio.Event | None = None
        self._inbound_limit = inbound_queue_size
        self._unfed = b""  # received, not yet fed to wsproto (see ``_feed``)
        self._room: trio.Event | None = None  # the reader waits for the queue to shrink

    @property
    def peer_code(self) -> int | None:
        """See ``Connection.peer_code``."""
        return self._peer_code

    def inbound_backlog(self) -> int:
        """See ``Connection.inbound_backlog``."""
        return len(self._messages) if self._messages else 0

    def handed_over(self) -> bool:
        """Messages are never handed to a waiting task: they wait in ``_messages``."""
        return False

    #: The session's task reads (``receive_messages``); see ``Connection.push``.
    push = True

    async def receive_messages(self, on_waiting: Callable[[], None]) -> None:
        """See ``Connection.receive_messages``."""
        limit = self._inbound_limit
        if self._messages:
            on_waiting()  # sent with the request (see ``open_wsproto_connection``)
        while not self.ended:
            if self._messages is not None and len(self._messages) >= limit:
                # Full: stop reading until the dispatcher takes one.
                self._room = room = trio.Event()
                await room.wait()
                continue
            data: bytes | bytearray
            if self._unfed:
                data, self._unfed = self._unfed, b""
            else:
                data = await self._receive()
                if not data:
                    self._end()
                    break
            self._feed(data)
            if self._messages:
                on_waiting()
        writer = self.writer
        if not (writer.holding or writer._busy or writer._batch is not None):
            # The close frames went out (or the client left): the server closes
            # TCP first (RFC 6455 7.1.1), while what the client sent before is
            # still being processed.
            with suppress(Exception):
                await trio.aclose_forcefully(self._stream)

    async def _receive(self) -> bytes | bytearray:
        """The next bytes from the client; empty once it closed or left."""
        return await _receive(self._stream, self.writer._socket)

    def take_message_nowait(self) -> str | bytes | None:
        """See ``Connection.take_message_nowait``."""
        messages = self._messages
        if not messages:
            return None
        message = messages.popleft()
        room = self._room
        if room is not None:
            self._room = None
            room.set()
        return message

    async def get_message(self) -> str | bytes:
        """Not used: see ``push``."""
        raise NotImplementedError("wsproto connections are read with receive_messages")

    def _feed(self, data: bytes | bytearray) -> None:
        """Feed what the client sent to wsproto, and act on its events.

        With compression, a few KiB can inflate to many messages of up to
        ``max_message_size`` each: the bytes are fed in slices, and what is
        left once ``inbound_queue_size`` messages wait is kept (``_unfed``)
        for when the dispatcher has taken some.
        """
        if self.writer._deflate_bits is None or len(data) <= _DEFLATE_SLICE:
            self._feed_slice(data)
            return
        for start in range(0, len(data), _DEFLATE_SLICE):
            self._feed_slice(data[start : start + _DEFLATE_SLICE])
            if self.ended:
                return
            if self._messages is not None and len(self._messages) >= self._inbound_limit:
                self._unfed = bytes(data[start + _DEFLATE_SLICE :])
                return

    def _feed_slice(self, data: bytes | bytearray) -> None:
        protocol = self._protocol
        try:
            protocol.receive_data(bytes(data))
        except LocalProtocolError:  # bytes after the close handshake
            self._end()
            return
        for event in protocol.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._on_data(event.data, event.message_finished)
            elif isinstance(event, Ping):
                if protocol.state is ConnectionState.OPEN:
                    self.writer.write_control_nowait(protocol.send(event.response()))
            elif isinstance(event, Pong):
                if self._pong is not None:
                    self._pong.set()
                    self._pong = None
            elif isinstance(event, CloseConnection):
                self._on_close(event)
            if self.ended:
                return

    def _on_data(self, data: str | bytes | bytearray, finished: bool) -> None:
        self._size += len(data)
        if self._size > self._max_message_size:
            self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
            return
        chunk: str | bytes = data if isinstance(data, str) else bytes(data)
        parts = self._parts
        if finished:
            message: str | bytes
            if parts is None:
                message = chunk
            else:
                parts.append(chunk)  # type: ignore[arg-type]
                message = "".join(parts) if isinstance(chunk, str) else b"".join(parts)  # type: ignore[arg-type]
                self._parts = None
            self._size = 0
            if self._messages is None:
                self._messages = deque()
            self._messages.append(message)
        elif parts is None:
            self._parts = [chunk]  # type: ignore[assignment]
        else:
            parts.append(chunk)  # type: ignore[arg-type]

    def _on_close(self, event: CloseConnection) -> None:
        protocol = self._protocol
        state = protocol.state
        if state is ConnectionState.OPEN:
            # wsproto reports a frame it could not parse as a close event but
            # stays OPEN: RFC 6455 7.1.7 asks for a close frame with the reason.
            self._fail(event.code, event.reason or "")
            return
        self._peer_code = int(event.code)
        if state is ConnectionState.REMOTE_CLOSING:
            # The client began the close: answer with its code (RFC 6455 5.5.1).
            self.writer.write_control_nowait(protocol.send(event.response()), "close")
        self._end()

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: send ``code`` and stop reading."""
        protocol = self._protocol
        if protocol.state is ConnectionState.OPEN:
            self.writer.write_control_nowait(protocol.send(CloseConnection(code, reason)), "close")
        self._peer_code = int(code)  # recorded as the connection's close code
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._parts = None
        if self._pong is not None:
            self._pong.set()
            self._pong = None
        if self._closed_event is not None:
            self._closed_event.set()
        if self._room is not None:
            self._room.set()
            self._room = None
        if self.on_end is not None:
            self.on_end()

    async def _wait_closed(self) -> None:
        if self.ended:
            await trio.lowlevel.checkpoint()
            return
        if self._closed_event is None:
            self._closed_event = trio.Event()
        await self._closed_event.wait()

    async def ping(self) -> None:
        """See ``Connection.ping``."""
        protocol = self._protocol
        if self.ended or protocol.state is not ConnectionState.OPEN:
            raise ConnectionEnded
        if self._pong is None:
            self._pong = trio.Event()
        pong = self._pong
        self.writer.write_control_nowait(protocol.send(Ping(b"trio-gw")), "ping")
        await pong.wait()
        if self.ended:
            raise ConnectionEnded

    def close_frame(self, code: int, reason: str) -> bytes | None:
        """Frame a close, if one may still be sent; the protocol state moves on."""
        protocol = self._protocol
        if protocol.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return None
        try:
            return protocol.send(CloseConnection(code, reason))
        except LocalProtocolError:  # pragma: no cover - guarded by the state check
            return None

    async def aclose(self, code: int, reason: str) -> None:
        """See ``Connection.aclose``; the session's task reads the client's answer."""
        writer = self.writer
        frame = self.close_frame(code, reason)
        if frame is not None:
            writer.hold(frame, "close")
        if writer.holding and not writer._busy:
            try:
                await writer.resume()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        await self._wait_closed()

    async def abort(self) -> None:
        """See ``Connection.abort``."""
        await trio.aclose_forcefully(self._stream)
        self._end()


async def open_wsproto_connection(
    stream: trio.abc.Stream,
    *,
    max_message_size: int,
    inbound_queue_size: int,
    compression: bool,
) -> WsprotoUpgrade | NoRequest:
    """Read the opening handshake on ``stream`` (the caller bounds it with a timeout).

    Returns:
        The handshake to accept or refuse, or why there is none: the peer
        left, or the request is no WebSocket upgrade (then it was answered 400,
        or 426 for a wrong version).
    """
    handshake = H11Handshake(ConnectionType.SERVER)
    head = b""  # what was read, up to a little past the request head
    request: Request | None = None
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    try:
        while request is None:
            data = await _receive(stream, sock)
            if not data:
                return NoRequest.PEER_LEFT
            if len(head) <= _MAX_REQUEST_HEAD:
                head += data
            handshake.receive_data(bytes(data))
            for event in handshake.events():
                if isinstance(event, Request):
                    request = event
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        if isinstance(hint, RejectConnection):
            await _send_quietly(stream, _plain_response(hint.status_code, str(exc), hint.headers))
        return NoRequest.MALFORMED
    except (UnicodeError, ValueError) as exc:
        # wsproto decodes Host (IDNA) and some headers without catching a bad value.
        await _send_quietly(stream, _plain_response(400, f"undecodable header value ({exc})", []))
        return NoRequest.MALFORMED
    # wsproto keeps what a client sent after its request (RFC 6455 4.1 says
    # it must wait for the 101, but nothing it sends is lost silently): it
    # follows the blank line that ends the head (h11 also takes a bare LF).
    end = _HEAD_END.search(head)
    trailing = head[end.end() :] if end is not None else b""
    request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    version = request_line.rpartition(b" HTTP/")[2] or None
    return WsprotoUpgrade(
        stream,
        request,
        version,
        handshake,
        trailing,
        (max_message_size, inbound_queue_size),
        compression,
    )


_HEAD_END = re.compile(rb"\n\r?\n")


def _plain_response(status: int, text: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    body = text.encode()
    response = h11.Connection(h11.SERVER)
    # h11 needs a request before it answers; a throw-away one for its framing.
    response.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    response.next_event()
    fields = [
        *[(k, v) for k, v in headers if k.lower() not in (b"content-length", b"connection")],
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    head = response.send(h11.Response(status_code=status, headers=fields)) or b""
    return (
        head
        + (response.send(h11.Data(data=body)) or b"")
        + (response.send(h11.EndOfMessage()) or b"")
    )


async def _receive(
    stream: trio.abc.Stream, sock: trio.socket.SocketType | None
) -> bytes | bytearray:
    """The next bytes from the peer; empty once it closed or left.

    On plain TCP (``sock``) this reads the socket itself, one non-blocking read
    once it is readable: a waiting connection then holds a shorter chain of
    coroutine frames than trio's ``receive_some``, and a read costs fewer calls.
    """
    if sock is None:
        try:
            return await stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
    while True:
        try:
            await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            return b""
        # Read afresh: -1 once closed, so a reused descriptor is never read.
        fd = sock.fileno()
        if fd < 0:
            return b""
        try:
            return os.read(fd, _RECEIVE_SIZE)
        except BlockingIOError:
            continue
        except OSError:
            return b""  # reset or broken


async def _send(stream: trio.abc.Stream, sock: trio.socket.SocketType | None, data: bytes) -> None:
    """Send ``data``: one non-blocking write if the socket takes it all, else trio's send_all.

    Raises:
        trio.BrokenResourceError: the peer left.
    """
    sent = write_nowait(sock, data) if sock is not None else 0
    if sent < 0:
        raise trio.BrokenResourceError("the peer left")
    if sent < len(data):
        await stream.send_all(data[sent:])


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    """Send ``data``; a peer that left meanwhile is ignored."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)
