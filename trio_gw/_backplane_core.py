"""The Redis backplane's decisions, without I/O: channels, envelopes, batches, subscriptions.

``RedisBackplane`` (``_redis_backplane``) is a thin shell around this module:
it asks it which channel a message goes to and what bytes to publish, queues
publishes here, asks which subscriptions to send after a change or a
reconnect, and when to try again. Nothing here imports trio or coredis, so
all of it is tested with plain and hypothesis tests.

Routing by interest:

* a message to users goes to each user's channel (``<prefix>:u:<user_id>``),
  to which a node subscribes while it holds a session of that user; a message
  to more users goes once to the broadcast channel instead, where that is the
  cheaper route (see ``route``), and each node picks out its own sessions of
  those users;
* a message to a session goes to the channel of the node its id names
  (``<prefix>:n:<node_id>``);
* a message to everyone goes to the broadcast channel (``<prefix>:all``).

The envelope (``encode_envelope``) carries the WebSocket frame's wire bytes as
they are: the receiving node writes them to its sockets without re-encoding.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import attrs

from ._backplane import BackplaneClose, BackplaneDeliver, BackplaneMessage
from ._frames import Frame
from ._targets import Target, ToAll, ToSession, ToUsers, node_of

__all__ = [
    "Backoff",
    "ChannelNames",
    "EnvelopeError",
    "PublishQueue",
    "SentinelUrl",
    "Subscriptions",
    "decode_envelope",
    "encode_envelope",
    "envelope_origin",
    "route",
    "with_tls_defaults",
]

# --- channels -----------------------------------------------------------------


@attrs.frozen
class ChannelNames:
    """The names of the channels and keys one cluster of hub nodes shares.

    Args:
        prefix: Separates clusters that share one Redis (``trio-gw`` by default).
    """

    prefix: str = "trio-gw"

    def user(self, user_id: str) -> bytes:
        """The channel of one user's messages."""
        return f"{self.prefix}:u:{user_id}".encode()

    def node(self, node_id: str) -> bytes:
        """The channel of messages to sessions of one node."""
        return f"{self.prefix}:n:{node_id}".encode()

    @property
    def broadcast(self) -> bytes:
        """The channel every node subscribes to."""
        return f"{self.prefix}:all".encode()

    def presence(self, node_id: str) -> str:
        """The key of one node's presence snapshot (expires unless refreshed)."""
        return f"{self.prefix}:presence:{node_id}"

    @property
    def nodes(self) -> str:
        """The key of the set of node ids that have published presence."""
        return f"{self.prefix}:nodes"


def with_tls_defaults(url: str) -> str:
    """``url``, with the server's host name checked if it is a TLS URL that does not say.

    coredis 6.9 checks a ``rediss://`` server's certificate chain but, unless
    the URL has ``ssl_check_hostname=true``, not that the certificate names
    the host: any certificate from a trusted CA would pass. The backplane
    checks the name unless the URL says ``ssl_check_hostname`` or turns
    verification off (``ssl_cert_reqs=none``). As coredis reads the query,
    an empty value says nothing and the first non-empty one counts.
    """
    split = urlsplit(url)
    if split.scheme != "rediss":  # urlsplit lowercases it
        return url
    query = parse_qs(split.query)
    if "ssl_check_hostname" in query or query.get("ssl_cert_reqs", [""])[0] == "none":
        return url
    check = "ssl_check_hostname=true"
    return urlunsplit(split._replace(query=f"{split.query}&{check}" if split.query else check))


@attrs.frozen
class SentinelUrl:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name``, parsed.

    Attributes:
        sentinels: The Sentinel servers' ``(host, port)``, in the order given.
        service_name: The monitored primary's name (``sentinel monitor <name> ...``).
        username: For the primary, if given.
        password: For the primary, if given.
    """

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    SCHEME = "redis+sentinel"

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Parse a ``redis+sentinel://`` URL.

        Raises:
            ValueError: it is not one, or names no Sentinel or no service.
        """
        scheme, sep, rest = url.partition("://")
        if scheme != cls.SCHEME or not sep:
            raise ValueError(f"expected a {cls.SCHEME}:// URL, got {url!r}")
        netloc, _, path = rest.partition("/")
        credentials, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = credentials.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        sentinels = []
        for host_port in hosts.split(","):
            host, colon, port = host_port.rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port for each Sentinel, got {host_port!r}")
            sentinels.append((host.strip("[]"), int(port)))
        service = unquote(path.partition("?")[0]).strip("/")
        if not service:
            raise ValueError(f"expected the service name as the path, got {url!r}")
        return cls(tuple(sentinels), service, username, password)


