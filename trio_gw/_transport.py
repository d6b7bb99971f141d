"""The trio-websocket engine, and the one module that touches trio-websocket internals.

``TrioWebsocketUpgrade`` and ``TrioWebsocketConnection`` present trio-websocket's
server behind the connection layer's interface (``_connection``).

**Server connections.** ``open_server_connection`` builds trio-websocket's
``WebSocketConnection`` around an accepted stream with a wsproto connection of
our own (``ServerProtocol``), and runs its reader task in the caller's nursery,
so that every task of a connection lives inside that connection's error
boundary. ``ServerProtocol`` works around three trio-websocket 0.12.2 bugs with
wsproto's public API only:

* a ping that arrives after the server sent its close frame makes
  trio-websocket answer with a pong, which wsproto refuses in LOCAL_CLOSING with
  ``LocalProtocolError`` (so does a too-large message then: a 1009 close frame);
  control frames that can no longer be sent are dropped instead;
* a frame wsproto cannot parse (bad RSV bits, an unmasked or oversized control
  frame, invalid UTF-8, ...) ends the connection without the 1002/1007 close
  frame that RFC 6455 section 7.1.7 asks for; it is sent now;
* an HTTP/1.0 upgrade request is accepted; ``http_version`` lets the hub refuse
  it with 400 (RFC 6455 section 4.1 requires HTTP/1.1).

trio-websocket's own reader also lets ``ConnectionClosed`` escape when its 400
for a malformed upgrade meets a reset socket; ``open_server_connection``
contains that.

**Fast writes.** trio-websocket's ``send_message`` costs about 30 µs per
message: a lock, trio checkpoints and a syscall for every frame. The fast
writer instead writes frames that ``_frames.encode_frame`` built once, and joins
everything a connection has queued into one write. To stay correct beside
trio-websocket's reader (which answers pings and close frames) it takes the
connection's stream lock and writes only while the protocol state is OPEN, just
as ``WebSocketConnection._send`` does. On a plain TCP socket it writes with
non-blocking ``os.write`` calls and waits with ``trio.lowlevel.wait_writable``,
so it always knows how much of a frame went out: a stalled client can then
still be sent its close frame after a whole frame.

The internals it relies on (checked by ``fast_writer_supported``,
``server_internals_supported`` and by ``tests/test_transport.py`` against the
pinned trio-websocket version):

* ``WebSocketConnection._stream``: the ``trio.abc.Stream`` under the connection;
* ``WebSocketConnection._stream_lock``: the ``trio.StrictFIFOLock`` serialising writes;
* ``WebSocketConnection._wsproto``: the ``wsproto.WSConnection`` with its ``state``;
* ``WebSocketConnection._reader_task`` and ``_get_request``: what the public
  ``wrap_server_stream`` calls;
* ``WebSocketConnection._recv_channel``: its inbound message queue, whose
  backlog says which client messages arrived before a close (``inbound_backlog``).

If any of them is missing the hub falls back to the public API
(``PortableWriter``, ``wrap_server_stream``) and logs a warning once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator
from contextlib import suppress

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event, Message, Ping, Pong, RejectConnection
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ._connection import CloseWrite, ConnectionEnded, FrameWriter, NoRequest
from ._frames import Frame
from ._nonblocking import whole_frames, write_nowait

__all__ = [
    "TESTED_TRIO_WEBSOCKET",
    "TrioWebsocketConnection",
    "TrioWebsocketUpgrade",
    "abort",
    "CloseWrite",
    "FastWriter",
    "FrameWriter",
    "PortableWriter",
    "NoRequest",
    "ServerConnection",
    "ServerProtocol",
    "fast_writer_supported",
    "make_writer",
    "open_server_connection",
    "server_internals_supported",
]

logger = logging.getLogger("trio_gw")

#: The trio-websocket release whose internals this module was checked against.
TESTED_TRIO_WEBSOCKET = "0.12.2"

# The request line is kept only to read its HTTP version; h11 refuses a
# request head larger than this anyway.
_MAX_REQUEST_LINE = 16 * 1024

_warned: set[str] = set()


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning(
            "trio-websocket %s lacks the internals the %s needs (tested with %s); "
            "using its public API instead",
            trio_websocket.__version__,
            what,
            TESTED_TRIO_WEBSOCKET,
        )


class ServerProtocol(WSConnection):
    """wsproto's server-side connection, made safe to drive from trio-websocket.

    See the module docstring for the bugs it works around.

    Attributes:
        handshake_error: Why wsproto refused the opening handshake, if it did.
    """

    def __init__(self) -> None:
        super().__init__(ConnectionType.SERVER)
        self.handshake_error: str | None = None
        self._request_line = b""
        # A close frame owed to a peer whose frame could not be parsed. While
        # it is owed, ``state`` reads REMOTE_CLOSING, so that trio-websocket
        # answers the close (with our code) before it closes the stream.
        self._owed_close = False
        # While a frame written inline is half out, what trio-websocket frames
        # (pongs, its close frame) is held here, and written after that frame.
        self._held: bytearray | None = None
        #: Called once trio-websocket's reader task has ended.
        self.on_reader_end: Callable[[], None] | None = None

    def hold_control_frames(self) -> None:
        """Hold what ``send`` frames from now on, until ``release_held``."""
        self._held = bytearray()

    def release_held(self) -> bytes:
        """Stop holding; return what was held."""
        held, self._held = self._held, None
        return bytes(held) if held else b""

    @property
    def http_version(self) -> bytes | None:
        """The HTTP version of the upgrade request (``b"1.1"``), once it is read."""
        line = self._request_line.rstrip(b"\r\n")
        _, _, version = line.rpartition(b" HTTP/")
        return version or None

    @property
    def state(self) -> ConnectionState:
        """The connection's state; REMOTE_CLOSING while a protocol-error close is owed."""
        # Read on every write: kept to two attribute reads in the common case.
        if self._owed_close:
            return ConnectionState.REMOTE_CLOSING
        connection = self.connection
        return connection.state if connection is not None else self.handshake.state

    def receive_data(self, data: bytes | None) -> None:
        """Feed received bytes to wsproto; remembers the request line and handshake errors."""
        if self.connection is None:
            if data and not self._request_line.endswith(b"\n"):
                line = (self._request_line + data)[:_MAX_REQUEST_LINE]
                head, newline, _ = line.partition(b"\n")
                self._request_line = head + newline
            try:
                super().receive_data(data)
            except RemoteProtocolError as exc:
                self.handshake_error = str(exc)
                raise
            except UnicodeError as exc:
                # wsproto decodes Connection, Sec-WebSocket-Extensions/-Protocol
                # and Host without catching a non-ASCII (or bad IDNA) value.
                self.handshake_error = f"undecodable header value ({exc})"
                raise RemoteProtocolError(
                    "undecodable header value", event_hint=RejectConnection()
                ) from None
            return
        super().receive_data(data)

    def events(self) -> Generator[Event, None, None]:
        """Wsproto's events; a parse failure while open makes a close owed."""
        for event in super().events():
            connection = self.connection
            if (
                isinstance(event, CloseConnection)
                and connection is not None
                and connection.state is ConnectionState.OPEN
            ):
                # wsproto reports a frame it could not parse as a close event
                # but stays OPEN; trio-websocket would then close the TCP
                # stream without a close frame.
                self._owed_close = True
            yield event

    def send(self, event: Event) -> bytes:
        """Frame ``event``; control frames that can no longer be sent are dropped."""
        data = self._send(event)
        if self._held is not None and data:
            self._held += data
            return b""
        return data

    def _send(self, event: Event) -> bytes:
        connection = self.connection
        if connection is not None:
            if self._owed_close and isinstance(event, CloseConnection):
                self._owed_close = False
                return connection.send(event)  # OPEN -> LOCAL_CLOSING
            state = self.state
            if isinstance(event, Ping | Pong) and state is not ConnectionState.OPEN:
                return b""  # our close frame is out (or owed): nothing may follow it
            if isinstance(event, CloseConnection) and state not in (
                ConnectionState.OPEN,
                ConnectionState.REMOTE_CLOSING,
            ):
                return b""  # a close frame went out already
            if isinstance(event, Message) and state is not ConnectionState.OPEN:
                raise LocalProtocolError(f"cannot send a message in state {state.name}")
        return super().send(event)


