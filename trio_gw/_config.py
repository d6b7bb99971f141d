"""The hub's configuration: one frozen object, every default and unit in one place."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.preconf.orjson import make_converter

from ._errors import ConfigError
from ._origins import OriginPolicy

__all__ = ["HubConfig"]

_ENV_PREFIX = "TRIO_GW_"


def _check(
    predicate: Callable[[Any], bool], allowed: str
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """Build an attrs validator whose error names the field, the value and what is allowed."""

    def validate(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not predicate(value):
            raise ConfigError(f"{attribute.name}: expected {allowed}, got {value!r}")

    return validate


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not to us


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _port(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= 65535


def _non_negative_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and v >= 0


def _positive_number(v: Any) -> bool:
    return _non_negative_number(v) and v > 0


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _compression_needs_wsproto(config: Any, compression: bool) -> None:
    if compression and config.engine != "wsproto":
        raise ConfigError(
            f"compression: permessage-deflate needs engine 'wsproto' (engine is {config.engine!r})"
        )


#: The connection layers a hub can run on (``HubConfig.engine``).
ENGINES = ("wsproto", "trio-websocket")


def _valid_origins(v: Any) -> bool:
    try:
        OriginPolicy(v)
    except ValueError:
        return False
    return True


@attrs.frozen(kw_only=True)
class HubConfig:
    """Settings of one hub. Sizes are in bytes or messages, durations in seconds.

    Build it directly, or with ``from_mapping``, ``from_toml`` or ``from_env``.
    Every constructor validates: a bad value raises ``ConfigError`` naming the
    field, the value and what is allowed.
    """

    #: Interface to bind. Dev mode refuses anything but a loopback address.
    host: str = attrs.field(default="127.0.0.1", validator=_check(bool, "a host name or address"))
    #: TCP port; 0 lets the OS choose (the bound port is reported by ``serve_hub``).
    port: int = attrs.field(
        default=8765,
        validator=_check(_port, "an integer 0..65535"),
    )
    #: Bind with SO_REUSEPORT, so that several processes on one machine share
    #: ``port`` (the kernel spreads the connections); for a cluster of nodes.
    reuse_port: bool = False
    #: Connections held at once, handshakes included; the next one gets HTTP 503.
    max_connections: int = attrs.field(
        default=10_000, validator=_check(_positive_int, "a positive integer")
    )
    #: Largest client message; a larger one closes that connection with 1009.
    max_message_size: int = attrs.field(
        default=1 << 20, validator=_check(_positive_int, "a positive integer (bytes)")
    )
    #: Client messages read but not yet handed to the backend callback, per connection.
    #: When full, the hub stops reading from that client (TCP backpressure).
    inbound_queue_size: int = attrs.field(
        default=16, validator=_check(_positive_int, "a positive integer (messages)")
    )
    #: Messages queued for one client at most; a message that does not fit
    #: closes it as a slow consumer (4008). Above half of it, senders wait for
    #: the client to drain to a quarter (flow control; see ``stall_timeout``).
    outbound_queue_size: int = attrs.field(
        default=1024, validator=_check(_positive_int, "a positive integer (messages)")
    )
    #: Bytes queued for one client at most; works like ``outbound_queue_size``.
    outbound_queue_bytes: int = attrs.field(
        default=1 << 20, validator=_check(_positive_int, "a positive integer (bytes)")
    )
    #: Seconds a client whose queue is over half full may go without taking a
    #: write before it is closed as a slow consumer (4008); no sender waits
    #: for a client longer than this.
    stall_timeout: float = attrs.field(
        default=5.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Seconds a message may wait in the queue of a client whose queue is over
    #: half full before that client is closed as a slow consumer (4008): a
    #: reader that keeps reading, but slower than the senders, cannot hold
    #: them back for ever.
    max_lag: float = attrs.field(
        default=10.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Bytes queued for all clients together; above it, senders wait until the
    #: queues drain to three quarters of it.
    queued_bytes_budget: int = attrs.field(
        default=64 << 20, validator=_check(_positive_int, "a positive integer (bytes)")
    )
    #: Largest single socket write the writer builds from queued frames.
    max_write_bytes: int = attrs.field(
        default=256 << 10, validator=_check(_positive_int, "a positive integer (bytes)")
    )
    #: Backend callbacks running at once for one connection. 1 keeps the
    #: seed's order: each message is processed before the next is started.
    max_inflight_per_session: int = attrs.field(
        default=1, validator=_check(_positive_int, "a positive integer")
    )
    #: Seconds between server pings; 0 turns the heartbeat off.
    heartbeat_interval: float = attrs.field(
        default=20.0, validator=_check(_non_negative_number, "a number >= 0 (seconds)")
    )
    #: Seconds to wait for a pong before closing with 4012.
    heartbeat_timeout: float = attrs.field(
        default=20.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Seconds a client has to complete the opening handshake (auth included).
    handshake_timeout: float = attrs.field(
        default=10.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Seconds a server-side close may take: draining the queue, then the close handshake.
    close_timeout: float = attrs.field(
        default=5.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Seconds a hub shutdown waits for sessions to drain and close before cancelling them.
    shutdown_timeout: float = attrs.field(
        default=10.0, validator=_check(_positive_number, "a number > 0 (seconds)")
    )
    #: Allowed ``Origin`` values: exact (``https://app.example.com``) or with a
    #: leading wildcard label (``https://*.example.com``). Empty allows any origin.
    #: Requests without an ``Origin`` header (non-browser clients) are allowed.
    allowed_origins: tuple[str, ...] = attrs.field(
        default=(),
        converter=tuple,
        validator=_check(
            _valid_origins, "origins like 'https://app.example.com' or 'https://*.example.com'"
        ),
    )
    #: Commands waiting for the hub actor; the async send methods wait when it is full.
    hub_queue_size: int = attrs.field(
        default=8192, validator=_check(_positive_int, "a positive integer (commands)")
    )
    #: "fast" frames a message once and writes queued frames in one syscall (it
    #: uses trio-websocket internals, checked at start-up); "portable" uses only
    #: trio-websocket's public ``send_message``.
    writer: str = attrs.field(
        default="fast",
        validator=_check(lambda v: v in ("fast", "portable"), "'fast' or 'portable'"),
    )
    #: The connection layer: "wsproto" drives wsproto directly, one task per
    #: idle connection; "trio-websocket" runs connections on trio-websocket's
    #: server (``writer`` applies to it only).
    engine: str = attrs.field(
        default="wsproto",
        validator=_check(lambda v: v in ENGINES, "'wsproto' or 'trio-websocket'"),
    )
    #: Offer permessage-deflate (RFC 7692) to clients that ask for it (wsproto
    #: engine only). Costs memory per compressing connection; see the README.
    compression: bool = attrs.field(
        default=False,
        validator=[
            _check(_bool, "true or false"),
            lambda c, a, v: _compression_needs_wsproto(c, v),
        ],
    )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> HubConfig:
        """Build a config from plain data, e.g. parsed TOML.

        Raises:
            ConfigError: an unknown key or a bad value; the message names the field.
        """
        return _structure(data, cls)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> HubConfig:
        """Read a TOML file; its ``[hub]`` table, or the top level if there is none.

        Raises:
            ConfigError: the file is missing, is not TOML, or holds a bad value.
        """
        try:
            with Path(path).open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from None
        table = data.get("hub", data)
        if not isinstance(table, dict):
            raise ConfigError("hub: expected a table")
        return cls.from_mapping(table)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, base: HubConfig | None = None
    ) -> HubConfig:
        """Read ``TRIO_GW_<FIELD>`` variables over ``base`` (the defaults if None).

        Lists (``TRIO_GW_ALLOWED_ORIGINS``) are comma-separated.

        Raises:
            ConfigError: a variable has a bad value; the message names it.
        """
        environ = os.environ if environ is None else environ
        data = _converter.unstructure(base or cls())
        data.update(_env_values(cls, environ, _ENV_PREFIX))
        return _structure(data, cls)

    def evolve(self, **changes: Any) -> HubConfig:
        """Return a copy with ``changes`` applied and validated."""
        return attrs.evolve(self, **changes)


_T = TypeVar("_T")


def _structure(data: Mapping[str, Any], cls: type[_T]) -> _T:
    """Structure and validate one config class; errors name the field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table, got {data!r}")
    try:
        return _converter.structure(dict(data), cls)
    except ConfigError:
        raise
    except cattrs.ClassValidationError as exc:
        causes = [e for e in _leaves(exc) if isinstance(e, ConfigError)]
        if causes:
            raise ConfigError("; ".join(str(c) for c in causes)) from None
        raise ConfigError(
            "; ".join(
                _field_first(m)
                for m in cattrs.transform_error(
                    exc, path="config", format_exception=_format_exception
                )
            )
        ) from None


