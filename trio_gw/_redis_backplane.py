"""``RedisBackplane``: hub nodes behave as one hub over Redis or Valkey pub/sub, via coredis.

The decisions (channel names, envelopes, batches, which subscriptions to send
after a change or a reconnect, backoff) live in ``_backplane_core``; this
module is the shell that carries them out with coredis, which runs on Trio
through anyio.

One connection loop owns everything that needs Redis: the subscriber (classic
pub/sub on a single server, sharded pub/sub on a Redis Cluster), the publisher
(one task, one pipelined round trip per batch) and the presence heartbeat. When
any of them fails the loop tears all of them down, logs, waits (doubling
backoff) and starts again, resubscribing to everything the node still needs.
While it is down, ``publish_nowait`` drops (the hub counts it) and the state
is ``down``, which the gateway turns into ``/readyz`` 503.

Nothing waits on Redis on the hub's behalf: publishes go into a bounded queue
(``publish_nowait``), and messages from other nodes go into a bounded inbox
that one task hands to the hub, everything that arrived together as one
batch (a burst stays a burst), so that a slow hub drops remote messages
(counted) instead of growing memory; Redis itself disconnects a subscriber
that falls behind its ``client-output-buffer-limit pubsub``, which is survived
like any other disconnection.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any, NoReturn
from urllib.parse import urlsplit

import anyio
import attrs
import coredis
import orjson
import trio
from anyio.abc import TaskStatus
from coredis.connection import (
    BaseConnection,
    ClusterConnection,
    SentinelManagedConnection,
    TCPConnection,
    TCPLocation,
    UnixDomainSocketConnection,
)
from coredis.patterns.pubsub import PubSub, ShardedPubSub
from coredis.pool import SentinelConnectionPool
from coredis.retry import NoRetryPolicy

from ._backplane import BackplaneInbox, BackplaneMessage
from ._backplane_core import (
    Backoff,
    ChannelNames,
    EnvelopeError,
    PublishQueue,
    SentinelUrl,
    Subscriptions,
    decode_envelope,
    envelope_origin,
    route,
    with_tls_defaults,
)
from ._errors import BackplaneUnavailable, ConfigError, GatewayError

__all__ = ["BackplaneStatistics", "BackplaneUnavailable", "RedisBackplane"]

logger = logging.getLogger("trio_gw.backplane")

# Log at most one line per this many seconds for each kind of repeated event.
_LOG_EVERY = 10.0


@attrs.frozen(kw_only=True)
class BackplaneStatistics:
    """A snapshot of one node's backplane.

    Attributes:
        node_id: This node's id.
        state: ``up`` (connected and subscribed), ``down``, or ``starting``.
        cluster: True on a Redis Cluster (sharded pub/sub).
        reconnects: Connections made after the first.
        outages: Times the connection was lost.
        down_since: Wall-clock time the current outage began, or None while up.
        last_error: What ended the last connection, or None.
        published: Envelopes published.
        publish_batches: Pipelined round trips that published them.
        publish_drops: Messages not published: the backplane was down, its
            queue was full, or a batch was lost with its connection.
        received: Envelopes received from other nodes.
        receive_drops: Envelopes received but not handed to the hub (its inbox
            was full) or not understood.
        subscriptions: Channels the server has confirmed now.
        wanted_subscriptions: Channels this node needs now.
        queued_publishes: Publishes waiting for the next batch now.
        listening_nodes: Nodes (this one included) that a message on the
            broadcast channel reaches, as last counted (every
            ``presence_interval``); None on a Redis Cluster or before the
            first count. A message to at least this many users goes once to
            the broadcast channel.
    """

    node_id: str
    state: str
    cluster: bool
    reconnects: int
    outages: int
    down_since: float | None
    last_error: str | None
    published: int
    publish_batches: int
    publish_drops: int
    received: int
    receive_drops: int
    subscriptions: int
    wanted_subscriptions: int
    queued_publishes: int
    listening_nodes: int | None


class _RateLimitedLog:
    """Log a repeated event at most once per ``_LOG_EVERY`` seconds, with the count since."""

    def __init__(self) -> None:
        self._last = -math.inf
        self._since = 0

    def __call__(self, level: int, message: str, *args: Any) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._last >= _LOG_EVERY:
            logger.log(level, message + " (%d since the last such line)", *args, self._since)
            self._last = now
            self._since = 0


class _ClosesBuffersOnFailure(BaseConnection):
    """A coredis 6.9 connection that closes its buffers when connecting fails.

    ``BaseConnection.run`` closes its anyio memory streams only once
    connected, so every failed attempt (the server is down) leaves four of
    them unclosed until the garbage collector warns (``ResourceWarning``).
    """

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(task_status=task_status)
        finally:
            for stream in (
                self._write_buffer_in,
                self._write_buffer_out,
                self._push_message_buffer_in,
                self._push_message_buffer_out,
                self._streamed_message_buffer_in,
                self._streamed_message_buffer_out,
            ):
                stream.close()


class _TCPConnection(_ClosesBuffersOnFailure, TCPConnection):
    pass


class _UnixConnection(_ClosesBuffersOnFailure, UnixDomainSocketConnection):
    pass


class _ClusterConnection(_ClosesBuffersOnFailure, ClusterConnection):
    pass


class _SentinelConnection(_ClosesBuffersOnFailure, SentinelManagedConnection):
    pass


class _SentinelPool(SentinelConnectionPool):
    """coredis 6.9's Sentinel pool, making connections that close their buffers on failure."""

    async def _construct_connection(self) -> SentinelManagedConnection:
        location = await (self.get_primary_location() if self.is_primary else self.get_replica())
        return _SentinelConnection(
            location, self.service_name, self.is_primary, **self.connection_kwargs
        )