class ServerConnection:
    """An accepted connection whose opening handshake was read.

    Attributes:
        ws: The trio-websocket connection.
        request: The handshake to accept or reject.
        protocol: Our wsproto connection under ``ws``, or None on the public-API fallback.
    """

    __slots__ = ("protocol", "request", "ws")

    def __init__(
        self,
        ws: WebSocketConnection | None,
        request: WebSocketRequest,
        protocol: ServerProtocol | None,
    ) -> None:
        self.ws = ws
        self.request = request
        self.protocol = protocol


def server_internals_supported() -> bool:
    """True if trio-websocket has the internals ``open_server_connection`` relies on."""
    return callable(getattr(WebSocketConnection, "_reader_task", None)) and callable(
        getattr(WebSocketConnection, "_get_request", None)
    )


async def open_server_connection(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    message_queue_size: int,
    max_message_size: int,
) -> ServerConnection | NoRequest:
    """Start a server-side WebSocket on ``stream`` and read its opening handshake.

    Args:
        nursery: The connection's own nursery; trio-websocket's reader runs in it.
        stream: The accepted stream.
        message_queue_size: trio-websocket's inbound message queue size.
        max_message_size: Larger client messages close the connection with 1009.

    Returns:
        The connection, or why there is no request to answer.

    Error handling:
        ``ConnectionClosed`` from trio-websocket's reader (a reset during its
        400 for a malformed upgrade) is contained; the reader just ends.
    """
    if not server_internals_supported():
        _warn_once("server connection")
        request = await trio_websocket.wrap_server_stream(
            nursery, stream, message_queue_size, max_message_size
        )
        return ServerConnection(None, request, None)
    protocol = ServerProtocol()
    ws = WebSocketConnection(
        stream, protocol, message_queue_size=message_queue_size, max_message_size=max_message_size
    )
    waiting = trio.CancelScope()

    async def read() -> None:
        try:
            await ws._reader_task()
        except ConnectionClosed:
            pass  # trio-websocket 0.12.2 lets a failed send in its reader escape
        finally:
            # A peer that leaves before its request is read must not hold a
            # file descriptor until the handshake timeout.
            waiting.cancel()
            if protocol.on_reader_end is not None:
                protocol.on_reader_end()

    nursery.start_soon(read)
    with waiting:
        request = await ws._get_request()
        return ServerConnection(ws, request, protocol)
    return NoRequest.MALFORMED if protocol.handshake_error is not None else NoRequest.PEER_LEFT


