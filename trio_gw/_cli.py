"""The ``trio-gw`` command line: a thin layer over ``HubConfig``, ``open_hub`` and ``serve_hub``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from ._config import HubConfig
from ._devmode import dev_authorizer, echo_backend
from ._errors import ConfigError
from ._hub import is_loopback, open_hub, serve_hub

__all__ = ["main"]

logger = logging.getLogger("trio_gw")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trio-gw", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run a hub (dev mode: token = user id, echo backend, loopback only)"),
        ("check-config", "validate the configuration and exit"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", metavar="FILE", help="TOML config file ([hub] table)")
        command.add_argument("--host", help="interface to bind (default 127.0.0.1)")
        command.add_argument("--port", type=int, help="port to bind, 0 for any (default 8765)")
        command.add_argument(
            "--log-level",
            default="INFO",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="log level (default INFO)",
        )
    return parser


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> HubConfig:
    """Defaults < config file < ``TRIO_GW_*`` environment < flags actually given."""
    config = HubConfig.from_toml(args.config) if args.config else HubConfig()
    config = HubConfig.from_env(os.environ if environ is None else environ, base=config)
    flags: dict[str, Any] = {
        name: getattr(args, name) for name in ("host", "port") if getattr(args, name) is not None
    }
    return config.evolve(**flags) if flags else config


async def _serve(config: HubConfig) -> None:
    logger.warning(
        "DEV MODE: any bearer token (or ?token=) is accepted as the user id, and requests "
        "are echoed back. Not for production; bound to loopback only."
    )
    async with (
        open_hub("trio-gw", "hub", echo_backend, config=config, authorizer=dev_authorizer) as hub,
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(serve_hub, hub)
        logger.info("ready: ws://%s:%d/?token=<user id>", config.host, port)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("%s received: shutting down", signal.Signals(signum).name)
                break
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-gw`` command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"trio-gw: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print("configuration OK")
        return 0
    if not is_loopback(config.host):
        print(
            f"trio-gw: invalid configuration: host: dev mode (token = user id, no real auth) "
            f"binds loopback only, got {config.host!r}",
            file=sys.stderr,
        )
        return 2
    try:
        trio.run(_serve, config)
    except BaseException as exc:
        error = _single_error(exc)
        if isinstance(error, ConfigError):
            print(f"trio-gw: invalid configuration: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):
            print(f"trio-gw: cannot serve on {config.host}:{config.port}: {error}", file=sys.stderr)
            return 1
        raise
    return 0


def _single_error(exc: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