# --- envelopes ----------------------------------------------------------------

_MAGIC = b"G\x01"
_DELIVER, _CLOSE = 1, 2
_TO_SESSION, _TO_USERS, _TO_ALL = 1, 2, 3
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class EnvelopeError(ValueError):
    """Bytes on a channel that are not an envelope of this version (the sender's fault)."""


def _put_str(out: bytearray, value: str) -> None:
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"id of {len(data)} bytes is too long for a backplane envelope")
    out += _U16.pack(len(data))
    out += data


def encode_envelope(origin: str, message: BackplaneMessage) -> bytes:
    """One message as the bytes published on a channel.

    Layout: the magic ``G`` and version 1, kind (1 deliver, 2 close), target kind (1 session,
    2 users, 3 all), the origin node id, the target, then for a delivery a
    text flag, the frame header's length and the frame's wire bytes; for a
    close the code and the reason. Strings are UTF-8 with a 16-bit length.

    Raises:
        ValueError: an id is longer than 65535 bytes.
    """
    out = bytearray(_MAGIC)
    kind = _DELIVER if isinstance(message, BackplaneDeliver) else _CLOSE
    target = message.target
    match target:
        case ToSession(session_id=session_id):
            out += bytes((kind, _TO_SESSION))
            _put_str(out, origin)
            _put_str(out, session_id)
        case ToUsers(user_ids=user_ids):
            out += bytes((kind, _TO_USERS))
            _put_str(out, origin)
            out += _U32.pack(len(user_ids))
            for user_id in sorted(user_ids):
                _put_str(out, user_id)
        case ToAll():
            out += bytes((kind, _TO_ALL))
            _put_str(out, origin)
    match message:
        case BackplaneDeliver(frame=frame):
            header = len(frame.wire) - len(frame.data)
            out += bytes((1 if frame.is_text else 0, header))
            out += frame.wire
        case BackplaneClose(code=code, reason=reason):
            out += _U16.pack(code)
            out += reason.encode("utf-8")
    return bytes(out)


class _Reader:
    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, n: int) -> bytes:
        end = self.offset + n
        if end > len(self.data):
            raise EnvelopeError("truncated envelope")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def u8(self) -> int:
        return int(_U8.unpack(self.take(1))[0])

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def string(self) -> str:
        try:
            return self.take(self.u16()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"an id is not UTF-8: {exc}") from None

    def rest(self) -> bytes:
        chunk = self.data[self.offset :]
        self.offset = len(self.data)
        return chunk


def decode_envelope(data: bytes) -> tuple[str, BackplaneMessage]:
    """The origin node id and the message of ``encode_envelope``'s bytes.

    Raises:
        EnvelopeError: the bytes are not an envelope of this version.
    """
    if data[:2] != _MAGIC:
        raise EnvelopeError(f"not a trio-gw envelope (starts {data[:2]!r})")
    reader = _Reader(data)
    reader.offset = 2
    kind = reader.u8()
    target_kind = reader.u8()
    origin = reader.string()
    target: Target
    if target_kind == _TO_SESSION:
        target = ToSession(reader.string())
    elif target_kind == _TO_USERS:
        count = reader.u32()
        if count > len(data):
            raise EnvelopeError(f"user count {count} exceeds the envelope")
        target = ToUsers(frozenset(reader.string() for _ in range(count)))
    elif target_kind == _TO_ALL:
        target = ToAll()
    else:
        raise EnvelopeError(f"unknown target kind {target_kind}")
    if kind == _DELIVER:
        is_text = reader.u8()
        header = reader.u8()
        wire = reader.rest()
        if is_text not in (0, 1) or not 2 <= header <= 10 or header > len(wire):
            raise EnvelopeError("bad frame in envelope")
        return origin, BackplaneDeliver(target, Frame(wire[header:], is_text == 1, wire))
    if kind == _CLOSE:
        code = reader.u16()
        try:
            reason = reader.rest().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"close reason is not UTF-8: {exc}") from None
        return origin, BackplaneClose(target, code, reason)
    raise EnvelopeError(f"unknown message kind {kind}")


