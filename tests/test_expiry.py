"""Identity expiry in the hub itself: ``Identity.valid_until`` and ``refresh_identity``.

Expiry is driven by moving trio's clock, not by waiting: the hub turns
``valid_until`` (Unix time) into a deadline on trio's clock, and the ``clock``
fixture below runs at real speed (real sockets need that) but can be jumped
forward. So a validity of ten minutes never passes on its own during a test,
however slow the machine, and passes at once when the test jumps the clock.
"""

from __future__ import annotations

import time

import pytest
import trio
from trio.testing import MockClock
from trio_websocket import ConnectionClosed

from trio_gw import CloseCode, Handshake, Identity, extract_token

from .conftest import TIMEOUT, client, receive_json, running_hub, wait_for

#: Longer than any machine takes to connect the clients and refresh one of them.
VALIDITY = 600.0


@pytest.fixture
def clock() -> MockClock:
    """Trio's clock at real speed (timeouts still guard I/O) that a test can jump forward.

    pytest-trio runs a test with any ``trio.abc.Clock`` fixture it takes.
    """
    return MockClock(rate=1.0)


async def expiring_authorizer(handshake: Handshake) -> Identity | None:
    """Token "<user>:<seconds>": that user, valid for that long."""
    user, _, seconds = (extract_token(handshake) or "").partition(":")
    return Identity(user, valid_until=time.time() + float(seconds)) if user else None


async def test_expired_sessions_close_with_4005_unless_refreshed(clock: MockClock) -> None:
    with trio.fail_after(TIMEOUT) as guard:
        async with (
            # No heartbeat: the clock jump below must not count as a missed pong.
            running_hub(authorizer=expiring_authorizer, heartbeat_interval=0) as (hub, url),
            # "kept" would lapse before "lapsing" does, so by the time "lapsing"
            # is closed the hub has passed kept's first deadline too.
            client(url, f"kept:{VALIDITY / 2}") as (kept, kept_hello),
            client(url, f"lapsing:{VALIDITY}") as (lapsing, lapsing_hello),
            client(url, f"forever:{100 * VALIDITY}") as (forever, _),
        ):
            session = hub.get_handler(kept_hello["session_id"])
            assert session is not None
            hub.refresh_identity(session, Identity("kept", valid_until=time.time() + 10 * VALIDITY))
            # Nothing has lapsed yet: trio's clock is far from any deadline.
            assert hub.get_handler(lapsing_hello["session_id"]) is not None
            assert hub.statistics().closes_by_code.get(CloseCode.AUTH_EXPIRED) is None
            # Past the deadlines of both tokens, short of the refreshed one's. The
            # jump is not time the test took, so the hang guard moves with it.
            clock.jump(VALIDITY)
            guard.deadline += VALIDITY
            with pytest.raises(ConnectionClosed) as closed:
                await lapsing.get_message()
            assert closed.value.reason.code == CloseCode.AUTH_EXPIRED
            # The refreshed and the long-lived sessions outlive that deadline.
            await hub.send_message_to_user_ids(["kept", "forever"], "still here")
            assert await kept.get_message() == "still here"
            assert await forever.get_message() == "still here"
            await wait_for(lambda: hub.statistics().closes_by_code.get(4005) == 1)
            assert set(hub.user_ids()) == {"kept", "forever"}


async def test_refresh_for_another_user_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(authorizer=expiring_authorizer) as (hub, url),
            client(url, "alice:1000") as (ws, hello),
        ):
            session = hub.get_handler(hello["session_id"])
            assert session is not None
            with pytest.raises(ValueError, match="belongs to 'alice'"):
                hub.refresh_identity(session, Identity("mallory"))
            assert session.user_id == "alice"
            await hub.send_message(session.session_id, {"ok": 1})
            assert await receive_json(ws) == {"ok": 1}


async def test_many_refreshes_keep_the_timer_queue_bounded() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(authorizer=expiring_authorizer) as (hub, url),
            client(url, "alice:1000") as (_, hello),
        ):
            session = hub.get_handler(hello["session_id"])
            assert session is not None
            for i in range(5000):
                hub.refresh_identity(session, Identity("alice", valid_until=time.time() + 2000 + i))
            # Stale entries are swept once they outnumber the live sessions.
            assert len(hub._router._expiries) <= 2 * hub.statistics().connections + 1025
