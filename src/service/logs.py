"""structlog set-up: JSON lines in containers, readable lines on a terminal.

Log events carry names, codes, counts and durations; never personal data or key
material. The last processor drops any field whose name suggests one, as a net
under that rule.

Loggers are cached on first use (they are on every RPC's path), and a cached
logger keeps the processor list, the wrapper class and the output it was built
with. So that a later :func:`configure_logging` (a test's, the CLI's) still
reaches every logger whatever was logged first, all three are fixed objects that
are changed in place: one processor list (``structlog.testing.capture_logs``
edits that same list), one wrapper class that lets every level through to a
level-filtering processor, and one output that forwards to the configured stream.
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

# structlog's method names -> stdlib level numbers ("exception" logs at error).
_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _drop_forbidden(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for field in _FORBIDDEN & event.keys():
        event[field] = "[withheld]"
    return event


_debug = False
_min_level = logging.INFO


def debug_enabled() -> bool:
    """Whether debug events are logged; hot paths check before building them."""
    return _debug


def _filter_level(
    _: Any, method_name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Here rather than in a filtering wrapper class: a cached logger keeps its class.
    if _METHOD_LEVELS.get(method_name, logging.INFO) < _min_level:
        raise structlog.DropEvent
    return event


class _Output:
    """The one file every logger prints to; it forwards to the configured stream
    (``None``: whatever ``sys.stderr`` is at the time of writing)."""

    def __init__(self) -> None:
        self.target: TextIO | None = None

    def _stream(self) -> TextIO:
        return self.target if self.target is not None else sys.stderr

    def write(self, s: str, /) -> int:
        return self._stream().write(s)

    def flush(self) -> None:
        self._stream().flush()


_OUTPUT = _Output()
# Changed in place only: cached loggers hold this very list.
_PROCESSORS: list[structlog.types.Processor] = []
#: Processors added by a part that is switched on (tracing's trace ids), run before
#: the net and the renderer; kept across :func:`configure_logging`.
_ADDED: list[structlog.types.Processor] = []


def add_processor(processor: structlog.types.Processor) -> None:
    """Run ``processor`` on every event from now on (until :func:`remove_processor`)."""
    if processor not in _ADDED:
        _ADDED.append(processor)
        if _PROCESSORS:
            _PROCESSORS.insert(_PROCESSORS.index(_drop_forbidden), processor)


def remove_processor(processor: structlog.types.Processor) -> None:
    if processor in _ADDED:
        _ADDED.remove(processor)
    if processor in _PROCESSORS:
        _PROCESSORS.remove(processor)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    global _debug, _min_level
    _debug = level == "debug"
    _min_level = logging.getLevelNamesMapping()[level.upper()]
    _OUTPUT.target = stream
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    _PROCESSORS[:] = [
        _filter_level,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *_ADDED,
        _drop_forbidden,
        renderer,
    ]
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        # PrintLogger only writes and flushes, which _Output does.
        logger_factory=structlog.PrintLoggerFactory(_OUTPUT),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
