"""The admin HTTP API, dashboard, health checks and metrics (Starlette on hypercorn's trio worker).

Every ``/api/*`` endpoint needs ``Authorization: Bearer <admin.api_key>`` (in
dev mode on loopback, with no key configured, none). Bodies are JSON,
structured with cattrs at this edge; a bad body gets 400 naming the field.

Web pages the operator happens to visit must not be able to drive it, so a
guard in front of every route refuses (403, counted):

* on a loopback admin port, a ``Host`` that is not a loopback name or address
  or ``admin.host``: a DNS-rebinding page reaches 127.0.0.1 under its own name,
  and would otherwise read everything that needs no key;
* a state-changing request whose ``Origin`` is not the request's own, such as
  a cross-site ``text/plain`` POST, which browsers send without asking.

Every answer carries ``X-Content-Type-Options: nosniff``, ``X-Frame-Options:
DENY`` and a Content-Security-Policy; the dashboard's allows only its own
inline script and style, by hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import attrs
import cattrs
import orjson
import trio
from cattrs.preconf.orjson import make_converter
from hypercorn.config import Config as HypercornConfig
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._close_codes import CloseCode
from .._config import _field_first, _format_exception, _leaves
from .._errors import HubClosedError, HubOverloadedError
from .._hub import is_loopback, listen_urls
from .._session import Session
from .._statistics import statistics_document
from .._targets import node_of
from ._metrics import CONTENT_TYPE
from ._openapi import openapi_document

if TYPE_CHECKING:
    from ._gateway import Gateway

__all__ = ["admin_app", "serve_admin"]

logger = logging.getLogger("trio_gw.admin")

_DEFAULT_PAGE = 100
_MAX_PAGE = 1000
# Echoed back in the page; JSON encoders (and most clients) stop at 64 bits.
_MAX_OFFSET = (1 << 63) - 1
# RFC 6455: a close frame's reason must fit in 123 bytes of UTF-8.
_MAX_REASON_BYTES = 123


class _BadRequest(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _close_code(_instance: Any, _attribute: Any, value: int) -> None:
    if not (value == CloseCode.NORMAL or 3000 <= value <= 4999):
        raise _BadRequest(f"code: expected 1000 or 3000..4999, got {value!r}")


def _close_reason(_instance: Any, _attribute: Any, value: str) -> None:
    if len(value.encode()) > _MAX_REASON_BYTES:
        raise _BadRequest(f"reason: expected at most {_MAX_REASON_BYTES} bytes of UTF-8")


def _user_ids(_instance: Any, _attribute: Any, value: list[str]) -> None:
    if not value or not all(value):
        raise _BadRequest("user_ids: expected a non-empty list of non-empty strings")


@attrs.frozen(kw_only=True)
class SendToSession:
    """Body of ``POST /api/send/session``."""

    session_id: str
    message: Any


@attrs.frozen(kw_only=True)
class SendToUsers:
    """Body of ``POST /api/send/users``."""

    user_ids: list[str] = attrs.field(validator=_user_ids)
    message: Any


@attrs.frozen(kw_only=True)
class SendToAll:
    """Body of ``POST /api/send/all``."""

    message: Any


@attrs.frozen(kw_only=True)
class CloseSession:
    """Body of ``POST /api/close/session``."""

    session_id: str
    code: int = attrs.field(default=CloseCode.NORMAL, validator=_close_code)
    reason: str = attrs.field(default="closed by admin", validator=_close_reason)


@attrs.frozen(kw_only=True)
class CloseUsers:
    """Body of ``POST /api/close/users``."""

    user_ids: list[str] = attrs.field(validator=_user_ids)
    code: int = attrs.field(default=CloseCode.NORMAL, validator=_close_code)
    reason: str = attrs.field(default="closed by admin", validator=_close_reason)


@attrs.frozen(kw_only=True)
class CloseAll:
    """Body of ``POST /api/close/all``."""

    code: int = attrs.field(default=CloseCode.NORMAL, validator=_close_code)
    reason: str = attrs.field(default="closed by admin", validator=_close_reason)


def _strict_str(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _strict_int(value: Any, _type: type) -> int:
    # JSON has one number type: 4000.0 is the integer 4000 (as in JSON Schema).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    return value


def _strict_str_list(value: Any, _type: type) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    return [_strict_str(item, str) for item in value]


_converter = make_converter(forbid_extra_keys=True)
_converter.register_structure_hook(str, _strict_str)
_converter.register_structure_hook(int, _strict_int)
_converter.register_structure_hook_func(lambda t: t == list[str], _strict_str_list)


_T = TypeVar("_T")


async def _body(request: Request, cls: type[_T]) -> _T:
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"body: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _BadRequest("body: expected a JSON object")
    try:
        return _converter.structure(data, cls)
    except _BadRequest:
        raise
    except cattrs.ClassValidationError as exc:
        ours = [e for e in _leaves(exc) if isinstance(e, _BadRequest)]
        if ours:
            raise _BadRequest("; ".join(e.detail for e in ours)) from None
        messages = cattrs.transform_error(exc, path="$", format_exception=_format_exception)
        raise _BadRequest("; ".join(_field_first(m, root="$") for m in messages)) from None


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, error: str, detail: str) -> Response:
    return _json({"error": error, "detail": detail}, status)


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{name}: expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise _BadRequest(f"{name}: expected {low}..{high}, got {value}")
    return value


def _page(request: Request) -> tuple[int, int]:
    return (
        _query_int(request, "offset", 0, 0, _MAX_OFFSET),
        _query_int(request, "limit", _DEFAULT_PAGE, 1, _MAX_PAGE),
    )


def _session_info(session: Session) -> dict[str, Any]:
    remote = session.remote
    return {
        "session_id": session.session_id,
        "user_id": session.user_id,
        "username": session.username,
        "remote": f"{remote[0]}:{remote[1]}" if remote else None,
        "connected_at": session.connected_at,
        "valid_until": session.identity.valid_until,
    }


# --- the browser guard ------------------------------------------------------------

_SAFE_METHODS = frozenset({"GET", "HEAD"})
_HOST = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<name>[^:\[\]]+))(?::\d*)?$")
#: The policy of every answer but the dashboard: load nothing, be framed nowhere.
_API_CSP = "default-src 'none'; frame-ancestors 'none'"
_SECURITY_HEADERS = (("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"))


def _host_name(host: str) -> str | None:
    """The name or address in a ``Host`` header, lower-cased, or None if malformed."""
    match = _HOST.match(host)
    if match is None:
        return None
    return (match.group("v6") or match.group("name")).lower()


def _same_origin(origin: str, host: str) -> bool:
    """True when ``origin`` names the server the request was sent to.

    A browser serializes both from the same URL for a same-origin request
    (default ports left out of both), so host and port compare as text; the
    scheme is not compared, so that a TLS-terminating proxy in front keeps working.
    """
    scheme, sep, authority = origin.partition("://")
    return (
        bool(sep)
        and scheme.lower() in ("http", "https")
        and "/" not in authority
        and authority.lower() == host.lower()
    )


def _csp_hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions allowing each inline ``<tag>`` element of ``html``."""
    # Browsers hash the element's text as parsed, and HTML parsing turns CRLF into LF.
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html.replace("\r\n", "\n"), re.S)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in bodies
    ]


