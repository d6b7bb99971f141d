"""trio_gw: a Trio-based, structured-concurrency WebSocket connection hub.

The public API is exactly what this module re-exports.
"""

from typing import TYPE_CHECKING, Any

from ._auth import Authorizer as Authorizer
from ._auth import Handshake as Handshake
from ._auth import Identity as Identity
from ._auth import TokenChecker as TokenChecker
from ._auth import bearer_token_authorizer as bearer_token_authorizer
from ._auth import extract_token as extract_token
from ._close_codes import CloseCode as CloseCode
from ._config import HubConfig as HubConfig
from ._devmode import dev_authorizer as dev_authorizer
from ._devmode import echo_backend as echo_backend
from ._errors import AuthRefused as AuthRefused
from ._errors import BackplaneUnavailable as BackplaneUnavailable
from ._errors import ConfigError as ConfigError
from ._errors import GatewayError as GatewayError
from ._errors import HubClosedError as HubClosedError
from ._errors import HubOverloadedError as HubOverloadedError
from ._hub import HandlerManager as HandlerManager
from ._hub import MessageCallback as MessageCallback
from ._hub import Reply as Reply
from ._hub import open_hub as open_hub
from ._hub import serve_hub as serve_hub
from ._presence import Presence as Presence
from ._session import Session as Session
from ._statistics import HubStatistics as HubStatistics
from .gateway import AdminConfig as AdminConfig
from .gateway import AuthConfig as AuthConfig
from .gateway import BackendConfig as BackendConfig
from .gateway import BackplaneConfig as BackplaneConfig
from .gateway import GatewayConfig as GatewayConfig
from .gateway import LogConfig as LogConfig
from .gateway import TlsConfig as TlsConfig

if TYPE_CHECKING:
    from ._redis_backplane import BackplaneStatistics as BackplaneStatistics
    from ._redis_backplane import RedisBackplane as RedisBackplane
    from .gateway import Gateway as Gateway
    from .gateway import serve_gateway as serve_gateway

# The standalone gateway (trio_gw.gateway) pulls in an HTTP stack (hypercorn,
# Starlette, httpx, pyjwt, prometheus-client). Its configuration classes are
# light and imported above; the rest is imported on first use, so that a program
# that only embeds the hub neither waits for it nor carries its objects, which
# every full garbage collection would otherwise traverse. The Redis backplane
# (coredis, about 0.3 s to import) is imported on first use too.
_GATEWAY_NAMES = frozenset({"Gateway", "serve_gateway"})
_BACKPLANE_NAMES = frozenset({"BackplaneStatistics", "RedisBackplane"})


def __getattr__(name: str) -> Any:
    if name in _BACKPLANE_NAMES:
        from . import _redis_backplane

        value = getattr(_redis_backplane, name)
        globals()[name] = value
        return value
    if name in _GATEWAY_NAMES:
        from . import gateway

        value = getattr(gateway, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "AuthRefused",
    "Authorizer",
    "BackplaneConfig",
    "BackplaneStatistics",
    "BackplaneUnavailable",
    "CloseCode",
    "BackendConfig",
    "ConfigError",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "HandlerManager",
    "Handshake",
    "HubClosedError",
    "HubConfig",
    "HubOverloadedError",
    "HubStatistics",
    "Identity",
    "LogConfig",
    "MessageCallback",
    "Presence",
    "RedisBackplane",
    "Reply",
    "Session",
    "TlsConfig",
    "TokenChecker",
    "bearer_token_authorizer",
    "dev_authorizer",
    "echo_backend",
    "extract_token",
    "open_hub",
    "serve_gateway",
    "serve_hub",
]
