"""Outbound frames: a message encoded and framed once, shared by every recipient.

A server's WebSocket frames are not masked, so the bytes on the wire are the
same for every connection. ``Frame`` holds them, and the writers hand the same
``bytes`` object to every socket.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from wsproto.frame_protocol import FrameProtocol

__all__ = ["Frame", "encode_frame"]

# The frame protocol keeps state only between the fragments of one message;
# every call here sends a whole message (fin=True), so one instance serves all.
_FRAMER = FrameProtocol(client=False, extensions=[])


class Frame:
    """One outbound WebSocket message.

    Attributes:
        data: The payload: UTF-8 bytes for text, raw bytes for binary.
        is_text: True for a text frame, False for a binary frame.
        wire: The complete, unmasked frame as written to every socket.
    """

    __slots__ = ("_deflated", "data", "is_text", "wire")

    def __init__(self, data: bytes, is_text: bool, wire: bytes) -> None:
        self.data = data
        self.is_text = is_text
        self.wire = wire
        self._deflated: tuple[int, bytes] | None = None

    def deflated(self, bits: int, min_size: int) -> bytes:
        """The frame compressed with permessage-deflate (RFC 7692), on its own.

        Compressed once per window size and kept, so that every recipient
        whose connection negotiated compression shares it. Messages shorter
        than ``min_size``, or that do not shrink, go uncompressed.
        """
        cached = self._deflated
        if cached is not None and cached[0] == bits:
            return cached[1]
        wire = self.wire
        if len(self.data) >= min_size:
            compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits)
            body = compressor.compress(self.data) + compressor.flush(zlib.Z_SYNC_FLUSH)
            body = body[:-4]  # the empty block's 00 00 ff ff (RFC 7692 7.2.1)
            if len(body) < len(self.data):
                wire = _frame_header(0xC1 if self.is_text else 0xC2, len(body)) + body
        self._deflated = (bits, wire)
        return wire

    def __len__(self) -> int:
        return len(self.wire)

    def __repr__(self) -> str:
        kind = "text" if self.is_text else "binary"
        return f"<Frame {kind} {len(self.data)} bytes>"

    @property
    def payload(self) -> str | bytes:
        """The message as trio-websocket's ``send_message`` takes it."""
        return self.data.decode("utf-8") if self.is_text else self.data


def _frame_header(first_byte: int, length: int) -> bytes:
    """A server frame's header (FIN, RSV1 and the opcode in ``first_byte``; unmasked)."""
    if length < 126:
        return bytes((first_byte, length))
    if length < 1 << 16:
        return bytes((first_byte, 126)) + length.to_bytes(2, "big")
    return bytes((first_byte, 127)) + length.to_bytes(8, "big")


def encode_frame(message: Any) -> Frame:
    """Encode a message once, the way a handler encodes it in nuropb_gw.

    ``str`` becomes a text frame as it is, ``bytes`` (or ``bytearray``) a binary
    frame, and anything else is JSON-encoded with orjson into a text frame.

    Raises:
        TypeError: ``message`` cannot be JSON-encoded.
    """
    if isinstance(message, str):
        return Frame(message.encode("utf-8"), True, bytes(_FRAMER.send_data(message)))
    if isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message)
        return Frame(data, False, bytes(_FRAMER.send_data(data)))
    try:
        data = orjson.dumps(message)
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"message is not JSON-serializable: {exc}") from None
    return Frame(data, True, bytes(_FRAMER.send_data(data.decode("utf-8"))))
