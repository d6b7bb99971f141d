"""The statistics history behind the dashboard's charts: the ring buffer, its rates, its sampler.

``History`` is pure (it is handed clock readings), so most of this is
synchronous; the sampler runs under trio's autojump clock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_gw._statistics import Counters, HubStatistics
from trio_gw.gateway._history import History, serve_history
from trio_gw.gateway._metrics import GatewayMetrics


def stats(connections: int = 0, **counters: int) -> HubStatistics:
    live = Counters(**counters)  # type: ignore[arg-type]
    return live.snapshot(connections=connections, users=min(connections, 1))


def test_the_first_reading_is_only_the_baseline() -> None:
    history = History()
    assert history.record(clock=0, unix_time=1000, statistics=stats(), backend_errors=0) is None
    assert history.samples() == []
    assert history.started == 1000


def test_rates_are_counter_growth_per_second_between_readings() -> None:
    history = History(interval=2, span=10)
    history.record(
        clock=10, unix_time=1000, statistics=stats(messages_in=5, drops=1), backend_errors=3
    )
    sample = history.record(
        clock=12,
        unix_time=1002,
        statistics=stats(3, messages_in=25, messages_out=8, drops=2, slow_consumer_closes=1),
        backend_errors=7,
    )
    assert sample is not None
    assert (sample.seq, sample.time, sample.connections, sample.users) == (1, 1002, 3, 1)
    assert (sample.messages_in_total, sample.messages_in_per_second) == (25, 10.0)
    assert (sample.messages_out_total, sample.messages_out_per_second) == (8, 4.0)
    assert (sample.drops_total, sample.drops_per_second) == (2, 0.5)
    assert sample.slow_consumer_closes_per_second == 0.5
    assert (sample.backend_errors_total, sample.backend_errors_per_second) == (7, 2.0)
    # The next rate is against this reading, not the baseline.
    after = history.record(
        clock=13, unix_time=1003, statistics=stats(messages_in=26), backend_errors=7
    )
    assert after is not None and after.messages_in_per_second == 1.0


def test_the_buffer_keeps_the_newest_capacity_samples_in_order() -> None:
    history = History(interval=5, span=60)
    assert history.capacity == 12
    for second in range(100):
        history.record(
            clock=second,
            unix_time=1000 + second,
            statistics=stats(second, messages_in=second * 2),
            backend_errors=0,
        )
    kept = history.samples()
    assert [s.seq for s in kept] == list(range(88, 100))
    assert [s.connections for s in kept] == list(range(88, 100))
    assert all(s.messages_in_per_second == 2.0 for s in kept)
    # ``after`` is for polling: only what is newer; nothing past the end; all below the start.
    assert [s.seq for s in history.samples(after=97)] == [98, 99]
    assert history.samples(after=99) == []
    assert history.samples(after=500) == []
    assert history.samples(after=3) == kept


def test_a_clock_that_did_not_move_gives_zero_rates() -> None:
    history = History()
    history.record(clock=5, unix_time=1, statistics=stats(), backend_errors=0)
    sample = history.record(clock=5, unix_time=1, statistics=stats(messages_in=9), backend_errors=0)
    assert sample is not None and sample.messages_in_per_second == 0.0


@pytest.mark.parametrize(("interval", "span"), [(0, 60), (-1, 60), (10, 5)])
def test_nonsense_intervals_are_refused(interval: float, span: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        History(interval=interval, span=span)


async def test_the_sampler_records_one_sample_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    history = History(interval=5, span=30)
    connections = [0]

    def statistics() -> HubStatistics:
        return stats(connections[0], messages_in=10 * connections[0])

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_history, history, statistics, lambda: 0)
        started = trio.current_time()
        assert history.samples() == []  # the baseline only
        for n in range(1, 10):
            connections[0] = n
            await trio.sleep_until(started + 5 * n + 0.5)
        nursery.cancel_scope.cancel()
    kept = history.samples()
    # 9 samples taken, 6 kept; each saw the value set during the interval before.
    assert [s.seq for s in kept] == [4, 5, 6, 7, 8, 9]
    assert [s.connections for s in kept] == [4, 5, 6, 7, 8, 9]
    assert all(s.messages_in_per_second == 2.0 for s in kept)


def test_the_backend_error_total_sums_every_code() -> None:
    metrics = GatewayMetrics(stats, backend_limit=4)
    assert metrics.backend_errors_total() == 0
    metrics.backend_errors.labels("backend_busy").inc()
    metrics.backend_errors.labels("backend_timeout").inc(2)
    assert metrics.backend_errors_total() == 3