class PortableWriter:
    """Writes through trio-websocket's public ``send_message``, one call per frame."""

    __slots__ = ("_writing", "_ws")

    exact = False

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        # Left True by a write that was cancelled: how much of it went out is unknown.
        self._writing = False

    async def write(self, frames: list[Frame]) -> int:
        """See ``FrameWriter.write``."""
        written = 0
        self._writing = True
        try:
            for frame in frames:
                await self._ws.send_message(frame.payload)
                written += 1
        except (ConnectionClosed, LocalProtocolError):
            pass
        self._writing = False
        return written

    def write_nowait(self, frame: Frame) -> bool | None:
        """It only writes through trio-websocket: never inline."""
        return False

    async def resume(self) -> bool:  # pragma: no cover - write_nowait never leaves a rest
        """Nothing is ever half written by ``write_nowait``."""
        return False

    def write_close_nowait(self, code: int, reason: str) -> CloseWrite:
        """See ``FrameWriter.write_close_nowait``: it cannot write itself."""
        return CloseWrite.BLOCKED if self._writing else CloseWrite.NOT_SENT


class FastWriter:
    """Writes pre-built frames, coalesced into one write per call."""

    __slots__ = ("_batch", "_cut_whole", "_lock", "_proto", "_sent", "_socket", "_stream")

    def __init__(self, ws: WebSocketConnection) -> None:
        self._stream: trio.abc.Stream = ws._stream
        self._lock: trio.StrictFIFOLock = ws._stream_lock
        self._proto: WSConnection = ws._wsproto
        # Plain TCP (not TLS): writes go straight to the socket.
        stream = self._stream
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        # While a write waits for the socket: the frames being written and how
        # many bytes of them went out. None when no write is half done.
        self._batch: list[Frame] | None = None
        self._sent = 0
        self._cut_whole = 0  # frames of a cut-off batch that went out whole

    @property
    def exact(self) -> bool:
        """See ``FrameWriter.exact``: on plain TCP, where it writes to the socket itself."""
        return self._socket is not None

    def write_nowait(self, frame: Frame) -> bool | None:
        """Write ``frame`` with one non-blocking send, from any task.

        Only for when the session's writer is idle with nothing queued (the
        caller checks). The writer stays the only task that waits on the socket.

        Returns:
            True if the frame went out whole; False if nothing was written
            (queue it as usual); None if part of it went out: the rest is a
            write in progress that ``resume`` finishes, and until then what
            trio-websocket frames (pongs, a close) is held to follow it.
        """
        sock, proto = self._socket, self._proto
        if (
            sock is None
            or self._batch is not None
            or self._lock.locked()
            or not isinstance(proto, ServerProtocol)
            or proto.state is not ConnectionState.OPEN
        ):
            return False
        wire = frame.wire
        sent = write_nowait(sock, wire)
        if sent == len(wire):
            return True
        if sent <= 0:
            return False  # full, or broken: the writer finds out
        proto.hold_control_frames()
        self._batch = [frame]
        self._sent = sent
        return None

    async def resume(self) -> bool:
        """Finish the frame ``write_nowait`` left half written, then what was held.

        Returns:
            True if the frame went out whole (here or by ``write_close_nowait``).
        """
        lock = self._lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            batch, sock = self._batch, self._socket
            if batch is None or sock is None:
                return self._cut_whole > 0  # finished by write_close_nowait
            whole = await self._write_slowly(sock, batch, batch[0].wire, self._sent) == 1
            held = self._release_held()
            if held:
                await self._stream.send_all(held)
            return whole
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            lock.release()

    def _release_held(self) -> bytes:
        proto = self._proto
        return proto.release_held() if isinstance(proto, ServerProtocol) else b""

    async def write(self, frames: list[Frame]) -> int:
        """See ``FrameWriter.write``."""
        data: bytes = frames[0].wire if len(frames) == 1 else b"".join([f.wire for f in frames])
        lock = self._lock
        # An uncontended lock costs a checkpoint in ``async with``; a write
        # that has to wait checkpoints anyway, so only wait for the reader.
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._proto.state is not ConnectionState.OPEN:
                return 0
            sock = self._socket
            if sock is None:
                await self._stream.send_all(data)
                return len(frames)
            # trio's send_all ends every send with a scheduling round; a
            # socket that can take the data now takes it in one syscall. The
            # fd is read afresh (-1 once closed) with no await before the
            # write, so a closed socket's reused fd is never written.
            fd = sock.fileno()
            if fd < 0:
                return 0
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return 0  # reset or broken: the reader sees it too
            if sent == len(data):
                return len(frames)
            return await self._write_slowly(sock, frames, data, sent)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return (
                whole_frames([len(f.wire) for f in frames], self._sent)
                if self._batch is frames
                else 0
            )
        finally:
            lock.release()

    async def _write_slowly(
        self, sock: trio.socket.SocketType, frames: list[Frame], data: bytes, sent: int
    ) -> int:
        view = memoryview(data)
        self._batch = frames
        self._sent = sent
        while sent < len(data):
            # Raises ClosedResourceError once the stream is closed (an abort).
            await trio.lowlevel.wait_writable(sock)
            if self._batch is not frames:
                return self._cut_whole  # cut off by write_close_nowait
            n = write_nowait(sock, view[sent:])
            if n < 0:
                return whole_frames([len(f.wire) for f in frames], sent)
            sent += n
            self._sent = sent
        self._batch = None
        return len(frames)

    def write_close_nowait(self, code: int, reason: str) -> CloseWrite:
        """See ``FrameWriter.write_close_nowait``."""
        batch = self._batch
        if self._proto.state is not ConnectionState.OPEN:
            return CloseWrite.NOT_SENT if batch is None else CloseWrite.BLOCKED
        sock = self._socket
        if sock is None:
            return CloseWrite.BLOCKED
        lock = self._lock
        if batch is None and lock.locked():
            return CloseWrite.BLOCKED  # trio-websocket's reader is writing: progress unknown
        if lock.statistics().tasks_waiting:
            return CloseWrite.BLOCKED  # its pong would follow our close frame
        rest = b""
        if batch is not None:
            # Finish the frame in progress, then stop: the writer writes
            # nothing more of its batch.
            whole = whole_frames([len(f.wire) for f in batch], self._sent)
            end = sum(len(frame.wire) for frame in batch[: whole + 1])
            rest = b"".join([f.wire for f in batch])[self._sent : end]
            self._batch = None
            self._cut_whole = whole
        data = rest + self._release_held() + self._proto.send(CloseConnection(code, reason))
        if write_nowait(sock, data) != len(data):
            return CloseWrite.BLOCKED
        if rest:
            self._cut_whole += 1
        return CloseWrite.SENT