# The push types of a published message, as coredis reads them (bytes: the
# clients do not decode responses).
_PUBLISHED_TYPES = frozenset({b"message", b"smessage"})


async def _consume_in_batches(
    pubsub: Any, connection: BaseConnection, checked_in: Callable[[], None]
) -> None:
    """Move every push message ``connection`` has parsed to ``pubsub``'s stream at once.

    coredis 6.9's consumers move one message per ``await`` (anyio's
    ``receive`` checkpoints even when a message is there), so a burst of
    publishes reached the backplane one message per scheduler pass, and the
    hub woke every writer once per message. Here one wake-up moves everything
    the last read parsed, and calls ``checked_in`` (the keepalive's clock)
    once. ``_handle_message`` only awaits per-channel callbacks, which the
    backplane does not use.

    A published message (``message``, or ``smessage`` on a Cluster) goes on
    as its payload alone: ``_handle_message`` would build a dict for it and
    compare its type against coredis's enums, about 25 µs a message, paid
    again for each of the node's own broadcasts that Redis sends back.
    Subscription acknowledgements still take ``_handle_message``, which
    wakes whoever waits for them.
    """
    buffer = connection._push_message_buffer_out
    send = pubsub._send_stream
    try:
        while True:
            response = await buffer.receive()
            checked_in()
            while True:
                if (
                    type(response) is list
                    and len(response) == 3
                    and response[0] in _PUBLISHED_TYPES
                ):
                    send.send_nowait(response[2])
                else:
                    send.send_nowait(await pubsub._handle_message(response))
                try:
                    response = buffer.receive_nowait()
                except anyio.WouldBlock:
                    break
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
        raise coredis.exceptions.ConnectionError(
            "Connection lost while waiting for push messages"
        ) from err


class _PubSub(PubSub[bytes]):
    """coredis 6.9's ``PubSub``, consuming push messages a batch at a time."""

    async def _consume_push_messages(self) -> None:
        def checked_in() -> None:
            self._last_checkin = time.monotonic()

        await _consume_in_batches(self, self.connection, checked_in)


class _ShardedPubSub(ShardedPubSub[bytes]):
    """coredis 6.9's ``ShardedPubSub`` with its connections released when it ends.

    Its ``run`` enters each shard's ``pool.acquire()`` in an ``AsyncExitStack``
    that it never closes, so every subscriber session leaks one connection per
    shard until the garbage collector finalizes the generators (trio then
    warns, ``ResourceWarning``). This is the same ``run`` (without the retry
    policy, which the backplane does not use) with the stack closed. It also
    consumes push messages a batch at a time, as ``_PubSub`` does.
    """

    async def _consume_shard_push_messages(self, connection: BaseConnection) -> None:
        assert isinstance(connection, ClusterConnection)
        location = connection.location

        def checked_in() -> None:
            self._last_checkins[location] = time.monotonic()

        await _consume_in_batches(self, connection, checked_in)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with AsyncExitStack() as stack:
            nodes = self.connection_pool.cluster_layout.primaries
            self.shard_connections = {
                node.node_id: await stack.enter_async_context(
                    self.connection_pool.acquire(node=node)
                )
                for node in nodes
                if node.node_id
            }
            try:
                async with anyio.create_task_group() as tg:
                    self._current_scope = tg.cancel_scope
                    for connection in self.shard_connections.values():
                        tg.start_soon(self._consume_shard_push_messages, connection)
                        tg.start_soon(self._shard_keepalive, connection)
                    task_status.started()
            finally:
                if self._current_scope.cancel_called:
                    with anyio.CancelScope(shield=True):
                        await self._cleanup()