def _dashboard_csp(html: str) -> str:
    """The dashboard's Content-Security-Policy: its own inline script and style, by hash."""
    scripts = " ".join(_csp_hashes(html, "script")) or "'none'"
    styles = " ".join(_csp_hashes(html, "style")) or "'none'"
    return (
        f"default-src 'self'; script-src {scripts}; style-src {styles}; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


class _BrowserGuard:
    """ASGI middleware: refuses what only a hostile web page would send; adds security headers.

    Args:
        app: The admin app.
        check_host: Refuse a ``Host`` that is neither loopback nor ``admin_host``.
        admin_host: ``admin.host``.
        refused: Called once per refusal (the metric).
    """

    def __init__(
        self, app: ASGIApp, *, check_host: bool, admin_host: str, refused: Callable[[], None]
    ) -> None:
        self._app = app
        self._check_host = check_host
        self._admin_host = admin_host.strip("[]").lower()
        self._refused = refused

    def _refusal(self, scope: Scope) -> str | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self._check_host:
            name = _host_name(host)
            if name is None or not (is_loopback(name) or name == self._admin_host):
                return (
                    f"Host {host!r} is not this admin API's address; use a loopback address "
                    "(127.0.0.1 or localhost) or admin.host"
                )
        origin = headers.get("origin")
        if (
            scope["method"] not in _SAFE_METHODS
            and origin is not None
            and not _same_origin(origin, host)
        ):
            return f"cross-origin request refused: Origin {origin!r} is not {host!r}"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection: refuse it, or pass it on with the headers added."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            self._refused()
            client = scope.get("client")
            logger.warning(
                "admin request %s %s from %s refused: %s",
                scope["method"],
                scope["path"],
                client[0] if client else "?",
                refusal,
            )
            await _error(403, "forbidden", refusal)(scope, receive, self._send_secured(send))
            return
        await self._app(scope, receive, self._send_secured(send))

    @staticmethod
    def _send_secured(send: Send) -> Send:
        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS:
                    headers.append(name, value)
                if "content-security-policy" not in headers:
                    headers["content-security-policy"] = _API_CSP
            await send(message)

        return secured


# --- the app -------------------------------------------------------------------------

Endpoint = Callable[[Request], Awaitable[Response]]

#: The API's operations; the tests check that the OpenAPI document lists exactly these.
API_ROUTES = (
    ("POST", "/api/send/session"),
    ("POST", "/api/send/users"),
    ("POST", "/api/send/all"),
    ("POST", "/api/close/session"),
    ("POST", "/api/close/users"),
    ("POST", "/api/close/all"),
    ("GET", "/api/sessions"),
    ("GET", "/api/users"),
    ("GET", "/api/users/{user_id}/sessions"),
    ("GET", "/api/statistics"),
    ("GET", "/api/history"),
)


def admin_app(gateway: Gateway) -> Starlette:
    """Build the admin ASGI app for ``gateway`` (served by ``serve_admin``)."""
    hub, metrics = gateway.hub, gateway.metrics
    api_key = gateway.config.admin.api_key
    expected = f"Bearer {api_key}".encode() if api_key is not None else None

    def protected(endpoint: Endpoint) -> Endpoint:
        async def guarded(request: Request) -> Response:
            if expected is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    metrics.admin_refused.inc()
                    logger.warning(
                        "admin request %s %s from %s refused: missing or wrong API key",
                        request.method,
                        request.url.path,
                        request.client.host if request.client else "?",
                    )
                    return _error(401, "unauthorized", "Authorization: Bearer <api key> required")
            try:
                return await endpoint(request)
            except _BadRequest as exc:
                return _error(400, "bad_request", exc.detail)
            except HubClosedError:
                return _error(503, "shutting_down", "the hub is shutting down")
            except HubOverloadedError as exc:
                return _error(503, "overloaded", str(exc))
            except ValueError as exc:  # an encoded message larger than any queue
                return _error(413, "too_large", str(exc))

        return guarded

    clustered = gateway.backplane is not None

    def unknown_session(session_id: str) -> Response:
        where = "in the cluster" if clustered else "on this hub"
        return _error(404, "not_found", f"session_id: no session {session_id!r} {where}")

    async def session_known(session_id: str) -> bool:
        """On this node, or (in a cluster) named by a live node's id: a message may reach it."""
        if hub.get_handler(session_id) is not None:
            return True
        node = node_of(session_id)
        if not clustered or node is None or node == hub.instance_id:
            return False
        return node in (await hub.presence([])).nodes

    async def users_count(user_ids: list[str]) -> int:
        """Sessions of these users on every node (this node's, if the others cannot be asked)."""
        presence = await hub.presence(user_ids)
        return sum(presence.users.values())

    async def send_session(request: Request) -> Response:
        body = await _body(request, SendToSession)
        if not await session_known(body.session_id):
            return unknown_session(body.session_id)
        await hub.send_message(body.session_id, body.message)
        return _json({"sessions": 1})

    async def send_users(request: Request) -> Response:
        body = await _body(request, SendToUsers)
        count = await users_count(body.user_ids)
        await hub.send_message_to_user_ids(body.user_ids, body.message)
        return _json({"sessions": count})

    async def send_all(request: Request) -> Response:
        body = await _body(request, SendToAll)
        count = (await hub.presence()).sessions
        await hub.send_message_to_all(body.message)
        return _json({"sessions": count})

    async def close_session(request: Request) -> Response:
        body = await _body(request, CloseSession)
        if not await session_known(body.session_id):
            return unknown_session(body.session_id)
        hub.close(body.session_id, code=body.code, reason=body.reason)
        return _json({"sessions": 1})

    async def close_users(request: Request) -> Response:
        body = await _body(request, CloseUsers)
        count = await users_count(body.user_ids)
        hub.close_user_ids(body.user_ids, code=body.code, reason=body.reason)
        return _json({"sessions": count})

    async def close_all(request: Request) -> Response:
        body = await _body(request, CloseAll)
        count = (await hub.presence()).sessions
        hub.close_all(code=body.code, reason=body.reason)
        return _json({"sessions": count})

    async def list_sessions(request: Request) -> Response:
        offset, limit = _page(request)
        ids = hub.session_ids()
        items = []
        for session_id in ids[offset : offset + limit]:
            session = hub.get_handler(session_id)
            if session is not None:
                items.append(_session_info(session))
        return _json({"total": len(ids), "offset": offset, "limit": limit, "items": items})

    async def list_users(request: Request) -> Response:
        offset, limit = _page(request)
        presence = await hub.presence()
        users = presence.users
        ids = list(users)
        items = [
            {
                "user_id": user_id,
                "sessions": users[user_id],
                "nodes": presence.nodes_of(user_id),
            }
            for user_id in ids[offset : offset + limit]
        ]
        return _json(
            {
                "total": len(ids),
                "offset": offset,
                "limit": limit,
                "items": items,
                "complete": presence.complete,
            }
        )

    async def user_sessions(request: Request) -> Response:
        user_id = request.path_params["user_id"]
        items = [
            _session_info(session)
            for session_id in sorted(hub.user_sessions(user_id))
            if (session := hub.get_handler(session_id)) is not None
        ]
        presence = await hub.presence([user_id])
        return _json(
            {
                "user_id": user_id,
                "items": items,
                "sessions": presence.sessions_of(user_id),
                "nodes": presence.nodes_of(user_id),
                "complete": presence.complete,
            }
        )

    async def statistics(_request: Request) -> Response:
        s = hub.statistics()
        forwarder = gateway._forwarder
        presence = await hub.presence()
        backplane = gateway.backplane
        return _json(
            {
                "time": time.time(),
                **statistics_document(s),
                "backend_inflight": forwarder.inflight if forwarder else 0,
                "backend_max_inflight": gateway.config.backend.max_inflight,
                "cluster": {
                    "node_id": hub.instance_id,
                    "complete": presence.complete,
                    "connections": presence.sessions,
                    "users": len(presence.users),
                    "nodes": presence.by_node(),
                },
                "backplane": (None if backplane is None else attrs.asdict(backplane.statistics())),
            }
        )

    async def history(request: Request) -> Response:
        after = _query_int(request, "after", 0, 0, _MAX_OFFSET)
        kept = gateway.history
        return _json(
            {
                "started": kept.started,
                "interval": kept.interval,
                "capacity": kept.capacity,
                "samples": [attrs.asdict(sample) for sample in kept.samples(after)],
            }
        )

    async def healthz(_request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        reason = gateway.not_ready_reason
        if reason is None:
            return _json({"status": "ready"})
        return _json({"status": "not ready", "reason": reason}, 503)

    async def prometheus(_request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    document = orjson.dumps(openapi_document())

    async def openapi(_request: Request) -> Response:
        return Response(document, media_type="application/json")

    dashboard = resources.files("trio_gw.gateway").joinpath("_dashboard.html").read_text("utf-8")
    dashboard_headers = {"content-security-policy": _dashboard_csp(dashboard)}

    async def index(_request: Request) -> Response:
        return HTMLResponse(dashboard, headers=dashboard_headers)

    api: dict[str, Endpoint] = {
        "/api/send/session": send_session,
        "/api/send/users": send_users,
        "/api/send/all": send_all,
        "/api/close/session": close_session,
        "/api/close/users": close_users,
        "/api/close/all": close_all,
        "/api/sessions": list_sessions,
        "/api/users": list_users,
        "/api/users/{user_id}/sessions": user_sessions,
        "/api/statistics": statistics,
        "/api/history": history,
    }
    routes = [
        Route("/", index, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        # A user id may hold "/" (sent as %2F, which Starlette decodes before
        # routing), so the route takes the rest of the path up to "/sessions".
        *(
            Route(path.replace("{user_id}", "{user_id:path}"), protected(api[path]), methods=[m])
            for m, path in API_ROUTES
        ),
    ]
    # A message may be as large as a client's queue; the JSON around it is small.
    max_body = gateway.config.hub.outbound_queue_bytes + 64 * 1024
    admin = gateway.config.admin
    guard = Middleware(
        _BrowserGuard,
        # Bound elsewhere, a key is required and probes come by the pod's own
        # address; bound to loopback, only a rebinding page uses another name.
        check_host=is_loopback(admin.host) or api_key is None,
        admin_host=admin.host,
        refused=metrics.admin_refused.inc,
    )
    return Starlette(routes=routes, middleware=[guard], max_body_size=max_body)


async def serve_admin(
    gateway: Gateway, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``admin_app(gateway)`` with hypercorn until cancelled; reports the bound port.

    It serves https when ``GatewayConfig.admin_tls_files`` names a certificate,
    and logs one start-up line with its URL (plus a warning when the API key
    would cross the network in clear).

    Raises:
        OSError: the admin address cannot be bound.
    """
    admin = gateway.config.admin
    tls_files = gateway.config.admin_tls_files
    config = HypercornConfig()
    host = f"[{admin.host}]" if ":" in admin.host else admin.host  # an IPv6 literal
    config.bind = [f"{host}:{admin.port}"]
    if tls_files is not None:
        config.certfile, config.keyfile = tls_files
    config.accesslog = None
    config.errorlog = logger
    config.logger_class = _HypercornLogger
    config.graceful_timeout = 1.0

    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(admin_app(gateway), config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        bound: list[str] = await nursery.start(run)
        addresses = [(split.hostname or "", split.port or 0) for split in map(urlsplit, bound)]
        scheme = "https" if tls_files is not None else "http"
        logger.info("admin API and dashboard on %s", listen_urls(scheme, addresses))
        if tls_files is None and not is_loopback(admin.host):
            logger.warning(
                "the admin API on %s is plain http: its API key crosses the network in clear; "
                "terminate TLS in front of it, or set admin.tls_cert_file and admin.tls_key_file "
                "(or admin.use_client_tls)",
                admin.host,
            )
        task_status.started(addresses[0][1])


class _HypercornLogger(HypercornLogger):
    """hypercorn's logger without its "Running on ..." line: ``serve_admin`` logs its own URL.

    Everything else (warnings, errors) still goes to ``config.errorlog``.
    """

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        if not message.startswith("Running on "):
            await super().info(message, *args, **kwargs)
