"""The client: one background task that keeps a connection to the hub open.

``open_client`` owns a nursery with one task, ``Client._run``. That task makes
one connection at a time (``Client._attempt``), serves it until it ends, and
then does what ``_policy.py`` decides: stop, give up, back off and reconnect,
or fetch a new token and reconnect. Callers' tasks only send; everything that
is received goes through the background task, which hands answers to waiting
requests and pushed messages to a bounded buffer.

trio-websocket 0.12.2's client has two bugs that leak its socket:

* when the hub refuses the handshake, ``ConnectionRejected`` is raised from its
  reader task, and nobody closes the stream;
* when the hub closes first, its reader stops at the end of the stream in state
  CLOSED without closing the stream.

Both are contained in one place, ``Client._read_frames``: the client builds the
``WebSocketConnection`` itself (as ``connect_websocket`` does), runs trio-websocket's
reader task inside a wrapper that catches ``ConnectionRejected``, and always
closes the stream when the reader ends. This uses three trio-websocket internals
(``_reader_task``, ``_open_handshake`` and ``_stream``); trio-websocket is pinned
exactly, and ``tests/test_client.py`` checks that they are still there.
"""

from __future__ import annotations

import enum
import logging
import math
import ssl
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection
from wsproto import ConnectionType, WSConnection

from ._errors import (
    ClientClosedError,
    ClientError,
    ConnectFailedError,
    ConnectionLostError,
    HandshakeRefusedError,
    ProtocolError,
    RequestError,
    RequestTimeoutError,
)
from ._policy import Action, Backoff, after_close, after_refusal
from ._tokens import refresh_delay, token_expiry

# A connection that stayed open this long resets the reconnect backoff.
_STABLE_AFTER = 10.0

__all__ = [
    "Client",
    "ClientState",
    "ClientStatistics",
    "MessagesLost",
    "TokenProvider",
    "open_client",
]

logger = logging.getLogger("trio_gw.client")

TokenProvider = Callable[[], Awaitable[str]]
"""An async callable that returns a fresh token (e.g. a JWT from your auth service)."""

# Timed-out requests whose late answers are recognised and dropped (oldest forgotten first).
_MAX_ABANDONED = 1024
# trio-websocket's own queue between its reader and ours; ours drains it at once.
_WS_QUEUE_SIZE = 16
_DEFAULT_BACKOFF = Backoff()


class ClientState(enum.Enum):
    """The state of a client's connection.

    ``CONNECTING``: the first connection is being made. ``OPEN``: connected,
    and the hello event received (``session_id`` is this connection's).
    ``RECONNECTING``: the connection ended and the client is making a new one
    (backing off, fetching a token, or connecting). ``CLOSED``: for good.
    """

    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@attrs.frozen
class MessagesLost:
    """Yielded by the iteration in place of ``count`` pushed messages that were dropped.

    The buffer of pushed messages holds ``max_buffered_messages``; when it is
    full, the oldest message is dropped to make room. The next item the
    consumer receives is then this marker, followed by the buffered (newer)
    messages.
    """

    count: int


@attrs.frozen(kw_only=True)
class ClientStatistics:
    """A snapshot of a client's counters. Counters only grow; gauges are "now".

    Attributes:
        state: The connection state now (gauge).
        connects: Connections opened (hello received).
        reconnects: Connections opened after the first one.
        connect_failures: Attempts that did not reach an open connection
            (network errors, timeouts, refused handshakes, a failing token provider).
        messages_in: Messages received from the hub (hello events, answers and pushes).
        messages_out: Messages sent (requests, auth frames and ``send``).
        messages_buffered: Pushed messages waiting to be received (gauge).
        messages_lost: Pushed messages dropped because the buffer was full.
        requests_sent: Requests sent.
        requests_timed_out: Requests that raised ``RequestTimeoutError``.
        requests_lost: Requests that failed because their connection ended.
        late_responses: Answers to timed-out (or cancelled) requests, dropped.
        token_fetches: Calls of the token provider that returned a token.
        token_refreshes: In-band token refreshes the hub accepted.
        token_refresh_failures: In-band refreshes that failed (refused, no
            answer, or the provider raised).
    """

    state: ClientState
    connects: int
    reconnects: int
    connect_failures: int
    messages_in: int
    messages_out: int
    messages_buffered: int
    messages_lost: int
    requests_sent: int
    requests_timed_out: int
    requests_lost: int
    late_responses: int
    token_fetches: int
    token_refreshes: int
    token_refresh_failures: int


