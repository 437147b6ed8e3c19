"""dx-watch as a service: systemd's notify socket, Prometheus metrics, token redaction, signals.

Nothing here decides what to count; :mod:`.watch` does, and calls :func:`notify`.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from bamcountd.dnanexus.model import Stats

log = structlog.get_logger("bamcountd.dnanexus.watch")


def notify(message: str) -> None:
    """sd_notify(3) without a library: one datagram to $NOTIFY_SOCKET, if systemd set it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as error:
            log.warning("notify_failed", error=str(error))


class Metrics:
    """Prometheus counters on ``--metrics-port`` (prometheus_client, imported only when asked)."""

    def __init__(self, port: int, *, address: str = "127.0.0.1") -> None:
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry()
        counter = prometheus_client.Counter
        self.launched = counter("bamcountd_dx_jobs_launched", "Applet jobs launched", registry=self.registry)
        self.counted = counter("bamcountd_dx_local_counts", "BAMs counted on this machine", registry=self.registry)
        self.done = counter("bamcountd_dx_bams_done", "BAMs with a result", registry=self.registry)
        self.failed = counter("bamcountd_dx_bams_failed", "BAMs marked failed", registry=self.registry)
        self.retried = counter("bamcountd_dx_jobs_retried", "Failed jobs relaunched", registry=self.registry)
        self.poll_errors = counter("bamcountd_dx_poll_errors", "Polls that failed", registry=self.registry)
        self.last_poll = prometheus_client.Gauge(
            "bamcountd_dx_last_poll_timestamp_seconds", "End of the last successful poll", registry=self.registry
        )
        self.server, self.thread = prometheus_client.start_http_server(port, addr=address, registry=self.registry)

    def record(self, stats: Stats) -> None:
        self.launched.inc(stats.launched)
        self.counted.inc(stats.counted)
        self.done.inc(stats.done + stats.counted)
        self.failed.inc(stats.failed)
        self.retried.inc(stats.retried)
        self.last_poll.set_to_current_time()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
