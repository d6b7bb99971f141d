"""The hub: nuropb_gw's HandlerManager rebuilt as a Trio actor, and how to run it."""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Any, NoReturn, TypeAlias

import attrs
import orjson
import trio
import trio_websocket

from ._auth import Authorizer, Handshake, Identity
from ._backplane import (
    Backplane,
    BackplaneClose,
    BackplaneDeliver,
    BackplaneMessage,
    LocalBackplane,
)
from ._close_codes import CloseCode
from ._config import HubConfig
from ._connection import Connection, ConnectionEnded, NoRequest, Upgrade
from ._devmode import dev_authorizer
from ._errors import (
    AuthRefused,
    BackplaneUnavailable,
    ConfigError,
    HubClosedError,
    HubOverloadedError,
)
from ._frames import Frame, encode_frame
from ._lifecycle import Lifecycle, Transition, advance
from ._listeners import open_tcp_listeners
from ._origins import OriginPolicy
from ._presence import Presence
from ._registry import Registry
from ._router import (
    Close,
    CloseSession,
    Command,
    Deliver,
    Discard,
    Drained,
    Effect,
    Expire,
    FlowLimits,
    Offer,
    Publish,
    Recheck,
    Refresh,
    Register,
    Registered,
    Router,
    Subscribe,
    Unregister,
    Unregistered,
    Unsubscribe,
    WakeProducers,
)
from ._session import Session
from ._statistics import Counters, HubStatistics
from ._targets import Target, ToAll, ToSession, new_session_id, to_users
from ._transport import open_trio_websocket
from ._wire import error_message, hello_message
from ._wsproto_engine import open_wsproto_connection

__all__ = ["HandlerManager", "MessageCallback", "Reply", "open_hub", "serve_hub"]

logger = logging.getLogger("trio_gw")

#: ``to_handler_message``: what a message callback calls to answer a client.
Reply: TypeAlias = Callable[[Session, Any], Awaitable[None]]
#: The backend callback: ``callback(to_handler_message, handler, decoded_message)``.
MessageCallback: TypeAlias = Callable[[Reply, Session, Any], Awaitable[Any]]

# The actor drains this many commands per wake-up before it yields to other tasks.
_COMMAND_BATCH = 64
# A sender delivering inline yields after offering about this many messages to
# every session, so that a burst is written while it is still being produced.
# Waking every writer costs about 20x offering one frame to it, so batches of
# ~16 frames keep the writers' share of the cost near the offers' own, while
# the burst's first message waits for at most 16 messages' worth of offers.
_MESSAGES_PER_YIELD = 32
_MIN_OFFERS_PER_YIELD = 4096
# Inline writes (see ``_inline_budget``): one task writes at most this many
# frames inline in a row within this many seconds; a send to more sessions than
# that is queued for the writers whole.
_INLINE_STREAK = 64
_INLINE_STREAK_WINDOW = 0.01
# The heartbeat pings one of this many groups of sessions per tick.
_HEARTBEAT_BUCKETS = 10
# accept() errors that mean "no descriptors or memory now", not a broken
# listener: trio's serve_listeners treats the same set this way.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY_DELAY = 0.1
# Sockets over max_connections that are read and answered 503 at once, and how
# long each may take; a flood beyond that is closed unanswered.
_REFUSAL_SLOTS = 16
_REFUSAL_TIMEOUT = 2.0
_ACCEPT_ERROR_LOG_INTERVAL = 10
# What a peer that vanishes can make the libraries under a connection raise.
_PEER_LEFT = (
    trio_websocket.ConnectionClosed,
    ConnectionEnded,
    trio.BrokenResourceError,
    ConnectionError,
)


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@attrs.frozen
class _Flush:
    reply: trio.MemorySendChannel[None]


_Command = Command[Session] | _Flush


