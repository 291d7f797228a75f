"""hclog-style JSON logging on stderr, the format go-plugin hosts parse into Nomad's log.

Nomad reads a plugin's stderr line by line. After an agent restart the pipe is gone, so the
handler falls back to a log file instead of raising (go-plugin issue #114).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import TextIO

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}
TRACE = 5


def format_record(record: logging.LogRecord) -> str:
    """One hclog JSON line. @message, @level and @timestamp must be strings for the Go host."""
    level = "trace" if record.levelno <= TRACE else _LEVELS.get(record.levelno, "info")
    when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds")
    line: dict[str, object] = {
        "@level": level,
        "@message": str(record.getMessage()),
        "@timestamp": when,
        "@module": str(record.name),
    }
    extra = getattr(record, "kv", None)
    if isinstance(extra, dict):
        for key, value in extra.items():
            if not str(key).startswith("@"):
                line[str(key)] = value if isinstance(value, (int, float, bool)) else str(value)
    if record.exc_info:
        line["error"] = logging.Formatter().formatException(record.exc_info)
    return json.dumps(line, separators=(",", ":"), default=str)


class HclogHandler(logging.Handler):
    """Writes hclog JSON to a stream, switching to a file once the stream is broken."""

    def __init__(self, stream: TextIO, fallback_path: str | None) -> None:
        super().__init__()
        self._stream: TextIO | None = stream
        self._fallback_path = fallback_path
        self._fallback: TextIO | None = None
        self._lock2 = threading.Lock()

    def set_fallback(self, path: str | None) -> None:
        with self._lock2:
            self._fallback_path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = format_record(record) + "\n"
        except Exception:  # a log call must never take the plugin down
            return
        with self._lock2:
            if self._stream is not None:
                try:
                    self._stream.write(text)
                    self._stream.flush()
                    return
                except (BrokenPipeError, OSError, ValueError):
                    self._stream = None
            self._write_fallback(text)

    def _write_fallback(self, text: str) -> None:
        if self._fallback is None and self._fallback_path:
            try:
                os.makedirs(os.path.dirname(self._fallback_path), exist_ok=True)
                self._fallback = open(self._fallback_path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError:
                self._fallback_path = None
        if self._fallback is not None:
            try:
                self._fallback.write(text)
                self._fallback.flush()
            except OSError:
                pass


_handler: HclogHandler | None = None


def setup_from_env(name: str, default_level: str, default_fallback: str) -> HclogHandler:
    """setup() with PYHPC_LOG_LEVEL and PYHPC_LOG_FILE overriding the defaults (a plugin's)."""
    level = logging.getLevelName(os.environ.get("PYHPC_LOG_LEVEL", default_level).upper())
    if not isinstance(level, int):
        level = logging.getLevelName(default_level)
    return setup(name, level, os.environ.get("PYHPC_LOG_FILE", default_fallback))


def setup(name: str, level: int = logging.DEBUG, fallback_path: str | None = None) -> HclogHandler:
    """Route the root logger to hclog JSON on stderr."""
    global _handler
    logging.addLevelName(TRACE, "TRACE")
    if _handler is None:
        _handler = HclogHandler(sys.stderr, fallback_path)
        root = logging.getLogger()
        root.handlers[:] = [_handler]
        root.setLevel(level)
    else:
        _handler.set_fallback(fallback_path)
    logging.getLogger(name).setLevel(level)
    return _handler


def set_fallback(path: str) -> None:
    """Where logs go once stderr is broken (no-op before setup())."""
    if _handler is not None:
        _handler.set_fallback(path)
