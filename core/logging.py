"""Log setup: structlog, one JSON object per line on stderr.

Every line carries `timestamp` (ISO 8601, UTC), `level`, `event` and, from `get_logger(name)`,
`logger`. Event names read `pkg.noun.past_verb` (`serving.request.completed`,
`shadow.teacher.failed`); everything else is a keyword argument:

    log = get_logger(__name__)
    log.info("serving.request.completed", route="student", status=200, latency_ms=41.7)

`configure_logging` may be called any number of times, in any process (each Ray replica calls
it on start): the last call wins, and loggers made before it follow it, because they are lazy
proxies that look the configuration up on each call. Prompt text is never logged here; whether a
caller may log it is `Settings.logging.log_prompts`.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error")


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at write time (test runners and Ray swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _CurrentStderr()


class _NamedLogger(structlog.PrintLogger):
    def __init__(self, name: str | None):
        super().__init__(file=_STDERR)
        self.name = name

    def __getstate__(self) -> str | None:  # Ray pickles what a deployment holds
        return self.name

    def __setstate__(self, name: str | None) -> None:
        self.__init__(name)


def _logger_factory(*args: object) -> _NamedLogger:
    return _NamedLogger(str(args[0]) if args else None)


def _add_logger_name(logger: object, method: str, event: dict) -> dict:
    name = getattr(logger, "name", None)
    if name is not None:
        event.setdefault("logger", name)
    return event


def configure_logging(level: str = "info", json_logs: bool = True) -> None:
    """Send structlog output to stderr at `level`: JSON lines, or a human-readable console."""
    name = level.lower()
    if name not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    renderer = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, name.upper())),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger that adds `logger=name` to each line; safe to create at import time."""
    return structlog.get_logger(name)
