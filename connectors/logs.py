"""Structured logs: one JSON object per line, with the fields passed through `extra={"fields": {...}}`."""
from __future__ import annotations

import json
import logging
import sys
import time

LOGGER_NAME = "connectors"


class JsonFormatter(logging.Formatter):
    """Format a record as {"ts", "level", "logger", "msg", **fields}."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", stream=None) -> logging.Logger:
    """Route the `connectors` and uvicorn loggers to one JSON-lines handler (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._connectors_json = True  # type: ignore[attr-defined]
    for name in (LOGGER_NAME, "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        for h in list(logger.handlers):
            if getattr(h, "_connectors_json", False):
                logger.removeHandler(h)
        logger.addHandler(handler)
        logger.propagate = False
    return logging.getLogger(LOGGER_NAME)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    """Log `msg` with structured `fields`."""
    logger.log(level, msg, extra={"fields": fields})
