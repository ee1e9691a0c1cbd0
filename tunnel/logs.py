"""Logging for both processes: one line per event, as text or as JSON (`--log-format json`).

JSON lines carry `ts`, `level`, `logger` and `msg`, plus `exc` for a
traceback and `trace_id` for a line logged while serving a request (the W3C
trace id that its audit row and spans carry too, `tunnel.tracing`), so log
shippers need no parsing rules. Text lines of a request end with
`trace_id=<id>`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from onprem.tunnel.tracing import current_trace_id


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        return f"{line} trace_id={trace_id}" if trace_id else line


class TraceIdFilter(logging.Filter):
    """Notes on each record the trace id of the request being served, read where the line is logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id = current_trace_id()
        return True


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    # On the handler, not a logger: records of every logger pass through it, in the task that logs them.
    handler.addFilter(TraceIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO, with its URL; the agent logs what matters itself.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    # Alembic narrates each step of a migration at INFO; the store logs the line that matters.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    # grpc's Cython layer logs a line per call at DEBUG: noise that costs a request's worth of time.
    logging.getLogger("grpc._cython").setLevel(max(logging.INFO, root.level))
