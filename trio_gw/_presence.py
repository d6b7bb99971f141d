"""Presence: which users are online, cluster-wide, and how many sessions each has on which node."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

__all__ = ["Presence"]


@attrs.frozen
class Presence:
    """A snapshot of who is online, as ``HandlerManager.presence()`` returns it.

    This node's part is read from its registry at the time of the call; the
    other nodes' parts are their last heartbeats, at most the backplane's
    presence interval old. A node that stopped (or was killed) drops out once
    its heartbeat expires.

    Attributes:
        node_id: The node that answered.
        nodes: ``{node_id: {user_id: sessions}}`` for every live node,
            this one included.
        complete: False if the other nodes could not be asked (the backplane
            is down); then ``nodes`` holds this node only.
    """

    node_id: str
    nodes: Mapping[str, Mapping[str, int]]
    complete: bool = True

    @property
    def users(self) -> dict[str, int]:
        """Sessions per online user, summed over the nodes, sorted by user id."""
        totals: dict[str, int] = {}
        for users in self.nodes.values():
            for user_id, count in users.items():
                totals[user_id] = totals.get(user_id, 0) + count
        return dict(sorted(totals.items()))

    @property
    def sessions(self) -> int:
        """Sessions on all nodes."""
        return sum(sum(users.values()) for users in self.nodes.values())

    def sessions_of(self, user_id: str) -> int:
        """How many sessions ``user_id`` has, on all nodes."""
        return sum(users.get(user_id, 0) for users in self.nodes.values())

    def nodes_of(self, user_id: str) -> dict[str, int]:
        """``{node_id: sessions}`` for the nodes where ``user_id`` has sessions."""
        return {
            node: users[user_id]
            for node, users in sorted(self.nodes.items())
            if users.get(user_id, 0) > 0
        }

    def by_node(self) -> dict[str, dict[str, int]]:
        """``{node_id: {"sessions": n, "users": m}}``, sorted by node id."""
        return {
            node: {"sessions": sum(users.values()), "users": len(users)}
            for node, users in sorted(self.nodes.items())
        }
