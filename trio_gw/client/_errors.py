"""Exceptions raised by trio_gw.client.

The tree, and whose fault each one is::

    GatewayError                    base of everything trio_gw raises on purpose
    └── ClientError                 base of everything the client raises on purpose
        ├── RequestError            the service's: it answered the request with an error
        ├── RequestTimeoutError     no answer in time (also a TimeoutError); a late answer
        │                           is dropped
        ├── ConnectionLostError     the network's or the hub's: the connection ended while a
        │                           request (or send) was in flight; its answer is lost
        ├── ClientClosedError       the caller's: the client is closed (by aclose, by a close
        │                           code it does not reconnect after, or because it gave up)
        ├── HandshakeRefusedError   the credentials' or the hub's: the hub refused the
        │                           handshake with an HTTP status; the client gave up
        ├── ConnectFailedError      the network's: ``max_attempts`` connection attempts in a
        │                           row failed; the client gave up
        └── ProtocolError           the hub's: it sent something the client cannot use
                                    (no hello event after the handshake)

``open_client`` raises ``HandshakeRefusedError``, ``ConnectFailedError`` or
``ProtocolError`` itself when the first connection cannot be made; later, the
same errors are the ``error`` (and ``__cause__``) of the ``ClientClosedError``
that requests, sends and iteration raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import GatewayError

__all__ = [
    "ClientClosedError",
    "ClientError",
    "ConnectFailedError",
    "ConnectionLostError",
    "HandshakeRefusedError",
    "ProtocolError",
    "RequestError",
    "RequestTimeoutError",
]


class ClientError(GatewayError):
    """Base class for the errors trio_gw.client raises on purpose."""


class RequestError(ClientError):
    """The hub (or the backend behind it) answered a request with an error.

    Attributes:
        code: The error's ``code`` (``backend_status``, ``bad_request``, ...).
        message: The error's ``message``.
        status: The backend's HTTP status, when the error carries one.
        detail: The error's ``detail`` (the backend's JSON body), when present.
        trace_id: The request's trace id.
        error: The whole ``error`` object, as received.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        detail: Any = None,
        trace_id: str | None = None,
        error: Any = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.status = status
        self.detail = detail
        self.trace_id = trace_id
        self.error = error

    @classmethod
    def from_error(cls, error: Any, trace_id: str | None) -> RequestError:
        """Build one from a response's ``error`` value, whatever its shape."""
        if isinstance(error, Mapping):
            code = error.get("code")
            message = error.get("message")
            status = error.get("status")
            return cls(
                code if isinstance(code, str) else "error",
                message if isinstance(message, str) else str(dict(error)),
                status=status if isinstance(status, int) else None,
                detail=error.get("detail"),
                trace_id=trace_id,
                error=error,
            )
        return cls("error", str(error), trace_id=trace_id, error=error)

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.code}: {self.message}{status} [trace_id={self.trace_id}]"


class RequestTimeoutError(ClientError, TimeoutError):
    """No answer to a request within its timeout.

    The request is forgotten: an answer that arrives later is dropped and
    counted in ``ClientStatistics.late_responses``, never delivered anywhere.

    Attributes:
        trace_id: The request's trace id.
        timeout: The timeout, in seconds.
    """

    def __init__(self, trace_id: str, timeout: float) -> None:
        super().__init__(trace_id, timeout)
        self.trace_id = trace_id
        self.timeout = timeout

    def __str__(self) -> str:
        return f"no answer within {self.timeout} s [trace_id={self.trace_id}]"


class ConnectionLostError(ClientError):
    """The connection ended while a request or a send was in flight.

    Whether the hub received the message is unknown; it is not resent.

    Attributes:
        close_code: The code the connection ended with (1006: no close frame).
        close_reason: The close frame's reason, if any.
    """

    def __init__(self, close_code: int | None, close_reason: str | None) -> None:
        super().__init__(close_code, close_reason)
        self.close_code = close_code
        self.close_reason = close_reason

    def __str__(self) -> str:
        reason = f" ({self.close_reason})" if self.close_reason else ""
        return f"connection lost with close code {self.close_code}{reason}"


class ClientClosedError(ClientError):
    """The client is closed: it will not connect again.

    Attributes:
        close_code: The last connection's close code, if there was a connection.
        close_reason: The last connection's close reason.
        error: Why the client gave up (``HandshakeRefusedError``,
            ``ConnectFailedError``, ``ProtocolError``, or an error of the token
            provider), also set as ``__cause__``; None when it was closed by
            ``aclose()`` or by a close code it does not reconnect after.
    """

    def __init__(
        self, close_code: int | None, close_reason: str | None, error: BaseException | None
    ) -> None:
        super().__init__(close_code, close_reason, error)
        self.close_code = close_code
        self.close_reason = close_reason
        self.error = error

    def __str__(self) -> str:
        if self.error is not None:
            return f"the client gave up: {self.error}"
        reason = f" ({self.close_reason})" if self.close_reason else ""
        return f"the client is closed (close code {self.close_code}{reason})"


class HandshakeRefusedError(ClientError):
    """The hub refused the opening handshake with an HTTP status.

    Attributes:
        status: The HTTP status (401: no token or a bad one, 403: origin or policy).
        body: The response body (the hub's reason), decoded.
    """

    def __init__(self, status: int, body: str) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body

    def __str__(self) -> str:
        return f"the hub refused the handshake with HTTP {self.status}: {self.body!r}"


class ConnectFailedError(ClientError):
    """``max_attempts`` connection attempts in a row failed.

    Attributes:
        attempts: The number of attempts made.
        last_error: What went wrong with the last one.
    """

    def __init__(self, attempts: int, last_error: str) -> None:
        super().__init__(attempts, last_error)
        self.attempts = attempts
        self.last_error = last_error

    def __str__(self) -> str:
        return f"{self.attempts} connection attempts failed; the last: {self.last_error}"


class ProtocolError(ClientError):
    """The hub sent something the client cannot use (e.g. no hello event)."""
