"""Log output of ``trio-gw serve``: text for people, or one JSON object per line.

Either way one record is one line a log reader can trust: client-chosen text
(a user id, a service name) cannot start a line of its own. JSON lines get
that from JSON's string escapes; text lines escape control characters.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]

# Passed with ``extra=`` by the hub and the gateway; JSON lines show them as fields.
CONTEXT_FIELDS = ("session_id", "user_id", "trace_id")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 and C1 controls and DEL (Unicode category Cc), plus the line and paragraph
# separators, which str.splitlines() and some log viewers also break lines at.
_ESCAPES = {
    code: _NAMED_ESCAPES.get(chr(code), f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def escape_controls(text: str) -> str:
    r"""``text`` with control characters written as escapes: ``\n``, ``\x00``, ``\u2028``."""
    # Every escaped character is unprintable, so most lines skip the translation.
    return text if text.isprintable() else text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """The text format, one line per record: control characters are escaped.

    The first line (time, level, logger and message) is escaped whole. A
    traceback keeps its line breaks, but each of its lines is indented and
    escaped, so that only a record's first line starts at the margin.
    """

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's first line, with control characters escaped."""
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        """The traceback, indented and escaped line by line."""
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        """The stack, indented and escaped line by line."""
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, context fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line (without the newline)."""
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(log_format: str, level: str) -> None:
    """Send the root logger's output to stderr as text or JSON lines, replacing other handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request at INFO; the gateway logs each backend call itself,
    # with the session, user and trace id.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
