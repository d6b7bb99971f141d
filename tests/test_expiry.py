"""Identity expiry in the hub itself: ``Identity.valid_until`` and ``refresh_identity``."""

from __future__ import annotations

import time

import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_gw import CloseCode, Handshake, Identity, extract_token

from .conftest import TIMEOUT, client, receive_json, running_hub, wait_for


async def expiring_authorizer(handshake: Handshake) -> Identity | None:
    """Token "<user>:<seconds>": that user, valid for that long."""
    user, _, seconds = (extract_token(handshake) or "").partition(":")
    return Identity(user, valid_until=time.time() + float(seconds)) if user else None


async def test_expired_sessions_close_with_4005_unless_refreshed() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(authorizer=expiring_authorizer) as (hub, url),
            client(url, "lapsing:0.3") as (lapsing, _),
            client(url, "kept:0.3") as (kept, kept_hello),
            client(url, "forever:1000") as (forever, _),
        ):
            session = hub.get_handler(kept_hello["session_id"])
            assert session is not None
            hub.refresh_identity(session, Identity("kept", valid_until=time.time() + 1000))
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
            assert len(hub._expiries) <= 2 * hub.statistics().connections + 1025