async def abort(ws: WebSocketConnection) -> None:
    """Close the stream under ``ws`` at once, whatever state trio-websocket is in.

    ``ws.aclose()`` does nothing once trio-websocket has recorded a close
    reason, even while a write is stuck on a client that stopped reading; this
    closes the transport itself, which also ends that write.
    """
    stream = getattr(ws, "_stream", None)
    await trio.aclose_forcefully(stream if isinstance(stream, trio.abc.Stream) else ws)


def inbound_backlog(ws: WebSocketConnection) -> int:
    """Client messages trio-websocket has received that nobody has taken yet.

    Those in its queue, and one held by its reader while the queue is full.
    """
    channel = getattr(ws, "_recv_channel", None)
    if isinstance(channel, trio.MemoryReceiveChannel):
        stats = channel.statistics()
        return stats.current_buffer_used + stats.tasks_waiting_send
    return 0


def handed_over(ws: WebSocketConnection) -> bool:
    """True if a dispatcher waiting in ``get_message`` has been handed a message.

    trio's channel hands a message straight to a waiting receiver: it is then
    in no queue, but the receiver has not run yet. Asked only while the
    dispatcher is (or was just) waiting.
    """
    channel = getattr(ws, "_recv_channel", None)
    return isinstance(channel, trio.MemoryReceiveChannel) and (
        channel.statistics().tasks_waiting_receive == 0
    )