class RedisBackplane:
    """Connects hub nodes through Redis or Valkey. See the module docstring.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` (coredis's URL forms);
            a server with cluster mode enabled is detected and used as a Redis
            Cluster through coredis's ``RedisCluster``, with sharded pub/sub.
            ``redis+sentinel://[[user]:password@]host:port[,host:port]/service``
            asks those Sentinels for the primary of ``service`` (coredis's
            ``Sentinel``); the credentials are the primary's.
        node_id: This node's id, unique in the cluster; session ids name it.
        prefix: Prefixes every channel and key, so that clusters can share a server.
        publish_queue_size: The most messages waiting to be sent (a message
            to a few users counts once, however many user channels it goes to).
        publish_queue_bytes: The most bytes of publishes waiting to be sent.
        batch_size: The most publishes (and subscriptions) in one round trip.
        inbox_size: The most messages from other nodes waiting for the hub or
            being carried out by it.
        fanout_threshold: A message to more users than this goes once to the
            broadcast channel instead of once per user channel. On a single
            server (not a Redis Cluster) so does a message to at least as many
            users as there are nodes listening (``route``).
        presence_interval: Seconds between presence heartbeats.
        presence_ttl: Seconds a node stays in presence after its last heartbeat.
        timeout: Seconds for connecting and for any one reply from the server.
        reconnect_initial: The first delay before reconnecting, in seconds.
        reconnect_max: The longest delay between attempts, in seconds.

    Resource handling:
        ``serve`` owns the connections; cancelling it closes them, after
        removing this node from presence (for at most one second).

    Error handling:
        A lost connection, a failed command or an unanswered subscription
        ends the connection; it is logged (with the outage window once it is
        over) and retried with backoff, never raised to the hub.
    """

    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        prefix: str = "trio-gw",
        publish_queue_size: int = 10_000,
        publish_queue_bytes: int = 64 * 1024 * 1024,
        batch_size: int = 512,
        inbox_size: int = 10_000,
        fanout_threshold: int = 64,
        presence_interval: float = 2.0,
        presence_ttl: float = 6.0,
        timeout: float = 5.0,
        reconnect_initial: float = 0.05,
        reconnect_max: float = 2.0,
    ) -> None:
        if not node_id or ":" in node_id:
            raise ConfigError(f"node_id: expected a non-empty id without ':', got {node_id!r}")
        if presence_ttl <= presence_interval:
            raise ConfigError(
                f"presence_ttl: expected more than presence_interval ({presence_interval!r}), "
                f"got {presence_ttl!r}"
            )
        self._url = url
        self._connect_url = with_tls_defaults(url)
        self._node_id = node_id
        self._names = ChannelNames(prefix)
        self._batch_size = batch_size
        self._batch_bytes = 1024 * 1024
        self._fanout_threshold = fanout_threshold
        self._presence_interval = presence_interval
        self._presence_ttl = presence_ttl
        self._timeout = timeout
        self._queue = PublishQueue(publish_queue_size, publish_queue_bytes)
        self._subscriptions = Subscriptions(
            frozenset({self._names.node(node_id), self._names.broadcast})
        )
        self._backoff = Backoff(
            reconnect_initial, reconnect_max, jitter=lambda d: d * random.uniform(0.5, 1.0)
        )
        # Messages from other nodes, waiting for the hub (see _read_loop, _deliver_loop).
        # Envelopes, decoded only as the hub takes them: bytes are not tracked by
        # the garbage collector, while a decoded message is several objects
        # that, held in a batch, would survive into the old generation and
        # bring on full collections (150 ms each with 2000 sessions).
        self._inbox: deque[bytes] = deque()
        self._inbox_size = inbox_size
        self._inbox_wakeup = trio.Event()
        self._delivering = 0  # messages of the batch the hub is carrying out now
        self._publish_wakeup = trio.Event()
        self._subscribe_wakeup = trio.Event()
        self._client: coredis.Redis[bytes] | coredis.RedisCluster[bytes] | None = None
        self._serving = False
        self._stopping = False
        # The connection loop runs shielded; serve() stops it in order (see there).
        self._loop_scope = trio.CancelScope(shield=True)
        self._work_scope: trio.CancelScope | None = None
        self._up = False
        self._was_up = False  # the connection that just failed had been up
        self._cluster = False
        # Nodes a broadcast reaches (PUBSUB NUMSUB, counted with each heartbeat);
        # None while unknown, and always on a Cluster, where the broadcast
        # channel is one shard's and user channels spread over all of them.
        self._listening_nodes: int | None = None
        self._connections = 0
        self._outages = 0
        self._down_since: float | None = None
        self._last_error: str | None = None
        self._published = 0
        self._batches = 0
        self._publish_drops = 0
        self._received = 0
        self._receive_drops = 0
        self._log_publish_drop = _RateLimitedLog()
        self._log_receive_drop = _RateLimitedLog()

    # --- the Backplane protocol -----------------------------------------------

    @property
    def node_id(self) -> str:
        """See ``Backplane.node_id``."""
        return self._node_id

    @property
    def up(self) -> bool:
        """True while connected, subscribed to this node's channels and listening."""
        return self._up

    @property
    def in_sync(self) -> bool:
        """True while up and the server holds exactly the channels this node needs now."""
        return self._up and self._subscriptions.in_sync

    def publish_nowait(self, message: BackplaneMessage) -> bool:
        """Queue ``message`` for the next pipelined batch; False (a drop) if down or full."""
        if not self._up:
            self._publish_drops += 1
            self._log_publish_drop(
                logging.WARNING, "backplane down: a message for other nodes was dropped"
            )
            return False
        items = route(
            message,
            self._node_id,
            self._names,
            fanout_threshold=self._fanout_threshold,
            listening_nodes=self._listening_nodes,
        )
        if not items:
            return True
        if not self._queue.offer(items):
            self._publish_drops += 1
            self._log_publish_drop(
                logging.WARNING, "backplane publish queue full: a message was dropped"
            )
            return False
        self._publish_wakeup.set()
        return True

    def subscribe_nowait(self, user_id: str) -> None:
        """Route ``user_id``'s messages here; subscribed at the next batch."""
        self._subscriptions.want(self._names.user(user_id))
        self._subscribe_wakeup.set()

    def unsubscribe_nowait(self, user_id: str) -> None:
        """This node's last session of ``user_id`` left; unsubscribed at the next batch."""
        self._subscriptions.unwant(self._names.user(user_id))
        self._subscribe_wakeup.set()

    def statistics(self) -> BackplaneStatistics:
        """A frozen snapshot of the counters and the state."""
        state = "up" if self._up else ("starting" if self._down_since is None else "down")
        return BackplaneStatistics(
            node_id=self._node_id,
            state=state,
            cluster=self._cluster,
            reconnects=max(0, self._connections - 1),
            outages=self._outages,
            down_since=self._down_since,
            last_error=self._last_error,
            published=self._published,
            publish_batches=self._batches,
            publish_drops=self._publish_drops,
            received=self._received,
            receive_drops=self._receive_drops,
            subscriptions=len(self._subscriptions.active),
            wanted_subscriptions=len(self._subscriptions.wanted),
            queued_publishes=len(self._queue),
            listening_nodes=self._listening_nodes,
        )

    async def presence(self) -> dict[str, dict[str, int]]:
        """The other live nodes' last heartbeats: ``{node_id: {user_id: sessions}}``.

        A node that has not refreshed its heartbeat for ``presence_ttl`` is
        gone from it (and removed from the node set by whoever reads first).

        Raises:
            BackplaneUnavailable: the connection is down or did not answer in time.
        """
        client = self._client
        if client is None or not self._up:
            raise BackplaneUnavailable("backplane: not connected, cluster presence unavailable")
        names = self._names
        try:
            with trio.fail_after(self._timeout):
                nodes = sorted(n.decode() for n in await client.smembers(names.nodes))
                others = [n for n in nodes if n != self._node_id]
                values = [await client.get(names.presence(n)) for n in others]
                gone = [n for n, value in zip(others, values, strict=True) if value is None]
                if gone:
                    await client.srem(names.nodes, gone)
        except Exception as exc:  # whatever broke, presence is unavailable: say why
            raise BackplaneUnavailable(
                f"backplane: presence query failed: {_describe(exc)}"
            ) from None
        result: dict[str, dict[str, int]] = {}
        for node, value in zip(others, values, strict=True):
            if value is None:
                continue
            try:
                users = orjson.loads(value)["users"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                logger.warning("backplane: node %s has an unreadable presence entry", node)
                continue
            result[node] = {str(u): int(n) for u, n in users.items()}
        return result

    async def serve(
        self,
        inbox: BackplaneInbox,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Connect, subscribe and run until cancelled; reconnect whenever the connection fails.

        Reports started after the first attempt to connect, whether it
        succeeded or not: a node whose Redis is down at start-up serves its
        own clients and reports not ready until it connects.
        """
        if self._serving:
            raise RuntimeError("RedisBackplane.serve: already serving")
        self._serving = True
        first_attempt = trio.Event()
        loop_done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver_loop, inbox, name="trio_gw backplane inbox")
            nursery.start_soon(
                self._connection_loop, inbox, first_attempt, loop_done, name="trio_gw backplane"
            )
            with trio.move_on_after(self._timeout * 2):
                await first_attempt.wait()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # coredis tears down badly when cancelled from outside (its
                # pub/sub cleanup writes to a connection already closed and
                # raises anyio.ClosedResourceError), so the connection runs
                # shielded and is stopped here in order: our tasks first, then
                # presence, then the pub/sub and the client leave normally.
                with trio.CancelScope(shield=True):
                    self._stopping = True
                    if self._work_scope is not None:
                        self._work_scope.cancel()
                    with trio.move_on_after(self._timeout):
                        await loop_done.wait()
                    self._loop_scope.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    # --- the connection loop --------------------------------------------------

    async def _connection_loop(
        self, inbox: BackplaneInbox, first_attempt: trio.Event, done: trio.Event
    ) -> None:
        with self._loop_scope:
            try:
                while not self._stopping:
                    try:
                        await self._connect_and_run(inbox, first_attempt)
                    except BaseException as exc:
                        if self._stopping:
                            logger.debug("backplane: while stopping: %r", exc)
                            return
                        if not isinstance(exc, Exception):
                            raise
                        self._went_down(exc)
                    first_attempt.set()
                    if not self._stopping:
                        await trio.sleep(self._backoff.delay())
            finally:
                self._up = False
                self._client = None
                done.set()

    def _went_down(self, exc: BaseException) -> None:
        was_up, self._was_up = self._was_up, False
        self._up = False
        self._client = None
        self._last_error = _describe(exc)
        dropped = self._queue.clear()
        self._publish_drops += dropped
        details = None if _is_connection_error(exc) else exc
        if was_up:
            self._outages += 1
            self._down_since = time.time()
            logger.error(
                "backplane %s: connection lost (%s); %d queued publishes dropped; reconnecting",
                self._url_for_logs(),
                self._last_error,
                dropped,
                exc_info=details,
            )
        elif self._down_since is None:
            self._down_since = time.time()
            logger.error(
                "backplane %s: cannot connect (%s); retrying",
                self._url_for_logs(),
                self._last_error,
                exc_info=details,
            )
        else:
            logger.debug("backplane: reconnection failed: %s", self._last_error)

    def _url_for_logs(self) -> str:
        """The URL without a password."""
        scheme, sep, rest = self._url.partition("://")
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        return f"{scheme}{sep}{rest}"

    async def _open_client(self) -> coredis.Redis[bytes] | coredis.RedisCluster[bytes]:
        """A client for ``url``: a ``RedisCluster`` if the server has cluster mode enabled."""
        options: dict[str, Any] = {
            "connect_timeout": self._timeout,
            "stream_timeout": self._timeout,
            # A password with "@" or "#" has to be percent-encoded in a URL;
            # coredis would otherwise send it still encoded.
            "decode_components": True,
        }
        single = _UnixConnection if self._url.startswith("unix:") else _TCPConnection
        url = self._connect_url
        probe = coredis.Redis.from_url(url, retry_policy=NoRetryPolicy(), **options)
        # from_url sets the connection class itself; ours closes what coredis leaves open.
        probe.connection_pool.connection_class = single
        async with probe:
            with trio.fail_after(self._timeout):
                info = await probe.info("cluster")
        client: coredis.Redis[bytes] | coredis.RedisCluster[bytes]
        if info.get("cluster_enabled") in (1, "1"):
            # Given explicitly: coredis 6.9's from_url builds its startup node
            # the deprecated way and warns (DeprecationWarning) on every call.
            split = urlsplit(url)
            startup = TCPLocation(split.hostname or "127.0.0.1", split.port or 6379)
            client = coredis.RedisCluster.from_url(
                url, retry_policy=NoRetryPolicy(), startup_nodes=[startup], **options
            )
            client.connection_pool.connection_class = _ClusterConnection
        else:
            client = coredis.Redis.from_url(url, retry_policy=NoRetryPolicy(), **options)
            client.connection_pool.connection_class = single
        return client

    async def _connect_and_run(self, inbox: BackplaneInbox, first_attempt: trio.Event) -> None:
        if self._url.startswith(f"{SentinelUrl.SCHEME}://"):
            await self._run_with_sentinel(inbox, first_attempt)
            return
        client = await self._open_client()
        try:
            await self._run_client(client, inbox, first_attempt)
        finally:
            if isinstance(client, coredis.RedisCluster):
                # coredis 6.9's ClusterLayout never closes its error stream, so
                # each cluster client leaves an unclosed pair (ResourceWarning).
                for stream in client.connection_pool.cluster_layout._error_stream:
                    stream.close()

    async def _run_with_sentinel(self, inbox: BackplaneInbox, first_attempt: trio.Event) -> None:
        """Ask the Sentinels for the primary and run on it; a failover ends the connection."""
        parsed = SentinelUrl.parse(self._url)
        timeouts: dict[str, Any] = {
            "connect_timeout": self._timeout,
            "stream_timeout": self._timeout,
        }
        primary: dict[str, Any] = dict(timeouts)
        if parsed.username is not None:
            primary["username"] = parsed.username
        if parsed.password is not None:
            primary["password"] = parsed.password
        sentinel = coredis.Sentinel(
            [TCPLocation(host, port) for host, port in parsed.sentinels],
            sentinel_kwargs=timeouts,
            decode_responses=False,
            **primary,
        )
        for sentinel_client in sentinel.sentinels:
            sentinel_client.connection_pool.connection_class = _TCPConnection
        async with sentinel:
            client = sentinel.primary_for(parsed.service_name, connection_pool_class=_SentinelPool)
            await self._run_client(client, inbox, first_attempt)

    async def _run_client(
        self,
        client: coredis.Redis[bytes] | coredis.RedisCluster[bytes],
        inbox: BackplaneInbox,
        first_attempt: trio.Event,
    ) -> None:
        cluster = isinstance(client, coredis.RedisCluster)
        async with client:
            pubsub_options: dict[str, Any] = {
                "ignore_subscribe_messages": True,
                "retry_policy": None,  # the connection loop reconnects, visibly
                "subscription_timeout": self._timeout,
                "unsubscription_timeout": self._timeout,
                "max_idle_seconds": self._presence_interval,
            }
            # Built directly: the clients' pubsub() and sharded_pubsub() do not
            # pass unsubscription_timeout on (coredis 6.9 waits 0.1 s for the
            # acknowledgement, then logs a warning).
            pubsub = (
                _ShardedPubSub(client.connection_pool, **pubsub_options)
                if isinstance(client, coredis.RedisCluster)
                else _PubSub(client.connection_pool, **pubsub_options)
            )
            self._work_scope = trio.CancelScope()
            async with pubsub:
                self._subscriptions.reset()
                await self._reconcile_all(pubsub)
                self._client = client
                self._cluster = cluster
                self._connections += 1
                self._up = self._was_up = True
                self._backoff.reset()
                first_attempt.set()
                self._announce_up()
                try:
                    with self._work_scope:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._read_loop, pubsub)
                            nursery.start_soon(self._publish_loop, client, cluster)
                            nursery.start_soon(self._subscribe_loop, pubsub)
                            nursery.start_soon(self._presence_loop, client, inbox)
                finally:
                    self._up = False
                    self._listening_nodes = None
                    self._client = None
                    self._work_scope = None
                if self._stopping:
                    with trio.move_on_after(1):
                        await self._leave_presence(client)
                    # Nothing to unsubscribe from: the connection closes. (coredis
                    # 6.9's pub/sub clean-up would otherwise wait for its whole
                    # unsubscription_timeout, however fast the server answers.)
                    pubsub.channels.clear()

    def _announce_up(self) -> None:
        mode = "Redis Cluster, sharded pub/sub" if self._cluster else "pub/sub"
        if self._down_since is not None and self._connections > 1:
            logger.warning(
                "backplane %s: reconnected (%s) after an outage of %.1f s (since %s); "
                "resubscribed to %d channels",
                self._url_for_logs(),
                mode,
                time.time() - self._down_since,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._down_since)),
                len(self._subscriptions.active),
            )
        elif self._down_since is not None:
            logger.warning(
                "backplane %s: connected (%s) after being unreachable for %.1f s",
                self._url_for_logs(),
                mode,
                time.time() - self._down_since,
            )
        else:
            logger.info(
                "backplane %s: connected as node %s (%s)", self._url_for_logs(), self._node_id, mode
            )
        self._down_since = None

    # --- subscriptions ----------------------------------------------------------

    async def _reconcile_once(self, pubsub: Any) -> bool:
        """Send one batch of (un)subscriptions; False if there was nothing to send."""
        subscribe, unsubscribe = self._subscriptions.pending(self._batch_size)
        if not subscribe and not unsubscribe:
            return False
        if subscribe:
            await pubsub.subscribe(*subscribe)
        if unsubscribe:
            await pubsub.unsubscribe(*unsubscribe)
        self._subscriptions.confirmed(subscribe, unsubscribe)
        return True

    async def _reconcile_all(self, pubsub: Any) -> None:
        with trio.fail_after(self._timeout * 4):
            while await self._reconcile_once(pubsub):
                pass

    async def _subscribe_loop(self, pubsub: Any) -> NoReturn:
        while True:
            self._subscribe_wakeup = trio.Event()
            # What coredis holds: it forgets a channel the server unsubscribed.
            lost = self._subscriptions.lost(pubsub.channels)
            if lost:
                logger.warning(
                    "backplane: the server dropped %d subscriptions (%s); subscribing again",
                    len(lost),
                    b", ".join(lost[:5]).decode(errors="replace"),
                )
            if not await self._reconcile_once(pubsub):
                with trio.move_on_after(self._presence_interval):
                    await self._subscribe_wakeup.wait()

    # --- receiving ----------------------------------------------------------------

    async def _read_loop(self, pubsub: Any) -> NoReturn:
        """Decode what arrives and queue it for the hub, a batch per wake-up, never waiting.

        Everything coredis has parsed is taken at once (its stream's
        ``receive_nowait``), so that a burst stays a burst up to the hub.
        """
        stream = pubsub._receive_stream
        while True:
            batch = [await stream.receive()]
            while True:
                try:
                    batch.append(stream.receive_nowait())
                except anyio.WouldBlock:
                    break
            self._accept(batch)

    def _accept(self, batch: list[Any]) -> None:
        """Queue the envelopes among ``batch``'s pub/sub messages in the inbox."""
        inbox, node_id = self._inbox, self._node_id
        before = len(inbox)
        for message in batch:
            if not isinstance(message, bytes):
                continue  # a subscription's acknowledgement (see _consume_in_batches)
            data = message
            origin = envelope_origin(data)
            if origin == node_id:
                continue  # this node's own publish, already delivered locally
            self._received += 1
            if len(inbox) + self._delivering >= self._inbox_size:
                self._receive_drops += 1
                self._log_receive_drop(
                    logging.WARNING,
                    "backplane: the hub is behind, a message from %s dropped",
                    origin,
                )
                continue
            inbox.append(data)
        if len(inbox) > before:
            self._inbox_wakeup.set()

    def _decoded(self, batch: list[bytes]) -> Iterator[BackplaneMessage]:
        """The messages of ``batch``'s envelopes, decoded one at a time as the hub takes them."""
        for data in batch:
            try:
                origin, message = decode_envelope(data)
            except EnvelopeError as exc:
                self._receive_drops += 1
                self._log_receive_drop(logging.WARNING, "backplane: unreadable message: %s", exc)
                continue
            if origin != self._node_id:
                yield message

    async def _deliver_loop(self, inbox: BackplaneInbox) -> NoReturn:
        """Hand the hub everything queued, in order, a batch at a time.

        The batch counts against ``inbox_size`` until the hub has carried it
        out, so that at most ``inbox_size`` messages are held, waiting or
        being delivered.
        """
        while True:
            if not self._inbox:
                self._inbox_wakeup = trio.Event()
                await self._inbox_wakeup.wait()
                continue
            batch = list(self._inbox)
            self._inbox.clear()
            # Still counted against inbox_size until the hub is done with it.
            self._delivering = len(batch)
            try:
                await inbox.deliver_from_backplane(self._decoded(batch))
            except GatewayError as exc:  # the hub is shutting down
                self._receive_drops += len(batch)
                logger.debug("backplane: messages not delivered: %s", exc)
            finally:
                self._delivering = 0

    # --- publishing -------------------------------------------------------------

    async def _publish_loop(
        self, client: coredis.Redis[bytes] | coredis.RedisCluster[bytes], cluster: bool
    ) -> NoReturn:
        queue = self._queue
        while True:
            batch = queue.take(self._batch_size, self._batch_bytes)
            if not batch:
                self._publish_wakeup = trio.Event()
                await self._publish_wakeup.wait()
                continue
            try:
                with trio.fail_after(self._timeout):
                    async with client.pipeline(transaction=False) as pipe:
                        for channel, payload in batch:
                            if cluster:
                                pipe.spublish(channel, payload)
                            else:
                                pipe.publish(channel, payload)
            except BaseException:
                self._publish_drops += len(batch)
                raise
            self._published += len(batch)
            self._batches += 1

    # --- presence ---------------------------------------------------------------

    async def _presence_loop(
        self,
        client: coredis.Redis[bytes] | coredis.RedisCluster[bytes],
        inbox: BackplaneInbox,
    ) -> NoReturn:
        names = self._names
        ttl_ms = max(1, round(self._presence_ttl * 1000))
        count_listeners = not self._cluster
        while True:
            snapshot = orjson.dumps(
                {"node": self._node_id, "at": time.time(), "users": inbox.local_presence()}
            )
            with trio.fail_after(self._timeout):
                await client.set(names.presence(self._node_id), snapshot, px=ttl_ms)
                await client.sadd(names.nodes, [self._node_id])
                if count_listeners:
                    count_listeners = await self._count_listeners(client)
            await trio.sleep(self._presence_interval)

    async def _count_listeners(
        self, client: coredis.Redis[bytes] | coredis.RedisCluster[bytes]
    ) -> bool:
        """Count the nodes a broadcast reaches; False if the server refuses to say.

        The count only chooses the cheaper route, so a refusal (an ACL without
        ``pubsub``, a proxy without the command) must not cost the connection:
        sends to users stay on their users' channels for as long as it lasts.
        """
        channel = self._names.broadcast
        try:
            listeners = await client.pubsub_numsub(channel)
        except coredis.exceptions.ResponseError as exc:
            self._listening_nodes = None
            logger.warning(
                "backplane: PUBSUB NUMSUB refused (%s); messages to several users go "
                "per user channel",
                _describe(exc),
            )
            return False
        count = listeners.get(channel) if isinstance(listeners, dict) else None
        self._listening_nodes = count if isinstance(count, int) and count > 0 else None
        return True

    async def _leave_presence(
        self, client: coredis.Redis[bytes] | coredis.RedisCluster[bytes]
    ) -> None:
        names = self._names
        try:
            await client.delete([names.presence(self._node_id)])
            await client.srem(names.nodes, [self._node_id])
        except Exception as exc:  # the connection is what failed: the TTL will do it
            logger.debug("backplane: could not leave presence: %r", exc)


def _is_connection_error(exc: BaseException) -> bool:
    """True if ``exc`` (or every leaf of an exception group) is an expected connection failure."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_connection_error(e) for e in exc.exceptions)
    return isinstance(
        exc,
        coredis.exceptions.ConnectionError
        | TimeoutError
        | trio.TooSlowError
        | OSError
        | coredis.exceptions.ClusterError,
    )


def _describe(exc: BaseException) -> str:
    """The first leaf of ``exc`` as ``Type: message``, with its direct cause if it has one.

    coredis wraps what went wrong: a refused TLS certificate is a
    ``ConnectionError`` ("Unable to establish a connection") whose cause
    says "certificate verify failed"; without the cause it reads like an
    unreachable server.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text
