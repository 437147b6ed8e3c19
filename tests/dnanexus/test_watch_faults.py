"""dx-watch under faults: API errors, an unreachable API, a bad token, a kill mid-launch, two runners."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from bamcountd import logs
from bamcountd.dnanexus.runtime import install_redaction
from bamcountd.ledger import Ledger
from bamcountd.metrics import MetricsServer, WatchMetrics
from devtools.dnanexus_emulator import Emulator
from devtools.dx_runner import make_runner, settle
from tests.dnanexus.helpers import run_watch, seed_text, watch_command, watch_env
from tests.support.waiting import wait_for


def test_api_500_and_503_with_retry_after_are_retried(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    bam_id = emulator.add_file("a.bam", shared_bam.read_bytes(), folder="/incoming")
    emulator.inject(r"^/system/findDataObjects$", 500, times=1)
    emulator.inject(r"/run$", 503, times=2, retry_after=1)
    runner = make_runner(emulator, tmp_path / "state", applet=applet)
    started = time.monotonic()
    runner.poll_once()
    assert time.monotonic() - started >= 2  # dxpy waited as Retry-After asked
    assert all(fault.remaining == 0 for fault in emulator.faults)
    settle(runner, emulator)
    entry = runner.ledger.get(bam_id)
    assert entry is not None and entry.state == "done"
    assert len(emulator.root_jobs()) == 1
    assert emulator.files[entry.result or ""].data.decode() == seed_text(shared_bam)


def test_unreachable_api_is_logged_and_the_runner_recovers(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    bam_id = emulator.add_file("a.bam", shared_bam.read_bytes(), folder="/incoming")
    state = tmp_path / "state"
    make_runner(emulator, state, applet=applet).check_access()
    emulator.stop_listening()
    stop = threading.Event()

    def serve() -> None:
        make_runner(emulator, state, applet=applet, api_retries=0).run(stop)

    def done() -> bool:
        entry = Ledger.open(state / "dx-watch.sqlite", lock=False).get(bam_id)
        return entry is not None and entry.state == "done"

    with capture_logs() as captured:
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            wait_for(
                lambda: sum(e["event"] == "poll_failed" for e in captured) >= 2,
                timeout=60,
                what="two failed polls",
                interval=0.1,
            )
            emulator.listen()
            wait_for(done, timeout=60, what="the BAM done", interval=0.1)
        finally:
            stop.set()
            thread.join(timeout=30)
    failures = [e for e in captured if e["event"] == "poll_failed"]
    assert failures[0]["log_level"] == "warning"
    assert "connect" in failures[0]["error"].lower() or "refused" in failures[0]["error"].lower()
    assert len(emulator.root_jobs()) == 1
    assert not thread.is_alive()


def test_bad_token_is_a_clear_error_with_exit_status_2(emulator: Emulator, applet: str, tmp_path: Path) -> None:
    completed = subprocess.run(
        [*watch_command(emulator, tmp_path / "state", "--applet", applet, "--once")],
        env=watch_env(emulator, tmp_path, token="not-the-token"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("bamcountd: error:")]
    assert len(errors) == 1 and "rejected the API token" in errors[0]
    assert "not-the-token" not in completed.stderr


def test_unknown_project_is_exit_status_2(emulator: Emulator, tmp_path: Path) -> None:
    command = watch_command(emulator, tmp_path / "state", "--local", "--once")
    command[command.index("--project") + 1] = "project-" + "0" * 24
    missing = subprocess.run(command, env=watch_env(emulator, tmp_path), capture_output=True, text=True, check=False)
    assert missing.returncode == 2
    assert "project-000000000000000000000000" in missing.stderr and "ResourceNotFound" in missing.stderr


def test_options_the_applet_cannot_take_are_usage_errors(emulator: Emulator, applet: str, tmp_path: Path) -> None:
    completed = run_watch(emulator, tmp_path, tmp_path / "state", "--applet", applet, "--once", "-r", "chr1")
    assert completed.returncode == 2
    assert "--region: not an input of the applet" in completed.stderr
    completed = run_watch(emulator, tmp_path, tmp_path / "state", "--applet", applet, "--once", "--verify", "full")
    assert completed.returncode == 2
    assert "--verify: not an input of the applet" in completed.stderr
    assert emulator.run_requests == 0


def test_killed_between_launch_and_record_launches_no_second_job(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    bam_id = emulator.add_file("a.bam", shared_bam.read_bytes(), folder="/incoming")
    emulator.hold_runs(1)
    state = tmp_path / "state"
    first = subprocess.Popen(
        watch_command(emulator, state, "--applet", applet, "--once"),
        env=watch_env(emulator, tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert emulator.run_created.wait(60), "the runner never launched"
    first.send_signal(signal.SIGKILL)  # the job exists on the platform; the runner recorded nothing
    first.wait(timeout=30)
    emulator.release_runs.set()
    assert "bamcountd_job" not in emulator.files[bam_id].properties
    completed = run_watch(emulator, tmp_path, state, "--applet", applet, "--once")
    assert completed.returncode == 0, completed.stderr
    assert emulator.run_requests == 2
    assert len(emulator.root_jobs()) == 1
    job = emulator.root_jobs()[0]
    assert emulator.files[bam_id].properties["bamcountd_job"] == job.id
    entry = Ledger.open(state / "dx-watch.sqlite", lock=False).get(bam_id)
    assert entry is not None and entry.handle == job.id


def test_two_runners_at_once_launch_one_job_per_bam(
    emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path
) -> None:
    bam_id = emulator.add_file("a.bam", shared_bam.read_bytes(), folder="/incoming")
    emulator.hold_runs(1)
    first = subprocess.Popen(
        watch_command(emulator, tmp_path / "one", "--applet", applet, "--once"),
        env=watch_env(emulator, tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert emulator.run_created.wait(60)
    # The first runner's launch is in flight; the second sees no property and launches too.
    second = run_watch(emulator, tmp_path, tmp_path / "two", "--applet", applet, "--once")
    emulator.release_runs.set()
    _, first_err = first.communicate(timeout=60)
    assert first.returncode == 0, first_err
    assert second.returncode == 0, second.stderr
    assert emulator.run_requests == 2
    assert len(emulator.root_jobs()) == 1
    entries = [Ledger.open(tmp_path / name / "dx-watch.sqlite", lock=False).get(bam_id) for name in ("one", "two")]
    job_ids = {entry.handle for entry in entries if entry is not None}
    assert job_ids == {emulator.root_jobs()[0].id}


def test_sigterm_stops_the_service_cleanly_and_systemd_hears_of_it(
    emulator: Emulator, applet: str, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind(str(notify_path))
        notify_socket.settimeout(30)
        process = subprocess.Popen(
            watch_command(emulator, tmp_path / "state", "--applet", applet),
            env={**watch_env(emulator, tmp_path), "NOTIFY_SOCKET": str(notify_path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert notify_socket.recv(4096).decode().startswith("READY=1\n")
        deadline = time.monotonic() + 30
        while emulator.calls.count("/system/findDataObjects") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        messages = []
        with contextlib.suppress(TimeoutError):
            notify_socket.settimeout(1)
            while True:
                messages.append(notify_socket.recv(4096).decode())
    assert process.returncode == 0, stderr
    assert messages[-1].splitlines()[0] == "STOPPING=1"  # the daemon's client: STOPPING=1, then STATUS=
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "stopping" in events and "polled" in events


def test_metrics_count_launches(emulator: Emulator, applet: str, shared_bam: Path, tmp_path: Path) -> None:
    emulator.add_file("a.bam", shared_bam.read_bytes(), folder="/incoming")
    runner = make_runner(emulator, tmp_path / "state", applet=applet)
    runner.metrics = WatchMetrics()
    server = MetricsServer(runner.metrics, "127.0.0.1", 0, stale_after=30.0)  # the daemon's server
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            pass
    except urllib.error.HTTPError as error:
        assert error.code == 503  # no poll yet
    try:
        runner.run(threading.Event(), once=True)  # one poll, as the service loop makes it
        settle(runner, emulator)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
            text = response.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        server.close()
    assert "bamcountd_dx_jobs_launched_total 1.0" in text
    assert "bamcountd_dx_bams_done_total 1.0" in text


@pytest.mark.usefixtures("emulator")
def test_the_token_never_reaches_the_log(emulator: Emulator) -> None:
    stream = io.StringIO()
    logs.configure(level="info", json=True, stream=stream)
    try:
        install_redaction()
        logger = structlog.get_logger("t")
        logger.warning("request", header=f"Bearer {emulator.token}", nested={"t": emulator.token})
        try:
            raise RuntimeError(f"the server echoed {emulator.token}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logs.configure(level="warning")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert emulator.token not in stream.getvalue()
    assert first["header"] == "Bearer [redacted]" and first["nested"] == {"t": "[redacted]"}
    assert "the server echoed [redacted]" in second["exception"]
