"""The last 15 minutes of the gateway's statistics, for the dashboard's charts.

A sampler task (``serve_history``) reads ``hub.statistics()`` and the backend
error total once per ``interval`` and hands the reading to a ``History``: a
bounded ring buffer (``capacity`` samples, 900 by default: 15 minutes at one a
second) that turns counter totals into per-second rates by the difference with
the reading before. The sampler only reads snapshots, so the message path pays
nothing for it.

``History`` imports no trio: it is given the clock readings, and is tested
with plain synchronous tests; ``serve_history`` is the thin shell that sleeps.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import NoReturn

import attrs
import trio

from .._statistics import HubStatistics

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_SPAN", "History", "Sample", "serve_history"]

#: Seconds between two samples.
DEFAULT_INTERVAL = 1.0
#: Seconds of history kept.
DEFAULT_SPAN = 15 * 60.0


@attrs.frozen(kw_only=True)
class Sample:
    """One point of the history. Gauges are "at ``time``"; rates are over the interval before.

    Attributes:
        seq: Position in this history, from 1 up, without gaps.
        time: Unix time of the reading.
        connections: Registered sessions (gauge).
        users: Users with at least one session (gauge).
        messages_in_total: Client messages received since start (and so on for
            each ``*_total``: the counter as read).
        messages_in_per_second: ``messages_in_total``'s growth since the sample
            before, per second (and so on for each ``*_per_second``).
    """

    seq: int
    time: float
    connections: int
    users: int
    messages_in_total: int
    messages_out_total: int
    drops_total: int
    slow_consumer_closes_total: int
    backend_errors_total: int
    messages_in_per_second: float
    messages_out_per_second: float
    drops_per_second: float
    slow_consumer_closes_per_second: float
    backend_errors_per_second: float


@attrs.define
class History:
    """A ring buffer of ``Sample``: the newest ``capacity`` of them, oldest first.

    Args:
        interval: Seconds between samples (what the sampler sleeps).
        span: Seconds of history to keep; ``capacity`` is ``span / interval``.

    Resource handling:
        Memory is bounded: a sample past ``capacity`` pushes out the oldest.
    """

    interval: float = DEFAULT_INTERVAL
    span: float = DEFAULT_SPAN
    #: Unix time of the first reading (the baseline); None until then.
    started: float | None = attrs.field(default=None, init=False)
    _samples: deque[Sample] = attrs.field(init=False)
    _last_clock: float = attrs.field(default=0.0, init=False)
    _last_totals: tuple[int, ...] = attrs.field(default=(), init=False)
    _seq: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if not (self.interval > 0 and self.span >= self.interval):
            raise ValueError(
                f"History: expected 0 < interval <= span, got {self.interval=}, {self.span=}"
            )
        self._samples = deque(maxlen=self.capacity)

    @property
    def capacity(self) -> int:
        """The most samples kept."""
        return round(self.span / self.interval)

    def record(
        self, *, clock: float, unix_time: float, statistics: HubStatistics, backend_errors: int
    ) -> Sample | None:
        """Add the sample for one reading; the first reading is only the baseline.

        Args:
            clock: A monotonic clock reading (seconds), for the rates.
            unix_time: The time of the reading, shown on the charts.
            statistics: The hub's snapshot.
            backend_errors: Requests answered with a backend error so far.

        Returns:
            The sample added, or None for the first reading.
        """
        # The counters charted as rates, in Sample's order.
        totals = (
            statistics.messages_in,
            statistics.messages_out,
            statistics.drops,
            statistics.slow_consumer_closes,
            backend_errors,
        )
        previous, elapsed = self._last_totals, clock - self._last_clock
        self._last_totals, self._last_clock = totals, clock
        if self.started is None:
            self.started = unix_time
            return None
        rates = [
            round((now - before) / elapsed, 3) if elapsed > 0 else 0.0
            for now, before in zip(totals, previous, strict=True)
        ]
        self._seq += 1
        sample = Sample(
            seq=self._seq,
            time=unix_time,
            connections=statistics.connections,
            users=statistics.users,
            messages_in_total=totals[0],
            messages_out_total=totals[1],
            drops_total=totals[2],
            slow_consumer_closes_total=totals[3],
            backend_errors_total=totals[4],
            messages_in_per_second=rates[0],
            messages_out_per_second=rates[1],
            drops_per_second=rates[2],
            slow_consumer_closes_per_second=rates[3],
            backend_errors_per_second=rates[4],
        )
        self._samples.append(sample)
        return sample

    def samples(self, after: int = 0) -> list[Sample]:
        """The samples kept whose ``seq`` is greater than ``after``, oldest first."""
        if not self._samples:
            return []
        skip = max(0, after + 1 - self._samples[0].seq)
        return list(itertools.islice(self._samples, skip, None))


async def serve_history(
    history: History,
    statistics: Callable[[], HubStatistics],
    backend_errors: Callable[[], int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Record a sample into ``history`` every ``history.interval`` seconds, until cancelled.

    Reports started once the baseline is read, so that the first sample
    comes one interval later. If the process falls more than an interval
    behind (a suspended VM, say), it skips the missed samples rather than
    recording a burst of them.

    Args:
        history: Where the samples go.
        statistics: The hub's ``statistics`` method.
        backend_errors: Returns the gateway's backend error total.
        task_status: Started (with None) once the baseline is read.
    """

    def read() -> None:
        history.record(
            clock=trio.current_time(),
            unix_time=time.time(),
            statistics=statistics(),
            backend_errors=backend_errors(),
        )

    read()
    task_status.started()
    deadline = trio.current_time()
    while True:
        deadline += history.interval
        await trio.sleep_until(deadline)
        now = trio.current_time()
        if now - deadline > history.interval:
            deadline = now
        read()
