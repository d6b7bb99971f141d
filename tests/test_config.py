"""HubConfig (trio_gw/_config.py): defaults, sources, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_gw import ConfigError, HubConfig


def test_defaults_are_sane() -> None:
    config = HubConfig()
    assert config.host == "127.0.0.1"
    assert config.port == 8765
    assert config.heartbeat_interval > 0
    assert config.writer == "fast"
    assert config.engine == "wsproto"
    assert config.compression is False


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("port", 70000, "port: expected an integer 0..65535, got 70000"),
        ("port", True, "port"),
        ("max_connections", 0, "max_connections: expected a positive integer"),
        ("heartbeat_timeout", 0, "heartbeat_timeout"),
        ("heartbeat_interval", float("nan"), "heartbeat_interval"),
        ("writer", "turbo", "writer: expected 'fast' or 'portable'"),
        ("engine", "asyncio", "engine: expected 'wsproto' or 'trio-websocket'"),
        ("compression", "maybe", "compression: expected true or false"),
        ("allowed_origins", ["example.com"], "allowed_origins"),
    ],
)
def test_bad_values_name_the_field(field: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        HubConfig.from_mapping({field: value})
    with pytest.raises(ConfigError, match=field):
        HubConfig(**{field: value})  # type: ignore[arg-type]


def test_compression_needs_the_wsproto_engine() -> None:
    """trio-websocket cannot negotiate permessage-deflate: asking for both is an error."""
    with pytest.raises(ConfigError, match="compression: permessage-deflate needs engine 'wsproto'"):
        HubConfig.from_mapping({"engine": "trio-websocket", "compression": True})
    assert HubConfig.from_mapping({"engine": "wsproto", "compression": "true"}).compression


def test_unknown_key_and_wrong_type_are_named() -> None:
    with pytest.raises(ConfigError, match="prot"):
        HubConfig.from_mapping({"prot": 1})
    with pytest.raises(ConfigError, match="port"):
        HubConfig.from_mapping({"port": "eighty"})


def test_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text('[hub]\nport = 9000\nallowed_origins = ["https://*.example.com"]\n')
    config = HubConfig.from_toml(path)
    assert config.port == 9000
    assert config.allowed_origins == ("https://*.example.com",)
    path.write_text("[hub]\nport = -1\n")
    with pytest.raises(ConfigError, match="port"):
        HubConfig.from_toml(path)
    path.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        HubConfig.from_toml(path)
    with pytest.raises(ConfigError, match="cannot read"):
        HubConfig.from_toml(tmp_path / "missing.toml")


def test_from_env_over_base() -> None:
    base = HubConfig(port=9000, max_connections=5)
    env = {
        "TRIO_GW_PORT": "9100",
        "TRIO_GW_HEARTBEAT_INTERVAL": "0",
        "TRIO_GW_ALLOWED_ORIGINS": "https://a.example.com, https://*.b.example.com",
        "UNRELATED": "x",
    }
    config = HubConfig.from_env(env, base=base)
    assert config.port == 9100
    assert config.max_connections == 5
    assert config.heartbeat_interval == 0
    assert config.allowed_origins == ("https://a.example.com", "https://*.b.example.com")
    with pytest.raises(ConfigError, match="port"):
        HubConfig.from_env({"TRIO_GW_PORT": "http"})
