"""The JSON messages the hub itself speaks with clients, typed at the edge.

Shapes follow nuropb_gw, so its clients keep working:

* hello (server -> client, once registered)::

    {"type": "event", "payload": {"topic": "hello",
                                  "event": {"session_id": ..., "user_id": ..., "username": ...}}}

* error (server -> client, for a message the hub could not process)::

    {"error": "<ExceptionName>", "description": "..."}

* request (client -> backend) and response (backend -> client)::

    {"type": "request", "payload": {"service": ..., "method": ..., "params": ..., "trace_id": ...}}
    {"type": "response", "payload": {"trace_id": ..., "result": ..., "error": null}}
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import cattrs
from cattrs.preconf.orjson import make_converter

from ._config import _field_first, _format_exception

__all__ = [
    "Request",
    "RequestPayload",
    "Response",
    "ResponsePayload",
    "WireError",
    "error_message",
    "hello_message",
    "parse_request",
]


class WireError(ValueError):
    """A client frame does not have the expected shape; the message names the field."""


@attrs.frozen
class RequestPayload:
    """What a client asks a backend service to do."""

    service: str
    method: str
    params: Any = None
    trace_id: str | None = None


@attrs.frozen(kw_only=True)
class Request:
    """A client's request frame."""

    type: Literal["request"] = "request"
    payload: RequestPayload


@attrs.frozen
class ResponsePayload:
    """The answer to one request."""

    trace_id: str | None
    result: Any = None
    error: Any = None


@attrs.frozen(kw_only=True)
class Response:
    """A response frame to one client."""

    type: Literal["response"] = "response"
    payload: ResponsePayload


_JSON_TYPES: dict[type, str] = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "an array",
    dict: "an object",
}


def _strict_str(value: Any, _type: type) -> str:
    # cattrs's default str hook calls str() on anything, so null would reach the
    # backend as the service "None" and a list as "['a', 'b']".
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_JSON_TYPES.get(type(value), 'a non-string')}")
    return value


_converter = make_converter(forbid_extra_keys=True)
_converter.register_structure_hook(str, _strict_str)


def parse_request(decoded: Any) -> Request:
    """Structure a decoded client message as a request.

    ``service`` and ``method`` must be strings, and ``trace_id`` a string or
    absent: nothing is coerced, and an explicit null is refused too.

    Raises:
        WireError: it is not a request; the message names the offending field,
            e.g. ``payload.service: expected a string, got null``.
    """
    payload = decoded.get("payload") if isinstance(decoded, dict) else None
    if isinstance(payload, dict) and "trace_id" in payload and payload["trace_id"] is None:
        # A client that sends null for its trace id expects to match the
        # answer by it; silently assigning one would leave it waiting.
        raise WireError("payload.trace_id: expected a string (or no trace_id), got null")
    try:
        return _converter.structure(decoded, Request)
    except cattrs.ClassValidationError as exc:
        messages = cattrs.transform_error(exc, path="message", format_exception=_format_exception)
        raise WireError("; ".join(_field_first(m, root="message") for m in messages)) from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"message: expected a request object ({exc})") from None


def unstructure(value: Response) -> Any:
    """Plain data for a response, ready for JSON encoding."""
    return _converter.unstructure(value)


def hello_message(session_id: str, user_id: str, username: str) -> dict[str, Any]:
    """nuropb_gw's hello event, sent to a client once its session is registered."""
    return {
        "type": "event",
        "payload": {
            "topic": "hello",
            "event": {"session_id": session_id, "user_id": user_id, "username": username},
        },
    }


def error_message(error: str, description: str) -> dict[str, Any]:
    """nuropb_gw's error frame."""
    return {"error": error, "description": description}
