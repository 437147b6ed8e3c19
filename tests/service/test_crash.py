"""kill -9 at random instants while a batch is counted, restart, repeat: in the end exactly one
correct result per BAM, none missing, none written twice, no temp files left; and the exact
crash window between a result's rename and its ``done`` row."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.service.helpers import assert_result_matches, drop_by_rename, result_path, results
from tests.support.daemon import Daemon, Daemons, Folders
from tests.support.waiting import wait_for


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill9_during_a_batch_loses_and_duplicates_nothing(
    templates: list[Path], folders: Folders, daemons: Daemons
) -> None:
    rng = random.Random(20261126)
    sources = {f"batch/s{i:02d}.bam": templates[i % len(templates)] for i in range(36)}
    daemon = daemons.start(extra=["--max-files", "3"])
    (folders.watch / "batch").mkdir()
    for relative, template in sources.items():
        drop_by_rename(template, folders.watch / relative)

    # Kill when the batch has reached random points of its progress (so the kills land inside
    # it on fast and slow machines alike), after a random extra instant.
    # The inode each result had when first seen: a BAM counted again after its result was in
    # place would get a new result file (the atomic write renames a new inode over it).
    first_inode: dict[str, int] = {}

    def finished() -> int:
        for rel in sources:
            with contextlib.suppress(FileNotFoundError):
                first_inode.setdefault(rel, os.lstat(result_path(folders, rel)).st_ino)
        return len(first_inode)

    def reached(threshold: int) -> bool:
        return finished() >= threshold

    done_at_kill: list[int] = []
    for threshold in sorted(rng.sample(range(1, len(sources) - 2), 5)):
        wait_for(partial(reached, threshold), timeout=60, what=f"{threshold} results", context=daemon.log)
        time.sleep(rng.uniform(0, 0.15))
        done_at_kill.append(finished())
        daemon.kill9()  # the daemon only: its samtools children are orphaned, as in a real crash
        daemon.start()
    assert sum(n < len(sources) for n in done_at_kill) >= 3, done_at_kill  # kills landed mid-batch

    wait_for(
        lambda: finished() == len(sources),
        timeout=120,
        what="every result after the last restart",
        context=daemon.log,
    )
    wait_for(lambda: _states(folders) == {"done"}, timeout=30, what="every row done", context=daemon.log)
    assert daemon.stop() == 0
    expected_files = sorted(result_path(folders, rel) for rel in sources)
    assert results(folders) == expected_files  # exactly one result each, and no temp files
    for relative, template in sources.items():
        assert_result_matches(result_path(folders, relative), folders.watch / relative, template)
    rewritten = [rel for rel in sources if os.lstat(result_path(folders, rel)).st_ino != first_inode[rel]]
    assert not rewritten, f"counted again after their result was in place: {rewritten}"


def _states(folders: Folders) -> set[str]:
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        return {state for (state,) in db.execute("SELECT state FROM items")}


def _set_state(folders: Folders, state: str) -> None:
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        db.execute("UPDATE items SET state = ?", (state,))


def _row(folders: Folders) -> tuple[str, int]:
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        (row,) = db.execute("SELECT state, attempts FROM items").fetchall()
        return row[0], row[1]


def _counted_once(templates: list[Path], folders: Folders, daemons: Daemons, name: str) -> tuple[Path, Path]:
    """Count ``name`` (a copy of the first template) with a real daemon and stop it: a real
    result in place and a ``done`` row."""
    bam = drop_by_rename(templates[0], folders.watch / name)
    daemon = daemons.start()
    result = result_path(folders, name)
    wait_for(lambda: _states(folders) == {"done"}, timeout=30, what="the first count", context=daemon.log)
    assert daemon.stop() == 0
    assert_result_matches(result, bam, templates[0])
    return bam, result


@pytest.mark.parametrize("state", ["running", "queued"])
@pytest.mark.timeout(60)
def test_the_crash_window_between_result_and_done_row(
    templates: list[Path], folders: Folders, daemons: Daemons, state: str
) -> None:
    """The exact state a crash leaves after the result's rename and before the ``done`` commit
    (a real result in place, the row still ``running``; ``queued`` if the crash came after a
    restart's recovery), plus a temp file from a crash mid-write: the restarted daemon adopts
    the result without counting the BAM again; the row ends ``done``, the result is untouched."""
    bam, result = _counted_once(templates, folders, daemons, "window.bam")
    _set_state(folders, state)
    before = result.read_bytes(), os.lstat(result).st_ino
    leftover = folders.results / ".window.counts.json.k3j2_x.tmp"
    leftover.write_text("half a result")

    daemon = daemons.start()
    wait_for(lambda: _states(folders) == {"done"}, timeout=30, what="the row done", context=daemon.log)
    wait_for(lambda: bool(_events(daemon, "result_adopted")), timeout=10, what="result_adopted", context=daemon.log)
    assert daemon.stop() == 0
    assert _row(folders) == ("done", 0)
    assert (result.read_bytes(), os.lstat(result).st_ino) == before  # never rewritten
    assert_result_matches(result, bam, templates[0])
    assert results(folders) == [result]
    assert [e["event"] for e in daemon.events() if e.get("event") in _COUNT_EVENTS] == [
        "swept_temporaries",
        "result_adopted",
    ]
    assert _events(daemon, "result_adopted")[0]["file"] == str(bam)


def _tamper_identity(document: dict[str, Any]) -> None:
    document["source"]["mtime_ns"] -= 1  # the result of an earlier version of the file


def _tamper_filters(document: dict[str, Any]) -> None:
    document["filters"]["exclude_flags"] = 1024  # counted with -F DUP, not with today's settings


def _tamper_regions(document: dict[str, Any]) -> None:
    document["regions"] = document["regions"][:-1]  # counted over other regions
    document["total"] = sum(region["count"] for region in document["regions"])


@pytest.mark.parametrize("tamper", [_tamper_identity, _tamper_filters, _tamper_regions])
@pytest.mark.timeout(60)
def test_a_result_of_another_file_or_other_settings_is_not_adopted(
    templates: list[Path], folders: Folders, daemons: Daemons, tamper: Callable[[dict[str, Any]], None]
) -> None:
    """In the crash window, but the result in place is stale or was counted with other
    settings: the BAM is counted again and the result replaced with samtools' counts."""
    bam, result = _counted_once(templates, folders, daemons, "stale.bam")
    document = json.loads(result.read_text())
    tamper(document)
    result.write_text(json.dumps(document))
    _set_state(folders, "running")

    daemon = daemons.start()
    wait_for(lambda: bool(_events(daemon, "done")), timeout=30, what="the second count", context=daemon.log)
    assert daemon.stop() == 0
    assert _row(folders) == ("done", 0)
    assert [e["event"] for e in daemon.events() if e.get("event") in _COUNT_EVENTS] == [
        "result_not_adopted",
        "counting",
        "done",
    ]
    assert json.loads(result.read_text()) != document
    assert_result_matches(result, bam, templates[0])
    assert results(folders) == [result]


_COUNT_EVENTS = ("swept_temporaries", "result_adopted", "result_not_adopted", "counting", "done")


def _events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [event for event in daemon.events() if event.get("event") == name]
