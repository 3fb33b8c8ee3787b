"""structlog set-up: JSON lines in containers, readable lines on a terminal.

Log events carry names, codes, counts and durations; never personal data or key
material. The last processor drops any field whose name suggests one, as a net
under that rule.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Field names that must never reach a log line, whatever a caller binds.
_FORBIDDEN = frozenset(
    {
        "password",
        "login_id",
        "email",
        "name",
        "mobile_phone",
        "birth_date",
        "ip",
        "key",
        "dek",
        "kek",
        "material",
        "token",
        "plaintext",
    }
)


def _drop_forbidden(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for field in _FORBIDDEN & event.keys():
        event[field] = "[withheld]"
    return event


_debug = False


def debug_enabled() -> bool:
    """Whether debug events are logged; hot paths check before building them."""
    return _debug


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    global _debug
    _debug = level == "debug"
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_forbidden,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        # Cached loggers keep the stream they first wrote to: configure once, at start.
        cache_logger_on_first_use=True,
    )
