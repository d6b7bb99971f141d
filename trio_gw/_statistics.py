"""Counters the hub keeps, and the frozen snapshot ``statistics()`` returns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

import attrs

__all__ = ["HubStatistics"]


@attrs.frozen(kw_only=True)
class HubStatistics:
    """A snapshot of one hub node's counters. Counters only grow; gauges are "now".

    Attributes:
        connections: Registered sessions now (gauge).
        users: Users with at least one session now (gauge).
        peak_connections: The most sessions registered at once (nuropb_gw's
            ``_max_concurrent_connections``).
        handshakes_in_progress: Connections that hold a slot but are not registered yet (gauge).
        sessions_opened: Sessions registered since start.
        sessions_closed: Sessions unregistered since start.
        messages_in: Client messages received.
        bytes_in: Payload bytes of client messages received.
        messages_out: Messages written to client sockets.
        bytes_out: Bytes (frames included) written to client sockets.
        drops: Messages not delivered: to an unknown or closing session, or
            left in the queue of a connection closed as a slow consumer.
        slow_consumer_closes: Connections closed because their outbound queue overflowed.
        rejected_handshakes: Handshakes refused before the upgrade, by reason.
        closes_by_code: Ended connections, by the close code the connection ended with.
        callback_errors: Backend callbacks (and tasks run on a session's behalf) that raised.
        bad_messages: Client messages that were not valid JSON.
        connection_errors: Connections ended by an unexpected error in the hub
            or a library under it; each is logged once and closed with 1011.
        handshakes_aborted: Connections whose peer left, reset or broke TLS
            before the opening handshake was answered. (Malformed upgrades are
            ``rejected_handshakes["bad_request"]``.)
        accept_errors: ``accept()`` calls that failed for lack of file
            descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    """

    connections: int
    users: int
    peak_connections: int
    handshakes_in_progress: int
    sessions_opened: int
    sessions_closed: int
    messages_in: int
    bytes_in: int
    messages_out: int
    bytes_out: int
    drops: int
    slow_consumer_closes: int
    rejected_handshakes: Mapping[str, int]
    closes_by_code: Mapping[int, int]
    callback_errors: int
    bad_messages: int
    connection_errors: int
    handshakes_aborted: int
    accept_errors: int

    @property
    def rejected_handshakes_total(self) -> int:
        """All refused handshakes, whatever the reason."""
        return sum(self.rejected_handshakes.values())


@attrs.define
class Counters:
    """The live, mutable counters; only the hub's own tasks touch them."""

    peak_connections: int = 0
    handshakes_in_progress: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    drops: int = 0
    slow_consumer_closes: int = 0
    rejected_handshakes: Counter[str] = attrs.field(factory=Counter)
    closes_by_code: Counter[int] = attrs.field(factory=Counter)
    callback_errors: int = 0
    bad_messages: int = 0
    connection_errors: int = 0
    handshakes_aborted: int = 0
    accept_errors: int = 0

    def snapshot(self, *, connections: int, users: int) -> HubStatistics:
        """Freeze the counters, with the registry's gauges."""
        return HubStatistics(
            connections=connections,
            users=users,
            peak_connections=self.peak_connections,
            handshakes_in_progress=self.handshakes_in_progress,
            sessions_opened=self.sessions_opened,
            sessions_closed=self.sessions_closed,
            messages_in=self.messages_in,
            bytes_in=self.bytes_in,
            messages_out=self.messages_out,
            bytes_out=self.bytes_out,
            drops=self.drops,
            slow_consumer_closes=self.slow_consumer_closes,
            rejected_handshakes=MappingProxyType(dict(self.rejected_handshakes)),
            closes_by_code=MappingProxyType(dict(self.closes_by_code)),
            callback_errors=self.callback_errors,
            bad_messages=self.bad_messages,
            connection_errors=self.connection_errors,
            handshakes_aborted=self.handshakes_aborted,
            accept_errors=self.accept_errors,
        )
