"""The standalone gateway's configuration: the hub's settings plus auth, backend, admin, TLS, logs.

One frozen tree, loaded from a TOML file, ``TRIO_GW_*`` variables and flags,
in that order of precedence (flags win). Every value is validated when the tree
is built; an error names the field with its section (``auth.jwt_algorithm``),
the value and what is allowed.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from .._backplane_core import SentinelUrl
from .._config import (
    _ENV_PREFIX,
    HubConfig,
    _check,
    _converter,
    _env_values,
    _non_negative_number,
    _port,
    _positive_int,
    _positive_number,
    _structure,
)
from .._errors import ConfigError
from .._hub import is_loopback

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "BackendConfig",
    "BackplaneConfig",
    "GatewayConfig",
    "LogConfig",
    "TlsConfig",
]

JWT_ALGORITHMS = ("HS256", "RS256", "ES256")
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
_MIN_HMAC_SECRET_BYTES = 32


def _optional(predicate: Any) -> Any:
    return lambda v: v is None or predicate(v)


def _non_empty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _http_url(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    split = urlsplit(v)
    return split.scheme in ("http", "https") and bool(split.netloc)


@attrs.frozen(kw_only=True)
class AuthConfig:
    """``[auth]``: how clients prove who they are. Nothing set means dev mode.

    Dev mode takes the bearer token as the user id and only binds loopback.
    Set ``jwt_algorithm`` and its key to check JSON Web Tokens instead.
    """

    #: "HS256" (shared secret), "RS256" or "ES256" (public key, JWKS file or JWKS URL);
    #: unset: dev mode.
    jwt_algorithm: str | None = attrs.field(
        default=None,
        validator=_check(
            _optional(JWT_ALGORITHMS.__contains__), "one of " + ", ".join(JWT_ALGORITHMS)
        ),
    )
    #: HS256 shared secret, at least 32 bytes. Prefer TRIO_GW_AUTH_JWT_SECRET to a file.
    jwt_secret: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a non-empty string"), repr=False
    )
    #: RS256/ES256: a PEM file holding the public key.
    jwt_public_key_file: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a file path")
    )
    #: RS256/ES256: a JWKS file (``{"keys": [...]}``); the token's ``kid`` picks the key.
    jwks_file: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a file path")
    )
    #: RS256/ES256: a JWKS URL (an identity provider's ``.../jwks.json``), fetched at
    #: start, every ``jwks_refresh_interval``, and when a token's ``kid`` is unknown.
    jwks_url: str | None = attrs.field(
        default=None, validator=_check(_optional(_http_url), "an http:// or https:// URL")
    )
    #: Seconds between background fetches of ``jwks_url``.
    jwks_refresh_interval: float = attrs.field(
        default=300.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Fewest seconds between two fetches of ``jwks_url`` on an unknown ``kid``, so
    #: that tokens with made-up kids cannot hammer the provider; failed fetches are
    #: retried with a backoff that grows to this.
    jwks_min_refresh_interval: float = attrs.field(
        default=30.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Seconds one fetch of ``jwks_url`` may take in all, connecting included.
    jwks_timeout: float = attrs.field(
        default=5.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Required ``aud`` claim, if set.
    audience: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a non-empty string")
    )
    #: Required ``iss`` claim, if set.
    issuer: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a non-empty string")
    )
    #: Seconds of clock skew allowed when checking ``exp``, ``nbf`` and ``iat``.
    leeway: float = attrs.field(
        default=5.0, validator=_check(_non_negative_number, "a number >= 0 (seconds)")
    )
    #: Seconds a connection stays open after its token's ``exp`` (plus leeway)
    #: without a refresh; then it is closed with 4005.
    refresh_grace: float = attrs.field(
        default=0.0, validator=_check(_non_negative_number, "a number >= 0 (seconds)")
    )
    #: The claim read as the display name; ``sub`` is used when it is absent.
    username_claim: str = attrs.field(default="name", validator=_check(_non_empty_str, "a name"))

    def __attrs_post_init__(self) -> None:
        algorithm = self.jwt_algorithm
        keys = {
            "jwt_secret": self.jwt_secret,
            "jwt_public_key_file": self.jwt_public_key_file,
            "jwks_file": self.jwks_file,
            "jwks_url": self.jwks_url,
        }
        given = sorted(name for name, value in keys.items() if value is not None)
        if algorithm is None:
            if given:
                raise ConfigError(
                    f"jwt_algorithm: required when {', '.join(given)} is set "
                    f"(expected one of {', '.join(JWT_ALGORITHMS)})"
                )
            return
        if algorithm == "HS256":
            if given != ["jwt_secret"]:
                field = "jwks_url" if "jwks_url" in given else "jwt_secret"
                raise ConfigError(
                    f"{field}: HS256 needs jwt_secret and no key file or URL, got {given or 'none'}"
                )
            assert self.jwt_secret is not None
            if len(self.jwt_secret.encode()) < _MIN_HMAC_SECRET_BYTES:
                raise ConfigError(
                    f"jwt_secret: expected at least {_MIN_HMAC_SECRET_BYTES} bytes for HS256, "
                    f"got {len(self.jwt_secret.encode())}"
                )
        elif given not in (["jwt_public_key_file"], ["jwks_file"], ["jwks_url"]):
            field = "jwks_url" if "jwks_url" in given else "jwt_public_key_file"
            raise ConfigError(
                f"{field}: {algorithm} needs exactly one of jwt_public_key_file, jwks_file "
                f"or jwks_url (and no jwt_secret), got {given or 'none'}"
            )
        if self.jwks_min_refresh_interval > self.jwks_refresh_interval:
            raise ConfigError(
                f"jwks_min_refresh_interval: expected at most jwks_refresh_interval "
                f"({self.jwks_refresh_interval!r}), got {self.jwks_min_refresh_interval!r}"
            )

    @property
    def dev_mode(self) -> bool:
        """True when no authentication is configured."""
        return self.jwt_algorithm is None


@attrs.frozen(kw_only=True)
class BackendConfig:
    """``[backend]``: where client requests go (the service mesh).

    Unset ``url``: in dev mode requests are echoed back; otherwise each one
    gets an error response saying that no backend is configured.
    """

    #: Requests are POSTed here as JSON.
    url: str | None = attrs.field(
        default=None, validator=_check(_optional(_http_url), "an http:// or https:// URL")
    )
    #: Seconds for one backend call, connecting included.
    timeout: float = attrs.field(
        default=10.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Backend calls in flight at once, all connections together.
    max_inflight: int = attrs.field(
        default=256, validator=_check(_positive_int, "a positive integer")
    )
    #: Backend calls in flight at once for one connection.
    max_inflight_per_session: int = attrs.field(
        default=8, validator=_check(_positive_int, "a positive integer")
    )
    #: Send the client's token to the backend as ``Authorization: Bearer <token>``.
    forward_token: bool = False


@attrs.frozen(kw_only=True)
class AdminConfig:
    """``[admin]``: the HTTP API, dashboard, health checks and metrics, on their own port."""

    #: Serve the admin HTTP port at all.
    enabled: bool = True
    #: Interface for the admin port; keep it private.
    host: str = attrs.field(
        default="127.0.0.1", validator=_check(_non_empty_str, "a host name or address")
    )
    #: Port for the admin API; 0 lets the OS choose.
    port: int = attrs.field(default=8766, validator=_check(_port, "an integer 0..65535"))
    #: Required as ``Authorization: Bearer <key>`` on /api/*. Required unless in
    #: dev mode on loopback. Prefer TRIO_GW_ADMIN_API_KEY to a file.
    api_key: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a non-empty string"), repr=False
    )
    #: Serve the admin port over https with this PEM certificate chain (with
    #: ``tls_key_file``; both or neither).
    tls_cert_file: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a file path")
    )
    #: The PEM private key of ``tls_cert_file``.
    tls_key_file: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a file path")
    )
    #: Serve the admin port over https with ``[tls]``'s certificate and key
    #: (instead of ``tls_cert_file`` and ``tls_key_file``).
    use_client_tls: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(
                "tls_cert_file: tls_cert_file and tls_key_file go together, set both or neither"
            )
        if self.use_client_tls and self.tls_cert_file is not None:
            raise ConfigError(
                "use_client_tls: reuses [tls]'s files, so set it or tls_cert_file and "
                "tls_key_file, not both"
            )


@attrs.frozen(kw_only=True)
class TlsConfig:
    """``[tls]``: serve ``wss://`` to clients. Both files, or neither."""

    #: PEM certificate chain.
    cert_file: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a file path")
    )
    #: PEM private key.
    key_file: str | None = attrs.field(
        default=None, validator=_check(_optional(_non_empty_str), "a file path")
    )

    def __attrs_post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file: cert_file and key_file go together, set both or neither")

    @property
    def enabled(self) -> bool:
        """True when clients are served over TLS."""
        return self.cert_file is not None


