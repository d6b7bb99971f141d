"""The public API is exactly what trio_gw/__init__.py re-exports."""

from __future__ import annotations

import pytest

import trio_gw

EXPECTED = {
    "AdminConfig",
    "AuthConfig",
    "AuthRefused",
    "BackendConfig",
    "Gateway",
    "GatewayConfig",
    "LogConfig",
    "TlsConfig",
    "serve_gateway",
    "Authorizer",
    "BackplaneConfig",
    "BackplaneStatistics",
    "BackplaneUnavailable",
    "Presence",
    "RedisBackplane",
    "CloseCode",
    "ConfigError",
    "GatewayError",
    "HandlerManager",
    "Handshake",
    "HubClosedError",
    "HubConfig",
    "HubOverloadedError",
    "HubStatistics",
    "Identity",
    "MessageCallback",
    "Reply",
    "Session",
    "TokenChecker",
    "bearer_token_authorizer",
    "dev_authorizer",
    "echo_backend",
    "extract_token",
    "open_hub",
    "serve_hub",
}


def test_public_names() -> None:
    assert set(trio_gw.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(trio_gw, name) is not None


def test_seed_method_names_are_kept() -> None:
    """A nuropb_gw user can port: the HandlerManager methods keep their names."""
    for name in (
        "on_handler_message",
        "to_handler_message",
        "get_handler",
        "register",
        "unregister",
        "send_message",
        "send_message_to_user_ids",
        "send_message_to_all",
        "close",
        "close_user_ids",
        "close_all",
    ):
        assert callable(getattr(trio_gw.HandlerManager, name))


def test_close_codes_table() -> None:
    assert {c.name: int(c) for c in trio_gw.CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "SERVER_ERROR": 1011,
        "AUTH_EXPIRED": 4005,
        "SLOW_CONSUMER": 4008,
        "NO_PONG": 4012,
    }


GATEWAY_EXPECTED = {
    "AdminConfig",
    "AuthConfig",
    "BackendConfig",
    "BackplaneConfig",
    "Gateway",
    "GatewayConfig",
    "LogConfig",
    "TlsConfig",
    "main",
    "serve_gateway",
}


def test_gateway_public_names() -> None:
    """trio_gw.gateway re-exports the standalone gateway; trio_gw re-exports the same objects."""
    import trio_gw.gateway

    assert set(trio_gw.gateway.__all__) == GATEWAY_EXPECTED
    for name in GATEWAY_EXPECTED - {"main"}:
        assert getattr(trio_gw, name) is getattr(trio_gw.gateway, name)
    assert callable(trio_gw.gateway.main)


@pytest.mark.parametrize(
    ("imports", "first_use"),
    [
        ("import trio_gw", "trio_gw.serve_gateway"),
        ("from trio_gw import GatewayConfig, HubConfig", "trio_gw.Gateway"),
        ("import trio_gw.gateway", "trio_gw.gateway.serve_gateway"),
        ("from trio_gw.gateway import GatewayConfig", "trio_gw.gateway.main"),
    ],
)
def test_embedding_the_hub_does_not_import_the_http_stack(imports: str, first_use: str) -> None:
    """The gateway's HTTP stack is imported on first use only (it costs every full GC)."""
    import subprocess
    import sys

    heavy = ["starlette", "hypercorn", "httpx", "jwt", "prometheus_client"]
    probe = (
        f"import sys; {imports}; import trio_gw; "
        f"print([m for m in {heavy!r} if m in sys.modules]); "
        f"{first_use}; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    before, after = result.stdout.splitlines()
    assert before == "[]"
    assert after == repr(heavy)


def test_the_redis_backplane_is_imported_on_first_use() -> None:
    """coredis takes a while to import; a hub without a backplane never pays for it."""
    import subprocess
    import sys

    probe = (
        "import sys, trio_gw, trio_gw.gateway; print('coredis' in sys.modules); "
        "trio_gw.RedisBackplane; print('coredis' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.split() == ["False", "True"]


def test_statistics_are_declared_once() -> None:
    """The live counters mirror the snapshot, and every statistic says how it is exported."""
    import attrs

    from trio_gw._statistics import STATISTICS, Counters, HubStatistics

    snapshot_fields = [field.name for field in attrs.fields(HubStatistics)]
    assert [s.name for s in STATISTICS] == snapshot_fields
    gauges_of_the_registry = {"connections", "users", "queued_bytes"}
    assert [f.name for f in attrs.fields(Counters)] == [
        name for name in snapshot_fields if name not in gauges_of_the_registry
    ]
    assert all(s.help and s.kind in {"gauge", "counter", "by_label"} for s in STATISTICS)
    assert {s.metric: s.label for s in STATISTICS if s.kind == "by_label"} == {
        "rejected_handshakes": "reason",
        "closes": "code",
    }
