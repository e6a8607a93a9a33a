"""grifo's log lines: text (the default) or one JSON object per line (`--log-format json`).

Both carry the id of the request being handled (set by the API for the length of a request) and
never a stack trace: an exception is logged as its type and message, and key material is masked
(`grf-1a2b3c4d-…`: the key id part stays for support; join tokens `gjt-…` alike), whatever a
message holds.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import re
import sys

import msgspec

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("grifo_request_id", default="")
_KEY = re.compile(r"\b((?:grf|gjt)-[0-9a-f]{8}-)[A-Za-z0-9_\-]+")  # API keys, join tokens
_BEARER = re.compile(r"(?i)\b(bearer\s+)(?!grf-|gjt-)\S+")


def mask(text: str) -> str:
    """Secrets out of a log line: grifo keys keep their id part, other bearer tokens go."""
    return _BEARER.sub(r"\1[masked]", _KEY.sub(r"\1[masked]", text))


def _error(record: logging.LogRecord) -> str | None:
    if record.exc_info is None or record.exc_info[0] is None:
        return None
    kind, value = record.exc_info[0], record.exc_info[1]
    return mask(f"{kind.__name__}: {value}")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        line = f"{stamp} {record.levelname} {record.name} {mask(record.getMessage())}"
        if rid := REQUEST_ID.get():
            line += f" request_id={rid}"
        if error := _error(record):
            line += f" error={error!r}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask(record.getMessage()),
        }
        if rid := REQUEST_ID.get():
            entry["request_id"] = rid
        if error := _error(record):
            entry["error"] = error
        return msgspec.json.encode(entry).decode()


def configure(level: str, fmt: str) -> None:
    """Log to stderr at `level` in `fmt` (`text` or `json`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