def envelope_origin(data: bytes) -> str | None:
    """The origin node id of an envelope, read without decoding the rest; None if unreadable.

    A node subscribed to a user's channel hears its own publishes to that user
    too (pub/sub has no "not to myself"); this tells them apart cheaply.
    """
    if data[:2] != _MAGIC or len(data) < 6:
        return None
    end = 6 + int(_U16.unpack_from(data, 4)[0])
    if end > len(data):
        return None
    try:
        return data[6:end].decode("utf-8")
    except UnicodeDecodeError:
        return None


def route(
    message: BackplaneMessage,
    origin: str,
    names: ChannelNames,
    *,
    fanout_threshold: int = 64,
    listening_nodes: int | None = None,
) -> list[tuple[bytes, bytes]]:
    """The ``(channel, payload)`` pairs that carry ``message`` to the nodes concerned.

    A message to users is split into one envelope per user channel, each
    naming only that user, so that a node subscribed to several of them
    delivers to each session once. It goes once to the broadcast channel
    instead, with the whole list, when that is cheaper: past
    ``fanout_threshold`` users, or when it names at least ``listening_nodes``
    users (the nodes a broadcast reaches, this one included, if known). Per
    user channel, the message costs a publish per user, read by each node
    that holds a session of that user; on the broadcast channel, one publish
    that each listening node reads once, whether it holds those users or not.
    A session id that names no node goes nowhere (an empty list).
    """
    target = message.target
    match target:
        case ToSession(session_id=session_id):
            node = node_of(session_id)
            if node is None or node == origin:
                return []
            return [(names.node(node), encode_envelope(origin, message))]
        case ToUsers(user_ids=user_ids):
            if len(user_ids) > fanout_threshold or (
                listening_nodes is not None and len(user_ids) >= listening_nodes
            ):
                return [(names.broadcast, encode_envelope(origin, message))]
            return [
                (
                    names.user(user_id),
                    encode_envelope(
                        origin, attrs.evolve(message, target=ToUsers(frozenset((user_id,))))
                    ),
                )
                for user_id in sorted(user_ids)
            ]
        case ToAll():
            return [(names.broadcast, encode_envelope(origin, message))]
    raise AssertionError(f"unknown target {target!r}")  # pragma: no cover


# --- publish queue ------------------------------------------------------------


@attrs.define
class PublishQueue:
    """Publishes waiting for the next pipelined batch, bounded in messages and bytes.

    A message is what the hub handed over (``offer``): the publishes that
    ``route`` made of it, one per user channel for a message to a few users.
    The bound counts messages, as the hub does, so that a burst of messages
    to ten users each takes as much of it as a burst to one user each; the
    bytes bound keeps the memory in check whatever the split.

    Args:
        max_messages: The most messages held.
        max_bytes: The most payload bytes held.
    """

    max_messages: int
    max_bytes: int
    _items: deque[tuple[bytes, bytes]] = attrs.field(factory=deque, init=False)
    # Publishes left in each message held, oldest first.
    _messages: deque[int] = attrs.field(factory=deque, init=False)
    _bytes: int = attrs.field(default=0, init=False)

    def __len__(self) -> int:
        """Publishes held (a message to several user channels holds several)."""
        return len(self._items)

    @property
    def queued_messages(self) -> int:
        """Messages held now, including one partly taken."""
        return len(self._messages)

    @property
    def queued_bytes(self) -> int:
        """Payload bytes held now."""
        return self._bytes

    def offer(self, items: list[tuple[bytes, bytes]]) -> bool:
        """Queue all of ``items`` (one message), or none if they do not fit; True if queued."""
        if not items:
            return True
        size = sum(len(payload) for _, payload in items)
        if len(self._messages) >= self.max_messages or self._bytes + size > self.max_bytes:
            return False
        self._items.extend(items)
        self._messages.append(len(items))
        self._bytes += size
        return True

    def take(self, max_messages: int, max_bytes: int) -> list[tuple[bytes, bytes]]:
        """The next batch, oldest first: at least one publish if any, then up to both limits.

        ``max_messages`` counts publishes: one per round-trip command.
        """
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        items, messages = self._items, self._messages
        while items and len(batch) < max_messages:
            channel, payload = items[0]
            if batch and size + len(payload) > max_bytes:
                break
            items.popleft()
            batch.append((channel, payload))
            size += len(payload)
            messages[0] -= 1
            if not messages[0]:
                messages.popleft()
        self._bytes -= size
        return batch

    def clear(self) -> int:
        """Drop everything held (the connection is down); returns how many publishes."""
        dropped = len(self._items)
        self._items.clear()
        self._messages.clear()
        self._bytes = 0
        return dropped


