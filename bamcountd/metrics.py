"""Prometheus metrics and ``/healthz`` for both runners (prometheus-client, imported lazily).

The daemon's (:class:`DaemonMetrics`, on ``--metrics-addr``) and dx-watch's
(:class:`WatchMetrics`, on ``--metrics-port``) are served alike by :class:`MetricsServer`:
``/metrics`` and ``/healthz``, which answers 200 only while the runner's loop has beaten
recently: a stuck loop turns it to 503, as systemd's watchdog would kill it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from bamcountd.ledger import STATES

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment


class _Beating:
    """A registry and the heartbeat that ``/healthz`` reads."""

    heartbeat = 0.0

    def beat(self) -> None:
        self.heartbeat = time.monotonic()


class DaemonMetrics(_Beating):
    """``bamcountd serve``'s."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.files = Gauge("bamcountd_files", "Watched BAMs by ledger state", ["state"], registry=self.registry)
        self.queue_depth = Gauge(
            "bamcountd_queue_depth", "BAMs settled and waiting to be counted", registry=self.registry
        )
        self.regions = Counter("bamcountd_regions_counted", "Regions counted", registry=self.registry)
        self.counted = Counter("bamcountd_files_counted", "BAMs counted and written", registry=self.registry)
        self.failures = Counter(
            "bamcountd_samtools_failures", "Failed counts, by error class", ["kind"], registry=self.registry
        )
        self.duration = Histogram(
            "bamcountd_count_duration_seconds",
            "Seconds per BAM count",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=self.registry,
        )

    def set_states(self, counts: dict[str, int]) -> None:
        for state in STATES:
            self.files.labels(state).set(counts.get(state, 0))
        self.queue_depth.set(counts.get("queued", 0) + counts.get("failed", 0))


class WatchMetrics(_Beating):
    """``bamcountd dx-watch``'s: what its polls did."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.launched = Counter("bamcountd_dx_jobs_launched", "Applet jobs launched", registry=self.registry)
        self.counted = Counter("bamcountd_dx_local_counts", "BAMs counted on this machine", registry=self.registry)
        self.done = Counter("bamcountd_dx_bams_done", "BAMs with a result", registry=self.registry)
        self.failed = Counter("bamcountd_dx_bams_failed", "BAMs marked failed", registry=self.registry)
        self.retried = Counter("bamcountd_dx_jobs_retried", "Failed jobs relaunched", registry=self.registry)
        self.poll_errors = Counter("bamcountd_dx_poll_errors", "Polls that failed", registry=self.registry)
        self.last_poll = Gauge(
            "bamcountd_dx_last_poll_timestamp_seconds", "End of the last successful poll", registry=self.registry
        )

    def record(self, poll: Mapping[str, int]) -> None:
        """Add what one successful poll did (dx-watch's ``Stats``, as a mapping)."""
        self.launched.inc(poll["launched"])
        self.counted.inc(poll["counted"])
        self.done.inc(poll["done"] + poll["counted"])
        self.failed.inc(poll["failed"])
        self.retried.inc(poll["retried"])
        self.last_poll.set_to_current_time()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not worth a journal line each."""


class _IPv6Server(WSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """``/metrics`` and ``/healthz`` in a background thread."""

    def __init__(self, metrics: DaemonMetrics | WatchMetrics, host: str, port: int, *, stale_after: float) -> None:
        from prometheus_client import make_wsgi_app

        self._metrics = metrics
        self._stale_after = stale_after
        self._prometheus = make_wsgi_app(metrics.registry)
        server_class = _IPv6Server if ":" in host else WSGIServer
        self._server: WSGIServer = make_server(
            host, port, self._app, server_class=server_class, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            age = time.monotonic() - self._metrics.heartbeat
            alive = self._metrics.heartbeat > 0 and age <= self._stale_after
            body = f"{'ok' if alive else 'stalled'} {age:.1f}s\n".encode()
            start_response("200 OK" if alive else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [body]
        app: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]] = self._prometheus
        return app(environ, start_response)
