"""Listening sockets for ``serve_hub``, optionally shared between processes (SO_REUSEPORT)."""

from __future__ import annotations

import socket

import trio

from ._errors import ConfigError

__all__ = ["open_tcp_listeners"]

# As trio's open_tcp_listeners: the kernel caps it at net.core.somaxconn.
_BACKLOG = 0xFFFF


async def open_tcp_listeners(
    port: int, *, host: str | None, reuse_port: bool
) -> list[trio.SocketListener]:
    """Listen on ``host``:``port``, like ``trio.open_tcp_listeners``.

    With ``reuse_port`` every socket is bound with SO_REUSEPORT, so that
    several processes on one machine can listen on the same port and the
    kernel spreads the incoming connections over them.

    Raises:
        ConfigError: ``reuse_port`` on a platform without SO_REUSEPORT.
        OSError: the address cannot be bound.
    """
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    reuse = getattr(socket, "SO_REUSEPORT", None)
    if reuse is None:
        raise ConfigError("reuse_port: this platform has no SO_REUSEPORT")
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, reuse, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
