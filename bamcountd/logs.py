"""structlog set-up: a console renderer on a terminal, JSON lines otherwise.

The counting core logs through :func:`get_logger`, whose loggers can import structlog at the
first event that the configured level lets through (``configure(defer=True)``): a
``bamcountd count`` at its default level (warning) that has nothing to report never imports
it, which saves a tenth of its start.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

_EXTRAS = ("rich", "better_exceptions", "colorama")


class _Settings:
    #: Set by configure() until structlog is imported and told: (level, json, stream).
    pending: tuple[str, bool | None, TextIO] | None = None
    #: Before structlog is imported, events below this level are dropped here.
    threshold = logging.NOTSET


_settings = _Settings()


def import_structlog_without_extras() -> None:
    """Import structlog with rich, better_exceptions and colorama hidden; for the command line.

    structlog.dev imports them, when installed, only to offer them to ConsoleRenderer; rich
    (which brings pygments) made a start of ``bamcountd count`` 0.05-0.09 s slower, a fifth of
    it, in the benchmark.  Our renderers use none of them.  It changes structlog's defaults for
    the whole process, so only :func:`configure` calls it; a program that imports structlog
    first keeps its own.  Nothing changes if structlog was imported already.
    """
    if "structlog" in sys.modules:
        return
    hidden = [name for name in _EXTRAS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail fast
    try:
        import structlog  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


def configure(
    *, level: str = "info", json: bool | None = None, stream: TextIO | None = None, defer: bool = False
) -> None:
    """Configure logging to ``stream`` (stderr); safe to call again (the last call wins).

    structlog is imported with its optional extras hidden if nothing imported it before.

    ``defer``: if structlog is not imported yet, leave it so until a :func:`get_logger` logger
    has an event at ``level`` or above; for a short command whose code all logs through those.
    """
    _settings.threshold = logging.getLevelNamesMapping()[level.upper()]
    _settings.pending = (level, json, stream if stream is not None else sys.stderr)
    if not defer or "structlog" in sys.modules:
        _apply_pending()


def _apply_pending_unless_configured() -> None:
    """structlog came in another way after a deferred configure(): settings its importer gave
    it (a program's own, a test's ``capture_logs()``) win over the ones waiting here."""
    import structlog

    if structlog.is_configured():
        _settings.pending = None
    else:
        _apply_pending()


def _apply_pending() -> None:
    if _settings.pending is None:
        return  # nothing to configure: structlog is someone else's, or told already
    import_structlog_without_extras()
    import structlog

    (level, json, out), _settings.pending = _settings.pending, None
    if json is None:
        json = not out.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redacted,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def _redacted(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Every text of a log line with its URLs' secrets hidden (urls.redact), whatever logged it."""
    from bamcountd.urls import redact

    return {key: redact(value) if isinstance(value, str) else value for key, value in event.items()}


class Logger:
    """A structlog logger that imports structlog when it first has an event to pass on.

    Once structlog is imported (by this, by a test's ``capture_logs()``, or by a program that
    uses bamcountd), every event goes to it, and its own configuration decides.
    """

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **values: Any) -> Logger:
        return Logger(self._name, {**self._context, **values})

    def debug(self, event: str, **values: Any) -> None:
        self._log(logging.DEBUG, "debug", event, values)

    def info(self, event: str, **values: Any) -> None:
        self._log(logging.INFO, "info", event, values)

    def warning(self, event: str, **values: Any) -> None:
        self._log(logging.WARNING, "warning", event, values)

    def error(self, event: str, **values: Any) -> None:
        self._log(logging.ERROR, "error", event, values)

    def _log(self, level: int, method: str, event: str, values: dict[str, Any]) -> None:
        if "structlog" not in sys.modules:
            if level < _settings.threshold:
                return
            _apply_pending()
        elif _settings.pending is not None:
            _apply_pending_unless_configured()
        import structlog

        bound = structlog.get_logger(self._name).bind(**self._context)
        getattr(bound, method)(event, **values)


def get_logger(name: str) -> Logger:
    return Logger(name)
