"""The ``trio-gw`` command line: a thin layer over ``GatewayConfig`` and ``serve_gateway``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from .._errors import ConfigError
from ._config import GatewayConfig
from ._fdlimit import raise_open_file_limit
from ._gateway import Gateway, check_gateway_config, serve_gateway
from ._logging import configure_logging

__all__ = ["main"]

logger = logging.getLogger("trio_gw")

# flag -> (section, field); a flag left out keeps the file's or environment's value.
_FLAGS: dict[str, tuple[str, str]] = {
    "host": ("hub", "host"),
    "port": ("hub", "port"),
    "admin_host": ("admin", "host"),
    "admin_port": ("admin", "port"),
    "backend_url": ("backend", "url"),
    "tls_cert": ("tls", "cert_file"),
    "tls_key": ("tls", "key_file"),
    "admin_tls_cert": ("admin", "tls_cert_file"),
    "admin_tls_key": ("admin", "tls_key_file"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
    "backplane_url": ("backplane", "url"),
    "node_id": ("backplane", "node_id"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-gw",
        description="A Trio WebSocket hub. Settings: flags > TRIO_GW_* environment > "
        "--config file > defaults. Without [auth] it runs in dev mode: the token is the "
        "user id, requests are echoed, and only loopback is bound.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the hub, its admin API and its backend forwarding"),
        ("check-config", "validate the configuration (and load its key files), then exit"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", metavar="FILE", help="TOML config file (see hub.toml)")
        command.add_argument("--host", help="interface for clients (default 127.0.0.1)")
        command.add_argument("--port", type=int, help="port for clients, 0 for any (default 8765)")
        command.add_argument("--admin-host", help="interface for the admin API (default 127.0.0.1)")
        command.add_argument("--admin-port", type=int, help="admin API port (default 8766)")
        command.add_argument("--backend-url", help="POST client requests to this URL")
        command.add_argument("--tls-cert", metavar="PEM", help="serve wss:// with this certificate")
        command.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
        command.add_argument(
            "--admin-tls-cert", metavar="PEM", help="serve the admin API over https with this"
        )
        command.add_argument("--admin-tls-key", metavar="PEM", help="the admin certificate's key")
        command.add_argument("--log-format", choices=["text", "json"], help="default text")
        command.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        command.add_argument(
            "--backplane-url",
            metavar="URL",
            help="be a node of a cluster on this Redis/Valkey (redis://, rediss://, unix://, "
            "redis+sentinel://)",
        )
        command.add_argument("--node-id", help="this node's id in the cluster (default host-pid)")
    return parser


def load_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Defaults < config file < ``TRIO_GW_*`` environment < flags actually given.

    Raises:
        ConfigError: a value is bad; the message names the field.
    """
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, field) in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault(section, {})[field] = value
    return GatewayConfig.load(args.config, environ, overrides)


async def _serve(config: GatewayConfig) -> None:
    # Signals are caught from before start-up, so that one arriving as soon as
    # "ready" is logged still shuts down gracefully.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run_gateway(*, task_status: trio.TaskStatus[Gateway]) -> None:
                await serve_gateway(config, task_status=task_status)
                nursery.cancel_scope.cancel()  # shut down: stop waiting for signals too

            gateway: Gateway = await nursery.start(run_gateway)
            # Each listener has logged its own URL; this says that all of them are up.
            logger.info("ready; SIGTERM or Ctrl+C shuts down gracefully")
            async for signum in signals:
                name = signal.Signals(signum).name
                if gateway.ready:
                    logger.info(
                        "%s received: shutting down within %gs (a second signal exits at once)",
                        name,
                        config.hub.shutdown_timeout,
                    )
                    gateway.shutdown()
                else:
                    logger.warning("%s received again: exiting at once", name)
                    logging.shutdown()
                    os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-gw`` command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args)
        if args.command == "check-config":
            check_gateway_config(config)
    except ConfigError as exc:
        print(f"trio-gw: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        mode = "dev mode (no auth)" if config.auth.dev_mode else f"JWT {config.auth.jwt_algorithm}"
        cluster = (
            f", node {config.backplane.node_id or 'host-pid'} of a cluster"
            if config.backplane.enabled
            else ""
        )
        print(f"configuration OK: {mode}, clients on {config.hub.host}:{config.hub.port}{cluster}")
        return 0
    configure_logging(config.log.format, config.log.level)
    # Each client is a file descriptor: take all the process may have, and say
    # so at once if hub.max_connections still does not fit.
    raise_open_file_limit(config)
    # Everything imported so far lives as long as the process: keep it out of
    # the garbage collector's full passes, which would otherwise re-scan it all.
    gc.freeze()
    try:
        trio.run(_serve, config)
    except BaseException as exc:
        error = _single_error(exc)
        if isinstance(error, ConfigError):
            print(f"trio-gw: invalid configuration: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):
            print(f"trio-gw: cannot serve: {error}", file=sys.stderr)
            return 1
        raise
    return 0


def _single_error(exc: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
