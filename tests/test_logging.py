"""Log lines of ``trio-gw serve`` (trio_gw/gateway/_logging.py).

One record, one line, whatever is sent.
"""

from __future__ import annotations

import logging
import sys

import orjson
import trio

from trio_gw.gateway._logging import JsonFormatter, TextFormatter

from ._gateway_support import gateway_process
from .conftest import TIMEOUT, client


def record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord(
        "trio_gw", logging.INFO, __file__, 1, message, args, sys.exc_info() if exc_info else None
    )


def test_text_lines_escape_control_characters() -> None:
    line = TextFormatter().format(record("user %s", "a\nb\r\x00\x7f\x85\u2028c\té"))
    assert line.endswith(r" INFO trio_gw: user a\nb\r\x00\x7f\x85\u2028c\té")
    assert line.splitlines() == [line]


def test_text_tracebacks_stay_indented_under_their_record() -> None:
    try:
        raise ValueError("bad\n2026-01-01 00:00:00,000 INFO trio_gw: forged\x1b[2K")
    except ValueError:
        line = TextFormatter().format(record("failed for %s", "x\ny", exc_info=True))
    first, *rest = line.split("\n")
    assert first.endswith(r"trio_gw: failed for x\ny")
    assert rest[0] == "    Traceback (most recent call last):"
    # The exception's own newline stays a line break, but cannot reach the margin.
    assert all(following.startswith("    ") for following in rest)
    assert rest[-1] == r"    2026-01-01 00:00:00,000 INFO trio_gw: forged\x1b[2K"


def test_json_lines_escape_control_characters() -> None:
    line = JsonFormatter().format(record("user %s", "a\nb\x00"))
    assert line.splitlines() == [line]
    assert orjson.loads(line)["message"] == "user a\nb\x00"


async def test_a_user_id_with_a_newline_stays_on_one_log_line() -> None:
    # Dev mode takes ?token= as the user id: "a%0Ab" is the user "a\nb".
    with trio.fail_after(TIMEOUT):
        async with gateway_process("--log-format", "text") as text_gateway:
            async with client(text_gateway.ws_url, "a%0Ab") as (_, hello):
                assert hello["user_id"] == "a\nb"
        async with (
            gateway_process() as json_gateway,
            client(json_gateway.ws_url, "a%0Ab"),
        ):
            pass
    registered = [line for line in text_gateway.log if line.endswith(" registered")]
    assert len(registered) == 1 and registered[0].endswith(r"(user a\nb) registered")
    # No line starts with what followed the newline.
    assert not [line for line in text_gateway.log if line.startswith("b)")]

    assert all(line.startswith("{") for line in json_gateway.log if line)
    registered_json = [
        r for r in json_gateway.log_records() if r["message"].endswith(" registered")
    ]
    assert [r["user_id"] for r in registered_json] == ["a\nb"]
    assert registered_json[0]["message"].endswith("(user a\nb) registered")
