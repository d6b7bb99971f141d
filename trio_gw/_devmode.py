"""Dev mode: an authorizer that trusts the token as the user id, and an echo backend.

Both are for trying the hub out on one machine. ``serve_hub`` refuses to bind a
non-loopback address while the dev authorizer is in use.
"""

from __future__ import annotations

from typing import Any

from ._auth import Handshake, Identity, extract_token
from ._session import Session
from ._wire import (
    Response,
    ResponsePayload,
    WireError,
    error_message,
    parse_request,
    unstructure,
)

__all__ = ["dev_authorizer", "echo_backend"]


async def dev_authorizer(handshake: Handshake) -> Identity | None:
    """INSECURE: accept any bearer token (header, cookie or ``?token=``) as the user id."""
    token = extract_token(handshake)
    return Identity(token, token) if token else None


async def echo_backend(reply: Any, handler: Session, message: Any) -> None:
    """Answer each request with its own params as the result.

    ``{"type":"request","payload":{"service":..,"method":..,"params":..,"trace_id":..}}``
    gets ``{"type":"response","payload":{"trace_id":..,"result":<params>,"error":null}}``;
    anything else gets an error frame naming what is wrong.
    """
    try:
        request = parse_request(message)
    except WireError as exc:
        await reply(handler, error_message(type(exc).__name__, str(exc)))
        return
    payload = request.payload
    response = Response(payload=ResponsePayload(trace_id=payload.trace_id, result=payload.params))
    await reply(handler, unstructure(response))
