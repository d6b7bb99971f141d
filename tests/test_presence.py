"""Presence (trio_gw/_presence.py) as a value, and a single node's ``hub.presence()``."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import TIMEOUT, client, running_hub
from trio_gw import Presence


def test_presence_sums_over_nodes() -> None:
    presence = Presence("a", {"a": {"u1": 2, "u2": 1}, "b": {"u1": 1}, "c": {}})
    assert presence.users == {"u1": 3, "u2": 1}
    assert presence.sessions == 4
    assert presence.sessions_of("u1") == 3 and presence.sessions_of("nobody") == 0
    assert presence.nodes_of("u1") == {"a": 2, "b": 1}
    assert presence.by_node() == {
        "a": {"sessions": 3, "users": 2},
        "b": {"sessions": 1, "users": 1},
        "c": {"sessions": 0, "users": 0},
    }
    assert presence.complete


async def test_a_single_node_hub_knows_its_own_presence() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub() as (hub, url), client(url, "amy"), client(url, "amy"):
            presence = await hub.presence()
            assert presence == Presence("node1", {"node1": {"amy": 2}})
            assert (await hub.presence(["bob"])).users == {}
            with pytest.raises(TypeError, match="not a single string"):
                await hub.presence("amy")
