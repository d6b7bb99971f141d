"""Counters the hub keeps, and the frozen snapshot ``statistics()`` returns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

__all__ = ["STATISTICS", "HubStatistics", "Statistic", "statistics_document"]


# Each statistic is declared once, below: its name, type, meaning and how it is
# exported. The Prometheus collector, the admin API's document and its OpenAPI
# schema are derived from these declarations (``STATISTICS``).


@attrs.frozen
class Statistic:
    """How one field of ``HubStatistics`` is exported.

    Attributes:
        name: The field's name.
        kind: ``gauge``, ``counter``, or ``by_label`` (a counter per label value).
        help: The metric's help text.
        metric: The Prometheus name, without ``trio_gw_`` and ``_total``.
        label: The label of a ``by_label`` counter.
    """

    name: str
    kind: str
    help: str
    metric: str
    label: str | None = None


def _gauge(help_text: str) -> Any:
    return attrs.field(metadata={"kind": "gauge", "help": help_text})


def _counter(help_text: str) -> Any:
    return attrs.field(metadata={"kind": "counter", "help": help_text})


def _by_label(metric: str, label: str, help_text: str) -> Any:
    return attrs.field(
        metadata={"kind": "by_label", "help": help_text, "metric": metric, "label": label}
    )


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
        queued_bytes: Bytes queued for all sessions now (gauge); flow control keeps
            it near ``queued_bytes_budget``.
        slow_consumer_closes: Connections closed as slow consumers (4008): a
            message did not fit in the queue, or a session whose queue was over
            half full took no write for ``stall_timeout`` or lagged ``max_lag``.
        sender_waits: Sends that waited for flow control: for a session over
            half full to drain, or for the queues to drain below the budget.
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

    connections: int = _gauge("Registered sessions now.")
    users: int = _gauge("Users with at least one session now.")
    peak_connections: int = _gauge("The most sessions registered at once.")
    handshakes_in_progress: int = _gauge("Connections holding a slot, not registered yet.")
    sessions_opened: int = _counter("Sessions registered.")
    sessions_closed: int = _counter("Sessions unregistered.")
    messages_in: int = _counter("Client messages received.")
    bytes_in: int = _counter("Payload bytes of client messages received.")
    messages_out: int = _counter("Messages written to client sockets.")
    bytes_out: int = _counter("Bytes written to client sockets, framing included.")
    drops: int = _counter("Messages never delivered or written, whatever the reason.")
    queued_bytes: int = _gauge("Bytes queued for all sessions now.")
    slow_consumer_closes: int = _counter(
        "Connections closed as slow consumers (queue full, stalled or lagging)."
    )
    sender_waits: int = _counter("Sends that waited for a slow session or the queue budget.")
    rejected_handshakes: Mapping[str, int] = _by_label(
        "rejected_handshakes", "reason", "Handshakes refused before the upgrade."
    )
    closes_by_code: Mapping[int, int] = _by_label(
        "closes", "code", "Ended connections by close code."
    )
    callback_errors: int = _counter("Message handler calls (and session tasks) that raised.")
    bad_messages: int = _counter("Client messages that were not valid JSON.")
    connection_errors: int = _counter(
        "Connections ended by an unexpected error (logged, closed with 1011)."
    )
    handshakes_aborted: int = _counter(
        "Connections whose peer left before the opening handshake was answered."
    )
    accept_errors: int = _counter("accept() failures for lack of descriptors or memory.")

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
    sender_waits: int = 0
    rejected_handshakes: Counter[str] = attrs.field(factory=Counter)
    closes_by_code: Counter[int] = attrs.field(factory=Counter)
    callback_errors: int = 0
    bad_messages: int = 0
    connection_errors: int = 0
    handshakes_aborted: int = 0
    accept_errors: int = 0

    def snapshot(self, *, connections: int, users: int, queued_bytes: int = 0) -> HubStatistics:
        """Freeze the counters, with the registry's and the queues' gauges."""
        values: dict[str, Any] = {}
        for field in _COUNTER_FIELDS:
            value = getattr(self, field)
            values[field] = MappingProxyType(dict(value)) if isinstance(value, Counter) else value
        return HubStatistics(
            connections=connections, users=users, queued_bytes=queued_bytes, **values
        )


#: Every statistic, in declaration order.
STATISTICS: tuple[Statistic, ...] = tuple(
    Statistic(
        name=field.name,
        kind=field.metadata["kind"],
        help=field.metadata["help"],
        metric=field.metadata.get("metric", field.name),
        label=field.metadata.get("label"),
    )
    for field in attrs.fields(HubStatistics)
)
# What Counters keeps: everything but the registry's and the queues' gauges.
_COUNTER_FIELDS = tuple(field.name for field in attrs.fields(Counters))


def statistics_document(statistics: HubStatistics) -> dict[str, Any]:
    """``statistics`` as plain JSON data (label values as strings), for the admin API."""
    document: dict[str, Any] = {}
    for statistic in STATISTICS:
        value = getattr(statistics, statistic.name)
        if statistic.kind == "by_label":
            value = {str(key): count for key, count in value.items()}
        document[statistic.name] = value
    return document
