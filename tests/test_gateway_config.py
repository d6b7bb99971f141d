"""The gateway's config tree: sections, layers and cross-section rules (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_gw import ConfigError, GatewayConfig

SECRET = "s" * 32


def test_errors_name_the_section_and_field() -> None:
    for data, expected in (
        ({"hub": {"port": "x"}}, "hub.port: expected an integer, got 'x'"),
        ({"auth": {"leeway": -1}}, "auth.leeway: expected a number >= 0 (seconds), got -1"),
        ({"auth": {"nope": 1}}, "auth: unknown field(s): nope"),
        ({"admin": {"port": 70000}}, "admin.port: expected an integer 0..65535, got 70000"),
        ({"logs": {}}, "unknown section(s): logs"),
        ({"backend": []}, "backend: expected a table"),
        ({"tls": {"cert_file": "c.pem"}}, "tls.cert_file: cert_file and key_file go together"),
        (
            {"auth": {"jwt_algorithm": "HS256", "jwt_secret": "short"}},
            "auth.jwt_secret: expected at least 32 bytes for HS256, got 5",
        ),
        (
            {"auth": {"jwt_algorithm": "RS256", "jwt_secret": SECRET}},
            "auth.jwt_public_key_file: RS256 needs exactly one of",
        ),
        ({"auth": {"jwks_file": "k.json"}}, "auth.jwt_algorithm: required when jwks_file is set"),
        (
            {"admin": {"tls_key_file": "k.pem"}},
            "admin.tls_cert_file: tls_cert_file and tls_key_file go together",
        ),
        (
            {"admin": {"use_client_tls": True, "tls_cert_file": "c.pem", "tls_key_file": "k.pem"}},
            "admin.use_client_tls: reuses [tls]'s files, so set it or tls_cert_file and",
        ),
        (
            {"admin": {"use_client_tls": True}},
            "admin.use_client_tls: needs [tls] cert_file and key_file",
        ),
    ):
        with pytest.raises(ConfigError) as error:
            GatewayConfig.from_mapping(data)
        assert expected in str(error.value), (data, str(error.value))


def test_cross_section_rules() -> None:
    with pytest.raises(ConfigError, match=r"hub\.host: without \[auth\]"):
        GatewayConfig.from_mapping({"hub": {"host": "0.0.0.0"}})
    with pytest.raises(ConfigError, match=r"admin\.api_key: required once auth is configured"):
        GatewayConfig.from_mapping({"auth": {"jwt_algorithm": "HS256", "jwt_secret": SECRET}})
    with pytest.raises(ConfigError, match=r"admin\.api_key: required when the admin API binds"):
        GatewayConfig.from_mapping({"admin": {"host": "10.0.0.1"}})
    production = GatewayConfig.from_mapping(
        {
            "hub": {"host": "0.0.0.0"},
            "auth": {"jwt_algorithm": "HS256", "jwt_secret": SECRET},
            "admin": {"api_key": "k"},
        }
    )
    assert not production.auth.dev_mode and production.hub.host == "0.0.0.0"
    assert SECRET not in repr(production) and "'k'" not in repr(production)


def test_layers_merge_before_validation(tmp_path: Path) -> None:
    file = tmp_path / "hub.toml"
    file.write_text(
        '[hub]\nport = 1\nmax_connections = 5\n[auth]\njwt_algorithm = "HS256"\n'
        '[backend]\ntimeout = 3\n[log]\nformat = "json"\n'
    )
    environ = {
        "TRIO_GW_PORT": "2",
        "TRIO_GW_AUTH_JWT_SECRET": SECRET,  # completes the file's [auth]
        "TRIO_GW_ADMIN_API_KEY": "key",
        "TRIO_GW_BACKEND_FORWARD_TOKEN": "true",
        "TRIO_GW_ALLOWED_ORIGINS": "https://a.example, https://*.b.example",
        "UNRELATED": "x",
    }
    config = GatewayConfig.load(file, environ, {"hub": {"port": 3}, "log": {"level": "debug"}})
    assert (config.hub.port, config.hub.max_connections) == (3, 5)
    assert config.hub.allowed_origins == ("https://a.example", "https://*.b.example")
    assert config.auth.jwt_secret == SECRET and config.admin.api_key == "key"
    assert (config.backend.timeout, config.backend.forward_token) == (3.0, True)
    assert (config.log.format, config.log.level) == ("json", "DEBUG")
    assert GatewayConfig.load(None, {}) == GatewayConfig()


def test_from_env_and_evolve() -> None:
    config = GatewayConfig.from_env({"TRIO_GW_ADMIN_ENABLED": "no", "TRIO_GW_LOG_LEVEL": "error"})
    assert not config.admin.enabled and config.log.level == "ERROR"
    moved = config.evolve(hub={"port": 0}, backend={"url": "http://127.0.0.1:9/rpc"})
    assert (moved.hub.port, moved.backend.url) == (0, "http://127.0.0.1:9/rpc")
    with pytest.raises(ConfigError, match=r"backend\.max_inflight: expected a positive integer"):
        config.evolve(backend={"max_inflight": 0})
    with pytest.raises(ConfigError, match="unknown section: nope"):
        config.evolve(nope={})


def test_admin_tls_files_are_its_own_or_the_clients() -> None:
    assert GatewayConfig().admin_tls_files is None
    own = GatewayConfig.from_env(
        {"TRIO_GW_ADMIN_TLS_CERT_FILE": "a.pem", "TRIO_GW_ADMIN_TLS_KEY_FILE": "a.key"}
    )
    assert own.admin_tls_files == ("a.pem", "a.key")
    client_tls = {"cert_file": "c.pem", "key_file": "c.key"}
    reused = GatewayConfig.from_mapping({"tls": client_tls, "admin": {"use_client_tls": True}})
    assert reused.admin_tls_files == ("c.pem", "c.key")
    # [tls] alone secures the clients' port only.
    assert GatewayConfig.from_mapping({"tls": client_tls}).admin_tls_files is None


def test_the_backplane_section() -> None:
    assert not GatewayConfig().backplane.enabled
    config = GatewayConfig.from_env(
        {
            "TRIO_GW_BACKPLANE_URL": "redis://:pw@redis.internal:6380/1",
            "TRIO_GW_BACKPLANE_NODE_ID": "node-7",
            "TRIO_GW_BACKPLANE_PRESENCE_TTL": "10",
            "TRIO_GW_REUSE_PORT": "true",
        }
    )
    assert config.backplane.enabled
    assert config.backplane.url == "redis://:pw@redis.internal:6380/1"
    assert config.backplane.node_id == "node-7"
    assert config.backplane.presence_ttl == 10.0
    assert config.hub.reuse_port is True
    assert "pw" not in repr(config.backplane)  # the URL may hold a password
    for url in (
        "rediss://h:1",
        "unix:///run/redis.sock",
        "redis://localhost",
        "redis+sentinel://s1:26379,s2:26379/primary",
    ):
        assert GatewayConfig.from_mapping({"backplane": {"url": url}}).backplane.url == url
    for data, expected in (
        ({"url": "http://h:1"}, "backplane.url: expected a redis://, rediss://, unix:// or"),
        ({"url": "redis://"}, "backplane.url: expected a redis://"),
        ({"url": "redis+sentinel://s1:26379"}, "backplane.url: expected a redis://"),
        ({"node_id": "a:b"}, "backplane.node_id: expected a non-empty id without ':'"),
        ({"node_id": ""}, "backplane.node_id: expected a non-empty id without ':'"),
        (
            {"presence_interval": 5, "presence_ttl": 5},
            "backplane.presence_ttl: expected more than presence_interval (5.0), got 5.0",
        ),
        ({"timeout": 0}, "backplane.timeout: expected a number > 0 (seconds), got 0"),
    ):
        with pytest.raises(ConfigError) as error:
            GatewayConfig.from_mapping({"backplane": data})
        assert expected in str(error.value), (data, str(error.value))


def test_a_node_id_by_default_names_the_host_and_process() -> None:
    import os

    from trio_gw.gateway._config import default_node_id

    node_id = default_node_id()
    assert node_id.endswith(f"-{os.getpid()}") and ":" not in node_id
