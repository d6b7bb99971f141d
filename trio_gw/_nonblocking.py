"""Non-blocking socket writes, shared by both connection engines' writers."""

from __future__ import annotations

import os
from collections.abc import Iterable

import trio

__all__ = ["whole_frames", "write_nowait"]


def write_nowait(sock: trio.socket.SocketType, data: bytes | memoryview) -> int:
    """Write what the socket takes now; the count, or -1 if it is closed or broken.

    The fd is read afresh (-1 once closed) with no await before the write, so
    a closed socket's reused fd is never written.
    """
    fd = sock.fileno()
    if fd < 0:
        return -1
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError:
        return -1


def whole_frames(sizes: Iterable[int], sent: int) -> int:
    """How many frames of these sizes lie whole within their first ``sent`` bytes."""
    whole, end = 0, 0
    for size in sizes:
        end += size
        if end > sent:
            break
        whole += 1
    return whole
