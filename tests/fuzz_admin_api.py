"""Fuzz the admin API of a real ``trio-gw serve`` process against its OpenAPI document.

Run by ``nox -s fuzz`` (part of the default ``nox`` run). Schemathesis generates
requests from ``/openapi.json`` (valid ones, then invalid and stateful ones)
and checks that no answer is a server error, an undocumented status or a body
that does not match its schema. The gateway's own log must show no traceback,
and the process must still shut down cleanly afterwards.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

API_KEY = "fuzz-admin-key"
CONFIG = f"""
[auth]
jwt_algorithm = "HS256"
jwt_secret = "fuzzing-secret-that-is-at-least-32-bytes"
[admin]
api_key = "{API_KEY}"
"""
READY = re.compile(r"admin API and dashboard on (http://127\.0\.0\.1:\d+)/")


def main() -> int:
    trio_gw = str(Path(sys.executable).with_name("trio-gw"))
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "hub.toml"
        config.write_text(CONFIG)
        gateway = subprocess.Popen(
            [trio_gw, "serve", "--config", str(config), "--port", "0", "--admin-port", "0"],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert gateway.stderr is not None
        log: list[str] = []
        admin = None
        for line in gateway.stderr:
            log.append(line)
            if match := READY.search(line):
                admin = match.group(1)
                break
        if admin is None:
            print("".join(log), file=sys.stderr)
            return 1
        reader = threading.Thread(target=lambda: log.extend(gateway.stderr or []), daemon=True)
        reader.start()
        fuzz = subprocess.run(
            [
                st,
                "run",
                f"{admin}/openapi.json",
                "--header",
                f"Authorization: Bearer {API_KEY}",
                "--max-examples",
                "100",
                "--seed",
                "20261125",
                "--no-color",
            ],
            check=False,
        )
        gateway.send_signal(signal.SIGTERM)
        exit_code = gateway.wait(timeout=30)
        reader.join(timeout=5)
    tracebacks = [line for line in log if "Traceback" in line]
    if tracebacks or exit_code != 0:
        print("".join(log), file=sys.stderr)
        print(f"gateway: exit {exit_code}, {len(tracebacks)} traceback(s)", file=sys.stderr)
        return 1
    return fuzz.returncode


if __name__ == "__main__":
    sys.exit(main())