def fast_writer_supported(ws: WebSocketConnection) -> bool:
    """True if ``ws`` has the internals ``FastWriter`` relies on, with the expected types."""
    stream = getattr(ws, "_stream", None)
    lock = getattr(ws, "_stream_lock", None)
    proto = getattr(ws, "_wsproto", None)
    return (
        isinstance(stream, trio.abc.Stream)
        and isinstance(lock, trio.StrictFIFOLock)
        and isinstance(getattr(proto, "state", None), ConnectionState)
    )


def make_writer(ws: WebSocketConnection, *, fast: bool) -> FrameWriter:
    """The writer to use for ``ws``: fast if asked for and supported, else portable."""
    if fast:
        if fast_writer_supported(ws):
            return FastWriter(ws)
        _warn_once("fast writer")
    return PortableWriter(ws)


class TrioWebsocketConnection:
    """trio-websocket's ``WebSocketConnection`` as a ``_connection.Connection``."""

    __slots__ = ("_protocol", "_ws", "writer")

    def __init__(self, ws: WebSocketConnection, protocol: ServerProtocol | None, *, fast: bool):
        self._ws = ws
        self._protocol = protocol
        self.writer: FrameWriter = make_writer(ws, fast=fast)

    @property
    def on_end(self) -> Callable[[], None] | None:
        """See ``Connection.on_end`` (it needs our ``ServerProtocol``; else never called)."""
        return self._protocol.on_reader_end if self._protocol is not None else None

    @on_end.setter
    def on_end(self, callback: Callable[[], None] | None) -> None:
        if self._protocol is not None:
            self._protocol.on_reader_end = callback

    @property
    def ended(self) -> bool:
        """See ``Connection.ended``."""
        return self._ws.closed is not None

    @property
    def peer_code(self) -> int | None:
        """The code trio-websocket recorded (1000 for every close it started itself)."""
        closed = self._ws.closed
        return closed.code if closed is not None else None

    #: trio-websocket reads in a task of its own: the session pulls.
    push = False

    async def receive_messages(self, on_waiting: Callable[[], None]) -> None:
        """Not used: see ``push``."""
        raise NotImplementedError("trio-websocket's connections are read with get_message")

    def take_message_nowait(self) -> str | bytes | None:
        """Not used: see ``push``."""
        return None

    async def get_message(self) -> str | bytes:
        """See ``Connection.get_message``."""
        try:
            return await self._ws.get_message()
        except ConnectionClosed:
            raise ConnectionEnded from None

    async def ping(self) -> None:
        """See ``Connection.ping``."""
        try:
            await self._ws.ping()
        except ConnectionClosed:
            raise ConnectionEnded from None

    async def aclose(self, code: int, reason: str) -> None:
        """See ``Connection.aclose``."""
        await self._ws.aclose(code, reason)

    async def abort(self) -> None:
        """See ``Connection.abort``."""
        await abort(self._ws)

    def inbound_backlog(self) -> int:
        """See ``Connection.inbound_backlog``."""
        return inbound_backlog(self._ws)

    def handed_over(self) -> bool:
        """See ``Connection.handed_over``."""
        return handed_over(self._ws)


