"""The connection layer's interface: what the hub and a session need from an engine.

An engine turns an accepted stream into a WebSocket connection. Two implement
this interface: ``_wsproto_engine`` (the default: trio streams driven through
wsproto directly) and ``_transport`` (trio-websocket's server). The hub asks an
engine for the opening handshake (``Upgrade``), accepts or refuses it, and
hands the accepted ``Connection`` to a session, which only ever:

* receives the client's messages, one at a time (``get_message``);
* writes frames through the connection's ``FrameWriter`` (``writer``);
* pings it (``ping``) and closes it (``aclose``, or ``abort``).

Pings and close frames from the client are answered by the engine itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

from ._frames import Frame

__all__ = ["CloseWrite", "Connection", "ConnectionEnded", "FrameWriter", "NoRequest", "Upgrade"]


class ConnectionEnded(Exception):
    """The connection has ended: no message can be received, and no ping answered."""


class NoRequest(enum.Enum):
    """Why an engine got no request to accept or reject."""

    PEER_LEFT = enum.auto()  # closed, reset or broke TLS before its request was read
    MALFORMED = enum.auto()  # not a WebSocket upgrade: answered 400 (or 426)


class CloseWrite(enum.Enum):
    """What ``write_close_nowait`` did."""

    SENT = enum.auto()  # the whole close frame went out, after a whole frame
    # Not sent here, and no frame is half written: the close (or what is left
    # of it) can go through trio-websocket's ``aclose``.
    NOT_SENT = enum.auto()
    BLOCKED = enum.auto()  # not sent: the socket is full or broken, or progress is unknown


class FrameWriter(Protocol):
    """Writes whole frames to one connection; used by that connection's writer task only."""

    async def write(self, frames: list[Frame]) -> int:
        """Write ``frames`` in order.

        Returns:
            How many of them went out whole. Fewer than ``len(frames)`` means
            the connection can no longer be written to (closing or broken);
            nothing more should be written then.
        """
        ...

    @property
    def exact(self) -> bool:
        """True if it knows how much of each frame went out.

        Then a close frame can follow a write that was cut off without
        corrupting the stream.
        """
        ...

    def write_nowait(self, frame: Frame) -> bool | None:
        """Write one frame now from any task, if the socket takes it (see ``FastWriter``)."""
        ...

    async def resume(self) -> bool:
        """Finish what ``write_nowait`` left half written (see ``FastWriter``)."""
        ...

    def write_close_nowait(self, code: int, reason: str) -> CloseWrite:
        """Send a close frame now, without waiting, from outside the writer task.

        Whatever the writer had half written is completed first, so the close
        frame starts at a frame boundary. Called only while the writer task is
        parked (idle, or waiting for the socket) or gone, and only before the
        stream is closed. The writer writes nothing after it.
        """
        ...


class Upgrade(Protocol):
    """A client's opening handshake, read and checked by the engine."""

    @property
    def path(self) -> str:
        """The request target, with its query string."""
        ...

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The request's header fields, as raw pairs."""
        ...

    @property
    def http_version(self) -> bytes | None:
        """The request's HTTP version (``b"1.1"``), if known."""
        ...

    async def accept(self) -> Connection | None:
        """Answer 101 and open the connection; None if the peer left meanwhile."""
        ...

    async def reject(self, status: int, body: bytes) -> None:
        """Answer ``status`` with a plain-text ``body``; the connection then ends.

        Error handling:
            A peer that left meanwhile is ignored: it was refused all the same.
        """
        ...

    async def aclose(self) -> None:
        """Release what the handshake holds (the stream is closed by the hub)."""
        ...


class Connection(Protocol):
    """An open WebSocket connection, as a session uses it."""

    @property
    def writer(self) -> FrameWriter:
        """Writes whole frames, for the session's writer task.

        Tasks that find that writer idle use it too, without waiting.
        """
        ...

    #: Called once, when the client closed, left or broke the protocol.
    on_end: Callable[[], None] | None

    @property
    def ended(self) -> bool:
        """True once the client closed, left or broke the protocol."""
        ...

    @property
    def peer_code(self) -> int | None:
        """The code of the close frame the client sent, once it did (1005 for none)."""
        ...

    @property
    def push(self) -> bool:
        """How a session takes the client's messages.

        True: the session's own task runs ``receive_messages``, and takes what
        waits with ``take_message_nowait``. False: the engine reads in a task
        of its own, and the session's dispatcher calls ``get_message``.
        """
        ...

    async def receive_messages(self, on_waiting: Callable[[], None]) -> None:
        """Read until the connection ends; call ``on_waiting`` when messages wait (push only).

        Up to ``inbound_queue_size`` messages wait; then reading pauses until
        one is taken, so that TCP pushes back on the client.
        """
        ...

    def take_message_nowait(self) -> str | bytes | None:
        """The next waiting message, or None (push only)."""
        ...

    async def get_message(self) -> str | bytes:
        """The client's next message (pull only).

        Raises:
            ConnectionEnded: the connection has ended.
        """
        ...

    async def ping(self) -> None:
        """Ping the client and wait for its pong.

        Raises:
            ConnectionEnded: the connection ended (or is closing) first.
        """
        ...

    async def aclose(self, code: int, reason: str) -> None:
        """Send a close frame (unless one went out) and wait for the client's answer.

        Called once the session's writer is done. The caller bounds it with a
        timeout and then aborts.
        """
        ...

    async def abort(self) -> None:
        """Close the transport at once, whatever state the connection is in."""
        ...

    def inbound_backlog(self) -> int:
        """Client messages received and not yet taken with ``get_message``."""
        ...

    def handed_over(self) -> bool:
        """True if a ``get_message`` that is waiting has just been handed a message."""
        ...