class HandlerManager:
    """Registers connection handlers (sessions) and routes messages to and from them.

    This is nuropb_gw's ``HandlerManager`` with the same names and meaning, run
    as a Trio actor around a synchronous decision core (``_router``): the actor
    receives the register, unregister, send and close commands on its channel
    and carries out what the core decides. It never waits for a connection:
    each session has a bounded outbound queue, fed without waiting. A send that
    reaches a session more than half full waits (``await``) until it drains,
    so producers go at their readers' pace; a session that stops taking
    writes for ``stall_timeout``, lags ``max_lag`` behind, or overflows its
    queue is closed as a slow consumer (4008) while the others carry on.

    Construct it, then run it with ``open_hub`` (or pass the arguments to
    ``open_hub`` directly) and accept WebSocket clients with ``serve_hub``.

    Args:
        service_name: Names this service in logs.
        instance_id: This hub node's id; it prefixes every session id.
        on_handler_message_received: The backend callback, awaited as
            ``callback(to_handler_message, handler, decoded_message)`` for each
            client message. Messages from one session are processed in order,
            each awaited before the next (see ``HubConfig.max_inflight_per_session``).
        config: Limits and timeouts; ``HubConfig()`` if omitted.
        authorizer: Decides who may connect. Without one every handshake is
            refused with 401, so that nothing is open by accident.
        backplane: Connects hub nodes; a single node by default.

    Error handling:
        A client's bad JSON or a callback that raises is answered with an error
        frame to that client only; nothing propagates into the hub.
    """

    def __init__(
        self,
        service_name: str,
        instance_id: str,
        on_handler_message_received: MessageCallback | None = None,
        *,
        config: HubConfig | None = None,
        authorizer: Authorizer | None = None,
        backplane: Backplane | None = None,
    ) -> None:
        if not instance_id or ":" in instance_id:
            raise ConfigError(
                f"instance_id: expected a non-empty id without ':', got {instance_id!r}"
            )
        self._service_name = service_name
        self._instance_id = instance_id
        self._on_handler_message_received = on_handler_message_received
        self._config = config if config is not None else HubConfig()
        self._authorizer = authorizer
        self._origins = OriginPolicy(self._config.allowed_origins)
        self._backplane: Backplane = backplane or LocalBackplane(instance_id)
        if self._backplane.node_id != instance_id:
            raise ConfigError(
                f"backplane: its node_id {self._backplane.node_id!r} differs from "
                f"instance_id {instance_id!r}"
            )
        self._counters = Counters()
        config = self._config
        self._router: Router[Session] = Router(
            instance_id,
            FlowLimits(
                max_messages=config.outbound_queue_size,
                max_bytes=config.outbound_queue_bytes,
                stall_timeout=config.stall_timeout,
                max_lag=config.max_lag,
                budget_bytes=config.queued_bytes_budget,
            ),
            self._counters,
        )
        # Senders waiting for the queues to drain below the hub-wide budget.
        self._budget_waiters = 0
        self._budget_drained: trio.Event | None = None
        self._commands_send, self._commands_recv = trio.open_memory_channel[_Command](
            self._config.hub_queue_size
        )
        self._state = _State.NEW
        self._connections: trio.Nursery | None = None
        self._live_connections = 0
        self._refusing = 0  # sockets over the limit being answered 503
        self._offers_since_yield = 0
        # The task that made the last sends, how many, and since when.
        self._streak_task: trio.lowlevel.Task | None = None
        self._streak = 0
        self._streak_at = -math.inf
        self._all_connections_ended = trio.Event()
        # The actor and the connections run shielded from the caller's
        # cancellation, so that leaving open_hub by any way closes every session
        # gracefully; these scopes end them once that is done.
        self._actor_scope: trio.CancelScope | None = None
        self._connections_scope: trio.CancelScope | None = None
        self._connections_closed = trio.Event()
        self._expiry_wakeup: trio.CancelScope | None = None

    # --- properties --------------------------------------------------------

    @property
    def service_name(self) -> str:
        """The service name given at construction."""
        return self._service_name

    @property
    def instance_id(self) -> str:
        """This node's id; it prefixes every session id."""
        return self._instance_id

    @property
    def config(self) -> HubConfig:
        """The hub's configuration."""
        return self._config

    @property
    def running(self) -> bool:
        """True while the hub accepts commands and connections."""
        return self._state is _State.RUNNING

    @property
    def _registry(self) -> Registry[Session]:
        return self._router.registry

    # --- registry (nuropb_gw API) -------------------------------------------

    def get_handler(self, session_id: str) -> Session | None:
        """Return the registered session with this id, or None if not found."""
        return self._registry.get(session_id)

    def register(self, handler: Session) -> None:
        """Register a session.

        The hub registers every connection it accepts itself, so this is only
        for nuropb_gw compatibility; registering a registered session does nothing.

        Raises:
            ValueError: the session is closing or closed.
            HubClosedError: the hub is not running.
            HubOverloadedError: the hub's command queue is full.
        """
        if handler.state in (Lifecycle.CLOSING, Lifecycle.ENDED):
            raise ValueError(f"{handler!r} is closing and cannot be registered")
        if self._registry.get(handler.session_id) is not handler:
            self._submit_nowait(Register(handler))

    def unregister(self, handler: Session) -> None:
        """Unregister a session and close its connection normally (1000).

        An unregistered session can no longer be reached, so its connection is
        closed too, rather than left open and deaf. Unregistering twice does nothing.

        Raises:
            HubClosedError: the hub is not running.
            HubOverloadedError: the hub's command queue is full.
        """
        self._submit_nowait(Unregister(handler, close=True))

    def user_sessions(self, user_id: str) -> frozenset[str]:
        """The ids of one user's sessions on this node."""
        return self._registry.sessions_of(user_id)

    def session_ids(self) -> list[str]:
        """The ids of every session registered on this node."""
        return list(self._registry.session_ids())

    def user_ids(self) -> list[str]:
        """Every user with a session on this node."""
        return list(self._registry.user_ids())

    def refresh_identity(self, handler: Session, identity: Identity) -> None:
        """Replace a session's identity, e.g. after the client sent a fresh token.

        The session's expiry moves to ``identity.valid_until``. A session that
        is closing is left as it is.

        Raises:
            ValueError: ``identity`` is for a different user than the session's;
                a session never changes hands.
        """
        if identity.user_id != handler.user_id:
            raise ValueError(
                f"identity is for user {identity.user_id!r}, session {handler.session_id} "
                f"belongs to {handler.user_id!r}"
            )
        if handler.state in (Lifecycle.CLOSING, Lifecycle.ENDED):
            return
        handler.identity = identity
        # The router only reschedules; it is safe ahead of queued commands.
        self._run_command(Refresh(handler, _expiry_deadline(identity)))

    def statistics(self) -> HubStatistics:
        """A frozen snapshot of this node's counters and gauges."""
        return self._counters.snapshot(
            connections=self._registry.session_count,
            users=self._registry.user_count,
            queued_bytes=self._router.budget.queued,
        )

    # --- messages in (nuropb_gw API) ----------------------------------------

    async def on_handler_message(self, handler: Session, message: str | bytes) -> None:
        """Decode one client message and await the backend callback with it.

        Bad JSON is answered with ``{"error": "<ExceptionName>", "description":
        "Error decoding JSON: ..."}`` to that client; a callback that raises is
        logged with the session id and answered with an error frame. Neither
        closes the connection.
        """
        try:
            decoded = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            self._counters.bad_messages += 1
            await self.to_handler_message(
                handler, error_message(type(exc).__name__, f"Error decoding JSON: {exc}")
            )
            return
        callback = self._on_handler_message_received
        if callback is None:
            await self.to_handler_message(
                handler,
                error_message("NoHandler", "this hub has no message handler; message dropped"),
            )
            return
        try:
            await callback(self.to_handler_message, handler, decoded)
        except HubClosedError:
            # The hub stopped while the callback ran: there is no one to tell.
            self._counters.drops += 1
            logger.debug("session %s: callback ended by hub shutdown", handler.session_id)
        except Exception as exc:
            self._counters.callback_errors += 1
            logger.exception(
                "session %s (user %s): message handler raised",
                handler.session_id,
                handler.user_id,
                extra=handler.log_fields,
            )
            await self.to_handler_message(
                handler,
                error_message(
                    type(exc).__name__, "Error processing message; the hub logged the details"
                ),
            )

    async def to_handler_message(self, handler: Session, message: Any) -> None:
        """Send a message to one session: the callback's way to answer.

        ``str`` is sent as a text frame as it is, ``bytes`` as a binary frame,
        anything else JSON-encoded (once) as a text frame. A session that is
        closing with a drain (a graceful close, hub shutdown) still gets it; a
        reply to a session that has gone, or after the hub stopped, is counted
        in ``drops``.

        Raises:
            TypeError: ``message`` cannot be JSON-encoded.
            ValueError: the encoded message exceeds ``outbound_queue_bytes``.
        """
        frame = self._encode(message)
        try:
            await self._send(ToSession(handler.session_id), frame, reply_to=handler)
        except HubClosedError:
            self._counters.drops += 1

    # --- messages out (nuropb_gw API) ---------------------------------------

    async def send_message(self, session_id: str, message: Any) -> None:
        """Send a message to one session, on whichever node holds it.

        Messages to one session arrive in the order they were sent. A session
        that is not (or no longer) registered is counted in ``drops``.

        Raises:
            TypeError: ``message`` cannot be JSON-encoded.
            ValueError: the encoded message exceeds ``outbound_queue_bytes``.
            HubClosedError: the hub is not running.
        """
        await self._send(ToSession(session_id), self._encode(message))

    async def send_message_to_user_ids(self, user_ids: Iterable[str], message: Any) -> None:
        """Send a message to every session of every listed user; encoded once.

        For one user pass a list of one.

        Raises:
            TypeError: ``user_ids`` is a single string, or ``message`` cannot be encoded.
            ValueError: the encoded message exceeds ``outbound_queue_bytes``.
            HubClosedError: the hub is not running.
        """
        target = to_users(user_ids)
        await self._send(target, self._encode(message))

    async def send_message_to_all(self, message: Any) -> None:
        """Send a message to every session; encoded once.

        Returns once the message is queued for everyone; first waiting, if a
        session's queue is over half full, until it drains (flow control).

        Raises:
            TypeError: ``message`` cannot be JSON-encoded.
            ValueError: the encoded message exceeds ``outbound_queue_bytes``.
            HubClosedError: the hub is not running.
        """
        await self._send(ToAll(), self._encode(message))

    # --- closing (nuropb_gw API) --------------------------------------------

    def close(
        self, session_id: str, *, code: int = CloseCode.NORMAL, reason: str = "closed by server"
    ) -> None:
        """Close one session; what is already queued for it is written first.

        Raises:
            HubClosedError: the hub is not running.
            HubOverloadedError: the hub's command queue is full.
        """
        self._submit_nowait(Close(ToSession(session_id), code, reason))

    def close_user_ids(
        self,
        user_ids: Iterable[str],
        *,
        code: int = CloseCode.NORMAL,
        reason: str = "closed by server",
    ) -> None:
        """Close every session of every listed user.

        Raises:
            TypeError: ``user_ids`` is a single string.
            HubClosedError: the hub is not running.
            HubOverloadedError: the hub's command queue is full.
        """
        self._submit_nowait(Close(to_users(user_ids), code, reason))

    def close_all(self, *, code: int = CloseCode.NORMAL, reason: str = "closed by server") -> None:
        """Close every session.

        Raises:
            HubClosedError: the hub is not running.
            HubOverloadedError: the hub's command queue is full.
        """
        self._submit_nowait(Close(ToAll(), code, reason))

    async def flush(self) -> None:
        """Wait until the actor has handled every command submitted before this call.

        Raises:
            HubClosedError: the hub is not running.
        """
        await self._flush(internal=False)

    async def _flush(self, *, internal: bool) -> None:
        reply_send, reply_recv = trio.open_memory_channel[None](1)
        await self._submit(_Flush(reply_send), internal=internal)
        await reply_recv.receive()

    # --- presence ---------------------------------------------------------------

    def local_presence(self) -> dict[str, int]:
        """Sessions per user on this node now (the backplane's heartbeat reads it)."""
        registry = self._registry
        return {user_id: len(registry.sessions_of(user_id)) for user_id in registry.user_ids()}

    async def presence(self, user_ids: Iterable[str] | None = None) -> Presence:
        """Who is online on every node, and with how many sessions on which node.

        This node's part is current; the other nodes' parts are their last
        heartbeats through the backplane (see ``RedisBackplane``).

        Args:
            user_ids: Only these users; every online user if None.

        Returns:
            The snapshot; ``complete`` is False (and only this node is in it)
            if the backplane cannot be asked now.

        Raises:
            TypeError: ``user_ids`` is a single string.
        """
        wanted = None if user_ids is None else to_users(user_ids).user_ids
        complete = True
        try:
            nodes = await self._backplane.presence()
        except BackplaneUnavailable as exc:
            logger.info("presence: this node only: %s", exc)
            nodes, complete = {}, False
        nodes[self._instance_id] = self.local_presence()
        if wanted is not None:
            nodes = {
                node: {u: n for u, n in users.items() if u in wanted}
                for node, users in nodes.items()
            }
        return Presence(self._instance_id, nodes, complete)

    # --- backplane inbox ------------------------------------------------------

    async def deliver_from_backplane(self, messages: Iterable[BackplaneMessage]) -> None:
        """Carry out, in order, what other nodes published (called by the backplane).

        The backplane hands over every message that arrived since its last
        call. Deliveries take ``_send``'s path: handled at once while the actor
        is idle, without yielding between them (up to the same budget of
        offers), so that a burst that crossed the backplane reaches each
        writer as one batch, as a local burst does.
        """
        for message in messages:
            match message:
                case BackplaneDeliver(target=target, frame=frame):
                    await self._send(target, frame, remote=True)
                case BackplaneClose(target=target, code=code, reason=reason):
                    await self._submit(Close(target, code, reason, remote=True), internal=True)

    # --- commands ------------------------------------------------------------

    def _encode(self, message: Any) -> Frame:
        frame = encode_frame(message)
        limit = self._config.outbound_queue_bytes
        if len(frame.wire) > limit:
            raise ValueError(
                f"message of {len(frame.wire)} bytes exceeds outbound_queue_bytes ({limit}); "
                "no client could receive it"
            )
        return frame

    async def _send(
        self,
        target: Target,
        frame: Frame,
        reply_to: Session | None = None,
        *,
        remote: bool = False,
    ) -> None:
        """Deliver ``frame``: at once if the actor is idle, else through its queue.

        A reply (``reply_to``) is delivered while the hub is shutting down too,
        so that a draining session still gets its answers; so is a ``remote``
        frame (another node sent it), which is not published again.
        """
        internal = reply_to is not None or remote
        budget = max(_MIN_OFFERS_PER_YIELD, _MESSAGES_PER_YIELD * self._registry.session_count)
        if self._offers_since_yield >= budget:
            self._offers_since_yield = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        self._check_running(internal)
        # Checked after any yield, and nothing awaits between the check and the
        # delivery: if nothing is queued ahead of this send, handling it here
        # is exactly what the actor would do next (the same ``handle``, the
        # same order, one task switch fewer).
        command = Deliver(target, frame, remote=remote, reply_to=reply_to)
        if self._actor_idle():
            # At least one per send: a loop of sends that reach nobody yields too.
            self._offers_since_yield += max(1, self._run_command(command))
        else:
            self._offers_since_yield += 1
            await self._submit(command, internal=internal)
        router = self._router
        if router._pressured or router.over_budget():
            await self._wait_for_flow(target)

    async def _wait_for_flow(self, target: Target) -> None:
        """Flow control: wait while the hub is over budget or ``target`` reaches a pressured one.

        See ``_router`` for the rule (a pressured session: one over its high-water mark).

        Each wait ends when the session drains, leaves, or is closed as stuck or
        lagging, which the router decides at the deadline it gives.
        """
        router = self._router
        if router.over_budget():
            self._counters.sender_waits += 1
            await self._wait_for_budget()
        sessions = router.pressured_for(target)
        if sessions:
            self._counters.sender_waits += 1
        while sessions:
            self._run_command(Recheck(sessions))
            sessions = [s for s in sessions if s.pressured]
            if not sessions:
                return
            with trio.move_on_at(router.flow_deadline(sessions)):
                await sessions[0]._wait_drained()
            sessions = [s for s in sessions if s.pressured]

    async def _wait_for_budget(self) -> None:
        router = self._router
        self._budget_waiters += 1
        try:
            while router.over_budget():
                if self._budget_drained is None:
                    self._budget_drained = trio.Event()
                with trio.move_on_after(self._config.stall_timeout) as scope:
                    await self._budget_drained.wait()
                if scope.cancelled_caught:
                    # No drain for a while: close the sessions that stopped taking writes.
                    self._run_command(Recheck(None))
        finally:
            self._budget_waiters -= 1

    def _on_progress(self, session: Session) -> None:
        """A session's writer finished a write while someone may be waiting for it."""
        if session.pressured:
            self._run_command(Drained(session))
        self._wake_budget_waiters()

    def _wake_budget_waiters(self) -> None:
        if (
            self._budget_waiters
            and self._budget_drained is not None
            and self._router.budget.queued <= self._router.limits.budget_resume
        ):
            self._budget_drained.set()
            self._budget_drained = None

    def _actor_idle(self) -> bool:
        # Empty queue and the actor parked in receive(): no command is pending.
        # (A command handed straight to a parked actor leaves the queue empty
        # but the actor no longer parked, so that case takes the queue.)
        stats = self._commands_send.statistics()
        return stats.current_buffer_used == 0 and stats.tasks_waiting_receive > 0

    def _check_running(self, internal: bool) -> None:
        if self._state is _State.RUNNING or (internal and self._state is _State.CLOSING):
            return
        raise HubClosedError(f"hub {self._instance_id!r} is {self._state.value}, not running")

    async def _submit(self, command: _Command, *, internal: bool = False) -> None:
        self._check_running(internal)
        # Only wait when the actor is behind. Not yielding on every send lets a
        # burst of sends queue up, so the actor handles it in one go and each
        # writer finds many frames to write at once; the bounded queue still
        # pushes back on a producer that outruns the actor.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._commands_send.send_nowait(command)
        except trio.WouldBlock:
            try:
                await self._commands_send.send(command)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise HubClosedError(f"hub {self._instance_id!r} has shut down") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise HubClosedError(f"hub {self._instance_id!r} has shut down") from None

    def _submit_nowait(self, command: _Command) -> None:
        self._check_running(False)
        try:
            self._commands_send.send_nowait(command)
        except trio.WouldBlock:
            raise HubOverloadedError(
                f"hub {self._instance_id!r}: command queue full ({self._config.hub_queue_size})"
            ) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise HubClosedError(f"hub {self._instance_id!r} has shut down") from None

    async def _register_session(self, session: Session) -> None:
        await self._submit(Register(session), internal=True)

    async def _close_session(
        self, session: Session, code: int, reason: str, *, drain: bool = False
    ) -> None:
        with suppress(HubClosedError):  # shutting down: the session closes anyway
            await self._submit(
                Close(ToSession(session.session_id), code, reason, drain=drain), internal=True
            )

    # --- the actor: synchronous handlers, never awaiting a connection ---------

    async def _run_heartbeat(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ping every session once per ``heartbeat_interval``, spread over the interval.

        Sessions fall into buckets by id, one bucket per tick, so that ten
        thousand connections are not pinged in the same instant.
        """
        task_status.started()
        interval = self._config.heartbeat_interval
        if interval <= 0:
            return
        tick = interval / _HEARTBEAT_BUCKETS
        bucket = 0
        while True:
            await trio.sleep(tick)
            # A session is first pinged a full interval after it connected.
            connected_before = trio.current_time() - interval
            for session_id, session in self._registry.resolve(ToAll()):
                if (
                    hash(session_id) % _HEARTBEAT_BUCKETS == bucket
                    and session._started_at <= connected_before
                ):
                    session._ping()
            bucket = (bucket + 1) % _HEARTBEAT_BUCKETS

    async def _run_expiry(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Close sessions whose identity's ``valid_until`` has passed, with 4005.

        The router keeps the expiry heap; this task sleeps until its earliest
        entry and has the actor handle ``Expire``.
        """
        task_status.started()
        while True:
            due = self._router.next_expiry()
            with trio.CancelScope(deadline=math.inf if due is None else due) as wakeup:
                self._expiry_wakeup = wakeup
                await trio.sleep_forever()
            self._expiry_wakeup = None
            with suppress(HubClosedError):
                await self._submit(Expire(), internal=True)
                await self._flush(internal=True)

    def _rearm_expiry(self) -> None:
        due, wakeup = self._router.next_expiry(), self._expiry_wakeup
        if due is not None and wakeup is not None and due < wakeup.deadline:
            wakeup.deadline = due

    async def _run_actor(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        commands = self._commands_recv
        # A start that is cancelled already must not leave a shielded task
        # behind: trio's start() would wait for it for ever.
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True) as scope:  # ended by _stop
            self._actor_scope = scope
            task_status.started()
            async with commands:
                while True:
                    try:
                        command = await commands.receive()
                    except trio.EndOfChannel:  # pragma: no cover - the send side stays open
                        return
                    self._handle_safely(command)
                    # Handle what else is queued before yielding, so that a burst
                    # of sends reaches each writer as one batch.
                    for _ in range(_COMMAND_BATCH - 1):
                        try:
                            command = commands.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        self._handle_safely(command)

    async def _run_connections(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the nursery every connection task runs in, shielded (ended by ``_stop``)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # see _run_actor
        try:
            with trio.CancelScope(shield=True) as scope:
                self._connections_scope = scope
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._connections_closed.set()

    async def _stop(self) -> None:
        """Close every session gracefully, then end the connections and the actor.

        Called shielded when ``open_hub``'s block is left, however it is left.
        """
        await self._shutdown()
        if self._connections_scope is not None:
            self._connections_scope.cancel()
        await self._connections_closed.wait()
        # Every connection task has now submitted its unregister; let the actor
        # handle them before it stops, so the registry is left empty.
        with suppress(HubClosedError):
            await self._flush(internal=True)
        self._state = _State.CLOSED
        if self._registry.session_count:  # pragma: no cover - would be a bug
            logger.error(
                "hub %s stopped with %d sessions registered",
                self._instance_id,
                self._registry.session_count,
            )
        self._end_shielded_tasks()

    def _end_shielded_tasks(self) -> None:
        self._state = _State.CLOSED
        for scope in (self._connections_scope, self._actor_scope):
            if scope is not None:
                scope.cancel()

    def _handle_safely(self, command: _Command) -> None:
        try:
            self._handle(command)
        except Exception:
            # A bug, but one command must not take the hub and every client down.
            logger.exception("hub %s: command %r failed", self._instance_id, command)

    def _handle(self, command: _Command) -> None:
        if isinstance(command, _Flush):
            command.reply.send_nowait(None)
        else:
            self._run_command(command)

    def _run_command(self, command: Command[Session]) -> int:
        """Have the router decide ``command`` and carry out its effects; returns the offers made."""
        if isinstance(command, Register):
            # The deadline of the identity the session has now: a refresh may
            # have come while the registration waited in the queue.
            command = Register(command.session, _expiry_deadline(command.session.identity))
        effects = self._router.handle(command, trio.current_time())
        offers = self._execute(effects) if effects else 0
        if isinstance(command, Register | Refresh):
            self._rearm_expiry()
        return offers

    def _inline_budget(self, now: float, offers: int) -> int:
        """How many of the next ``offers`` of one frame may be written inline.

        Writing a frame inline saves the writer's task switch but costs a
        syscall per frame, where a writer that wakes to many queued frames
        writes them in one. Traffic that trickles (a reply, a fan-out a
        request triggers, each from its own task) is written inline. A burst,
        where the writers will find many frames, is queued for them: a send to
        many sessions, and a task's sends once it has written 64 frames inline
        within 10 ms (a producer looping without yielding).
        """
        if offers > _INLINE_STREAK:
            return 0
        task = trio.lowlevel.current_task()
        if task is not self._streak_task or now - self._streak_at >= _INLINE_STREAK_WINDOW:
            self._streak_task, self._streak, self._streak_at = task, 0, now
        self._streak += offers
        return offers if self._streak <= _INLINE_STREAK else 0

    def _execute(self, effects: list[Effect[Session]]) -> int:
        """Carry out the router's effects, in order; returns the offers made."""
        counters = self._counters
        offers = 0
        for effect in effects:
            match effect:
                case Offer(frame=frame, sessions=sessions):
                    now = trio.current_time()
                    offers += len(sessions)
                    inline = self._inline_budget(now, len(sessions))
                    for session in sessions:
                        if not session._offer_nowait(frame, now, inline > 0):
                            counters.drops += 1
                        inline -= 1
                case CloseSession(session=session, code=code, reason=reason, drain=drain, why=why):
                    if code == CloseCode.SLOW_CONSUMER:
                        logger.warning(
                            "session %s (user %s): slow consumer, closing with %d: %s "
                            "(%d messages, %d bytes queued)",
                            session.session_id,
                            session.user_id,
                            code,
                            why,
                            session.queued_messages,
                            session.queued_bytes,
                            extra=session.log_fields,
                        )
                    elif why is not None:
                        logger.info(
                            "session %s (user %s): %s, closing with %d",
                            session.session_id,
                            session.user_id,
                            why,
                            code,
                            extra=session.log_fields,
                        )
                    session._request_close(code, reason, drain=drain)
                case Discard(session=session):
                    session._close_outbound()
                    counters.drops += session._discard_queued()
                case WakeProducers(session=session):
                    session._wake_producers()
                case Publish(message=message):
                    if not self._backplane.publish_nowait(message):
                        # The backplane logs its outages and full queues itself.
                        counters.drops += 1
                        logger.debug("backplane dropped %r", message)
                case Registered(session=session):
                    now = trio.current_time()
                    session._offer_nowait(
                        encode_frame(
                            hello_message(session.session_id, session.user_id, session.username)
                        ),
                        now,
                        self._inline_budget(now, 1) > 0,
                    )
                    logger.info(
                        "session %s (user %s) registered",
                        session.session_id,
                        session.user_id,
                        extra=session.log_fields,
                    )
                case Unregistered(session=session):
                    logger.info(
                        "session %s (user %s) unregistered",
                        session.session_id,
                        session.user_id,
                        extra=session.log_fields,
                    )
                case Subscribe(user_id=user_id):
                    self._backplane.subscribe_nowait(user_id)
                case Unsubscribe(user_id=user_id):
                    self._backplane.unsubscribe_nowait(user_id)
        if self._budget_waiters:
            self._wake_budget_waiters()
        return offers

    # --- connections -----------------------------------------------------------

    async def _accept_loop(self, listener: trio.abc.Listener[trio.abc.Stream]) -> NoReturn:
        """Accept clients on one listener; each runs in its own task and error boundary.

        A socket counts against ``max_connections`` from the moment it is
        accepted, so silent or half-open sockets cannot pile up. Above the
        limit (or while shutting down), up to ``_REFUSAL_SLOTS`` sockets at a
        time are answered 503 within ``_REFUSAL_TIMEOUT``; the others are
        closed at once.

        Error handling:
            EMFILE, ENFILE, ENOBUFS and ENOMEM are counted in ``accept_errors``
            and logged once per ``_ACCEPT_ERROR_LOG_INTERVAL``; accepting goes
            on after a short pause. Any other ``OSError`` ends the listener.
        """
        counters, config = self._counters, self._config
        connections, limit = self._connections, config.max_connections
        assert connections is not None
        logged_at = -math.inf
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    counters.accept_errors += 1
                    if trio.current_time() - logged_at >= _ACCEPT_ERROR_LOG_INTERVAL:
                        logged_at = trio.current_time()
                        logger.error(
                            "accept failed: %s (%d connections open, max_connections %d); "
                            "new clients wait until descriptors free up. Raise the process's "
                            "file limit (ulimit -n) or lower max_connections. "
                            "(Logged once per %ds; %d failures so far.)",
                            exc.strerror,
                            self._live_connections,
                            config.max_connections,
                            _ACCEPT_ERROR_LOG_INTERVAL,
                            counters.accept_errors,
                        )
                    await trio.sleep(_ACCEPT_RETRY_DELAY)
                    continue
                try:
                    if self._state is _State.RUNNING and self._live_connections < limit:
                        connections.start_soon(self._serve_connection, stream)
                        self._live_connections += 1
                        counters.handshakes_in_progress += 1
                    elif self._refusing < _REFUSAL_SLOTS:
                        # A few sockets over the limit are read, so that their
                        # clients get a 503 they can act on; the rest are closed.
                        connections.start_soon(self._refuse_connection, stream)
                        self._refusing += 1
                    else:
                        counters.rejected_handshakes[
                            "connection_limit" if self._state is _State.RUNNING else "shutting_down"
                        ] += 1
                        await trio.aclose_forcefully(stream)
                except RuntimeError:  # the hub's connections nursery has closed
                    await trio.aclose_forcefully(stream)
                    raise HubClosedError(
                        f"hub {self._instance_id!r} has shut down; serve_hub outlived open_hub"
                    ) from None

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        """Run one accepted connection, from its handshake to its close.

        This is the connection's error boundary: every task of the connection
        (trio-websocket's reader, the session's reader, writer and dispatcher)
        runs in a nursery inside it.

        Error handling:
            Nothing raised here reaches the hub's nursery, except cancellation.
            A peer that leaves during the handshake is counted in
            ``handshakes_aborted``. Any other exception, a bug in the hub or in
            a library under it, is logged once with the session id (or the
            peer's address), counted in ``connection_errors``, and the
            connection is closed: with a 1011 close frame if it is still open
            and the socket takes one at once, else by closing the socket.
        """
        counters, config = self._counters, self._config
        peer = _peer_address(stream)
        in_handshake = True
        session: Session | None = None
        try:
            async with trio.open_nursery() as nursery:
                upgrade = None
                with trio.move_on_after(config.handshake_timeout):
                    upgrade = await self._open_upgrade(nursery, stream)
                if upgrade is None or isinstance(upgrade, NoRequest):
                    self._handshake_failed(peer, upgrade)
                else:
                    accepted = await self._answer_handshake(upgrade, peer)
                    counters.handshakes_in_progress -= 1
                    in_handshake = False
                    if accepted is not None:
                        connection, identity = accepted
                        session = Session._create(
                            session_id=new_session_id(self._instance_id),
                            identity=identity,
                            remote=peer,
                            connection=connection,
                            hub=self,
                            config=config,
                        )
                        try:
                            # The wsproto engine runs no task of its own: the
                            # session's tasks share the connection's nursery.
                            await session._run(nursery if connection.push else None)
                        except* Exception as failure:
                            # The engine can still finish the close handshake:
                            # close with 1011.
                            self._connection_failed(failure, session, peer)
                            try:
                                await session._close_after_failure()
                            except Exception as exc:  # logged once above already
                                logger.warning("closing %s after its failure: %r", session, exc)
                    # The end of the close handshake (or of a refusal).
                    with trio.move_on_after(config.close_timeout):
                        await upgrade.aclose()
                nursery.cancel_scope.cancel()
        except* Exception as failure:
            # trio-websocket's reader (or the handshake) failed: every task of
            # the connection is gone; the client gets 1011 if the socket takes it.
            try:
                self._connection_failed(failure, session, peer)
                if session is not None:
                    request = session._fail()
                    session._writer.write_close_nowait(request.code, request.reason)
            except Exception:  # the last resort: nothing may reach the hub's nursery
                logger.exception("connection from %s: handling its failure failed", peer)
        finally:
            if in_handshake:
                counters.handshakes_in_progress -= 1
            await _close_stream(stream)
            if session is not None:
                advance(session, Transition.END)
                counters.closes_by_code[session.close_code] += 1
                # Unregister exactly once, whatever ended the connection; shielded so
                # that a cancelled connection still leaves no registry entry behind.
                with (
                    trio.CancelScope(shield=True),
                    suppress(trio.ClosedResourceError, trio.BrokenResourceError),
                ):
                    await self._commands_send.send(Unregister(session, close=False))
            self._live_connections -= 1
            if self._live_connections == 0 and self._state is not _State.RUNNING:
                self._all_connections_ended.set()

    async def _open_upgrade(
        self, nursery: trio.Nursery, stream: trio.abc.Stream
    ) -> Upgrade | NoRequest:
        """Read the opening handshake with the configured engine."""
        config = self._config
        if config.engine == "wsproto":
            return await open_wsproto_connection(
                stream,
                max_message_size=config.max_message_size,
                inbound_queue_size=config.inbound_queue_size,
                compression=config.compression,
            )
        return await open_trio_websocket(
            nursery,
            stream,
            # The session's inbound queue: its dispatcher reads it directly.
            message_queue_size=config.inbound_queue_size,
            max_message_size=config.max_message_size,
            fast=config.writer == "fast",
        )

    async def _refuse_connection(self, stream: trio.abc.Stream) -> None:
        """Answer a socket over the connection limit with 503 (error boundary as above)."""
        try:
            async with trio.open_nursery() as nursery:
                connection = None
                with trio.move_on_after(_REFUSAL_TIMEOUT):
                    connection = await self._open_upgrade(nursery, stream)
                if connection is None or isinstance(connection, NoRequest):
                    self._handshake_failed(_peer_address(stream), connection)
                else:
                    why, body = (
                        ("connection_limit", "connection limit reached")
                        if self._state is _State.RUNNING
                        else ("shutting_down", "hub is shutting down")
                    )
                    await self._reject(connection, 503, why, body)
                nursery.cancel_scope.cancel()
        except* Exception as failure:
            self._connection_failed(failure, None, _peer_address(stream))
        finally:
            self._refusing -= 1
            await _close_stream(stream)

    def _handshake_failed(self, peer: tuple[str, int] | None, why: NoRequest | None) -> None:
        """Count a connection that sent no request to answer (``why`` None: timed out)."""
        counters = self._counters
        if why is None:
            counters.rejected_handshakes["handshake_timeout"] += 1
            logger.info("handshake from %s: no request within the handshake timeout", peer)
        elif why is NoRequest.MALFORMED:
            counters.rejected_handshakes["bad_request"] += 1
            logger.info("handshake from %s: not a WebSocket upgrade; refused with 400", peer)
        else:
            counters.handshakes_aborted += 1
            logger.debug("handshake from %s: the peer left before its request was read", peer)

    def _connection_failed(
        self, failure: BaseExceptionGroup[Exception], session: Session | None, peer: object
    ) -> None:
        _, unexpected = failure.split(_PEER_LEFT)
        if unexpected is None:
            # The peer vanished at a moment the libraries under us did not expect.
            logger.debug("connection from %s: the peer left (%r)", peer, failure.exceptions)
            if session is None:
                self._counters.handshakes_aborted += 1
            return
        self._counters.connection_errors += 1
        who = f"session {session.session_id} (user {session.user_id!r})" if session else peer
        logger.error(
            "connection %s failed; closing it with %d",
            who,
            CloseCode.SERVER_ERROR,
            exc_info=unexpected,
            extra=session.log_fields if session is not None else {},
        )

    async def _answer_handshake(
        self, request: Upgrade, peer: tuple[str, int] | None
    ) -> tuple[Connection, Identity] | None:
        """Check the request, run the authorizer, and accept or refuse.

        Returns:
            The open connection and who it is, or None if it was refused (the
            refusal is answered and counted here) or the peer left meanwhile.
        """
        if self._state is not _State.RUNNING:
            await self._reject(request, 503, "shutting_down", "hub is shutting down")
            return None
        if request.http_version != b"1.1":
            await self._reject(
                request, 400, "bad_request", "a WebSocket upgrade needs HTTP/1.1 (RFC 6455 4.1)"
            )
            return None
        try:
            handshake = Handshake.from_request(request.path, request.headers, peer)
        except ValueError as exc:
            await self._reject(request, 400, "bad_request", f"bad request: {exc}")
            return None
        origin = handshake.headers.get("origin")
        if not self._origins.allows(origin):
            await self._reject(request, 403, "origin", f"origin not allowed: {origin}")
            return None
        identity = await self._authorize(request, handshake)
        if identity is None:
            return None
        connection = None
        # A client that does not read even the 101 answer holds nothing for long.
        with trio.move_on_after(self._config.close_timeout):
            connection = await request.accept()
        if connection is None:
            self._counters.handshakes_aborted += 1
            return None
        return connection, identity

    async def _authorize(self, request: Upgrade, handshake: Handshake) -> Identity | None:
        """Run the authorizer; answer the refusal itself and return None if refused."""
        if self._authorizer is None:
            logger.warning("handshake refused: no authorizer configured (pass authorizer=...)")
            await self._reject(request, 401, "no_authorizer", "unauthorized")
            return None
        try:
            with trio.fail_after(self._config.handshake_timeout):
                identity = await self._authorizer(handshake)
        except AuthRefused as exc:
            await self._reject(request, exc.status, "refused", exc.reason)
            return None
        except trio.TooSlowError:
            logger.warning("authorizer took longer than %ss", self._config.handshake_timeout)
            await self._reject(request, 503, "authorizer_timeout", "authorization timed out")
            return None
        except Exception:
            logger.exception("authorizer raised; handshake refused with 500")
            await self._reject(request, 500, "authorizer_error", "authorization failed")
            return None
        if identity is None:
            await self._reject(request, 401, "unauthorized", "unauthorized")
            return None
        if not isinstance(identity, Identity):
            logger.error("authorizer returned %r, not an Identity; refused", type(identity))
            await self._reject(request, 500, "authorizer_error", "authorization failed")
            return None
        return identity

    async def _reject(self, request: Upgrade, status: int, why: str, body: str) -> None:
        self._counters.rejected_handshakes[why] += 1
        logger.info("handshake refused: %d %s", status, body)
        with trio.move_on_after(self._config.close_timeout):
            await request.reject(status, body.encode())

    async def _shutdown(self) -> None:
        """Close every session with 1001, draining their queues, within the grace period."""
        if self._state is not _State.RUNNING:
            return
        self._state = _State.CLOSING
        self._router.accepting = False
        logger.info(
            "hub %s shutting down: closing %d sessions",
            self._instance_id,
            self._registry.session_count,
        )
        try:
            await self._commands_send.send(
                Close(
                    ToAll(), CloseCode.GOING_AWAY, "hub is shutting down", drain=True, remote=True
                )
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The actor is gone already (an outer cancellation reached it first);
            # the connections are cancelled below and unregister nothing.
            return
        if self._live_connections == 0:
            return
        with trio.move_on_after(self._config.shutdown_timeout):
            await self._all_connections_ended.wait()


@asynccontextmanager
async def open_hub(
    service_name: str = "trio-gw",
    instance_id: str = "hub",
    on_handler_message_received: MessageCallback | None = None,
    *,
    config: HubConfig | None = None,
    authorizer: Authorizer | None = None,
    backplane: Backplane | None = None,
) -> AsyncIterator[HandlerManager]:
    """Run a hub for the duration of the block.

    The arguments are ``HandlerManager``'s. Accept clients with ``serve_hub``
    inside the block.

    Resource handling:
        The hub owns its actor, its backplane and every connection task. On
        leaving the block (normally, by an error or by cancellation) every
        session is closed with 1001 after its queue is drained, for at most
        ``config.shutdown_timeout`` seconds; connections still open after that
        are cancelled. Only then does the actor stop, so each connection is
        unregistered before the registry goes away. The actor and the
        connections are shielded from the caller's cancellation for that long:
        a cancelled block still closes its clients gracefully.
    """
    hub = HandlerManager(
        service_name,
        instance_id,
        on_handler_message_received,
        config=config,
        authorizer=authorizer,
        backplane=backplane,
    )
    async with trio.open_nursery() as services:
        try:
            await services.start(hub._run_actor)
            await services.start(hub._run_heartbeat)
            await services.start(hub._run_expiry)
            await services.start(hub._backplane.serve, hub)
            await services.start(hub._run_connections)
            hub._state = _State.RUNNING
            try:
                yield hub
            finally:
                with trio.CancelScope(shield=True):
                    await hub._stop()
        finally:
            # Whatever ended the block or its start-up (a failed backplane, a
            # second Ctrl-C during _stop), the shielded tasks end with it.
            hub._end_shielded_tasks()
            services.cancel_scope.cancel()


def _expiry_deadline(identity: Identity) -> float | None:
    """When ``identity`` expires on trio's clock (its ``valid_until`` is wall-clock time)."""
    if identity.valid_until is None:
        return None
    return trio.current_time() + (identity.valid_until - time.time())


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_hub(
    hub: HandlerManager,
    *,
    host: str | None = None,
    port: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept WebSocket clients for ``hub`` until cancelled.

    Start it with ``port = await nursery.start(serve_hub, hub)``: it reports the
    bound port once it is listening.

    Args:
        hub: A running hub (inside ``open_hub``).
        host: Interface to bind; ``hub.config.host`` if None.
        port: Port to bind, 0 for any; ``hub.config.port`` if None.
        ssl_context: Serve ``wss://`` with this context.
        task_status: Receives the bound port.

    Resource handling:
        Cancelling it closes the listener only; the sessions belong to the hub
        and stay up until the hub closes them.

    Raises:
        HubClosedError: the hub is not running.
        ConfigError: the hub uses the dev authorizer and ``host`` is not loopback.
        OSError: the address cannot be bound.
    """
    if hub._connections is None or not hub.running:
        raise HubClosedError("serve_hub needs a running hub: use it inside `async with open_hub()`")
    host = hub.config.host if host is None else host
    port = hub.config.port if port is None else port
    if hub._authorizer is dev_authorizer and not is_loopback(host):
        raise ConfigError(
            f"host: dev mode (token = user id, no real auth) binds loopback only, got {host!r}"
        )
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
    tcp_listeners = await open_tcp_listeners(port, host=host, reuse_port=hub.config.reuse_port)
    if ssl_context is None:
        listeners = tcp_listeners
    else:
        listeners = [
            trio.SSLListener(listener, ssl_context, https_compatible=True)
            for listener in tcp_listeners
        ]
    addresses = [_listener_address(listener) for listener in listeners]
    scheme = "ws" if ssl_context is None else "wss"
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(hub._accept_loop, listener)
        logger.info(
            "WebSocket clients on %s (hub %s, service %s, engine %s%s)",
            listen_urls(scheme, addresses),
            hub.instance_id,
            hub.service_name,
            hub.config.engine,
            ", permessage-deflate" if hub.config.compression else "",
        )
        task_status.started(addresses[0][1])
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


def listen_urls(scheme: str, addresses: list[tuple[str, int]]) -> str:
    """Bound addresses as URLs a person can paste, for the one start-up line of a listener.

    IPv6 addresses go in brackets; a wildcard bind (``0.0.0.0``, ``::``) is shown
    as such, with a hint, since it is not where to connect to from elsewhere.
    """
    urls = [
        f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"
        for host, port in addresses
    ]
    if any(_is_unspecified(host) for host, _ in addresses):
        return ", ".join(urls) + " (all interfaces: use this host's name or address)"
    return ", ".join(urls)


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _listener_address(
    listener: trio.SocketListener | trio.SSLListener[trio.SocketStream],
) -> tuple[str, int]:
    inner = listener.transport_listener if isinstance(listener, trio.SSLListener) else listener
    if not isinstance(inner, trio.SocketListener):  # pragma: no cover - built above
        raise TypeError(f"not a socket listener: {inner!r}")
    name = inner.socket.getsockname()
    return str(name[0]), int(name[1])


def _peer_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The peer's address, or None if the socket was reset before we asked."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        name = stream.socket.getpeername()
    except OSError:
        return None  # ENOTCONN: reset between accept and now
    return str(name[0]), int(name[1])


async def _close_stream(stream: trio.abc.Stream) -> None:
    """Close an accepted stream at the end of its connection, whatever state it is in.

    Shielded, so that a cancelled connection still frees its descriptor, and
    contained: closing a broken TLS stream must not raise into the hub.
    """
    with trio.CancelScope(shield=True):
        try:
            await trio.aclose_forcefully(stream)
        except Exception as exc:
            logger.debug("closing a connection's stream failed: %r", exc)