@attrs.define(eq=False)
class _Waiter:
    """One answer awaited by one task: a request's response, or an auth reply."""

    event: trio.Event = attrs.Factory(trio.Event)
    payload: dict[str, Any] | None = None
    error: ClientError | None = None

    def resolve(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.event.set()

    def fail(self, error: ClientError) -> None:
        self.error = error
        self.event.set()


@attrs.define(eq=False)
class _Connection:
    """An open connection, and what is waiting for answers on it."""

    ws: WebSocketConnection
    pending: dict[str, _Waiter] = attrs.Factory(dict)
    auth_waiter: _Waiter | None = None


# What one connection attempt came to.
@attrs.frozen
class _Ended:
    code: int
    reason: str | None
    action: Action


@attrs.frozen
class _Refused:
    status: int
    body: str


@attrs.frozen
class _Failed:
    description: str


@attrs.frozen
class _Fatal:
    error: ClientError


_Outcome = _Ended | _Refused | _Failed | _Fatal


@attrs.frozen
class _Target:
    host: str
    port: int
    resource: str
    host_header: str
    ssl_context: ssl.SSLContext | None

    @classmethod
    def from_url(cls, url: str, ssl_context: ssl.SSLContext | None) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"expected a ws:// or wss:// URL with a host, got {url!r}")
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port in (80, 443) else f"{shown}:{port}"
        if secure and ssl_context is None:
            ssl_context = ssl.create_default_context()
        return cls(host, port, resource, host_header, ssl_context if secure else None)


def _parse_hello(raw: str | bytes) -> tuple[str, str, str] | None:
    """(session_id, user_id, username) from a hello event, or None if it is not one."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    match message:
        case {
            "type": "event",
            "payload": {
                "topic": "hello",
                "event": {"session_id": str() as session_id, "user_id": str() as user_id} as event,
            },
        }:
            username = event.get("username")
            return session_id, user_id, username if isinstance(username, str) else user_id
    return None


async def _wait_any(*events: trio.Event) -> None:
    """Return as soon as one of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


