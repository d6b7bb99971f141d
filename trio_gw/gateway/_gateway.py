"""The standalone gateway: a hub, JWT auth, backend forwarding and the admin API in one nursery."""

from __future__ import annotations

import logging
import ssl
import uuid
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import httpx
import trio

from .._auth import Authorizer
from .._close_codes import CloseCode
from .._devmode import dev_authorizer
from .._errors import AuthRefused, ConfigError
from .._hub import HandlerManager, Reply, open_hub, serve_hub
from .._session import Session
from .._wire import (
    RequestPayload,
    Response,
    ResponsePayload,
    WireError,
    error_message,
    parse_request,
    unstructure,
)
from ._admin import serve_admin
from ._config import GatewayConfig, default_node_id
from ._forwarding import BackendForwarder, request_error
from ._history import History, serve_history
from ._jwt import JwtVerifier, jwt_authorizer
from ._metrics import GatewayMetrics

if TYPE_CHECKING:
    from .._redis_backplane import RedisBackplane

__all__ = ["Gateway", "check_gateway_config", "serve_gateway"]

logger = logging.getLogger("trio_gw")


def _server_context(field: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server TLS context holding this certificate chain and key; errors name ``field``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{field}: cannot load {cert_file!r} with key {key_file!r}: {exc}"
        ) from None
    return context


def _tls_context(config: GatewayConfig) -> ssl.SSLContext | None:
    tls = config.tls
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    return _server_context("tls.cert_file", tls.cert_file, tls.key_file)


def _check_admin_tls(config: GatewayConfig) -> None:
    """Load the admin port's own certificate and key once, so that a bad file is a ConfigError.

    (hypercorn loads them again itself; ``admin.use_client_tls`` files are ``[tls]``'s,
    which ``_tls_context`` loads.)
    """
    admin = config.admin
    if admin.enabled and admin.tls_cert_file is not None and admin.tls_key_file is not None:
        _server_context("admin.tls_cert_file", admin.tls_cert_file, admin.tls_key_file)


def check_gateway_config(config: GatewayConfig) -> None:
    """Load everything ``config`` points at (keys, certificates) without serving.

    Raises:
        ConfigError: a file is missing or does not hold what it should.
    """
    if not config.auth.dev_mode:
        JwtVerifier(config.auth)
    _tls_context(config)
    _check_admin_tls(config)


