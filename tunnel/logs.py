"""Logging for both processes: one line per event, as text or as JSON (`--log-format json`).

JSON lines carry `ts`, `level`, `logger` and `msg`, plus `exc` for a
traceback, so log shippers need no parsing rules.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO, with its URL; the agent logs what matters itself.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    # Alembic narrates each step of a migration at INFO; the store logs the line that matters.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    # grpc's Cython layer logs a line per call at DEBUG: noise that costs a request's worth of time.
    logging.getLogger("grpc._cython").setLevel(max(logging.INFO, root.level))