def _env_values(cls: type[Any], environ: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """The ``<prefix><FIELD>`` variables that are set for ``cls``'s fields, as raw values.

    Lists are comma-separated; everything else is left as a string for the
    converter, which parses numbers and booleans.
    """
    values: dict[str, Any] = {}
    for field in attrs.fields(cls):
        raw = environ.get(prefix + field.name.upper())
        if raw is None:
            continue
        if field.type in ("tuple[str, ...]", tuple[str, ...]):
            values[field.name] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            values[field.name] = raw
    return values


def _format_exception(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown field(s): {', '.join(sorted(exc.extra_fields))}"
    return str(exc)


def _field_first(message: str, root: str = "config") -> str:
    """Turn cattrs's "problem @ config.port" into "port: problem"."""
    problem, _, path = message.rpartition(" @ ")
    field = path.removeprefix(root).lstrip(".")
    return f"{field}: {problem}" if field else problem


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _structure_int(value: Any, _type: type) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _structure_float(value: Any, _type: type) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    raise ValueError(f"expected a number, got {value!r}")


def _structure_bool(value: Any, _type: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[value.strip().lower()]
    raise ValueError(f"expected true or false, got {value!r}")


_BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _structure_str(value: Any, _type: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


_converter = make_converter(forbid_extra_keys=True)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(float, _structure_float)
_converter.register_structure_hook(str, _structure_str)
_converter.register_structure_hook(bool, _structure_bool)
