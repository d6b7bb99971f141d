"""Prometheus metrics for the standalone gateway (prometheus-client).

The hub's own counters are read from ``statistics()`` when Prometheus scrapes,
so the hot path pays nothing for them; only the gateway's backend calls and
admin refusals are recorded as they happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._statistics import STATISTICS, HubStatistics

if TYPE_CHECKING:
    from .._redis_backplane import BackplaneStatistics
    from ._jwt import JwksStatistics

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

#: The text exposition format's media type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Backend calls of a WebSocket gateway are usually 1 ms - 10 s.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _HubCollector(Collector):
    """Turns one ``HubStatistics`` snapshot per scrape into metric families."""

    def __init__(self, statistics: Callable[[], HubStatistics]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        s = self._statistics()
        for statistic in STATISTICS:
            name, value = f"trio_gw_{statistic.metric}", getattr(s, statistic.name)
            if statistic.kind == "gauge":
                yield GaugeMetricFamily(name, statistic.help, value)
            elif statistic.kind == "counter":
                yield CounterMetricFamily(name, statistic.help, value)
            else:
                assert statistic.label is not None
                family = CounterMetricFamily(name, statistic.help, labels=[statistic.label])
                for key, count in sorted(value.items()):
                    family.add_metric([str(key)], count)
                yield family


class _JwksCollector(Collector):
    """The ``auth.jwks_url`` key set and its fetches, read from the verifier per scrape."""

    def __init__(self, statistics: Callable[[], JwksStatistics]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        s = self._statistics()
        yield CounterMetricFamily("trio_gw_jwks_fetches", "Fetches of auth.jwks_url.", s.fetches)
        yield CounterMetricFamily(
            "trio_gw_jwks_fetch_errors",
            "Fetches of auth.jwks_url that failed (the last good key set stays in use).",
            s.fetch_errors,
        )
        yield GaugeMetricFamily("trio_gw_jwks_keys", "Signing keys in the set in use.", s.keys)
        if s.loaded_at is not None:
            yield GaugeMetricFamily(
                "trio_gw_jwks_age_seconds",
                "Seconds since auth.jwks_url was last fetched successfully.",
                max(0.0, time.time() - s.loaded_at),
            )


class _BackplaneCollector(Collector):
    """The Redis backplane's state and counters, read per scrape."""

    def __init__(self, statistics: Callable[[], BackplaneStatistics]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        s = self._statistics()
        yield GaugeMetricFamily(
            "trio_gw_backplane_up",
            "1 while the backplane is connected and its subscriber listens, else 0.",
            1 if s.state == "up" else 0,
        )
        for name, help_text, value in (
            ("reconnects", "Backplane connections made after the first.", s.reconnects),
            ("outages", "Times the backplane connection was lost.", s.outages),
            ("published", "Envelopes published to other nodes.", s.published),
            ("publish_batches", "Pipelined round trips that published them.", s.publish_batches),
            (
                "publish_drops",
                "Messages for other nodes dropped: backplane down, queue full, or batch lost.",
                s.publish_drops,
            ),
            ("received", "Envelopes received from other nodes.", s.received),
            (
                "receive_drops",
                "Envelopes from other nodes dropped (hub inbox full, or unreadable).",
                s.receive_drops,
            ),
        ):
            yield CounterMetricFamily(f"trio_gw_backplane_{name}", help_text, value)
        yield GaugeMetricFamily(
            "trio_gw_backplane_subscriptions",
            "Channels the server has confirmed for this node now.",
            s.subscriptions,
        )
        yield GaugeMetricFamily(
            "trio_gw_backplane_queued_publishes",
            "Publishes waiting for the next batch now.",
            s.queued_publishes,
        )
        yield GaugeMetricFamily(
            "trio_gw_backplane_listening_nodes",
            "Nodes a broadcast reaches, as last counted; 0 if unknown (a Redis Cluster, "
            "a server that refuses PUBSUB NUMSUB, or not counted yet).",
            s.listening_nodes or 0,
        )


class GatewayMetrics:
    """The gateway's metrics, in a registry of its own (not prometheus-client's global one).

    Args:
        statistics: The hub's ``statistics`` method, called once per scrape.
        backend_limit: ``backend.max_inflight``, exported so that the bound is visible.
    """

    def __init__(self, statistics: Callable[[], HubStatistics], backend_limit: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_HubCollector(statistics))
        self.backend_latency = Histogram(
            "trio_gw_backend_call_seconds",
            "Backend call latency, by outcome.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "trio_gw_backend_errors",
            "Requests answered with an error instead of a backend result, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.backend_inflight = Gauge(
            "trio_gw_backend_inflight", "Backend calls in flight now.", registry=self.registry
        )
        limit = Gauge(
            "trio_gw_backend_inflight_limit",
            "The most backend calls allowed in flight at once (backend.max_inflight).",
            registry=self.registry,
        )
        limit.set(backend_limit)
        self.auth_refreshes = Counter(
            "trio_gw_auth_refreshes",
            "Token refreshes sent by clients, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.admin_refused = Counter(
            "trio_gw_admin_refused",
            "Admin API requests refused for a missing or wrong API key.",
            registry=self.registry,
        )

    def backend_errors_total(self) -> int:
        """Requests answered with an error instead of a backend result so far, any code."""
        return round(
            sum(
                sample.value
                for family in self.backend_errors.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
            )
        )

    def watch_jwks(self, statistics: Callable[[], JwksStatistics]) -> None:
        """Export the ``auth.jwks_url`` metrics, reading ``statistics()`` at each scrape."""
        self.registry.register(_JwksCollector(statistics))

    def watch_backplane(self, statistics: Callable[[], BackplaneStatistics]) -> None:
        """Export the Redis backplane's metrics, reading ``statistics()`` at each scrape."""
        self.registry.register(_BackplaneCollector(statistics))

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)
