"""structlog set-up: a console renderer on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO


def import_structlog_without_extras() -> None:
    """Import structlog with rich, better_exceptions and colorama hidden; for the command line.

    structlog.dev imports them, when installed, only to offer them to ConsoleRenderer; rich
    (which brings pygments) made a start of ``bamcountd count`` 0.05-0.09 s slower, a fifth of
    it, in the benchmark.  Our renderers use none of them.  It changes structlog's defaults for the whole process, so
    only the ``bamcountd`` command calls it, first; a program that imports bamcountd keeps its
    own structlog.  Nothing changes if structlog was imported already.
    """
    if "structlog" in sys.modules:
        return
    hidden = [name for name in ("rich", "better_exceptions", "colorama") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail fast
    try:
        import structlog  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


def configure(*, level: str = "info", json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure logging to ``stream`` (stderr); safe to call again (the last call wins)."""
    import structlog

    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
