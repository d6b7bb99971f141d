"""Sessions: tests, fuzz, lint and typecheck run by default; bench only when asked."""

from __future__ import annotations

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def group(name: str) -> list[str]:
    """The requirements of one dependency group in pyproject.toml."""
    return nox.project.dependency_groups(PYPROJECT, name)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (real sockets, real processes) with pytest."""
    session.install(".", *group("test"))
    session.run("pytest", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """Fuzz a real trio-gw process: its admin API (OpenAPI), then its WebSocket protocol."""
    session.install(".", *group("fuzz"))
    session.run("python", "tests/fuzz_admin_api.py")
    # Arguments go to the protocol fuzzer: nox -s fuzz -- --examples 2000 --seed 7
    session.run("python", "tests/fuzz_protocol.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint and check formatting with ruff, including its ASYNC rules."""
    session.install(*group("lint"))
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check trio_gw/ with mypy --strict."""
    session.install(".", *group("typecheck"))
    session.run("mypy", "--strict", "trio_gw", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark the hub against the reference peers (quick pass; --full for everything)."""
    session.install(".", *group("bench"))
    session.run("python", "-m", "benchmarks", *session.posargs)