@attrs.define(eq=False)
class Gateway:
    """A running standalone gateway, as ``serve_gateway`` reports it (not built directly).

    Attributes:
        config: Its configuration.
        hub: The hub it runs.
        port: The bound WebSocket port.
        admin_port: The bound admin HTTP port, or None if the admin API is off.
        metrics: Its Prometheus metrics.
        history: The last 15 minutes of its statistics (sampled while the admin API is on).
    """

    config: GatewayConfig
    hub: HandlerManager
    metrics: GatewayMetrics
    _verifier: JwtVerifier | None
    _forwarder: BackendForwarder | None
    #: The Redis backplane when ``[backplane] url`` is set (a node of a cluster), else None.
    backplane: RedisBackplane | None = None
    port: int = 0
    admin_port: int | None = None
    _ready: bool = False
    _shutdown_requested: trio.Event = attrs.Factory(trio.Event)
    history: History = attrs.Factory(History)

    @property
    def ready(self) -> bool:
        """True while the listener is bound and the gateway is not shutting down."""
        return self._ready

    @property
    def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` answers 503, or None when it answers 200.

        Not ready: before the listener is bound, once a shutdown starts,
        while an ``auth.jwks_url`` key set has never been loaded, and while
        the backplane's connection or its subscriber is down.
        """
        if not self._ready:
            return "not serving (starting or shutting down)"
        if self._verifier is not None and not self._verifier.keys_loaded:
            return "no signing keys loaded yet from auth.jwks_url"
        if self.backplane is not None and not self.backplane.up:
            stats = self.backplane.statistics()
            return f"backplane {stats.state}: {stats.last_error or 'not connected yet'}"
        return None

    def shutdown(self) -> None:
        """Start a graceful shutdown; ``serve_gateway`` returns once it is done.

        Readiness turns false at once, the listener closes, and every client
        gets 1001 once the answers to its in-flight requests and its queue are
        written (for at most ``hub.close_timeout`` per client and
        ``hub.shutdown_timeout`` in all). Backend calls still running then are
        cancelled.
        """
        self._ready = False
        self._shutdown_requested.set()

    # --- the message callback -------------------------------------------------

    async def on_message(self, reply: Reply, session: Session, message: Any) -> None:
        """Route one decoded client message: a token refresh or a backend request."""
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "auth":
            await self._refresh(reply, session, message)
        elif kind == "request":
            await self._request(reply, session, message)
        else:
            await reply(
                session,
                error_message(
                    "WireError",
                    'message: expected an object with "type": "request" or "auth"',
                ),
            )

    async def _refresh(self, reply: Reply, session: Session, message: dict[str, Any]) -> None:
        metrics = self.metrics
        payload = message.get("payload")
        token = payload.get("token") if isinstance(payload, dict) else None
        # A refused refresh leaves the connection and its deadline as they are;
        # the client may try again.
        try:
            if not isinstance(token, str) or not token:
                raise AuthRefused(400, "payload.token: expected a string")
            if self._verifier is None:
                raise AuthRefused(400, "dev mode: tokens are not checked")
            identity = await self._verifier.check(token)
        except AuthRefused as exc:
            metrics.auth_refreshes.labels("invalid").inc()
            logger.info(
                "session %s: token refresh refused: %s",
                session.session_id,
                exc.reason,
                extra=session.log_fields,
            )
            await reply(session, _auth_reply(False, error=exc.reason))
            return
        if identity.user_id != session.user_id:
            metrics.auth_refreshes.labels("other_user").inc()
            logger.warning(
                "session %s: refresh with a token for user %r refused; closing",
                session.session_id,
                identity.user_id,
                extra=session.log_fields,
            )
            await reply(session, _auth_reply(False, error="token is for a different user"))
            self.hub.close(
                session.session_id,
                code=CloseCode.POLICY_VIOLATION,
                reason="token for a different user",
            )
            return
        self.hub.refresh_identity(session, identity)
        metrics.auth_refreshes.labels("ok").inc()
        await reply(
            session,
            _auth_reply(True, user_id=identity.user_id, valid_until=identity.valid_until),
        )

    async def _request(self, reply: Reply, session: Session, message: dict[str, Any]) -> None:
        try:
            request = parse_request(message).payload
        except WireError as exc:
            # The refusal carries the client's trace id when it gave a usable
            # one, so that the client can match it; otherwise a fresh one.
            payload = message.get("payload")
            given = payload.get("trace_id") if isinstance(payload, dict) else None
            trace_id = given if isinstance(given, str) and given else uuid.uuid4().hex
            await reply(session, _response(request_error(trace_id, "bad_request", str(exc))))
            return
        if not request.trace_id:  # absent or empty: assign one
            request = attrs.evolve(request, trace_id=uuid.uuid4().hex)
        forwarder = self._forwarder
        if forwarder is None:
            if self.config.auth.dev_mode:  # echo, as in the dev hub
                await reply(
                    session,
                    _response(ResponsePayload(trace_id=request.trace_id, result=request.params)),
                )
            else:
                await reply(
                    session,
                    _response(
                        request_error(request.trace_id, "no_backend", "no backend is configured")
                    ),
                )
            return
        refusal = forwarder.try_reserve(session, request.trace_id)
        if refusal is not None:
            await reply(session, _response(refusal))
            return
        # The call runs beside the dispatcher, so that a slow backend never
        # holds up this client's next message (a token refresh, say).
        if not session.start_soon(self._forward, forwarder, session, request):
            forwarder.release(session)  # the connection has ended: no one to answer

    async def _forward(
        self, forwarder: BackendForwarder, session: Session, request: RequestPayload
    ) -> None:
        """One backend call and its answer; whatever happens, the client gets a response.

        Error handling:
            A failure in forwarding (a bug) is logged and answered with
            ``backend_error``; a reply too large for the client's queue is
            answered with ``backend_reply_too_large``. Nothing escapes: this
            runs on the session's behalf (``Session.start_soon``).
        """
        extra = {**session.log_fields, "trace_id": request.trace_id}
        try:
            response = await forwarder.forward(session, request)
        except Exception:
            logger.exception(
                "request %s.%s: forwarding failed", request.service, request.method, extra=extra
            )
            response = request_error(
                request.trace_id, "backend_error", "forwarding failed; the gateway logged why"
            )
        try:
            await self.hub.to_handler_message(session, _response(response))
        except ValueError as exc:  # over outbound_queue_bytes once encoded
            self.metrics.backend_errors.labels("backend_reply_too_large").inc()
            logger.warning(
                "request %s.%s: reply not sent: %s",
                request.service,
                request.method,
                exc,
                extra=extra,
            )
            await self.hub.to_handler_message(
                session,
                _response(
                    request_error(
                        request.trace_id,
                        "backend_reply_too_large",
                        f"the backend's reply is too large for this connection ({exc})",
                    )
                ),
            )


def _response(payload: ResponsePayload) -> Any:
    return unstructure(Response(payload=payload))


def _auth_reply(ok: bool, **fields: Any) -> dict[str, Any]:
    return {"type": "auth", "payload": {"ok": ok, **fields}}


async def serve_gateway(
    config: GatewayConfig,
    *,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the standalone gateway until ``Gateway.shutdown()`` is called.

    Start it with ``gateway = await nursery.start(serve_gateway, config)``: it
    reports the running ``Gateway`` (with its bound ports) once both listeners
    accept connections.

    Resource handling:
        Everything runs in this task's nurseries: the hub with its
        connections (each backend call runs in the nursery of the session
        that made it), the httpx client, and the admin HTTP server with
        its statistics sampler (``serve_history``, which only reads
        ``hub.statistics()``). ``shutdown()`` stops them in order (listener,
        clients, admin API).
        With ``auth.jwks_url``, the key set's refresh task
        (``JwtVerifier.serve_jwks_refresh``) runs beside the admin API and
        stops with it.
        Cancelling this task stops them too; the hub still closes its clients
        with 1001, for at most ``hub.shutdown_timeout``.

    Raises:
        ConfigError: a key or certificate file cannot be loaded.
        OSError: a port cannot be bound.
    """
    verifier = None if config.auth.dev_mode else JwtVerifier(config.auth)
    authorizer: Authorizer = dev_authorizer if verifier is None else jwt_authorizer(verifier)
    ssl_context = _tls_context(config)
    _check_admin_tls(config)
    backend = config.backend
    if config.auth.dev_mode:
        logger.warning(
            "DEV MODE: any bearer token (or ?token=) is accepted as the user id%s. "
            "Not for production; bound to loopback only.",
            "" if backend.url else ", and requests are echoed back",
        )
    limits = httpx.Limits(
        max_connections=backend.max_inflight, max_keepalive_connections=backend.max_inflight
    )
    async with (
        httpx.AsyncClient(timeout=backend.timeout, limits=limits) as client,
        trio.open_nursery() as admin_nursery,
    ):
        gateway: Gateway | None = None

        async def on_message(reply: Reply, session: Session, message: Any) -> None:
            assert gateway is not None
            await gateway.on_message(reply, session, message)

        if verifier is not None and verifier.jwks_url is not None:
            # Clients are served after the first fetch, failed or not (then
            # handshakes get 503 until a retry loads the keys).
            await admin_nursery.start(verifier.serve_jwks_refresh)
        backplane = _backplane(config)
        node_id = "hub" if backplane is None else backplane.node_id
        async with open_hub(
            "trio-gw",
            node_id,
            on_message,
            config=config.hub,
            authorizer=authorizer,
            backplane=backplane,
        ) as hub:
            metrics = GatewayMetrics(hub.statistics, backend.max_inflight)
            if backplane is not None:
                metrics.watch_backplane(backplane.statistics)
            if verifier is not None and verifier.jwks_url is not None:
                metrics.watch_jwks(verifier.jwks_statistics)
            forwarder = (
                BackendForwarder(backend, client, metrics) if backend.url is not None else None
            )
            gateway = Gateway(config, hub, metrics, verifier, forwarder, backplane)
            if config.admin.enabled:
                await admin_nursery.start(
                    serve_history, gateway.history, hub.statistics, metrics.backend_errors_total
                )
                gateway.admin_port = await admin_nursery.start(serve_admin, gateway)
            async with trio.open_nursery() as listener:
                gateway.port = await listener.start(
                    _serve_clients, hub, ssl_context, name="trio_gw listener"
                )
                gateway._ready = True
                task_status.started(gateway)
                await gateway._shutdown_requested.wait()
                gateway._ready = False
                logger.info("shutting down: no new connections; closing clients with 1001")
                listener.cancel_scope.cancel()
            # Leaving open_hub closes every session with 1001 after draining.
        admin_nursery.cancel_scope.cancel()
    logger.info("shut down")


def _backplane(config: GatewayConfig) -> RedisBackplane | None:
    """The Redis backplane ``[backplane]`` asks for, or None for a single node."""
    settings = config.backplane
    if settings.url is None:
        return None
    from .._redis_backplane import RedisBackplane

    return RedisBackplane(
        settings.url,
        settings.node_id or default_node_id(),
        prefix=settings.prefix,
        publish_queue_size=settings.publish_queue_size,
        inbox_size=settings.inbox_size,
        fanout_threshold=settings.fanout_threshold,
        presence_interval=settings.presence_interval,
        presence_ttl=settings.presence_ttl,
        timeout=settings.timeout,
        reconnect_max=settings.reconnect_max,
    )


async def _serve_clients(
    hub: HandlerManager,
    ssl_context: ssl.SSLContext | None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    await serve_hub(hub, ssl_context=ssl_context, task_status=task_status)
