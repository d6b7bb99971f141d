"""The hub's Trio shell where it needs time, under trio's autojump clock.

The router decides when a credential expires and when a session is stuck
(``tests/test_router.py``, no trio). These check that the shell acts on those
decisions at the right time: the expiry task wakes for the earliest deadline,
and a sender waiting for a stuck session gets the router to close it once
``stall_timeout`` has passed. The clock is virtual, so a one-hour expiry and a
one-minute stall take no real time; the sockets are real (loopback, in this
process, so every byte sent is readable at once and the clock only jumps when
every task waits for time).
"""

from __future__ import annotations

import time

import trio
import trio.testing

from trio_gw import CloseCode, Handshake, Identity

from .conftest import running_hub
from .test_hostile import RawClient
from .test_session import port_of

# Virtual seconds: long, since the clock jumps over them. The raw clients never
# answer pings, so the heartbeat is off.
TIMEOUT = 24 * 3600
HOUR = 3600.0


async def expiring_authorizer(handshake: Handshake) -> Identity:
    """Token "<user>:<seconds>": the user's credentials expire that many seconds from now."""
    (token,) = handshake.query["token"]
    user, _, seconds = token.partition(":")
    return Identity(user_id=user, valid_until=time.time() + float(seconds))


async def test_credentials_expire_at_their_deadline_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(authorizer=expiring_authorizer, heartbeat_interval=0) as (hub, url):
            early = await RawClient.open(port_of(url), f"early:{HOUR}")
            late = await RawClient.open(port_of(url), f"late:{2 * HOUR}")
            start = trio.current_time()
            await early.closed_with(CloseCode.AUTH_EXPIRED)
            # Woken for the earlier deadline, not the later one.
            assert HOUR <= trio.current_time() - start < 2 * HOUR
            assert hub.get_handler(late.session_id) is not None
            await late.closed_with(CloseCode.AUTH_EXPIRED)
            assert trio.current_time() - start >= 2 * HOUR
            assert hub.statistics().connections == 0


async def test_a_refresh_moves_the_deadline_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(authorizer=expiring_authorizer, heartbeat_interval=0) as (hub, url):
            raw = await RawClient.open(port_of(url), f"u:{HOUR}")
            session = hub.get_handler(raw.session_id)
            assert session is not None
            start = trio.current_time()
            await trio.sleep(HOUR / 2)
            hub.refresh_identity(session, Identity(user_id="u", valid_until=time.time() + HOUR))
            await raw.closed_with(CloseCode.AUTH_EXPIRED)
            assert trio.current_time() - start >= 1.5 * HOUR


async def test_a_sender_waits_for_a_stuck_session_until_stall_timeout_then_it_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stall = 60.0
    with trio.fail_after(TIMEOUT):
        async with running_hub(
            outbound_queue_bytes=64 << 10,
            stall_timeout=stall,
            max_lag=10 * stall,
            heartbeat_interval=0,
        ) as (hub, url):
            stuck = await RawClient.open(port_of(url), "stuck", rcvbuf=4096)
            payload = "x" * 1024
            sent = 0
            start = trio.current_time()
            while hub.get_handler(stuck.session_id) is not None:
                await hub.send_message_to_all(payload)
                sent += 1
            # The sender waited (the hub is idle otherwise, so only the stall
            # deadline could end its wait), and then the session was closed.
            assert trio.current_time() - start >= stall
            stats = hub.statistics()
            assert stats.slow_consumer_closes == 1
            assert stats.sender_waits >= 1
            # It never held more than its cap, and the queue was let go.
            assert stats.queued_bytes == 0
            await stuck.closed_with(CloseCode.SLOW_CONSUMER)
            # The sender was not held back before the session passed its
            # high-water mark (half of 64 KiB, in 1 KiB messages).
            assert sent >= 32
