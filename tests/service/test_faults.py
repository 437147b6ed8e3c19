"""Faults: corrupt BAMs, crashing samtools, a full disk, a second daemon on the same ledger."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from bamcountd.cli import main
from bamcountd.service.config import load
from bamcountd.service.scheduler import Scheduler, serve
from tests.service.helpers import assert_result_matches, drop_by_rename, result_path, results
from tests.support.daemon import Daemons, Folders
from tests.support.fake_samtools import Fault, fake_samtools
from tests.support.waiting import wait_for


def error_path(folders: Folders, relative: str) -> Path:
    return folders.results / (relative[: -len(".bam")] + ".error.json")


@pytest.mark.timeout(90)
def test_corrupt_bam_gets_an_error_file_and_others_are_served(
    templates: list[Path], folders: Folders, daemons: Daemons, tmp_path: Path
) -> None:
    daemon = daemons.start(extra=["--retries", "3", "--retry-delay", "0.2"])
    truncated = tmp_path / "truncated.bam"
    truncated.write_bytes(templates[0].read_bytes()[:-3000])
    drop_by_rename(truncated, folders.watch / "bad.bam")
    good = drop_by_rename(templates[1], folders.watch / "good.bam")

    wait_for(error_path(folders, "bad.bam").exists, timeout=30, what="bad.error.json", context=daemon.log)
    wait_for(result_path(folders, "good.bam").exists, timeout=30, what="good result", context=daemon.log)
    assert_result_matches(result_path(folders, "good.bam"), good, templates[1])
    error = json.loads(error_path(folders, "bad.bam").read_text())
    assert error["kind"] == "CorruptBam" and "quickcheck" in error["error"] and "bad.bam" in error["error"]
    assert error["attempts"] == 1  # a corrupt file stays corrupt: no retries until it changes
    assert error["source"]["size"] == (folders.watch / "bad.bam").stat().st_size
    assert not result_path(folders, "bad.bam").exists()

    # Fixed (replaced) by the uploader: counted, and the error file goes.
    drop_by_rename(templates[2], folders.watch / "bad.bam")
    wait_for(result_path(folders, "bad.bam").exists, timeout=30, what="the fixed file's result", context=daemon.log)
    assert_result_matches(result_path(folders, "bad.bam"), folders.watch / "bad.bam", templates[2])
    assert not error_path(folders, "bad.bam").exists()
    assert daemon.stop() == 0


@pytest.mark.timeout(90)
def test_crashing_samtools_is_retried_then_gets_an_error_file(
    templates: list[Path], folders: Folders, daemons: Daemons, tmp_path: Path
) -> None:
    samtools = fake_samtools(
        tmp_path, Fault("read", contains="crashme", stderr="samtools: simulated crash\n", end="abort")
    )
    daemon = daemons.start(extra=["--samtools", str(samtools), "--retries", "3", "--retry-delay", "0.2"])
    drop_by_rename(templates[0], folders.watch / "crashme.bam")
    fine = drop_by_rename(templates[1], folders.watch / "fine.bam")
    wait_for(error_path(folders, "crashme.bam").exists, timeout=40, what="crashme.error.json", context=daemon.log)
    wait_for(result_path(folders, "fine.bam").exists, timeout=30, what="fine result", context=daemon.log)
    assert_result_matches(result_path(folders, "fine.bam"), fine, templates[1])
    error = json.loads(error_path(folders, "crashme.bam").read_text())
    assert error["attempts"] == 3 and error["kind"] == "SamtoolsFailed" and "SIGABRT" in error["error"]
    failures = [e for e in daemon.events() if e.get("event") == "count_failed"]
    assert [e["attempts"] for e in failures] == [1, 2]
    assert daemon.stop() == 0
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        states = dict(db.execute("SELECT CAST(key AS TEXT), state FROM items"))
    assert sorted(states.values()) == ["done", "quarantined"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("where", "code"), [("fsync", errno.ENOSPC), ("mkstemp", errno.EACCES)])
def test_disk_full_leaves_no_partial_result_and_requeues(
    templates: list[Path], folders: Folders, monkeypatch: pytest.MonkeyPatch, where: str, code: int
) -> None:
    """A full disk (ENOSPC at fsync, where delayed allocation reports it) or a results folder
    that cannot be written (EACCES creating the temp file); both injected, since these tests run
    as root and cannot mount a tiny tmpfs.  The real write_atomic runs around the fault."""
    failures_left = [2]
    real_fsync, real_mkstemp = os.fsync, tempfile.mkstemp

    def fail_in_results(path: str) -> None:
        if path.startswith(str(folders.results)) and failures_left[0] > 0:
            failures_left[0] -= 1
            raise OSError(code, os.strerror(code))

    def fsync(fd: int) -> None:
        if where == "fsync":
            fail_in_results(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        if where == "mkstemp":
            fail_in_results(str(kwargs.get("dir", "")))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    bam = drop_by_rename(templates[0], folders.watch / "full.bam")
    config = load(
        {
            "watch": [str(folders.watch)],
            "results": str(folders.results),
            "state": str(folders.state),
            "settle": "0",
            "retry_delay": "0",
        },
        environ={},
    )
    handle: list[Scheduler] = []
    seen_states: list[list[str]] = []

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(partial(serve, config, started=handle.append))
            with anyio.fail_after(30):
                while failures_left[0] > 0 or not result_path(folders, "full.bam").exists():
                    if failures_left[0] < 2 and not result_path(folders, "full.bam").exists():
                        # Between failures no result is visible (a write's own hidden temp file
                        # may be, for an instant, until write_atomic removes it).
                        seen_states.append([p.name for p in results(folders) if not p.name.startswith(".")])
                    await anyio.sleep(0.02)
            handle[0].stop()

    with structlog.testing.capture_logs() as logs:
        anyio.run(scenario)
    write_failures = [e for e in logs if e["event"] == "result_write_failed"]
    assert len(write_failures) == 2
    assert write_failures[0]["errno"] == code and write_failures[0]["error"] == os.strerror(code)
    assert write_failures[0]["log_level"] == "error" and "requeued" in write_failures[0]["action"]
    assert all(names == [] for names in seen_states)
    assert_result_matches(result_path(folders, "full.bam"), bam, templates[0])
    assert results(folders) == [result_path(folders, "full.bam")]
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        assert db.execute("SELECT state, attempts FROM items").fetchall() == [("done", 0)]


@pytest.mark.timeout(60)
def test_second_daemon_on_the_same_ledger_refuses_to_start(folders: Folders, daemons: Daemons) -> None:
    first = daemons.start()
    second = subprocess.run(
        [sys.executable, "-m", "bamcountd", *first.argv()[3:]], capture_output=True, text=True, timeout=30, check=False
    )
    assert second.returncode == 1
    assert (
        f"another bamcountd daemon (pid {first.process.pid if first.process else '?'}) holds the ledger"
        in second.stderr
    )
    assert second.stderr.count("\n") == 1 and second.stderr.startswith("bamcountd: error: ")
    assert not first.exited()
    assert first.stop() == 0


def test_bad_config_is_exit_2_naming_the_key(
    folders: Folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["serve", "--watch", str(folders.watch), "--results", str(folders.results), "--state", str(folders.state)]
    config = tmp_path / "bad.toml"
    config.write_text("max_files = 0\n")
    assert main([*base, "--config", str(config)]) == 2
    assert f"{config}: max_files: must be at least 1" in capsys.readouterr().err
    config.write_text("max_filez = 2\n")
    assert main([*base, "--config", str(config)]) == 2
    assert "max_filez: unknown key" in capsys.readouterr().err
    assert main([*base, "--settle", "soon"]) == 2
    assert "--settle: could not convert" in capsys.readouterr().err
    assert main(["serve", "--results", str(folders.results), "--state", str(folders.state)]) == 2
    assert "watch: not set" in capsys.readouterr().err
    assert main([*base, "--index", str(tmp_path / "x.bai")]) == 2
    assert "--index names one index file" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_an_option_no_bam_can_satisfy_stops_the_daemon_with_status_2(
    templates: list[Path], folders: Folders, daemons: Daemons
) -> None:
    daemon = daemons.start(extra=["--method", "index", "--min-mapq", "20"])
    drop_by_rename(templates[0], folders.watch / "a.bam")
    assert daemon.process is not None
    assert daemon.process.wait(timeout=30) == 2
    assert "bamcountd: error: --method index reads only the index" in daemon.log()
    assert not results(folders)
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        assert db.execute("SELECT state FROM items").fetchall() == [("queued",)]


@pytest.mark.timeout(90)
def test_an_unexpected_exception_in_one_count_fails_that_bam_and_the_daemon_serves_on(
    templates: list[Path], folders: Folders, daemons: Daemons
) -> None:
    """A fault no code path expects: a folder squats on the name of the index the daemon builds
    for one BAM, so the rename that puts the built index in place raises IsADirectoryError (an
    OSError that is no bamcountd error).  Real files, no injection.  That BAM is retried, then
    gets an error file of kind InternalError; the daemon keeps counting the others."""
    from bamcountd.inputs import cached_index_path

    bad = drop_by_rename(templates[0], folders.watch / "bad.bam")
    good = drop_by_rename(templates[1], folders.watch / "good.bam")
    squatter = cached_index_path(Path(os.path.realpath(bad)), folders.state / "index", csi=False)
    squatter.mkdir(parents=True)
    daemon = daemons.start(extra=["--retries", "2", "--retry-delay", "0.2"])

    wait_for(error_path(folders, "bad.bam").exists, timeout=40, what="bad.error.json", context=daemon.log)
    wait_for(result_path(folders, "good.bam").exists, timeout=30, what="good result", context=daemon.log)
    assert_result_matches(result_path(folders, "good.bam"), good, templates[1])
    error = json.loads(error_path(folders, "bad.bam").read_text())
    assert error["kind"] == "InternalError" and error["attempts"] == 2
    assert error["error"].startswith("internal error: IsADirectoryError:") and str(squatter) in error["error"]
    assert not result_path(folders, "bad.bam").exists()
    crashes = [e for e in daemon.events() if e.get("event") == "count_crashed"]
    assert len(crashes) == 2 and all(e["file"] == str(os.path.realpath(bad)) for e in crashes)
    assert all(e["level"] == "error" and "Traceback" in e["exception"] for e in crashes)
    assert all("os.replace(partial, out)" in e["exception"] for e in crashes)
    assert [e["attempts"] for e in daemon.events() if e.get("event") == "count_failed"] == [1]

    # Still serving: a BAM dropped after the crashes is counted.
    later = drop_by_rename(templates[2], folders.watch / "later.bam")
    wait_for(result_path(folders, "later.bam").exists, timeout=30, what="later result", context=daemon.log)
    assert_result_matches(result_path(folders, "later.bam"), later, templates[2])
    assert not daemon.exited()
    assert daemon.stop() == 0
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        states = dict(db.execute("SELECT CAST(key AS TEXT), state FROM items"))
    assert states == {str(os.path.realpath(p)): s for p, s in ((bad, "quarantined"), (good, "done"), (later, "done"))}
