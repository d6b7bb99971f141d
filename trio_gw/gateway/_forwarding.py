"""Forwarding client requests to the backend over HTTP (httpx): the service-mesh role.

Every outcome becomes a response for the client with the request's trace id:
the backend's JSON reply as ``result``, or an ``error`` saying what went wrong.
Nothing a backend does (or fails to do) is dropped without an answer.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any
from urllib.parse import quote

import attrs
import httpx
import orjson
import trio

from .._session import Session
from .._wire import RequestPayload, ResponsePayload
from ._config import BackendConfig
from ._metrics import GatewayMetrics

__all__ = ["BackendForwarder", "request_error"]

logger = logging.getLogger("trio_gw.backend")

# Header values must be ASCII; ids outside it are percent-encoded (RFC 3986).
_HEADER_SAFE = "!#$&'()*+,/:;=?@[]~-._ "


def _header_value(value: str) -> str:
    return quote(value, safe=_HEADER_SAFE)


def request_error(trace_id: str | None, code: str, message: str) -> ResponsePayload:
    """A response payload that carries an error instead of a result."""
    return ResponsePayload(trace_id=trace_id, error={"code": code, "message": message})


@attrs.define
class BackendForwarder:
    """POSTs requests to ``backend.url`` and turns each outcome into a response.

    In-flight calls are bounded twice: ``max_inflight`` for the whole gateway
    and ``max_inflight_per_session`` for each connection. A request over
    either bound is answered at once with ``backend_busy`` or
    ``too_many_requests``, never queued without limit.

    Args:
        config: The ``[backend]`` section.
        client: The shared httpx client (its pool limits match ``max_inflight``).
        metrics: Where latency, errors and the in-flight gauge are recorded.
    """

    config: BackendConfig
    client: httpx.AsyncClient
    metrics: GatewayMetrics
    _inflight: int = 0
    _per_session: Counter[str] = attrs.Factory(Counter)

    @property
    def inflight(self) -> int:
        """Backend calls in flight now."""
        return self._inflight

    def try_reserve(self, session: Session, trace_id: str | None) -> ResponsePayload | None:
        """Take a slot for one call; returns the error response if there is none.

        A reserved slot must be given back with ``release`` (``forward`` does).
        """
        config = self.config
        if self._inflight >= config.max_inflight:
            return self._refuse(
                trace_id,
                "backend_busy",
                f"the gateway has {config.max_inflight} backend calls in flight; retry later",
            )
        if self._per_session[session.session_id] >= config.max_inflight_per_session:
            return self._refuse(
                trace_id,
                "too_many_requests",
                f"this connection has {config.max_inflight_per_session} requests in flight; "
                "wait for a response first",
            )
        self._inflight += 1
        self._per_session[session.session_id] += 1
        self.metrics.backend_inflight.set(self._inflight)
        return None

    def release(self, session: Session) -> None:
        """Give back a slot taken by ``try_reserve``."""
        self._inflight -= 1
        left = self._per_session[session.session_id] - 1
        if left:
            self._per_session[session.session_id] = left
        else:
            del self._per_session[session.session_id]
        self.metrics.backend_inflight.set(self._inflight)

    def _refuse(self, trace_id: str | None, code: str, message: str) -> ResponsePayload:
        self.metrics.backend_errors.labels(code).inc()
        return request_error(trace_id, code, message)

    async def forward(self, session: Session, request: RequestPayload) -> ResponsePayload:
        """Call the backend for one request; the slot must have been reserved.

        Returns:
            The response: ``result`` is the backend's JSON reply, or ``error``
            is one of ``backend_timeout``, ``backend_unreachable``,
            ``backend_status`` (non-2xx), ``backend_bad_reply`` (not JSON) or
            ``backend_error``.
        """
        config, trace_id = self.config, request.trace_id
        assert config.url is not None
        headers = {
            "content-type": "application/json",
            "x-session-id": _header_value(session.session_id),
            "x-user-id": _header_value(session.user_id),
            "x-trace-id": _header_value(trace_id or ""),
        }
        credentials = session.identity.credentials
        if config.forward_token and credentials is not None:
            headers["authorization"] = f"Bearer {credentials}"
        body = orjson.dumps(
            {
                "service": request.service,
                "method": request.method,
                "params": request.params,
                "trace_id": trace_id,
            }
        )
        started = trio.current_time()
        outcome = "ok"
        try:
            reply = await self.client.post(config.url, content=body, headers=headers)
            response = self._interpret(reply, trace_id)
            if response.error is not None:
                outcome = response.error["code"]
        except httpx.TimeoutException:
            outcome = "backend_timeout"
            response = request_error(
                trace_id, outcome, f"the backend did not answer within {config.timeout:g}s"
            )
        except httpx.ConnectError as exc:
            outcome = "backend_unreachable"
            response = request_error(trace_id, outcome, f"cannot connect to the backend ({exc})")
        except httpx.HTTPError as exc:
            outcome = "backend_error"
            response = request_error(
                trace_id, outcome, f"backend call failed ({type(exc).__name__}: {exc})"
            )
        finally:
            self.release(session)
        elapsed = trio.current_time() - started
        self.metrics.backend_latency.labels("ok" if outcome == "ok" else "error").observe(elapsed)
        extra = {**session.log_fields, "trace_id": trace_id}
        if outcome == "ok":
            logger.info(
                "request %s.%s answered in %.1f ms",
                request.service,
                request.method,
                elapsed * 1000,
                extra=extra,
            )
        else:
            self.metrics.backend_errors.labels(outcome).inc()
            logger.warning(
                "request %s.%s failed after %.1f ms: %s",
                request.service,
                request.method,
                elapsed * 1000,
                response.error["message"] if isinstance(response.error, dict) else outcome,
                extra=extra,
            )
        return response

    def _interpret(self, reply: httpx.Response, trace_id: str | None) -> ResponsePayload:
        if not reply.is_success:
            detail: Any = _json_or_none(reply.content)
            message = f"the backend answered HTTP {reply.status_code}"
            error = {"code": "backend_status", "message": message, "status": reply.status_code}
            if detail is not None:
                error["detail"] = detail
            return ResponsePayload(trace_id=trace_id, error=error)
        try:
            result = orjson.loads(reply.content)
        except orjson.JSONDecodeError:
            content_type = reply.headers.get("content-type", "none")
            return request_error(
                trace_id,
                "backend_bad_reply",
                f"the backend's reply is not JSON (content-type {content_type}, "
                f"{len(reply.content)} bytes)",
            )
        return ResponsePayload(trace_id=trace_id, result=result)


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        return None
