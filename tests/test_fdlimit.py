"""The open-file limit check of ``trio-gw serve`` (trio_gw/gateway/_fdlimit.py), as pure decisions.

``raise_open_file_limit`` itself changes the process's limit, so it is tested
on the real ``trio-gw serve`` process, in tests/test_cli.py.
"""

from __future__ import annotations

from typing import Any

from trio_gw.gateway._config import GatewayConfig
from trio_gw.gateway._fdlimit import PROCESS_FDS, open_file_limit_warning, open_files_needed


def config(**sections: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig.from_mapping(sections)


def test_needed_counts_connections_listeners_backend_and_the_process() -> None:
    base = open_files_needed(config(hub={"max_connections": 1000}))
    assert 1000 + PROCESS_FDS < base < 1000 + PROCESS_FDS + 10
    # Backend calls count only when there is a backend to call.
    without_backend = config(hub={"max_connections": 1000}, backend={"max_inflight": 50})
    assert open_files_needed(without_backend) == base
    assert (
        open_files_needed(
            config(
                hub={"max_connections": 1000},
                backend={"url": "http://127.0.0.1:9/rpc", "max_inflight": 50},
            )
        )
        == base + 50
    )
    # No admin API, one listener fewer.
    assert open_files_needed(config(hub={"max_connections": 1000}, admin={"enabled": False})) < base


def test_no_warning_when_everything_fits() -> None:
    small = config(hub={"max_connections": 100})
    assert open_file_limit_warning(small, 1024, 4096) is None
    assert open_file_limit_warning(small, open_files_needed(small), 4096) is None
    assert open_file_limit_warning(config(), None, None) is None  # unlimited


def test_warning_says_how_many_connections_fit_and_how_to_raise_the_limit() -> None:
    default = config()
    needed = open_files_needed(default)
    warning = open_file_limit_warning(default, 1024, 1024)
    assert warning is not None
    assert "open-file limit 1024 (hard limit 1024)" in warning
    assert "hub.max_connections = 10000" in warning
    assert f"lower hub.max_connections to {1024 - (needed - 10000)}," in warning
    assert f"`ulimit -n {needed}`" in warning
    assert open_file_limit_warning(default, needed - 1, None) is not None
    assert "(hard limit unlimited)" in (open_file_limit_warning(default, 1024, None) or "")


def test_warning_names_the_backend_when_it_alone_exceeds_the_limit() -> None:
    busy_backend = config(backend={"url": "http://127.0.0.1:9/rpc", "max_inflight": 2000})
    warning = open_file_limit_warning(busy_backend, 1024, 1024)
    assert warning is not None
    assert "lower backend.max_inflight and hub.max_connections" in warning