class TrioWebsocketUpgrade:
    """trio-websocket's ``WebSocketRequest`` as a ``_connection.Upgrade``."""

    __slots__ = ("_connection", "_fast")

    def __init__(self, connection: ServerConnection, *, fast: bool) -> None:
        self._connection = connection
        self._fast = fast

    @property
    def path(self) -> str:
        """See ``Upgrade.path``."""
        return self._connection.request.path

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """See ``Upgrade.headers``."""
        return list(self._connection.request.headers)

    @property
    def http_version(self) -> bytes | None:
        """See ``Upgrade.http_version`` (unknown on the public-API fallback: taken as 1.1)."""
        protocol = self._connection.protocol
        return protocol.http_version if protocol is not None else b"1.1"

    async def accept(self) -> TrioWebsocketConnection | None:
        """See ``Upgrade.accept``."""
        try:
            ws = await self._connection.request.accept()
        except ConnectionClosed:
            return None
        self._connection.ws = ws
        return TrioWebsocketConnection(ws, self._connection.protocol, fast=self._fast)

    async def reject(self, status: int, body: bytes) -> None:
        """See ``Upgrade.reject``."""
        with suppress(ConnectionClosed):  # the peer left; it was refused all the same
            await self._connection.request.reject(
                status,
                extra_headers=[(b"content-type", b"text/plain; charset=utf-8")],
                body=body,
            )

    async def aclose(self) -> None:
        """End the close handshake (or a refusal), as trio-websocket's own server does."""
        if self._connection.ws is not None:
            await self._connection.ws.aclose()


async def open_trio_websocket(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    message_queue_size: int,
    max_message_size: int,
    fast: bool,
) -> TrioWebsocketUpgrade | NoRequest:
    """``open_server_connection``, as the connection layer's interface."""
    connection = await open_server_connection(
        nursery,
        stream,
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
    )
    if isinstance(connection, NoRequest):
        return connection
    return TrioWebsocketUpgrade(connection, fast=fast)