# --- subscriptions ------------------------------------------------------------


@attrs.define
class Subscriptions:
    """Which channels this node wants, which the server has confirmed, and what to send.

    The shell reconciles: ``pending`` says what to (un)subscribe, the shell
    sends it and reports back with ``confirmed``; after a reconnect ``reset``
    forgets the server's side, so that everything still wanted is sent again.

    Args:
        fixed: Channels wanted for as long as the node runs (its own, broadcast).
    """

    fixed: frozenset[bytes]
    _wanted: set[bytes] = attrs.field(init=False)
    _active: set[bytes] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self._wanted = set(self.fixed)

    @property
    def wanted(self) -> frozenset[bytes]:
        """Every channel this node needs now."""
        return frozenset(self._wanted)

    @property
    def active(self) -> frozenset[bytes]:
        """Every channel the server has confirmed on the current connection."""
        return frozenset(self._active)

    @property
    def in_sync(self) -> bool:
        """True when the server holds exactly the wanted channels."""
        return self._wanted == self._active

    def want(self, channel: bytes) -> None:
        """Subscribe to ``channel`` at the next reconciliation."""
        self._wanted.add(channel)

    def unwant(self, channel: bytes) -> None:
        """Unsubscribe from ``channel`` at the next reconciliation (fixed channels stay)."""
        if channel not in self.fixed:
            self._wanted.discard(channel)

    def pending(self, max_channels: int) -> tuple[list[bytes], list[bytes]]:
        """Up to ``max_channels`` channels to subscribe to, and up to as many to leave."""
        subscribe = sorted(self._wanted - self._active)[:max_channels]
        unsubscribe = sorted(self._active - self._wanted)[:max_channels]
        return subscribe, unsubscribe

    def confirmed(self, subscribed: Iterable[bytes], unsubscribed: Iterable[bytes]) -> None:
        """The server acknowledged these (un)subscriptions."""
        self._active.update(subscribed)
        self._active.difference_update(unsubscribed)

    def lost(self, held: Iterable[bytes]) -> list[bytes]:
        """The server holds only ``held`` now: forget the others, so that they are sent again.

        A server may drop subscriptions on a connection that stays up (a
        Redis Cluster moving a slot unsubscribes its shard channels); a node
        that did not notice would stay "healthy" and deaf.

        Returns:
            The channels this node thought it held and no longer does, sorted.
        """
        gone = sorted(self._active - set(held))
        self._active.difference_update(gone)
        return gone

    def reset(self) -> None:
        """The connection was lost: the new one holds no subscriptions yet."""
        self._active.clear()


# --- reconnecting -------------------------------------------------------------


@attrs.define
class Backoff:
    """Delays between reconnection attempts: doubling from ``initial`` up to ``maximum``.

    Args:
        initial: The first delay, in seconds.
        maximum: The largest delay, in seconds.
        jitter: Maps a delay to the one used (e.g. a random fraction of it);
            identity by default, so that tests are deterministic.
    """

    initial: float
    maximum: float
    jitter: Callable[[float], float] = lambda delay: delay
    _next: float = attrs.field(default=0.0, init=False)

    def __attrs_post_init__(self) -> None:
        self._next = self.initial

    def delay(self) -> float:
        """The delay before the next attempt; each call doubles the following one."""
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return self.jitter(delay)

    def reset(self) -> None:
        """A connection succeeded: start again from ``initial`` next time."""
        self._next = self.initial
