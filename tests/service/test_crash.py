"""kill -9 at random instants while a batch is counted, restart, repeat: in the end exactly one
correct result per BAM, none missing, no temp files left."""

from __future__ import annotations

import random
import sqlite3
import time
from functools import partial
from pathlib import Path

import pytest

from tests.service.helpers import Daemon, Folders, assert_result_matches, drop_by_rename, result_path, results, wait_for


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill9_during_a_batch_loses_and_duplicates_nothing(
    templates: list[Path], folders: Folders, daemons: list[Daemon]
) -> None:
    rng = random.Random(20261126)
    sources = {f"batch/s{i:02d}.bam": templates[i % len(templates)] for i in range(36)}
    daemon = Daemon(folders, extra=["--max-files", "3"])
    daemons.append(daemon)
    daemon.start()
    (folders.watch / "batch").mkdir()
    for relative, template in sources.items():
        drop_by_rename(template, folders.watch / relative)

    # Kill when the batch has reached random points of its progress (so the kills land inside
    # it on fast and slow machines alike), after a random extra instant.
    def finished() -> int:
        return sum(result_path(folders, rel).exists() for rel in sources)

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
        lambda: all(result_path(folders, rel).exists() for rel in sources),
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


def _states(folders: Folders) -> set[str]:
    with sqlite3.connect(folders.state / "ledger.sqlite3") as db:
        return {state for (state,) in db.execute("SELECT state FROM files")}


@pytest.mark.timeout(60)
def test_the_crash_window_between_result_and_done_row(
    templates: list[Path], folders: Folders, daemons: list[Daemon]
) -> None:
    """The exact state a crash leaves after the result's rename and before the ``done`` commit
    (plus a temp file from a crash mid-write): the restarted daemon counts the BAM again and
    replaces the result; one correct result remains, and no temp file."""
    import os

    from bamcountd.service.ledger import Identity, Ledger

    bam = drop_by_rename(templates[0], folders.watch / "window.bam")
    identity = Identity.of(os.lstat(bam))
    with Ledger.open(folders.state) as ledger:
        ledger.observe(bam, folders.watch, identity)
        assert ledger.queue(bam, identity) and ledger.start(bam, identity)
    result = result_path(folders, "window.bam")
    result.write_text('{"total": -1, "regions": []}\n')  # stands for the result of that count
    leftover = folders.results / ".window.counts.json.k3j2_x.tmp"
    leftover.write_text("half a result")

    daemon = Daemon(folders)
    daemons.append(daemon)
    daemon.start()
    wait_for(lambda: _states(folders) == {"done"}, timeout=30, what="the row done", context=daemon.log)
    assert daemon.stop() == 0
    assert_result_matches(result, bam, templates[0])
    assert results(folders) == [result]
    assert [e["event"] for e in daemon.events() if e.get("event") in ("swept_temporaries", "counting", "done")] == [
        "swept_temporaries",
        "counting",
        "done",
    ]
