"""The ``trio-gw`` process itself (trio_gw/gateway/_cli.py), started as a real subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from trio_gw import ConfigError

from ._gateway_support import gateway_process
from .conftest import TIMEOUT, echo_round_trip

TRIO_GW = str(Path(sys.executable).with_name("trio-gw"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRIO_GW, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
        check=False,
    )


async def test_serve_dev_mode_echo_and_sigterm() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                partial(
                    trio.run_process,
                    [TRIO_GW, "serve", "--port", "0", "--admin-port", "0"],
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            log = b""
            assert process.stderr is not None
            while re.search(rb"\bready; ", log) is None:
                chunk = await process.stderr.receive_some()
                assert chunk, log.decode()
                log += chunk
            match = re.search(rb"WebSocket clients on ws://127\.0\.0\.1:(\d+)/", log)
            assert match is not None, log.decode()
            assert b"DEV MODE" in log
            url = f"ws://127.0.0.1:{int(match.group(1))}/?token=alice"
            hello, response = await trio.to_thread.run_sync(echo_round_trip, url, {"a": 1}, "t-9")
            assert hello["payload"]["event"]["user_id"] == "alice"
            assert response["payload"] == {"trace_id": "t-9", "result": {"a": 1}, "error": None}
            process.send_signal(signal.SIGTERM)
            async for chunk in process.stderr:
                log += chunk
            assert await process.wait() == 0, log.decode()
            assert b"SIGTERM received" in log
    # Logs are text unless --log-format json is given. (Not only the first line: a
    # warning about the open-file limit may come first on a machine with a low one.)
    lines = log.decode().splitlines()
    assert lines and not any(line.startswith("{") for line in lines)
    assert any(" WARNING trio_gw: DEV MODE" in line for line in lines)


def _low_open_file_limit() -> None:
    """Runs in the child before exec: a soft open-file limit of 64, a hard one of 256."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 256))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/limits")
async def test_serve_raises_the_open_file_limit_and_warns_when_it_is_too_low() -> None:
    with trio.fail_after(TIMEOUT):
        async with gateway_process(
            env={"TRIO_GW_MAX_CONNECTIONS": "10000"}, preexec_fn=_low_open_file_limit
        ) as gateway:
            limits = await trio.Path(f"/proc/{gateway.process.pid}/limits").read_text()
            warnings = [
                record["message"]
                for record in gateway.log_records()
                if record["level"] == "WARNING" and "open-file limit" in record["message"]
            ]
    # The soft limit was raised to the hard one...
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.MULTILINE)
    assert match is not None, limits
    assert (int(match.group(1)), int(match.group(2))) == (256, 256)
    # ... which still cannot hold 10000 clients: said once, with what to do about it.
    assert len(warnings) == 1, warnings
    assert "open-file limit 256 (hard limit 256)" in warnings[0]
    assert "hub.max_connections = 10000" in warnings[0]
    fits = re.search(r"lower hub\.max_connections to (\d+)", warnings[0])
    assert fits is not None and 0 < int(fits.group(1)) < 256
    assert "ulimit -n" in warnings[0]


def test_dev_mode_refuses_non_loopback() -> None:
    result = run("serve", "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2
    assert "hub.host" in result.stderr and "loopback" in result.stderr


def test_check_config_names_the_bad_field(tmp_path: Path) -> None:
    assert run("check-config").returncode == 0
    bad_env = run("check-config", env={"TRIO_GW_MAX_CONNECTIONS": "lots"})
    assert bad_env.returncode == 2
    assert "hub.max_connections: expected an integer, got 'lots'" in bad_env.stderr
    config = tmp_path / "hub.toml"
    config.write_text("[hub]\nheartbeat_timeout = -3\n")
    bad_file = run("check-config", "--config", str(config))
    assert bad_file.returncode == 2
    assert "heartbeat_timeout" in bad_file.stderr and "-3" in bad_file.stderr
    bad_flag = run("check-config", "--port", "99999")
    assert bad_flag.returncode == 2
    assert "hub.port: expected an integer 0..65535, got 99999" in bad_flag.stderr


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    from trio_gw.gateway._cli import _parser, load_config

    config = tmp_path / "hub.toml"
    config.write_text("[hub]\nport = 9001\nmax_connections = 7\nclose_timeout = 2.5\n")
    args = _parser().parse_args(["serve", "--config", str(config), "--port", "9003"])
    loaded = load_config(args, {"TRIO_GW_PORT": "9002", "TRIO_GW_MAX_CONNECTIONS": "8"})
    hub = loaded.hub
    assert (hub.port, hub.max_connections, hub.close_timeout) == (9003, 8, 2.5)


def test_backplane_flags_beat_env() -> None:
    from trio_gw.gateway._cli import _parser, load_config

    args = _parser().parse_args(
        ["serve", "--backplane-url", "redis://flag:6379", "--node-id", "from-flag"]
    )
    loaded = load_config(
        args,
        {"TRIO_GW_BACKPLANE_URL": "redis://env:6379", "TRIO_GW_BACKPLANE_NODE_ID": "from-env"},
    )
    assert (loaded.backplane.url, loaded.backplane.node_id) == ("redis://flag:6379", "from-flag")
    args = _parser().parse_args(["serve", "--node-id", "a:b"])
    with pytest.raises(ConfigError, match=r"backplane\.node_id: expected a non-empty id"):
        load_config(args, {})
