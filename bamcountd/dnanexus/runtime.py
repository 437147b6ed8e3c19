"""dx-watch as a service: token redaction and signals (systemd's notify socket and the metrics
are the daemon's too: :mod:`bamcountd.notify`, :mod:`bamcountd.metrics`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    pass

log = structlog.get_logger("bamcountd.dnanexus.watch")


def redact_token(token: str) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
    """A structlog processor that replaces the API token wherever it appears in an event."""

    def scrub(value: Any) -> Any:
        if isinstance(value, str) and token in value:
            return value.replace(token, "[redacted]")
        if isinstance(value, dict):
            return {key: scrub(inner) for key, inner in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(scrub(inner) for inner in value)
        return value

    def processor(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            event[key] = scrub(value)
        return event

    return processor


def install_redaction() -> None:
    """Add the token redactor to structlog's chain (call after bamcountd.logs.configure)."""
    from bamcountd.dnanexus.platform import api_token  # dxpy: only when the service starts

    token = api_token()
    if not token:
        return
    processors = list(structlog.get_config()["processors"])
    # Just before the renderer: after format_exc_info, so tracebacks are scrubbed too.
    structlog.configure(processors=[*processors[:-1], redact_token(str(token)), processors[-1]])


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop``: the runner finishes the current step and exits cleanly."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, _frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
