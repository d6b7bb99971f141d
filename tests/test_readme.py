"""The README's embedding example runs exactly as printed, and its commands are the real ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def run_example(marker: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    """Run the README's ``marker`` example block; its output lines, and the printed ones."""
    match = re.search(
        rf"<!-- {marker}[^>]*-->\n```python\n(.*?)```\n\nIt prints:\n\n```text\n(.*?)```",
        README,
        re.S,
    )
    assert match, f"README lost its {marker}"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines(), match.group(2).splitlines()


def test_embedding_example_runs_as_printed(tmp_path: Path) -> None:
    lines, printed = run_example("embedding-example", tmp_path)
    assert printed[0] == "alice Alice node-1:…"
    assert lines[0].startswith("alice Alice node-1:")
    assert lines[1:] == [
        "{'you_said': {'ping': 1}, 'user': 'alice'}",
        "{'news': 'hello, Alice'}",
        "1 session closed",
    ]
    assert lines[1:] == printed[1:]


def test_client_example_runs_as_printed(tmp_path: Path) -> None:
    lines, printed = run_example("client-example", tmp_path)
    assert lines == printed


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    assert commands == ["pip install . && trio-gw serve", "pip install nox && nox"]
    assert "pip install nox && nox\n" in (ROOT / ".ci" / "run").read_text()


def console_commands(marker: str) -> list[tuple[str, list[str]]]:
    """The ```console blocks that contain ``marker``: (commands joined, expected output)."""
    blocks = re.findall(r"```console\n(.*?)```", README, re.S)
    found = []
    for block in blocks:
        if marker not in block:
            continue
        commands, output = [], []
        for line in block.splitlines():
            (commands if line.startswith("$ ") else output).append(line.removeprefix("$ "))
        found.append(("\n".join(commands), output))
    return found


def test_production_quickstart_runs_as_written() -> None:
    [(commands, output)] = console_commands("trio-gw check-config")
    # Run it up to (not including) `serve`, from the repository root, as a user would.
    runnable = commands.split("\ntrio-gw serve")[0]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", runnable],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == output


def test_admin_api_table_matches_the_routes() -> None:
    from trio_gw.gateway._admin import API_ROUTES

    rows = set(re.findall(r"^\| `(GET|POST) (/api/\S+)` \|", README, re.M))
    assert rows == set(API_ROUTES)


async def test_admin_curl_example_runs_as_written(tmp_path: Path) -> None:
    import trio

    from ._gateway_support import API_KEY, HS_SECRET, gateway_process, token
    from .conftest import TIMEOUT, client

    [(command, output)] = console_commands("curl ")
    secrets = {"TRIO_GW_AUTH_JWT_SECRET": HS_SECRET, "TRIO_GW_ADMIN_API_KEY": API_KEY}
    alice = token(HS_SECRET, "HS256", sub="alice", aud="my-app", iss="https://auth.example.com")
    with trio.fail_after(TIMEOUT):
        async with gateway_process(
            "--config", str(ROOT / "examples" / "hub.toml"), "--host", "127.0.0.1", env=secrets
        ) as gateway:
            assert gateway.admin_url is not None
            async with client(gateway.ws_url, alice) as (ws1, _), client(gateway.ws_url, alice):
                result = await trio.run_process(
                    ["bash", "-c", command.replace("http://127.0.0.1:8766", gateway.admin_url)],
                    capture_stdout=True,
                    env={"PATH": "/usr/bin:/bin", **secrets},
                )
                assert result.stdout.decode().splitlines() == output
                assert await ws1.get_message() == '{"news":1}'
