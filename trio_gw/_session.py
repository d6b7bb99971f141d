"""One client connection once authorized: its tasks, its queues and how it closes."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._auth import Identity
from ._close_codes import CloseCode
from ._config import HubConfig
from ._connection import CloseWrite, Connection, ConnectionEnded, FrameWriter
from ._errors import HubClosedError
from ._frames import Frame
from ._lifecycle import Lifecycle, Transition, advance
from ._router import QueueBudget

if TYPE_CHECKING:
    from ._hub import HandlerManager

__all__ = ["Session"]

logger = logging.getLogger("trio_gw")


# A queued frame's age is known to within this many seconds: a session notes
# the time of at most one offer per interval (see ``oldest_queued_at``).
_MARK_INTERVAL = 0.02
# A frame offered to an idle writer with nothing queued is written at once by
# the offering task, at most once per this many seconds per session (and only
# while the hub is not in a burst, see ``HandlerManager._inline_budget``): a
# trickle costs one syscall and no task switch per message, while a burst's
# frames still reach the writer, which writes many in one syscall.
_INLINE_INTERVAL = 0.001
# Queued by a task that wrote part of a frame inline: the writer finishes it.
_RESUME = Frame(b"", False, b"")


class _Finished:
    """Whether something has finished; the Event is made only if someone waits.

    Idle sessions are the common case, so per-session state is kept small: a
    trio.Event with its parking lot costs more than this whole object.
    """

    __slots__ = ("_event", "done")

    def __init__(self) -> None:
        self.done = False
        self._event: trio.Event | None = None

    def set(self) -> None:
        self.done = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


@attrs.frozen
class _CloseRequest:
    code: int
    reason: str
    drain: bool  # write what is queued first (shutdown) or drop it (slow consumer)


@attrs.define(eq=False, repr=False)
class Session:
    """One authorized WebSocket connection (nuropb_gw calls it a handler).

    The hub creates a session for each connection it accepts and registers it.
    A session runs in its own nursery, beside trio-websocket's reader task
    (which answers pings and close frames and queues the client's messages):

    * the dispatcher takes the client's messages from that queue and hands
      them to ``on_handler_message``, one at a time by default
      (``max_inflight_per_session``);
    * the writer is the only task that waits on the socket; it takes
      everything queued on the outbound channel and writes it in one go. When
      it is idle with nothing queued, the task that offers a frame writes it
      itself, with one non-blocking send;
    * a ping task lives only while a ping from the hub's heartbeat waits for
      its pong.

    Resource handling:
        The outbound channel's send side belongs to the hub actor, which feeds
        it with ``send_nowait`` and closes it when it unregisters the session.
        The session's own tasks never outlive the connection.
    """

    session_id: str
    identity: Identity
    remote: tuple[str, int] | None
    connected_at: float
    _conn: Connection
    _hub: HandlerManager
    _config: HubConfig
    _writer: FrameWriter
    _budget: QueueBudget
    # The outbound queue and its writer task are made when a frame is first
    # queued: an idle connection, whose messages are written inline, has neither.
    _out_send: trio.MemorySendChannel[Frame] | None = None
    _out_recv: trio.MemoryReceiveChannel[Frame] | None = None
    _outbound_closed: bool = False  # nothing may be queued any more
    _writer_started: bool = False
    #: Where the session is in its life (see ``trio_gw._lifecycle``).
    state: Lifecycle = Lifecycle.CONNECTING
    #: Frames and bytes in the outbound queue now (not counting the write in progress).
    queued_messages: int = 0
    queued_bytes: int = 0
    #: When the writer last finished a write, or the queue last filled while it
    #: was idle (trio clock): how the router tells a stuck session.
    last_progress: float = attrs.Factory(trio.current_time)
    #: Set by the router: over the high-water mark, senders wait for it.
    pressured: bool = False
    #: Set by the router: when the credentials expire (trio clock).
    expires_at: float | None = None
    _close: _CloseRequest | None = None
    _nursery: trio.Nursery | None = None
    _writer_done: _Finished = attrs.Factory(_Finished)
    _close_done: _Finished = attrs.Factory(_Finished)
    # The dispatcher (the read loop) is in a callback, or waits for a free slot
    # (max_inflight_per_session): it takes no message meanwhile.
    _dispatching: bool = False
    _awaiting_message: bool = False  # the dispatcher waits in get_message()
    _dispatcher_running: bool = False  # a dispatcher task takes waiting messages
    _slots: trio.Semaphore | None = None  # callbacks at once (max_inflight_per_session > 1)
    # Client messages received before the hub began closing the session and not
    # yet handed to the callback; they still are.
    _backlog: int = 0
    _work_idle: trio.Event | None = None  # made only while someone waits for the work
    # Cancels the dispatcher a close_timeout after the connection ended.
    _dispatch_scope: trio.CancelScope | None = None
    _connection_gone: bool = False
    _writing: bool = False  # the writer holds a batch it has not finished writing
    _ping_in_flight: bool = False
    _started_at: float = attrs.Factory(trio.current_time)
    _tasks: int = 0  # started with start_soon and still running
    _tasks_idle: trio.Event | None = None  # made only while someone waits for them
    _drained: trio.Event | None = None  # made only while a sender waits for the queue
    # (index of the first frame offered at t, t), at most one per _MARK_INTERVAL,
    # for the frames still queued; None while the queue is empty.
    _marks: list[tuple[int, float]] | None = None
    _offered: int = 0  # frames ever queued
    _inline_at: float = -1.0  # when a frame was last written inline
    _inline_rest: int = 0  # the size of the frame written in part inline
    _taken: int = 0  # frames the writer has taken off the queue

    @classmethod
    def _create(
        cls,
        *,
        session_id: str,
        identity: Identity,
        remote: tuple[str, int] | None,
        connection: Connection,
        hub: HandlerManager,
        config: HubConfig,
    ) -> Session:
        session = cls(
            session_id,
            identity,
            remote,
            time.time(),
            connection,
            hub,
            config,
            connection.writer,
            hub._router.budget,
        )
        # The wsproto engine's writer asks for the writer task when a control
        # frame (a pong, a close) has to wait for the socket.
        if hasattr(connection.writer, "on_blocked"):
            connection.writer.on_blocked = session._queue_resume
        connection.on_end = session._connection_ended
        if connection.ended:
            session._connection_ended()
        return session

    def __repr__(self) -> str:
        return f"<Session {self.session_id} user={self.user_id!r}>"

    @property
    def log_fields(self) -> dict[str, str]:
        """``extra=`` for log records about this session (JSON logs show them as fields)."""
        return {"session_id": self.session_id, "user_id": self.user_id}

    @property
    def user_id(self) -> str:
        """The user this session belongs to."""
        return self.identity.user_id

    @property
    def username(self) -> str:
        """The user's display name."""
        return self.identity.username

    @property
    def claims(self) -> Mapping[str, Any]:
        """What the authorizer learned about the user."""
        return self.identity.claims

    @property
    def closing(self) -> bool:
        """True once the hub has asked this session to close."""
        return self._close is not None

    @property
    def close_code(self) -> int:
        """The code this connection was closed with, as far as it is known yet.

        The hub's code if the hub closed it, else the client's, else 1006 (no
        close frame).
        """
        if self._close is not None:
            return self._close.code
        code = self._conn.peer_code
        return code if code is not None else 1006

    def start_soon(self, async_fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run a task on this session's behalf, beside its dispatcher.

        For work a message starts that should not hold up the client's next
        message, such as a backend call. A graceful close (and hub shutdown)
        waits for it, up to ``close_timeout``, so that its reply is still
        delivered; once the connection has ended it is cancelled.

        Returns:
            False, and nothing is started, if the session has ended.

        Error handling:
            An exception it raises is logged with the session id and counted
            in ``callback_errors``; it never ends the connection or reaches the hub.
        """
        if self._nursery is None or self._ended:
            return False
        try:
            self._nursery.start_soon(self._run_task, async_fn, args)
        except RuntimeError:  # the nursery is closing: the connection has ended
            return False
        self._tasks += 1
        return True

    async def _run_task(
        self, async_fn: Callable[..., Awaitable[object]], args: tuple[object, ...]
    ) -> None:
        try:
            await async_fn(*args)
        except Exception:
            self._hub._counters.callback_errors += 1
            logger.exception(
                "session %s (user %s): task %s raised",
                self.session_id,
                self.user_id,
                getattr(async_fn, "__qualname__", async_fn),
                extra=self.log_fields,
            )
        finally:
            self._tasks -= 1
            self._note_work_done()

    @property
    def _work_pending(self) -> bool:
        return self._dispatching or self._dispatcher_running or self._backlog > 0 or self._tasks > 0

    def _note_work_done(self) -> None:
        if self._work_idle is not None and not self._work_pending:
            self._work_idle.set()
            self._work_idle = None

    async def _wait_for_work(self) -> None:
        """Wait until the messages received so far are handled, and every ``start_soon`` task."""
        while self._work_pending:
            if self._work_idle is None:
                self._work_idle = trio.Event()
            await self._work_idle.wait()

    @property
    def _reader_blocked(self) -> bool:
        # The dispatcher takes no message now (its queue may fill), or the
        # queue is full: trio-websocket's reader may have stopped, and a pong
        # may not be read in time. The client is alive all the same.
        return self._dispatching or self._conn.inbound_backlog() >= self._config.inbound_queue_size

    def _connection_ended(self) -> None:
        """The connection has ended: the client closed, left or broke the protocol.

        Messages it sent before are still handed to the callback, but not for
        longer than a close may take.
        """
        self._connection_gone = True
        scope = self._dispatch_scope
        if scope is not None and scope.deadline == math.inf:
            scope.deadline = trio.current_time() + self._config.close_timeout

    @property
    def _ended(self) -> bool:
        return self.state is Lifecycle.ENDED

    # --- the router's narrow protocol: synchronous, never waits -----------------

    def oldest_queued_at(self) -> float | None:
        """When the oldest queued frame was queued (trio clock, to within 20 ms), or None."""
        marks = self._marks
        return marks[0][1] if marks and self.queued_messages else None

    def _offer_nowait(self, frame: Frame, now: float, inline: bool = False) -> bool:
        """Queue ``frame`` (the router checked it fits); False if the session is closing.

        With ``inline``, when the writer is idle with nothing queued, the frame
        is written here, with one non-blocking send (see ``_INLINE_INTERVAL``);
        a rest the socket does not take is left to the writer, so the order is
        kept.
        """
        if (
            inline
            and not self._writing
            and not self.queued_messages
            and now - self._inline_at >= _INLINE_INTERVAL
            and self._close is None
        ):
            self._inline_at = now
            written = self._writer.write_nowait(frame)
            if written:
                counters = self._hub._counters
                counters.messages_out += 1
                counters.bytes_out += len(frame.wire)
                self.last_progress = now
                if self.pressured:
                    # Marked for this frame (larger than the high-water mark,
                    # or a tiny queue), which never reached the queue.
                    self._hub._on_progress(self)
                return True
            if written is None:
                # Part of it went out: the writer finishes it before anything else.
                self._writing = True
                self._inline_rest = len(frame.wire)
                self._queue_nowait(_RESUME)
                return True
        if not self._queue_nowait(frame):
            return False
        size = len(frame.wire)
        marks = self._marks
        if marks is None:
            if not self._writing:
                self.last_progress = now  # the stall clock starts with the work
            self._marks = [(self._offered, now)]
        elif now - marks[-1][1] >= _MARK_INTERVAL:
            marks.append((self._offered, now))
        self._offered += 1
        self.queued_messages += 1
        self.queued_bytes += size
        self._budget.queued += size
        return True

    def _queue_nowait(self, frame: Frame) -> bool:
        """Put ``frame`` on the outbound queue, making the queue and its writer on first use."""
        send = self._out_send
        if send is None:
            if self._outbound_closed or self._nursery is None:
                return False
            send, recv = trio.open_memory_channel[Frame](self._config.outbound_queue_size)
            try:
                self._nursery.start_soon(self._write_loop, recv)
            except RuntimeError:  # the connection has ended
                return False
            self._out_send, self._out_recv = send, recv
            self._writer_started = True
        try:
            send.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def _queue_resume(self) -> None:
        """The engine holds bytes only the writer task may write: have it ``resume``."""
        if self._writing or self.queued_messages or self._outbound_closed:
            return  # the writer writes them with its next write (or none is wanted)
        self._writing = True
        self._inline_rest = 0
        if not self._queue_nowait(_RESUME):
            self._writing = False

    def _close_outbound(self) -> None:
        """Nothing more is queued: the writer ends once it has written what is."""
        self._outbound_closed = True
        if self._out_send is not None:
            self._out_send.close()

    @property
    def _writer_running(self) -> bool:
        return self._writer_started and not self._writer_done.done

    def _took(self, count: int, size: int) -> None:
        """The writer took ``count`` frames (``size`` bytes) off the queue."""
        self.queued_messages -= count
        self.queued_bytes -= size
        self._budget.queued -= size
        self._taken += count
        marks = self._marks
        if marks is None:
            return
        if not self.queued_messages:
            self._marks = None
            return
        taken, drop = self._taken, 0
        while drop + 1 < len(marks) and marks[drop + 1][0] <= taken:
            drop += 1
        if drop:
            del marks[:drop]

    def _request_close(self, code: int, reason: str, *, drain: bool) -> None:
        """Start closing; the router has unregistered the session and marked it closing.

        With ``drain``, what is queued is still written, and so are the replies
        of the messages the client sent before (see ``_close_procedure``).
        Without it, what is queued is dropped (and counted), and nothing more
        is written but the close frame.
        """
        if self._close is not None or self.state is Lifecycle.ENDED:
            return
        advance(self, Transition.CLOSE)  # already done when the router decided it
        self._close = _CloseRequest(code, reason, drain)
        # The session takes no new client messages; those already received are
        # still handed to the callback.
        self._backlog = self._conn.inbound_backlog()
        if self._awaiting_message and self._conn.handed_over():
            self._backlog += 1  # handed to the dispatcher, which has not run yet
        if not drain:
            self._close_outbound()
            self._hub._counters.drops += self._discard_queued()
        if self._nursery is not None:
            # RuntimeError: the connection ended a moment ago; nothing to close.
            with suppress(RuntimeError):
                self._nursery.start_soon(self._close_procedure)

    def _discard_queued(self) -> int:
        """Drop every frame still queued; returns how many."""
        dropped = 0
        recv = self._out_recv
        while recv is not None:
            try:
                frame = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if frame is not _RESUME:  # a half-written frame is finished by the close frame
                dropped += 1
        self._took(self.queued_messages, self.queued_bytes)
        return dropped

    async def _wait_drained(self) -> None:
        """Wait until the router wakes the senders waiting for this session."""
        if self._drained is None:
            self._drained = trio.Event()
        await self._drained.wait()

    def _wake_producers(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    # --- the session's own tasks ----------------------------------------------

    async def _run(self, nursery: trio.Nursery | None = None) -> None:
        """Run the connection until it ends; the caller unregisters afterwards.

        The session's tasks run in ``nursery`` (the connection's own, which
        this cancels at the end: every nursery costs memory on every idle
        connection), or in one of its own.
        """
        if nursery is not None:
            await self._run_in(nursery)
            return
        async with trio.open_nursery() as own:
            await self._run_in(own)

    async def _run_in(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        if self._close is not None:  # asked to close before the nursery existed
            nursery.start_soon(self._close_procedure)
        await self._hub._register_session(self)
        if self._conn.push:
            # This task reads; a dispatcher runs while messages wait.
            await self._conn.receive_messages(self._messages_waiting)
        else:
            await self._read_loop()
        if self._close is not None:
            await self._close_done.wait()
        # Messages the client sent before it left are still processed (their
        # side effects may matter), but not for longer than a close may take;
        # their replies are counted as drops.
        with trio.move_on_after(self._config.close_timeout):
            await self._wait_for_work()
        if self._writer_started:
            # What the writer still holds (the answer to the client's close
            # frame, say) goes out, unless the socket will not take it.
            self._close_outbound()
            with trio.move_on_after(self._config.close_timeout):
                await self._writer_done.wait()
        nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        """Read the client's messages and hand each to the callback: the dispatcher.

        The engine answers pings and close frames. On trio-websocket, its
        reader task queues up to ``inbound_queue_size`` messages meanwhile;
        on wsproto, ``get_message`` itself reads (see ``_wsproto_engine``).
        Either way a client that sends faster than it is served meets TCP's
        push-back. Reading goes on until the connection ends, even once the
        session is closing, so that the close handshake finishes.
        """
        conn = self._conn
        with trio.CancelScope() as scope:
            self._dispatch_scope = scope
            if self._connection_gone:
                self._connection_ended()
            try:
                while True:
                    self._awaiting_message = True
                    try:
                        message = await conn.get_message()
                    finally:
                        self._awaiting_message = False
                    await self._dispatch(message)
            except ConnectionEnded:
                pass
            finally:
                self._backlog = 0
                self._note_work_done()

    def _messages_waiting(self) -> None:
        """The engine holds client messages: start the dispatcher unless it runs.

        The dispatcher ends when no message waits, so that an idle connection
        is one task (the one reading).
        """
        if self._dispatcher_running or self._nursery is None:
            return
        try:
            self._nursery.start_soon(self._dispatch_waiting)
        except RuntimeError:  # the connection has ended
            return
        self._dispatcher_running = True

    async def _dispatch_waiting(self) -> None:
        """Hand each waiting message to the callback, in order, then end."""
        conn = self._conn
        with trio.CancelScope() as scope:
            self._dispatch_scope = scope
            if self._connection_gone:
                self._connection_ended()
            try:
                while (message := conn.take_message_nowait()) is not None:
                    await self._dispatch(message)
            finally:
                self._dispatch_scope = None
                self._dispatcher_running = False
                if scope.cancelled_caught:
                    self._backlog = 0  # what is left is not processed any more
                self._note_work_done()

    async def _dispatch(self, message: str | bytes) -> None:
        """Hand one client message to the callback (or count it as dropped)."""
        counters = self._hub._counters
        counters.messages_in += 1
        if self._close is not None:
            if self._backlog <= 0:
                counters.drops += 1  # arrived after the hub began closing it
                return
            self._backlog -= 1
        counters.bytes_in += len(message.encode()) if isinstance(message, str) else len(message)
        self._dispatching = True
        try:
            if self._config.max_inflight_per_session == 1:
                await self._hub.on_handler_message(self, message)
            else:
                slots = self._slots
                if slots is None:
                    slots = self._slots = trio.Semaphore(self._config.max_inflight_per_session)
                await slots.acquire()
                assert self._nursery is not None
                self._nursery.start_soon(self._dispatch_one, message, slots)
                self._tasks += 1
        finally:
            self._dispatching = False
            self._note_work_done()

    async def _dispatch_one(self, message: str | bytes, slots: trio.Semaphore) -> None:
        try:
            await self._hub.on_handler_message(self, message)
        finally:
            slots.release()
            self._tasks -= 1
            self._note_work_done()

    async def _write_loop(self, recv: trio.MemoryReceiveChannel[Frame]) -> None:
        writer, hub = self._writer, self._hub
        counters = hub._counters
        max_write = self._config.max_write_bytes
        try:
            while True:
                try:
                    frame = await recv.receive()
                except trio.EndOfChannel:
                    return
                if frame is _RESUME:
                    if not await self._resume_inline_write():
                        return
                    continue
                batch = [frame]
                size = len(frame.wire)
                while size < max_write:
                    try:
                        frame = recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(frame)
                    size += len(frame.wire)
                count = len(batch)
                self._took(count, size)
                self._writing = True
                try:
                    written = await writer.write(batch)
                except BaseException:
                    counters.drops += count  # cancelled: at most part of it went out
                    raise
                finally:
                    self._writing = False
                # An idle writer must not keep its last batch alive.
                batch = frame = None  # type: ignore[assignment]
                if written < count:
                    # The client is gone or closing: what is queued, and what
                    # is offered from now on, is counted as dropped. The reader
                    # and the dispatcher go on, so that what the client sent
                    # before it left is still processed.
                    counters.messages_out += written
                    counters.drops += count - written + self._discard_queued()
                    recv.close()
                    return
                counters.messages_out += count
                counters.bytes_out += size
                self.last_progress = trio.current_time()
                if self.pressured or hub._budget_waiters:
                    hub._on_progress(self)
                if self._close is not None and not self._close.drain:
                    return
        finally:
            self._writer_done.set()

    async def _resume_inline_write(self) -> bool:
        """Finish a frame written in part inline (or held control frames).

        Returns:
            False if the connection can no longer be written.
        """
        rest, self._inline_rest = self._inline_rest, 0
        try:
            whole = await self._writer.resume()
        except BaseException:
            self._hub._counters.drops += 1 if rest else 0
            raise
        finally:
            self._writing = False
        counters = self._hub._counters
        if not whole:
            counters.drops += (1 if rest else 0) + self._discard_queued()
            if self._out_recv is not None:
                self._out_recv.close()
            return False
        if not rest:
            return True
        counters.messages_out += 1
        counters.bytes_out += rest
        self.last_progress = trio.current_time()
        if self.pressured or self._hub._budget_waiters:
            self._hub._on_progress(self)
        return True

    def _ping(self) -> None:
        """Ping the client in a short-lived task (called by the hub's heartbeat).

        A resident heartbeat task per session would cost memory on every idle
        connection; a ping task lives only until its pong arrives.
        """
        if self._ping_in_flight or self._reader_blocked or self._close is not None:
            return  # a client we cannot keep up with is alive by definition
        if self._nursery is None or self._ended:
            return
        self._ping_in_flight = True
        try:
            self._nursery.start_soon(self._ping_once)
        except RuntimeError:  # the session's nursery is closing
            self._ping_in_flight = False

    async def _ping_once(self) -> None:
        timeout = self._config.heartbeat_timeout
        try:
            with trio.move_on_after(timeout) as scope:
                await self._conn.ping()
            if not scope.cancelled_caught:
                return  # the pong came
        except ConnectionEnded:
            # The engine has begun closing, and the session normally ends
            # at once. If it is still here a timeout later, the close is stuck
            # (its answer waits behind a write to a client that stopped
            # reading): close it as one that does not answer.
            self._ping_in_flight = False
            await trio.sleep(timeout)
            if self._ended or self._close is not None:
                return
        finally:
            self._ping_in_flight = False
        if not self._reader_blocked:
            logger.info(
                "session %s (user %s): no pong within %ss, closing",
                self.session_id,
                self.user_id,
                timeout,
                extra=self.log_fields,
            )
            await self._hub._close_session(self, CloseCode.NO_PONG, "no pong")

    def _fail(self) -> _CloseRequest:
        """Note that an unexpected error ended the session's tasks; it closes with 1011."""
        if self._close is None:
            advance(self, Transition.CLOSE)
            self._close = _CloseRequest(CloseCode.SERVER_ERROR, "server error", drain=False)
            self._close_outbound()
        return self._close

    async def _close_after_failure(self) -> None:
        """Close with 1011 once an unexpected error ended the session's tasks.

        The engine can still finish the close handshake.
        """
        request = self._fail()
        if self._writer.write_close_nowait(request.code, request.reason) is CloseWrite.BLOCKED:
            await self._conn.abort()  # a close frame now could follow half a frame
            return
        with trio.move_on_after(self._config.close_timeout) as scope:
            await self._conn.aclose(request.code, request.reason)
        if scope.cancelled_caught:
            await self._conn.abort()

    async def _close_procedure(self) -> None:
        """Close the connection as ``_request_close`` asked.

        Draining: wait for the dispatcher to finish what the client sent before
        (its replies are still delivered), then for the writer to write the
        queue, then send the close frame. Whatever does not fit in
        ``close_timeout`` is dropped and counted.

        A writer that cannot finish (not draining, or a client that stopped
        reading) is cut off: the close frame follows the last whole frame if the
        socket takes it at once, so the client learns the code; otherwise the
        TCP connection is aborted and the client sees 1006.
        """
        request = self._close
        assert request is not None
        timeout = self._config.close_timeout
        deadline = trio.current_time() + timeout
        try:
            with trio.move_on_at(deadline):
                if request.drain:
                    await self._wait_for_work()
                    # Replies that went through the hub's queue are offered
                    # once the actor has handled what was queued before this.
                    with suppress(HubClosedError):
                        await self._hub._flush(internal=True)
                # Nothing can be offered any more: the session is unregistered
                # and its callbacks are done. Without a drain, the writer stops
                # after the write it is in.
                self._close_outbound()
                if self._writer_started:
                    await self._writer_done.wait()
            self._close_outbound()
            if (
                self._writer_running
                and self._writer.write_close_nowait(request.code, request.reason)
                is CloseWrite.BLOCKED
            ):
                # Closing the stream also ends the writer's blocked write.
                await self._conn.abort()
                return
            with trio.move_on_at(deadline + timeout) as scope:
                await self._conn.aclose(request.code, request.reason)
            if scope.cancelled_caught or self._writer_running:
                # Timed out, or the engine thinks the connection is closed
                # while our write is stuck on a client that stopped reading.
                await self._conn.abort()
        finally:
            self._close_done.set()
