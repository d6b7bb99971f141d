"""The seam between hub nodes: what one node tells the others, and how it hears back.

The hub actor resolves every send and close against its own registry first.
Whatever may concern sessions on other nodes (a user-level or all-level target,
or a session id that names another node) it hands to the backplane with
``publish_nowait``, which must never wait: a backplane queues and batches
internally. What other nodes publish, the backplane feeds back into the hub
through the ``BackplaneInbox`` it is served with, a batch at a time (whatever
arrived together), marked as remote so that it is not published again. The hub
also tells it, without waiting, which users this node holds sessions of
(``subscribe_nowait`` when a user's first session registers,
``unsubscribe_nowait`` when the last one leaves), so that a backplane can route
user messages by interest.

Presence goes the other way: the backplane reads this node's user counts
from the inbox (``local_presence``) for its heartbeat, and ``presence()``
returns the other live nodes' last heartbeats.

``LocalBackplane`` is the single-node implementation: there is nobody to tell.
``RedisBackplane`` (``_redis_backplane``) connects nodes through Redis or Valkey.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn, Protocol

import attrs
import trio

from ._frames import Frame
from ._targets import Target

__all__ = ["Backplane", "BackplaneClose", "BackplaneDeliver", "BackplaneInbox", "LocalBackplane"]


@attrs.frozen
class BackplaneDeliver:
    """Deliver a frame to whoever ``target`` names on the receiving node."""

    target: Target
    frame: Frame


@attrs.frozen
class BackplaneClose:
    """Close whoever ``target`` names on the receiving node."""

    target: Target
    code: int
    reason: str


BackplaneMessage = BackplaneDeliver | BackplaneClose


class BackplaneInbox(Protocol):
    """How a backplane hands remote messages to its hub."""

    async def deliver_from_backplane(self, messages: Iterable[BackplaneMessage]) -> None:
        """Carry out, in order, messages other nodes published.

        A backplane hands over at once every message that arrived together,
        so that the hub can deliver a burst as one batch; it may decode them
        as the hub iterates.
        """
        ...

    def local_presence(self) -> dict[str, int]:
        """Sessions per user on this node now."""
        ...


class Backplane(Protocol):
    """Connects hub nodes. See the module docstring."""

    @property
    def node_id(self) -> str:
        """This node's id; it prefixes the ids of the sessions this node holds."""
        ...

    def publish_nowait(self, message: BackplaneMessage) -> bool:
        """Queue ``message`` for the other nodes without waiting.

        Returns:
            False if it had to be dropped (the backplane is overloaded or down);
            the hub counts it.
        """
        ...

    def subscribe_nowait(self, user_id: str) -> None:
        """This node now holds a session of ``user_id``: route the user's messages here.

        Called by the hub, without waiting, when the user's first session on
        this node registers; a backplane batches its subscriptions.
        """
        ...

    def unsubscribe_nowait(self, user_id: str) -> None:
        """This node's last session of ``user_id`` left."""
        ...

    async def presence(self) -> dict[str, dict[str, int]]:
        """The other live nodes' sessions per user: ``{node_id: {user_id: sessions}}``.

        Raises:
            BackplaneUnavailable: the other nodes cannot be asked now.
        """
        ...

    async def serve(
        self,
        inbox: BackplaneInbox,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Run the backplane's connections; call ``task_status.started()`` once ready."""
        ...


@attrs.define
class LocalBackplane:
    """A backplane for a single hub node: nothing is ever remote."""

    _node_id: str

    @property
    def node_id(self) -> str:
        """See ``Backplane.node_id``."""
        return self._node_id

    def publish_nowait(self, message: BackplaneMessage) -> bool:
        """There are no other nodes: nothing to do."""
        return True

    def subscribe_nowait(self, user_id: str) -> None:
        """There are no other nodes: nothing to do."""

    def unsubscribe_nowait(self, user_id: str) -> None:
        """There are no other nodes: nothing to do."""

    async def presence(self) -> dict[str, dict[str, int]]:
        """There are no other nodes."""
        return {}

    async def serve(
        self,
        inbox: BackplaneInbox,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Report ready and wait to be cancelled."""
        task_status.started()
        await trio.sleep_forever()