def _backplane_url(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    if v.startswith(f"{SentinelUrl.SCHEME}://"):
        try:
            SentinelUrl.parse(v)
        except ValueError:
            return False
        return True
    split = urlsplit(v)
    if split.scheme == "unix":
        return bool(split.path)
    return split.scheme in ("redis", "rediss") and bool(split.hostname)


def _node_id(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and ":" not in v and v.strip() == v


def default_node_id() -> str:
    """``<host name>-<process id>``: unique on a machine, readable in logs and presence."""
    return f"{socket.gethostname().replace(':', '-')}-{os.getpid()}"


@attrs.frozen(kw_only=True)
class BackplaneConfig:
    """``[backplane]``: run as one node of a cluster, connected through Redis or Valkey.

    Without ``url`` the gateway is a single node. With it, every node that
    shares the server (and ``prefix``) behaves as one hub: sends, closes and
    the admin API reach every node, and presence counts them all.
    """

    #: ``redis://[user:password@]host:port[/db]``, ``rediss://...`` (TLS) or
    #: ``unix:///path/to/socket``. A server in cluster mode is detected and used
    #: as a Redis Cluster (sharded pub/sub). ``redis+sentinel://host:port[,host:port]/name``
    #: asks Sentinels for the primary ``name``. Prefer TRIO_GW_BACKPLANE_URL when
    #: it holds a password.
    url: str | None = attrs.field(
        default=None,
        validator=_check(
            _optional(_backplane_url),
            "a redis://, rediss://, unix:// or redis+sentinel://host:port[,...]/service URL",
        ),
        repr=False,
    )
    #: This node's id, unique in the cluster; it prefixes the node's session ids.
    #: Unset: ``<host name>-<process id>``.
    node_id: str | None = attrs.field(
        default=None, validator=_check(_optional(_node_id), "a non-empty id without ':'")
    )
    #: Prefixes every channel and key, so that clusters can share a server.
    prefix: str = attrs.field(default="trio-gw", validator=_check(_node_id, "a non-empty name"))
    #: Seconds between a node's presence heartbeats.
    presence_interval: float = attrs.field(
        default=2.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Seconds a node stays in presence after its last heartbeat (a killed node
    #: drops out within this); more than ``presence_interval``.
    presence_ttl: float = attrs.field(
        default=6.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Messages waiting to be published at most (a message to many users
    #: counts once); more are dropped and counted.
    publish_queue_size: int = attrs.field(
        default=10_000, validator=_check(_positive_int, "a positive integer (messages)")
    )
    #: Messages from other nodes waiting for this hub at most; more are dropped and counted.
    inbox_size: int = attrs.field(
        default=10_000, validator=_check(_positive_int, "a positive integer (messages)")
    )
    #: A message to more users than this goes once to the broadcast channel (every
    #: node reads it) instead of once to each user's channel; on a single server,
    #: so does one to at least as many users as there are nodes listening.
    fanout_threshold: int = attrs.field(
        default=64, validator=_check(_positive_int, "a positive integer (users)")
    )
    #: Seconds for connecting to the server and for any one of its replies.
    timeout: float = attrs.field(
        default=5.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: The longest wait between two attempts to reconnect, in seconds.
    reconnect_max: float = attrs.field(
        default=2.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )

    def __attrs_post_init__(self) -> None:
        if self.presence_ttl <= self.presence_interval:
            raise ConfigError(
                f"presence_ttl: expected more than presence_interval "
                f"({self.presence_interval!r}), got {self.presence_ttl!r}"
            )

    @property
    def enabled(self) -> bool:
        """True when this gateway is a node of a cluster."""
        return self.url is not None


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


@attrs.frozen(kw_only=True)
class LogConfig:
    """``[log]``: what is logged, and how."""

    #: "text" for people, "json" for one JSON object per line.
    format: str = attrs.field(
        default="text", validator=_check(lambda v: v in ("text", "json"), "'text' or 'json'")
    )
    #: DEBUG, INFO, WARNING or ERROR.
    level: str = attrs.field(
        default="INFO",
        converter=_upper,
        validator=_check(
            lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"), "DEBUG, INFO, WARNING or ERROR"
        ),
    )


_SECTIONS: dict[str, type[Any]] = {
    "hub": HubConfig,
    "auth": AuthConfig,
    "backend": BackendConfig,
    "admin": AdminConfig,
    "tls": TlsConfig,
    "log": LogConfig,
    "backplane": BackplaneConfig,
}


@attrs.frozen(kw_only=True)
class GatewayConfig:
    """Everything ``trio-gw serve`` needs, one table per section of the TOML file.

    Build it with ``from_toml``, ``from_env`` or ``from_mapping``; ``evolve``
    applies flags. Cross-section rules are checked too: without auth, the hub
    binds loopback only, a non-loopback admin port needs an API key, and
    ``admin.use_client_tls`` needs ``[tls]``.
    """

    hub: HubConfig = attrs.Factory(HubConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    backend: BackendConfig = attrs.Factory(BackendConfig)
    admin: AdminConfig = attrs.Factory(AdminConfig)
    tls: TlsConfig = attrs.Factory(TlsConfig)
    log: LogConfig = attrs.Factory(LogConfig)
    backplane: BackplaneConfig = attrs.Factory(BackplaneConfig)

    def __attrs_post_init__(self) -> None:
        if self.auth.dev_mode and not is_loopback(self.hub.host):
            raise ConfigError(
                f"hub.host: without [auth] (dev mode: token = user id) the hub binds loopback "
                f"only, got {self.hub.host!r}; configure auth.jwt_algorithm to serve other hosts"
            )
        if self.admin.enabled and self.admin.api_key is None:
            if not is_loopback(self.admin.host):
                raise ConfigError(
                    f"admin.api_key: required when the admin API binds {self.admin.host!r} "
                    "(not loopback)"
                )
            if not self.auth.dev_mode:
                raise ConfigError(
                    "admin.api_key: required once auth is configured (or set admin.enabled = false)"
                )
        if self.admin.enabled and self.admin.use_client_tls and not self.tls.enabled:
            raise ConfigError(
                "admin.use_client_tls: needs [tls] cert_file and key_file to reuse, and none is set"
            )

    @property
    def admin_tls_files(self) -> tuple[str, str] | None:
        """The certificate chain and key the admin port serves https with, or None for http."""
        admin, tls = self.admin, self.tls
        if admin.tls_cert_file is not None and admin.tls_key_file is not None:
            return admin.tls_cert_file, admin.tls_key_file
        if admin.use_client_tls and tls.cert_file is not None and tls.key_file is not None:
            return tls.cert_file, tls.key_file
        return None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GatewayConfig:
        """Build a config from plain data shaped like the TOML file.

        Raises:
            ConfigError: an unknown section or key, or a bad value; the message
                names the field as ``section.field``.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table of sections, got {data!r}")
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(
                f"unknown section(s): {', '.join(unknown)}; expected {', '.join(_SECTIONS)}"
            )
        sections: dict[str, Any] = {}
        for name, section_cls in _SECTIONS.items():
            table = data.get(name, {})
            if not isinstance(table, Mapping):
                raise ConfigError(f"{name}: expected a table, got {table!r}")
            try:
                sections[name] = _structure(table, section_cls)
            except ConfigError as exc:
                raise ConfigError(_in_section(name, str(exc))) from None
        return cls(**sections)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> GatewayConfig:
        """Layer a TOML file, ``TRIO_GW_*`` variables and overrides (flags), then validate once.

        Precedence: ``overrides`` > ``environ`` > the file > defaults. The layers
        are merged before validation, so that a rule spanning fields (HS256
        needs a secret) may be met by a secret that only the environment holds.

        Raises:
            ConfigError: the file cannot be read, or a value is bad; the message
                names the field.
        """
        data = _read_toml(path) if path is not None else {}
        layers = [_env_tables(os.environ if environ is None else environ), overrides or {}]
        for layer in layers:
            for section, fields in layer.items():
                table = data.setdefault(section, {})
                if not isinstance(table, dict):
                    raise ConfigError(f"{section}: expected a table, got {table!r}")
                table.update(fields)
        return cls.from_mapping(data)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> GatewayConfig:
        """Read a TOML file with one table per section (``[hub]``, ``[auth]``, ...).

        Raises:
            ConfigError: the file is missing, is not TOML, or holds a bad value.
        """
        return cls.from_mapping(_read_toml(path))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, base: GatewayConfig | None = None
    ) -> GatewayConfig:
        """Lay ``TRIO_GW_*`` variables over ``base`` (the defaults if None).

        Hub settings are ``TRIO_GW_<FIELD>`` (``TRIO_GW_PORT``); the other
        sections are ``TRIO_GW_<SECTION>_<FIELD>`` (``TRIO_GW_AUTH_JWT_SECRET``).

        Raises:
            ConfigError: a variable has a bad value; the message names the field.
        """
        environ = os.environ if environ is None else environ
        data = _converter.unstructure(base or cls())
        for section, fields in _env_tables(environ).items():
            data[section].update(fields)
        return cls.from_mapping(data)

    def evolve(self, **changes: Mapping[str, Any]) -> GatewayConfig:
        """Return a copy with some fields of some sections changed, validated.

        ``config.evolve(hub={"port": 0}, log={"format": "json"})``.

        Raises:
            ConfigError: a changed value is bad; the message names the field.
        """
        sections: dict[str, Any] = {}
        for name, fields in changes.items():
            if name not in _SECTIONS:
                raise ConfigError(f"unknown section: {name}")
            try:
                sections[name] = attrs.evolve(getattr(self, name), **fields)
            except ConfigError as exc:
                raise ConfigError(_in_section(name, str(exc))) from None
        return attrs.evolve(self, **sections)


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from None


def _env_tables(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The ``TRIO_GW_*`` variables that are set, as ``{section: {field: raw value}}``."""
    tables: dict[str, dict[str, Any]] = {}
    for name, section_cls in _SECTIONS.items():
        prefix = _ENV_PREFIX if name == "hub" else f"{_ENV_PREFIX}{name.upper()}_"
        values = _env_values(section_cls, environ, prefix)
        if values:
            tables[name] = values
    return tables


def _in_section(section: str, message: str) -> str:
    """Prefix each "field: problem" of a joined message with its section."""
    parts = []
    for part in message.split("; "):
        field, sep, problem = part.partition(": ")
        parts.append(
            f"{section}.{field}: {problem}"
            if sep and field.isidentifier()
            else f"{section}: {part}"
        )
    return "; ".join(parts)
