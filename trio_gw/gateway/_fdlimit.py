"""The open-file limit of ``trio-gw serve``: raised at start, and checked against the config.

Every client connection is a file descriptor, and so are the listeners, the
admin API's connections and the backend calls. A process starts with the soft
``RLIMIT_NOFILE`` (often 1024), which any process may raise up to the hard
limit. ``raise_open_file_limit`` does that, and warns when the configured
connections still cannot fit: past the limit, ``accept()`` fails with EMFILE
and clients are turned away long before ``hub.max_connections``.

``open_files_needed`` and ``open_file_limit_warning`` decide; only
``raise_open_file_limit`` touches the process.
"""

from __future__ import annotations

import logging

from ._config import GatewayConfig

__all__ = ["open_file_limit_warning", "open_files_needed", "raise_open_file_limit"]

logger = logging.getLogger("trio_gw")

#: Descriptors the process holds besides connections and listeners: stdio,
#: trio's epoll and wake-up sockets, the admin API's clients, files being read.
PROCESS_FDS = 32
#: Per listening port: ``open_tcp_listeners`` may bind both IPv4 and IPv6.
_FDS_PER_LISTENER = 2


def open_files_needed(config: GatewayConfig) -> int:
    """The file descriptors the gateway may hold at once with ``config``.

    Args:
        config: The gateway's configuration.

    Returns:
        ``hub.max_connections``, plus the client and admin listeners, plus
        ``backend.max_inflight`` when a backend is configured, plus
        ``PROCESS_FDS`` for the process itself.
    """
    listeners = 1 + int(config.admin.enabled)
    backend = config.backend.max_inflight if config.backend.url is not None else 0
    return config.hub.max_connections + _FDS_PER_LISTENER * listeners + backend + PROCESS_FDS


def open_file_limit_warning(
    config: GatewayConfig, soft: int | None, hard: int | None
) -> str | None:
    """What to tell the operator when ``config`` cannot fit in the open-file limit.

    Args:
        config: The gateway's configuration.
        soft: The soft ``RLIMIT_NOFILE`` in force (after raising it); None if unlimited.
        hard: The hard ``RLIMIT_NOFILE``; None if unlimited.

    Returns:
        A warning that names the setting to lower and how to raise the limit,
        or None if everything fits.
    """
    needed = open_files_needed(config)
    if soft is None or needed <= soft:
        return None
    max_connections = config.hub.max_connections
    others = needed - max_connections
    if soft - others >= 1:
        lower = f"lower hub.max_connections to {soft - others}"
    elif config.backend.url is not None:
        lower = "lower backend.max_inflight and hub.max_connections"
    else:
        lower = "lower hub.max_connections"
    return (
        f"open-file limit {soft} (hard limit {'unlimited' if hard is None else hard}) is too "
        f"low for hub.max_connections = {max_connections}: the gateway may need {needed} file "
        f"descriptors ({others} of them for listeners, backend calls and the process), and "
        f"past the limit new clients are refused. Either {lower}, or raise the limit before "
        f"starting: `ulimit -n {needed}` (above the hard limit this needs root; "
        f"LimitNOFILE={needed} in a systemd unit, --ulimit nofile={needed} for docker run)"
    )


def raise_open_file_limit(config: GatewayConfig) -> int | None:
    """Raise the soft open-file limit to the hard limit; warn if ``config`` cannot fit.

    Does nothing where the ``resource`` module is unavailable (Windows).

    Args:
        config: The gateway's configuration.

    Returns:
        The soft limit now in force (``resource.RLIM_INFINITY`` if unlimited),
        or None where the platform has no ``RLIMIT_NOFILE``.

    Error handling:
        A refusal to raise the limit (macOS refuses an unlimited soft limit) is
        logged at debug level and the limit is kept; the warning then reflects it.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.debug("open-file limit stays %d: cannot raise it to %d: %s", soft, hard, exc)
        else:
            logger.debug("open-file limit raised from %d to %d", soft, hard)
            soft = hard
    unlimited = resource.RLIM_INFINITY
    warning = open_file_limit_warning(
        config, None if soft == unlimited else soft, None if hard == unlimited else hard
    )
    if warning is not None:
        logger.warning("%s", warning)
    return soft
