"""SIGTERM with samtools running: exit 0 within the drain time, no samtools left, the file back
in the queue; and the next start counts it."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.service.helpers import assert_result_matches, drop_by_rename, result_path, results
from tests.support.daemon import Daemons, Folders
from tests.support.fake_samtools import Fault, fake_samtools, pid_alive
from tests.support.waiting import wait_for


@pytest.mark.timeout(90)
def test_sigterm_kills_hung_samtools_and_requeues(
    templates: list[Path], folders: Folders, daemons: Daemons, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    drain = 1.0
    samtools = fake_samtools(tmp_path, Fault("read", pids=str(pids), hang="3600"))
    daemon = daemons.start(extra=["--samtools", str(samtools), "--drain-seconds", str(drain)])
    bam = drop_by_rename(templates[0], folders.watch / "hang.bam")
    wait_for(lambda: any(pids.iterdir()), timeout=30, what="a samtools count to start", context=daemon.log)
    time.sleep(0.3)
    running = [int(p.name) for p in pids.iterdir()]
    assert all(pid_alive(pid) for pid in running)

    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.process is not None
    assert daemon.process.wait(timeout=drain + 10) == 0, daemon.log()
    assert time.monotonic() - started < drain + 5
    assert not [pid for pid in running if pid_alive(pid)], "samtools outlived the daemon"
    assert not results(folders)
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        assert db.execute("SELECT state FROM items").fetchall() == [("queued",)]
    events = [e["event"] for e in daemon.events()]
    assert "requeued" in events and events[-1] == "stopped"

    # Restarted without the fault, the requeued file is counted.
    daemon.env = {}
    daemon.extra = []
    daemon.start()
    wait_for(result_path(folders, "hang.bam").exists, timeout=30, what="the result after restart", context=daemon.log)
    assert_result_matches(result_path(folders, "hang.bam"), bam, templates[0])
    assert daemon.stop() == 0


@pytest.mark.timeout(60)
def test_sigint_when_idle_exits_zero_and_releases_the_ledger(folders: Folders, daemons: Daemons) -> None:
    daemon = daemons.start()
    daemon.signal(signal.SIGINT)
    assert daemon.process is not None
    assert daemon.process.wait(timeout=10) == 0
    second = daemons.start()  # the lock went with the first daemon
    assert second.stop() == 0
    assert os.path.exists(folders.state / "ledger.sqlite3")


@pytest.mark.timeout(90)
def test_a_count_that_finishes_within_the_drain_is_kept(
    templates: list[Path], folders: Folders, daemons: Daemons, tmp_path: Path
) -> None:
    hold, pids = tmp_path / "hold", tmp_path / "pids"
    hold.touch()
    pids.mkdir()
    samtools = fake_samtools(tmp_path, Fault("read", pids=str(pids), hold=str(hold)))
    daemon = daemons.start(extra=["--samtools", str(samtools), "--drain-seconds", "20"])
    bam = drop_by_rename(templates[0], folders.watch / "drained.bam")
    wait_for(lambda: any(pids.iterdir()), timeout=30, what="a held count", context=daemon.log)
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: any(e.get("event") == "draining" for e in daemon.events()), timeout=10, what="draining")
    assert not daemon.exited()
    hold.unlink()  # the count can finish now, well within the drain time
    assert daemon.process is not None
    assert daemon.process.wait(timeout=30) == 0
    assert_result_matches(result_path(folders, "drained.bam"), bam, templates[0])
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        assert db.execute("SELECT state FROM items").fetchall() == [("done",)]


@pytest.mark.timeout(90)
def test_a_second_sigterm_skips_the_drain(
    templates: list[Path], folders: Folders, daemons: Daemons, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    samtools = fake_samtools(tmp_path, Fault("read", pids=str(pids), hang="3600"))
    daemon = daemons.start(extra=["--samtools", str(samtools), "--drain-seconds", "60"])
    drop_by_rename(templates[0], folders.watch / "hang.bam")
    wait_for(lambda: any(pids.iterdir()), timeout=30, what="a hung count", context=daemon.log)
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: any(e.get("event") == "draining" for e in daemon.events()), timeout=10, what="draining")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.process is not None
    assert daemon.process.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    assert not [pid for pid in (int(p.name) for p in pids.iterdir()) if pid_alive(pid)]
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        assert db.execute("SELECT state FROM items").fetchall() == [("queued",)]