class Client:
    """A connection to a trio_gw hub that reconnects by itself; made by ``open_client``.

    Attributes are read-only; see ``open_client`` for the behaviour.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        token_provider: TokenProvider | None,
        backoff: Backoff,
        reconnect: bool,
        reconnect_on: Collection[int],
        max_buffered_messages: int,
        max_buffered_bytes: int,
        request_timeout: float,
        connect_timeout: float,
        close_timeout: float,
        refresh_ratio: float,
        refresh_margin: float,
        max_refresh_attempts: int,
        max_message_size: int,
        ssl_context: ssl.SSLContext | None,
        extra_headers: Sequence[tuple[str, str]],
    ) -> None:
        if token is not None and token_provider is not None:
            raise ValueError("give token or token_provider, not both")
        if max_buffered_messages < 1:
            raise ValueError(f"max_buffered_messages must be >= 1, got {max_buffered_messages}")
        if max_buffered_bytes < 1:
            raise ValueError(f"max_buffered_bytes must be >= 1, got {max_buffered_bytes}")
        for name, value in (
            ("request_timeout", request_timeout),
            ("connect_timeout", connect_timeout),
            ("close_timeout", close_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 < refresh_ratio <= 1:
            raise ValueError(f"refresh_ratio must be in (0, 1], got {refresh_ratio}")
        if max_refresh_attempts < 1:
            raise ValueError(f"max_refresh_attempts must be >= 1, got {max_refresh_attempts}")
        self.url = url
        self._target = _Target.from_url(url, ssl_context)
        self._token = token
        self._provider = token_provider
        self._backoff = backoff
        self._reconnect = reconnect
        self._reconnect_on = frozenset(reconnect_on)
        self._max_buffered = max_buffered_messages
        self._max_buffered_bytes = max_buffered_bytes
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._refresh_ratio = refresh_ratio
        self._refresh_margin = refresh_margin
        self._max_refresh_attempts = max_refresh_attempts
        self._max_message_size = max_message_size
        self._extra_headers = [(k.encode(), v.encode()) for k, v in extra_headers]

        self._state = ClientState.CONNECTING
        self._entered: Counter[ClientState] = Counter({ClientState.CONNECTING: 1})
        self._opened_at = -math.inf  # trio clock: when the current connection's hello came
        self._wakeup = trio.Event()  # set (and replaced) on every state change and push
        self._connection: _Connection | None = None
        self._session_id: str | None = None
        self._user_id: str | None = None
        self._username: str | None = None
        self._close_code: int | None = None
        self._close_reason: str | None = None
        self._error: ClientError | None = None  # why the client gave up
        self._closing = False
        self._run_scope = trio.CancelScope()
        self._finished = trio.Event()
        self._buffer: deque[tuple[Any, int]] = deque()  # (message, its frame's length)
        self._buffered_bytes = 0
        self._lost_unreported = 0
        self._abandoned: OrderedDict[str, None] = OrderedDict()
        self._counts: Counter[str] = Counter()

    # --- what callers read ----------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """The connection state now."""
        return self._state

    @property
    def session_id(self) -> str | None:
        """The session id from the last hello event; it changes on every reconnect."""
        return self._session_id

    @property
    def user_id(self) -> str | None:
        """The user id from the last hello event."""
        return self._user_id

    @property
    def username(self) -> str | None:
        """The display name from the last hello event."""
        return self._username

    @property
    def close_code(self) -> int | None:
        """The code the last connection ended with (1006: no close frame); None before."""
        return self._close_code

    @property
    def close_reason(self) -> str | None:
        """The reason in the last connection's close frame, if any."""
        return self._close_reason

    @property
    def error(self) -> ClientError | None:
        """Why the client gave up, once it has; None while it runs or after a normal close."""
        return self._error

    def statistics(self) -> ClientStatistics:
        """A frozen snapshot of the client's counters."""
        counts = self._counts
        return ClientStatistics(
            state=self._state,
            connects=counts["connects"],
            reconnects=max(0, counts["connects"] - 1),
            connect_failures=counts["connect_failures"],
            messages_in=counts["messages_in"],
            messages_out=counts["messages_out"],
            messages_buffered=len(self._buffer),
            messages_lost=counts["messages_lost"],
            requests_sent=counts["requests_sent"],
            requests_timed_out=counts["requests_timed_out"],
            requests_lost=counts["requests_lost"],
            late_responses=counts["late_responses"],
            token_fetches=counts["token_fetches"],
            token_refreshes=counts["token_refreshes"],
            token_refresh_failures=counts["token_refresh_failures"],
        )

    async def wait_state(self, state: ClientState) -> None:
        """Wait until the client is in ``state``.

        Returns at once if it is in ``state`` now; otherwise waits for the next
        time it enters ``state``, however briefly (no transition is missed).

        Raises:
            ClientClosedError: the client closed while waiting for another state.
        """
        if self._state is state:
            await trio.lowlevel.checkpoint()
            return
        seen = self._entered[state]
        while self._entered[state] == seen:
            if self._state is ClientState.CLOSED:
                raise self._closed_error()
            await self._wakeup.wait()

    # --- requests, sends and pushed messages ----------------------------------------

    # A timeout of its own (ASYNC109) because it is part of the protocol, not just a
    # deadline: a timed-out request is remembered, and its late answer is dropped.
    async def request(
        self,
        service: str,
        method: str,
        params: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Send a request with a fresh ``trace_id`` and return the ``result`` of its answer.

        If the client is connecting or reconnecting, the request waits for the
        connection (within ``timeout``). It is sent once, never resent.

        Args:
            service: The ``service`` field.
            method: The ``method`` field.
            params: The ``params`` field (anything JSON-serializable).
            timeout: Seconds to wait for the answer, connection included
                (default: ``open_client``'s ``request_timeout``).

        Returns:
            The answer's ``result``.

        Raises:
            RequestError: the answer carries an ``error``.
            RequestTimeoutError: no answer within ``timeout``; a late answer is dropped.
            ConnectionLostError: the connection ended before the answer came.
            ClientClosedError: the client is closed (or closed while waiting).
        """
        limit = self._request_timeout if timeout is None else timeout
        trace_id = uuid.uuid4().hex
        frame = orjson.dumps(
            {
                "type": "request",
                "payload": {
                    "service": service,
                    "method": method,
                    "params": params,
                    "trace_id": trace_id,
                },
            }
        ).decode()
        waiter = _Waiter()
        connection: _Connection | None = None
        try:
            with trio.fail_after(limit):
                connection = await self._wait_open()
                connection.pending[trace_id] = waiter
                try:
                    await connection.ws.send_message(frame)
                except ConnectionClosed as exc:
                    del connection.pending[trace_id]
                    self._counts["requests_lost"] += 1
                    raise _lost(exc) from None
                self._counts["messages_out"] += 1
                self._counts["requests_sent"] += 1
                await waiter.event.wait()
        except trio.TooSlowError:
            self._counts["requests_timed_out"] += 1
            raise RequestTimeoutError(trace_id, limit) from None
        finally:
            if connection is not None and connection.pending.pop(trace_id, None) is not None:
                # Timed out or cancelled: an answer that still comes is dropped.
                self._abandoned[trace_id] = None
                if len(self._abandoned) > _MAX_ABANDONED:
                    self._abandoned.popitem(last=False)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.payload is not None
        error = waiter.payload.get("error")
        if error is not None:
            raise RequestError.from_error(error, trace_id)
        return waiter.payload.get("result")

    async def send(self, message: Any) -> None:
        """Send one message as it is: ``str`` as a text frame, ``bytes`` as binary, else JSON.

        Waits for the connection if the client is connecting or reconnecting
        (put it under ``trio.fail_after`` to bound that).

        Raises:
            ConnectionLostError: the connection ended during the send.
            ClientClosedError: the client is closed.
            TypeError: ``message`` cannot be encoded as JSON (the caller's fault).
        """
        data = message if isinstance(message, str | bytes) else orjson.dumps(message).decode()
        connection = await self._wait_open()
        try:
            await connection.ws.send_message(data)
        except ConnectionClosed as exc:
            raise _lost(exc) from None
        self._counts["messages_out"] += 1

    async def receive(self) -> Any:
        """The next pushed message, or a ``MessagesLost`` marker; waits for one.

        A pushed message is anything the hub sends that is not the hello event,
        an answer to a pending request, or the reply to the client's own token
        refresh. It comes decoded from JSON, or as the raw ``str``/``bytes`` if
        it is not JSON. Messages pushed before the client closed are still
        received first.

        Raises:
            ClientClosedError: the client is closed and nothing is left.
        """
        await trio.lowlevel.checkpoint()
        while True:
            if self._lost_unreported:
                lost, self._lost_unreported = self._lost_unreported, 0
                return MessagesLost(lost)
            if self._buffer:
                item, size = self._buffer.popleft()
                self._buffered_bytes -= size
                return item
            if self._state is ClientState.CLOSED:
                raise self._closed_error()
            await self._wakeup.wait()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        """The next pushed message; ends when the client closed normally.

        Raises:
            ClientClosedError: the client gave up (``error`` says why).
        """
        try:
            return await self.receive()
        except ClientClosedError as exc:
            if exc.error is None:
                raise StopAsyncIteration from None
            raise

    async def aclose(self) -> None:
        """Close the connection with 1000 and stop reconnecting; idempotent.

        Pending requests fail with ``ClientClosedError``. Pushed messages
        already buffered can still be received.

        Resource handling:
            The close handshake takes at most ``close_timeout`` (shielded from
            cancellation); the socket is closed whatever happens.
        """
        self._closing = True
        connection = self._connection
        if connection is not None:
            await self._close_ws(connection.ws, 1000, "client closed")
        self._run_scope.cancel()
        await self._finished.wait()

    # --- the background task ----------------------------------------------------------

    async def _run(self) -> None:
        """The background task: connect, serve, and reconnect, until told to stop."""
        try:
            with self._run_scope:
                await self._connect_loop()
        except Exception as exc:
            # The client's error boundary: a bug here (or in a library under it)
            # closes this client, visibly, instead of crashing the caller's nursery
            # with an error that is not theirs.
            logger.error("trio_gw.client: unexpected error; the client is closed", exc_info=True)
            error = ClientError(f"unexpected error in the client: {exc!r}")
            error.__cause__ = exc
            self._error = error
        finally:
            if self._connection is not None:
                self._end_connection(self._connection, ClientClosedError(None, None, None))
            self._set_state(ClientState.CLOSED)
            self._finished.set()

    async def _connect_loop(self) -> None:
        failures = 0  # attempts in a row that did not reach an open connection
        need_token = self._provider is not None and self._token is None
        while not self._closing:
            fresh_token = False
            if self._provider is not None and (need_token or self._token_is_stale()):
                try:
                    self._token = await self._fetch_token()
                except Exception as exc:
                    logger.warning("trio_gw.client: the token provider raised", exc_info=True)
                    description = f"the token provider raised {exc!r}"
                    failures += 1
                    if not await self._back_off(failures, description):
                        return
                    continue
                need_token, fresh_token = False, True
            outcome = await self._attempt()
            match outcome:
                case _Ended(code=code, action=action):
                    # A connection that stayed up resets the backoff; one that a
                    # flapping hub ends at once counts as a failed attempt, so
                    # that the waits grow instead of hammering it.
                    if trio.current_time() - self._opened_at >= _STABLE_AFTER:
                        failures = 0
                    else:
                        failures += 1
                    if action is Action.NEW_TOKEN:
                        logger.info(
                            "trio_gw.client: closed with %d; reconnecting with a new token", code
                        )
                        need_token = True
                        if failures > 1:
                            await trio.sleep(self._backoff.delay(failures - 1))
                    elif action is Action.BACKOFF:
                        delay = self._backoff.delay(failures)
                        logger.info(
                            "trio_gw.client: closed with %d; reconnecting in %.2f s", code, delay
                        )
                        await trio.sleep(delay)
                    else:
                        return
                case _Refused(status=status, body=body):
                    action = after_refusal(
                        status, has_provider=self._provider is not None, token_is_fresh=fresh_token
                    )
                    self._counts["connect_failures"] += 1
                    if action is Action.NEW_TOKEN:
                        logger.info("trio_gw.client: handshake refused (401); fetching a new token")
                        need_token = True
                    elif action is Action.BACKOFF:
                        failures += 1
                        if not await self._back_off(
                            failures, f"HTTP {status}: {body}", count=False
                        ):
                            return
                    else:
                        logger.warning("trio_gw.client: handshake refused (%d); giving up", status)
                        self._error = HandshakeRefusedError(status, body)
                        return
                case _Failed(description=description):
                    failures += 1
                    if not await self._back_off(failures, description):
                        return
                case _Fatal(error=error):
                    self._counts["connect_failures"] += 1
                    self._error = error
                    return

    async def _back_off(self, failures: int, description: str, *, count: bool = True) -> bool:
        """After a failed attempt: wait and return True, or give up and return False."""
        if count:
            self._counts["connect_failures"] += 1
        if self._backoff.exhausted(failures):
            logger.warning("trio_gw.client: %d attempts failed; giving up", failures)
            self._error = ConnectFailedError(failures, description)
            return False
        delay = self._backoff.delay(failures)
        logger.info("trio_gw.client: %s; retrying in %.2f s", description, delay)
        await trio.sleep(delay)
        return True

    async def _fetch_token(self) -> str:
        assert self._provider is not None
        token = await self._provider()
        if not isinstance(token, str):
            raise TypeError(f"the token provider returned {type(token).__name__}, not str")
        self._counts["token_fetches"] += 1
        return token

    def _token_is_stale(self) -> bool:
        """Whether the current token is due for a refresh (so not worth connecting with)."""
        expiry = token_expiry(self._token) if self._token else None
        if expiry is None:
            return False
        delay = refresh_delay(
            expiry, time.time(), ratio=self._refresh_ratio, margin=self._refresh_margin
        )
        return delay <= 0

    async def _attempt(self) -> _Outcome:
        """One connection, from the TCP connect to its end."""
        async with trio.open_nursery() as nursery:
            try:
                return await self._attempt_in(nursery)
            finally:
                nursery.cancel_scope.cancel()

    async def _attempt_in(self, nursery: trio.Nursery) -> _Outcome:
        target = self._target
        headers = list(self._extra_headers)
        if self._token is not None:
            headers.append((b"authorization", f"Bearer {self._token}".encode()))
        rejected: list[ConnectionRejected] = []
        reader_done = trio.Event()
        try:
            with trio.fail_after(self._connect_timeout):
                stream: trio.abc.Stream
                if target.ssl_context is None:
                    stream = await trio.open_tcp_stream(target.host, target.port)
                else:
                    stream = await trio.open_ssl_over_tcp_stream(
                        target.host,
                        target.port,
                        ssl_context=target.ssl_context,
                        https_compatible=True,
                    )
                # As trio_websocket.connect_websocket does, but with our reader wrapper.
                ws = WebSocketConnection(
                    stream,
                    WSConnection(ConnectionType.CLIENT),
                    host=target.host_header,
                    path=target.resource,
                    client_extra_headers=headers,
                    message_queue_size=_WS_QUEUE_SIZE,
                    max_message_size=self._max_message_size,
                )
                nursery.start_soon(self._read_frames, ws, rejected, reader_done)
                await _wait_any(ws._open_handshake, reader_done)
                if rejected:
                    body = (rejected[0].body or b"").decode("utf-8", "replace")
                    return _Refused(rejected[0].status_code, body)
                if not ws._open_handshake.is_set():
                    return _Failed("the connection closed during the handshake")
                raw = await ws.get_message()
        except trio.TooSlowError:
            return _Failed(f"no connection and hello event within {self._connect_timeout} s")
        except OSError as exc:
            return _Failed(f"cannot connect to {target.host}:{target.port}: {exc}")
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason else 1006
            return _Failed(f"the connection closed (code {code}) before the hello event")

        self._counts["messages_in"] += 1
        hello = _parse_hello(raw)
        if hello is None:
            await self._close_ws(ws, 1002, "expected a hello event")
            shown = raw if len(raw) <= 200 else raw[:200]
            return _Fatal(ProtocolError(f"expected the hello event first, got {shown!r}"))

        connection = _Connection(ws)
        self._session_id, self._user_id, self._username = hello
        self._connection = connection
        self._counts["connects"] += 1
        self._set_state(ClientState.OPEN)
        if self._provider is not None:
            nursery.start_soon(self._refresh_tokens, connection)
        code, reason = await self._serve(connection)

        # The connection is over: decide, and fail what waits on it, before any
        # checkpoint, so that no caller sees an OPEN client without a connection.
        if self._closing or not self._reconnect:
            action = Action.STOP
        else:
            action = after_close(
                code, reconnect_on=self._reconnect_on, has_provider=self._provider is not None
            )
        self._close_code, self._close_reason = code, reason
        lost: ClientError = (
            ClientClosedError(code, reason, None)
            if self._closing
            else ConnectionLostError(code, reason)
        )
        self._end_connection(connection, lost)
        self._set_state(ClientState.CLOSED if action is Action.STOP else ClientState.RECONNECTING)
        # Let the close handshake finish (and the reader close the socket).
        with trio.move_on_after(self._close_timeout):
            await reader_done.wait()
        return _Ended(code, reason, action)

    async def _read_frames(
        self, ws: WebSocketConnection, rejected: list[ConnectionRejected], done: trio.Event
    ) -> None:
        """trio-websocket's reader task, with its two socket leaks contained."""
        try:
            await ws._reader_task()
        except ConnectionRejected as exc:
            # trio-websocket raises this from its reader and leaves the stream open.
            rejected.append(exc)
        finally:
            # trio-websocket's client reader stops at the end of the stream (or
            # after a refusal) without closing its socket; close it here.
            await trio.aclose_forcefully(ws._stream)
            done.set()

    async def _serve(self, connection: _Connection) -> tuple[int, str | None]:
        """Hand out what arrives until the connection ends; its close code and reason."""
        while True:
            try:
                raw = await connection.ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is None:
                    return 1006, None
                return exc.reason.code, exc.reason.reason
            self._dispatch(connection, raw)

    def _dispatch(self, connection: _Connection, raw: str | bytes) -> None:
        self._counts["messages_in"] += 1
        size = len(raw)
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._push(raw, size)
            return
        match message:
            case {"type": "response", "payload": {"trace_id": str() as trace_id} as payload}:
                waiter = connection.pending.pop(trace_id, None)
                if waiter is not None:
                    waiter.resolve(payload)
                    return
                if trace_id in self._abandoned:
                    del self._abandoned[trace_id]
                    self._counts["late_responses"] += 1
                    return
            case {"type": "auth", "payload": dict() as payload} if (
                connection.auth_waiter is not None and not connection.auth_waiter.event.is_set()
            ):
                connection.auth_waiter.resolve(payload)
                return
        self._push(message, size)

    def _push(self, item: Any, size: int) -> None:
        # Full (by count, or by the frames' bytes, since a hostile hub's 1 MiB
        # frame can decode to many times that): drop the oldest, so that the
        # consumer gets the newest, and tell it.
        buffer = self._buffer
        while buffer and (
            len(buffer) >= self._max_buffered
            or self._buffered_bytes + size > self._max_buffered_bytes
        ):
            _, dropped = buffer.popleft()
            self._buffered_bytes -= dropped
            self._counts["messages_lost"] += 1
            self._lost_unreported += 1
        buffer.append((item, size))
        self._buffered_bytes += size
        self._wake()

    async def _refresh_tokens(self, connection: _Connection) -> None:
        """Refresh the token in-band before it expires, for as long as the connection lives."""
        failures = 0
        while True:
            expiry = token_expiry(self._token) if self._token else None
            if expiry is None:
                return  # not a JWT (dev mode, opaque tokens): never refreshed
            now = time.time()
            if failures == 0:
                delay = refresh_delay(
                    expiry, now, ratio=self._refresh_ratio, margin=self._refresh_margin
                )
            else:
                delay = min(self._backoff.delay(failures), max(0.0, (expiry - now) / 2))
            await trio.sleep(delay)
            if await self._refresh_once(connection):
                failures = 0
                new_expiry = token_expiry(self._token) if self._token else None
                if new_expiry is None or new_expiry <= expiry:
                    # The provider has nothing newer; refreshing again would spin.
                    return
                continue
            failures += 1
            if failures >= self._max_refresh_attempts:
                logger.warning(
                    "trio_gw.client: %d token refreshes failed; the hub will close the "
                    "connection (4005) when the token expires, and the client will "
                    "reconnect with a new token",
                    failures,
                )
                return

    async def _refresh_once(self, connection: _Connection) -> bool:
        try:
            token = await self._fetch_token()
        except Exception:
            logger.warning("trio_gw.client: the token provider raised", exc_info=True)
            self._counts["token_refresh_failures"] += 1
            return False
        waiter = _Waiter()
        connection.auth_waiter = waiter
        try:
            frame = orjson.dumps({"type": "auth", "payload": {"token": token}}).decode()
            try:
                await connection.ws.send_message(frame)
            except ConnectionClosed:
                return False  # the connection is ending; the reconnect fetches a token
            self._counts["messages_out"] += 1
            with trio.move_on_after(self._request_timeout):
                await waiter.event.wait()
        finally:
            connection.auth_waiter = None
        if waiter.payload is not None and waiter.payload.get("ok") is True:
            self._token = token
            self._counts["token_refreshes"] += 1
            return True
        self._counts["token_refresh_failures"] += 1
        reason = "no answer" if waiter.payload is None else waiter.payload.get("error")
        logger.warning("trio_gw.client: the hub refused a token refresh: %s", reason)
        return False

    # --- helpers ------------------------------------------------------------------------

    async def _wait_open(self) -> _Connection:
        while True:
            if self._state is ClientState.OPEN and self._connection is not None:
                return self._connection
            if self._state is ClientState.CLOSED:
                raise self._closed_error()
            await self._wakeup.wait()

    async def _wait_first_open(self) -> None:
        """For ``open_client``: wait for the first connection, or raise why there is none.

        Counted by entries, not by the state now: a hello followed at once by
        the connection's end (in the same read) still counts as connected.
        """
        while not self._entered[ClientState.OPEN]:
            if self._state is ClientState.CLOSED:
                if self._error is not None:
                    raise self._error
                raise self._closed_error()
            await self._wakeup.wait()

    async def _close_ws(self, ws: WebSocketConnection, code: int, reason: str) -> None:
        with trio.move_on_after(self._close_timeout) as scope:
            scope.shield = True
            await ws.aclose(code, reason)

    def _end_connection(self, connection: _Connection, error: ClientError) -> None:
        if self._connection is connection:
            self._connection = None
        for waiter in connection.pending.values():
            waiter.fail(error)
        if isinstance(error, ConnectionLostError):
            self._counts["requests_lost"] += len(connection.pending)
        connection.pending.clear()

    def _set_state(self, state: ClientState) -> None:
        if self._state is not state:
            if state is ClientState.OPEN:
                self._opened_at = trio.current_time()
            self._state = state
            self._entered[state] += 1
            self._wake()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    def _closed_error(self) -> ClientClosedError:
        error = ClientClosedError(self._close_code, self._close_reason, self._error)
        error.__cause__ = self._error
        return error


def _lost(exc: ConnectionClosed) -> ConnectionLostError:
    if exc.reason is None:
        return ConnectionLostError(1006, None)
    return ConnectionLostError(exc.reason.code, exc.reason.reason)


@asynccontextmanager
async def open_client(
    url: str,
    *,
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    backoff: Backoff = _DEFAULT_BACKOFF,
    reconnect: bool = True,
    reconnect_on: Collection[int] = (),
    max_buffered_messages: int = 1024,
    max_buffered_bytes: int = 16 * 2**20,
    request_timeout: float = 30.0,
    connect_timeout: float = 10.0,
    close_timeout: float = 5.0,
    refresh_ratio: float = 0.8,
    refresh_margin: float = 30.0,
    max_refresh_attempts: int = 3,
    max_message_size: int = 2**20,
    ssl_context: ssl.SSLContext | None = None,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[Client]:
    """Connect to a hub, and keep connected until the block ends.

    Entering waits for the first connection to be open (its hello event
    received), retrying as after any failure; put it under ``trio.fail_after``
    to bound the wait. Leaving closes the connection with 1000.

    Args:
        url: ``ws://`` or ``wss://`` URL of the hub (a query string is kept).
        token: A fixed bearer token, sent as ``Authorization: Bearer``.
        token_provider: Instead of ``token``: an async callable that returns a
            token. It is called before the first connection, after a close with
            4005, after a 401 refusal (once), before reconnecting with a token
            that is due for refresh, and for in-band refreshes.
        backoff: The waits between connection attempts, and ``max_attempts``.
        reconnect: False: never reconnect; the client closes when its connection ends.
        reconnect_on: Close codes to reconnect after although the client would
            stop (1000, 1008, 1002, 1003, 1007).
        max_buffered_messages: Pushed messages kept for ``receive()``; beyond
            that the oldest is dropped and reported (``MessagesLost``).
        max_buffered_bytes: The same bound on the pushed messages' frame
            bytes, so that a few large messages cannot take the memory either.
        request_timeout: The default ``request()`` timeout, and the wait for
            an auth reply.
        connect_timeout: The time for one attempt: TCP, TLS, handshake and hello.
        close_timeout: The time for a close handshake.
        refresh_ratio: Refresh a JWT at this fraction of its remaining lifetime...
        refresh_margin: ... or this many seconds before its ``exp``, whichever is first.
        max_refresh_attempts: Failed in-band refreshes in a row before the client
            stops trying on this connection (the hub then closes with 4005, and
            the client reconnects with a new token).
        max_message_size: The largest message accepted from the hub (larger
            closes with 1009, and the client reconnects).
        ssl_context: For ``wss://`` (default: ``ssl.create_default_context()``).
        extra_headers: More handshake headers, as (name, value) pairs.

    Yields:
        The ``Client``.

    Raises:
        HandshakeRefusedError: the hub refused the first handshake (see the policy).
        ConnectFailedError: ``backoff.max_attempts`` first attempts failed.
        ProtocolError: the hub sent no hello event.
        ValueError: a bad argument (the caller's fault).

    Resource handling:
        One background task in the client's own nursery holds the connection;
        its socket is closed whatever ends it (including trio-websocket's
        refused-handshake and server-closes-first cases). The background task
        is shielded from the caller's cancellation, and stopped by leaving the
        block, which closes gracefully within ``close_timeout`` even when the
        block was cancelled.

    Error handling:
        Exceptions raised in the block propagate unchanged (not wrapped in an
        exception group). The background task never raises into the block: a
        lost connection fails the requests in flight (``ConnectionLostError``)
        and is reconnected; giving up closes the client, and requests, sends
        and iteration then raise ``ClientClosedError`` with ``error`` set. An
        unexpected error in the background task is logged and closes the
        client the same way.
    """
    client = Client(
        url,
        token=token,
        token_provider=token_provider,
        backoff=backoff,
        reconnect=reconnect,
        reconnect_on=reconnect_on,
        max_buffered_messages=max_buffered_messages,
        max_buffered_bytes=max_buffered_bytes,
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        refresh_ratio=refresh_ratio,
        refresh_margin=refresh_margin,
        max_refresh_attempts=max_refresh_attempts,
        max_message_size=max_message_size,
        ssl_context=ssl_context,
        extra_headers=extra_headers,
    )
    # The block's own exception is kept here and re-raised after the nursery,
    # so that it is not wrapped in an exception group.
    raised: BaseException | None = None
    async with trio.open_nursery() as nursery:
        client._run_scope.shield = True  # stopped by aclose(), never by the caller's cancel
        nursery.start_soon(client._run)
        try:
            await client._wait_first_open()
        except BaseException as exc:
            raised = exc
        else:
            try:
                yield client
            except BaseException as exc:
                raised = exc
        with trio.CancelScope(shield=True):
            await client.aclose()
    if raised is not None:
        raise raised
