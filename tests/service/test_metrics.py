"""/metrics (Prometheus text) and /healthz, over loopback only."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bamcountd.metrics import DaemonMetrics, MetricsServer
from tests.service.helpers import drop_by_rename, expected_counts, result_path
from tests.support.daemon import Daemons, Folders
from tests.support.waiting import wait_for


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.timeout(60)
def test_metrics_and_healthz_of_a_running_daemon(templates: list[Path], folders: Folders, daemons: Daemons) -> None:
    port = _free_port()
    daemon = daemons.start(extra=["--metrics-addr", f"127.0.0.1:{port}"])
    drop_by_rename(templates[0], folders.watch / "m.bam")
    wait_for(result_path(folders, "m.bam").exists, timeout=30, what="a result", context=daemon.log)
    base = f"http://127.0.0.1:{port}"

    def scraped() -> str:
        return _get(base + "/metrics")[1]

    wait_for(lambda: 'bamcountd_files{state="done"} 1.0' in scraped(), timeout=10, what="done gauge")
    text = scraped()
    assert f"bamcountd_regions_counted_total {float(len(expected_counts(templates[0])))}" in text
    assert "bamcountd_files_counted_total 1.0" in text
    assert "bamcountd_count_duration_seconds_count 1.0" in text
    assert "bamcountd_queue_depth 0.0" in text
    assert _get(base + "/healthz")[0] == 200
    assert daemon.stop() == 0


def test_healthz_is_503_when_the_loop_stops_beating() -> None:
    metrics = DaemonMetrics()
    server = MetricsServer(metrics, "127.0.0.1", 0, stale_after=0.3)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/healthz"
        assert _get(url)[0] == 503  # never beaten yet
        metrics.beat()
        status, body = _get(url)
        assert status == 200 and body.startswith("ok")
        time.sleep(0.5)
        status, body = _get(url)
        assert status == 503 and body.startswith("stalled")
    finally:
        server.close()
