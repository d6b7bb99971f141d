"""The README's embedding example runs exactly as printed, and its commands are the real ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_embedding_example_runs_as_printed(tmp_path: Path) -> None:
    match = re.search(r"<!-- embedding-example[^>]*-->\n```python\n(.*?)```", README, re.S)
    assert match, "README lost its embedding example"
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
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        '{"type":"event","payload":{"topic":"hello","event":{"session_id":"node-1:'
    )
    assert lines[0].endswith('"user_id":"alice","username":"Alice"}}}')
    assert lines[1:] == [
        '{"you_said":{"ping":1},"user":"alice"}',
        '{"news":"hello, Alice"}',
        "1 session closed",
    ]


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    assert commands == ["pip install . && trio-gw serve", "pip install nox && nox"]
    assert "pip install nox && nox\n" in (ROOT / ".ci" / "run").read_text()
