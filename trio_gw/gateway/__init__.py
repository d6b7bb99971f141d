"""The standalone gateway: one application of the trio_gw core library.

``trio-gw serve`` runs it: a hub (from the core, ``trio_gw``) with JWT
authentication, forwarding of requests to an HTTP backend, and an admin API
with a dashboard, health checks and Prometheus metrics, all in one nursery.
It builds on the core modules (``trio_gw._hub``, ``trio_gw._config``, ...);
no core module imports it. Only ``trio_gw/__init__.py`` re-exports its public
names, so that ``trio_gw.GatewayConfig`` and ``trio_gw.serve_gateway`` keep
working.

The configuration classes are light and imported at once. ``Gateway``,
``serve_gateway`` and ``main`` pull in an HTTP stack (hypercorn, Starlette,
httpx, pyjwt, prometheus-client) and are imported on first use, so that
``import trio_gw`` (which re-exports the configuration classes from here) stays
cheap for a program that only embeds the hub.
"""

from typing import TYPE_CHECKING, Any

from ._config import AdminConfig as AdminConfig
from ._config import AuthConfig as AuthConfig
from ._config import BackendConfig as BackendConfig
from ._config import BackplaneConfig as BackplaneConfig
from ._config import GatewayConfig as GatewayConfig
from ._config import LogConfig as LogConfig
from ._config import TlsConfig as TlsConfig

if TYPE_CHECKING:
    from ._cli import main as main
    from ._gateway import Gateway as Gateway
    from ._gateway import serve_gateway as serve_gateway

#: The names imported on first use, and the module each lives in.
_LAZY = {"Gateway": "_gateway", "serve_gateway": "_gateway", "main": "_cli"}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
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
]
