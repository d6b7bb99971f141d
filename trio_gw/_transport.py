"""Writing queued frames to a trio-websocket connection, fast or portably.

This is the only module that touches trio-websocket internals. trio-websocket's
``send_message`` costs about 30 µs per message: a lock, trio checkpoints and a
syscall for every frame. The fast writer instead writes frames that
``_frames.encode_frame`` built once, and joins everything a connection has
queued into one ``send_all``. To stay correct beside trio-websocket's own
reader (which answers pings and close frames) it takes the connection's stream
lock and writes only while the protocol state is OPEN, just as
``WebSocketConnection._send`` does.

The internals it relies on (checked by ``fast_writer_supported`` and by
``tests/test_transport.py`` against the pinned trio-websocket version):

* ``WebSocketConnection._stream``: the ``trio.abc.Stream`` under the connection;
* ``WebSocketConnection._stream_lock``: the ``trio.StrictFIFOLock`` serialising writes;
* ``WebSocketConnection._wsproto``: the ``wsproto.WSConnection`` with its ``state``.

On a plain TCP stream the writer first tries one non-blocking ``os.write`` on
the socket's file descriptor (public: ``SocketStream.socket.fileno()``) and
hands only what did not fit to ``send_all``.

If any of them is missing the hub falls back to ``PortableWriter``, which uses
only the public API, and logs a warning once.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState

from ._frames import Frame

__all__ = [
    "TESTED_TRIO_WEBSOCKET",
    "FastWriter",
    "FrameWriter",
    "PortableWriter",
    "fast_writer_supported",
    "make_writer",
]

logger = logging.getLogger("trio_gw")

#: The trio-websocket release whose internals the fast writer was checked against.
TESTED_TRIO_WEBSOCKET = "0.12.2"

_warned = False


class FrameWriter(Protocol):
    """Writes whole frames to one connection; used by that connection's writer task only."""

    async def write(self, frames: list[Frame]) -> bool:
        """Write ``frames`` in order.

        Returns:
            False if the connection can no longer be written to (closing or
            broken); nothing more should be written then.
        """
        ...


class PortableWriter:
    """Writes through trio-websocket's public ``send_message``, one call per frame."""

    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    async def write(self, frames: list[Frame]) -> bool:
        """See ``FrameWriter.write``."""
        try:
            for frame in frames:
                await self._ws.send_message(frame.payload)
        except ConnectionClosed:
            return False
        return True


class FastWriter:
    """Writes pre-built frames, coalesced into one write per call."""

    __slots__ = ("_lock", "_proto", "_socket", "_stream")

    def __init__(self, ws: WebSocketConnection) -> None:
        self._stream: trio.abc.Stream = ws._stream
        self._lock: trio.StrictFIFOLock = ws._stream_lock
        self._proto = ws._wsproto
        # Plain TCP (not TLS): the first attempt is a direct non-blocking write.
        stream = self._stream
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def write(self, frames: list[Frame]) -> bool:
        """See ``FrameWriter.write``."""
        data: bytes | memoryview = (
            frames[0].wire if len(frames) == 1 else b"".join([f.wire for f in frames])
        )
        lock = self._lock
        # An uncontended lock costs a checkpoint in ``async with``; send_all
        # checkpoints anyway, so only wait when the reader is writing a pong.
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._proto.state is not ConnectionState.OPEN:
                return False
            if self._socket is not None:
                # trio's send_all ends every send with a scheduling round; a
                # socket that can take the data now takes it in one syscall.
                # The fd is read afresh (-1 once closed) with no await before
                # the write, so a closed socket's reused fd is never written.
                fd = self._socket.fileno()
                if fd < 0:
                    return False
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return False  # reset or broken: the reader sees it too
                if sent == len(data):
                    return True
                data = memoryview(data)[sent:]
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            lock.release()
        return True


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
    global _warned
    if fast:
        if fast_writer_supported(ws):
            return FastWriter(ws)
        if not _warned:
            _warned = True
            logger.warning(
                "trio-websocket %s lacks the internals the fast writer needs (tested with %s); "
                "using the portable writer",
                trio_websocket.__version__,
                TESTED_TRIO_WEBSOCKET,
            )
    return PortableWriter(ws)
