"""Entry point: ``python -m trio_gw`` and the ``trio-gw`` script."""

from .gateway._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
