"""A BAM replaced or deleted while it is being counted: the count is cancelled (its samtools
killed), a replaced file is counted again, a deleted one leaves the queue."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.service.helpers import assert_result_matches, drop_by_rename, result_path, results
from tests.support.daemon import Daemons, Folders
from tests.support.fake_samtools import Fault, fake_samtools, pid_alive
from tests.support.waiting import wait_for


@pytest.mark.timeout(90)
def test_replaced_and_deleted_mid_count(
    templates: list[Path], folders: Folders, daemons: Daemons, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    pids = tmp_path / "pids"
    pids.mkdir()
    samtools = fake_samtools(tmp_path, Fault("read", pids=str(pids), hold=str(hold)))
    daemon = daemons.start(extra=["--samtools", str(samtools)])
    replaced = drop_by_rename(templates[0], folders.watch / "replaced.bam")
    deleted = drop_by_rename(templates[1], folders.watch / "deleted.bam")

    def held(name: str) -> list[int]:
        return [int(p.name) for p in pids.iterdir() if name in p.read_text()]

    wait_for(lambda: bool(held("replaced.bam")) and bool(held("deleted.bam")), timeout=30, what="both counts held")
    first_pids = held("replaced.bam") + held("deleted.bam")
    drop_by_rename(templates[2], replaced)  # new content under the same name, mid-count
    deleted.unlink()
    wait_for(
        lambda: sum(e.get("event") == "changed_during_count" for e in daemon.events()) >= 2,
        timeout=20,
        what="both changes noticed",
        context=daemon.log,
    )
    wait_for(lambda: not any(pid_alive(pid) for pid in first_pids), timeout=10, what="held samtools killed")
    hold.unlink()
    wait_for(
        result_path(folders, "replaced.bam").exists, timeout=30, what="the new version's result", context=daemon.log
    )
    assert_result_matches(result_path(folders, "replaced.bam"), replaced, templates[2])
    assert daemon.stop() == 0
    assert results(folders) == [result_path(folders, "replaced.bam")]
    done = [e for e in daemon.events() if e.get("event") == "done"]
    assert len(done) == 1
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        assert db.execute("SELECT state FROM items").fetchall() == [("done",)]
