"""bamcountd.ledger on real SQLite files: transitions and their guards, the upserts of
dx-watch, the lock, and the migration of databases written by bamcountd 0.1.0 (tests/data,
made by that release's own ledgers with scripts/make_v0_ledgers.py)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bamcountd.errors import BamcountdError, LedgerLocked
from bamcountd.ledger import STATES, Ledger, file_identity
from bamcountd.service.watch import Identity

DATA = Path(__file__).parent / "data"
A, A2 = "1:10:100:1000", "1:11:100:2000"  # the same path, replaced
KEY, ROOT = b"/w/a.bam", b"/w"
DX = b"project-P"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state" / "ledger.sqlite3", lock=True) as opened:
        yield opened


def running(ledger: Ledger, key: bytes = KEY, identity: str = A) -> None:
    assert ledger.observe(key, ROOT, identity, name="a.bam", sort_key=1000, now=100.0)
    assert ledger.queue(key, identity)
    assert ledger.start(key, identity)


def state(ledger: Ledger, key: bytes = KEY) -> tuple[str, int, str | None]:
    entry = ledger.get(key)
    assert entry is not None
    return entry.state, entry.attempts, entry.error


def test_life_of_a_file_and_replacement(ledger: Ledger) -> None:
    assert ledger.observe(KEY, ROOT, A, name="a.bam", sort_key=1000, now=100.0)
    assert not ledger.observe(KEY, ROOT, A, now=200.0)  # nothing new: the settle clock runs on
    assert ledger.settled(seen_before=99.0) == []
    [fresh] = ledger.settled(seen_before=100.0)
    assert (fresh.path, fresh.root, fresh.name, fresh.sort_key, fresh.seen_at) == (
        Path("/w/a.bam"),
        Path("/w"),
        "a.bam",
        1000,
        100.0,
    )
    assert not ledger.queue(KEY, A2)  # a stale identity moves nothing
    assert ledger.queue(KEY, A)
    assert not ledger.queue(KEY, A)  # only from seen
    assert [e.key for e in ledger.waiting(now=0, limit=5)] == [KEY]
    assert not ledger.start(KEY, A2)
    assert ledger.start(KEY, A)
    assert not ledger.start(KEY, A)
    assert ledger.fail(KEY, A2, "stale", retry_at=50.0) == 0  # guarded: nothing spent
    assert ledger.fail(KEY, A, "boom", retry_at=50.0) == 1
    assert state(ledger) == ("failed", 1, "boom")
    assert ledger.waiting(now=49.0, limit=5) == []  # backing off
    assert [e.key for e in ledger.waiting(now=50.0, limit=5)] == [KEY]
    assert ledger.start(KEY, A)
    assert not ledger.finish(KEY, A2)
    assert ledger.finish(KEY, A, result="file-R")
    entry = ledger.get(KEY)
    assert entry is not None and (entry.state, entry.attempts, entry.error, entry.result) == ("done", 1, None, "file-R")
    # Replaced: counted again from scratch.
    assert ledger.observe(KEY, ROOT, A2, name="a.bam", sort_key=2000, now=300.0)
    entry = ledger.get(KEY)
    assert entry is not None
    assert (entry.state, entry.attempts, entry.identity, entry.result, entry.seen_at) == ("seen", 0, A2, None, 300.0)
    assert not ledger.finish(KEY, A)  # a late finish for the old identity is ignored
    ledger.forget(KEY)
    assert ledger.get(KEY) is None
    assert ledger.counts() == dict.fromkeys(STATES, 0)


def test_requeue_and_quarantine(ledger: Ledger) -> None:
    running(ledger)
    assert not ledger.requeue(KEY, A2)
    assert ledger.requeue(KEY, A, not_before=70.0, error="results folder full")
    assert state(ledger) == ("queued", 0, "results folder full")  # no attempt spent
    assert ledger.waiting(now=69.0, limit=5) == []
    assert ledger.start(KEY, A)
    assert ledger.quarantine(KEY, A2, "stale") == 0
    assert ledger.quarantine(KEY, A, "CorruptBam") == 1
    assert state(ledger) == ("quarantined", 1, "CorruptBam")
    assert not ledger.start(KEY, A)  # not tried again
    assert ledger.waiting(now=1e12, limit=5) == []
    assert ledger.observe(KEY, ROOT, A2)  # until the file changes
    assert state(ledger) == ("seen", 0, None)


def test_queries_order_and_counts(ledger: Ledger) -> None:
    for key, sort_key in ((b"/w/c", 1), (b"/w/b", 2), (b"/w/a", 2)):
        assert ledger.observe(key, ROOT, A, sort_key=sort_key, now=1.0)
        assert ledger.queue(key, A)
    assert [e.key for e in ledger.waiting(now=0, limit=5)] == [b"/w/c", b"/w/a", b"/w/b"]
    assert [e.key for e in ledger.waiting(now=0, limit=2)] == [b"/w/c", b"/w/a"]
    assert [e.key for e in ledger.entries()] == [b"/w/a", b"/w/b", b"/w/c"]
    assert ledger.counts() == {**dict.fromkeys(STATES, 0), "queued": 3}


def test_recover_requeues_counts_but_keeps_launched_jobs(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.sqlite3"
    with Ledger.open(path, lock=True) as ledger:
        running(ledger)
        ledger.record_launch(b"file-J", scope=DX, name="j.bam", handle="job-J", attempt=1)
    with Ledger.open(path, lock=True) as ledger:
        assert state(ledger)[0] == "running"  # open itself changes nothing
        assert ledger.recover() == 1
        assert state(ledger)[0] == "queued"
        assert [e.key for e in ledger.launched()] == [b"file-J"]


def test_dx_watch_upserts(ledger: Ledger) -> None:
    ledger.record_launch(b"file-1", scope=DX, name="one.bam", handle="job-1", attempt=1)
    ledger.record_launch(b"file-2", scope=DX, name="two.bam", handle="job-2", attempt=1)
    assert [e.handle for e in ledger.launched()] == ["job-1", "job-2"]
    entry = ledger.get(b"file-1")
    assert entry is not None and (entry.state, entry.scope, entry.identity, entry.attempts) == ("running", DX, "", 1)
    ledger.record_retry(b"file-1", scope=DX, name="one.bam", error="exit 1", attempts=1, retry_at=500.0)
    entry = ledger.get(b"file-1")
    assert entry is not None and (entry.state, entry.error, entry.not_before) == ("failed", "exit 1", 500.0)
    assert ledger.waiting(now=499.0, limit=5) == []  # dx-watch --local gets the daemon's back-off
    assert [e.key for e in ledger.waiting(now=500.0, limit=5)] == [b"file-1"]
    ledger.record_launch(b"file-1", scope=DX, name="one.bam", handle="job-1b", attempt=2)
    ledger.record_done(b"file-1", scope=DX, name="one.bam", result="file-R")
    entry = ledger.get(b"file-1")
    assert entry is not None
    assert (entry.state, entry.attempts, entry.error, entry.handle, entry.result, entry.not_before) == (
        "done",
        2,
        None,
        "job-1b",
        "file-R",
        0.0,
    )
    assert [e.key for e in ledger.launched()] == [b"file-2"]
    ledger.record_failed(b"file-2", scope=DX, name="two.bam", error="AppError", attempts=3)
    assert state(ledger, b"file-2") == ("quarantined", 3, "AppError")
    # Adopted from the platform without a prior row.
    ledger.record_done(b"file-3", scope=DX, name="three.bam", result="file-R3")
    ledger.record_failed(b"file-4", scope=DX, name="four.bam", error="marked failed", attempts=0)
    ledger.record_launch(b"file-5", scope=DX, name="five.bam", handle="job-5", attempt=2)
    assert [(e.key, e.state, e.attempts) for e in ledger.entries()][2:] == [
        (b"file-3", "done", 0),
        (b"file-4", "quarantined", 0),
        (b"file-5", "running", 2),
    ]
    assert ledger.recover() == 0  # launched jobs are not this process's counts


def test_non_utf8_paths_round_trip(ledger: Ledger, tmp_path: Path) -> None:
    key = os.fsencode(tmp_path) + b"/caf\xe9.bam"
    path = Path(os.fsdecode(key))
    assert ledger.observe(key, os.fsencode(tmp_path), A, name=path.name)
    [entry] = ledger.entries()
    assert (entry.key, entry.path, entry.name) == (key, path, "caf\ufffd.bam")


def test_file_identity(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    info = (tmp_path / "a").stat()
    identity = Identity.of(info)
    assert identity == f"{info.st_dev}:{info.st_ino}:3:{info.st_mtime_ns}"
    assert (identity.stat.dev, identity.stat.inode, identity.stat.size, identity.stat.mtime_ns) == (
        info.st_dev,
        info.st_ino,
        3,
        info.st_mtime_ns,
    )
    assert file_identity(dev=1, inode=2, size=3, mtime_ns=4) == Identity(dev=1, inode=2, size=3, mtime_ns=4)


def test_wal_full_and_busy_timeout(ledger: Ledger) -> None:
    db = ledger._db
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
    assert db.execute("PRAGMA user_version").fetchone() == (1,)
    # A second writer (another dx-watch) waits for the first's transaction instead of failing.
    other = sqlite3.connect(ledger.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, other.execute, ("COMMIT",)).start()
    started = time.monotonic()
    ledger.record_done(b"file-1", scope=DX, name="one.bam", result="file-R")
    assert time.monotonic() - started >= 0.2
    other.close()


def test_a_second_open_with_lock_fails_until_closed(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.sqlite3"
    with Ledger.open(path, lock=True):
        with pytest.raises(LedgerLocked, match=rf"pid {os.getpid()}\) holds the ledger; stop it"):
            Ledger.open(path, lock=True)
        with Ledger.open(path, lock=False) as reader:  # dx-watch's way: no lock
            assert reader.counts()["seen"] == 0
    with Ledger.open(path, lock=True):
        pass


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.sqlite3"
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom bamcountd.ledger import Ledger\n"
        f"ledger = Ledger.open(Path({str(path)!r}), lock=True)\nprint('open', flush=True)\ntime.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "open\n"
            with pytest.raises(LedgerLocked, match=rf"pid {child.pid}\)"):
                Ledger.open(path, lock=True)
        finally:
            os.kill(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    with Ledger.open(path, lock=True):
        pass


# --- migration from 0.1.0 ------------------------------------------------------------------


def v0(tmp_path: Path, fixture: str, name: str) -> Path:
    path = tmp_path / "state" / name
    path.parent.mkdir()
    shutil.copyfile(DATA / fixture, path)
    return path


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_the_daemons_v0_ledger_migrates(tmp_path: Path) -> None:
    path = v0(tmp_path, "ledger-v0-daemon.sqlite3", "ledger.sqlite3")
    with sqlite3.connect(path) as db:
        before = db.execute("SELECT * FROM files ORDER BY path").fetchall()
    assert len(before) == 8
    for _ in range(2):  # the second open finds nothing to do
        with Ledger.open(path, lock=True) as ledger:
            migrated = ledger.entries()
        assert tables(path) == {"items"}
        assert [e.key for e in migrated] == [row[0] for row in before]
        for entry, (key, root, dev, inode, size, mtime_ns, st, attempts, error, seen_at, not_before, updated_at) in zip(
            migrated, before, strict=True
        ):
            assert (entry.key, entry.scope, entry.identity, entry.sort_key) == (
                key,
                root,
                f"{dev}:{inode}:{size}:{mtime_ns}",
                mtime_ns,
            )
            assert (entry.state, entry.attempts, entry.error) == (st, attempts, error)
            assert (entry.seen_at, entry.not_before, entry.updated_at) == (seen_at, not_before, updated_at)
            assert (entry.handle, entry.result, entry.name) == (None, None, entry.path.name.replace("\udce9", "\ufffd"))
    by_name = {e.path.name: e for e in migrated}
    assert {name: e.state for name, e in by_name.items()} == {
        "seen.bam": "seen",
        "queued.bam": "queued",
        "requeued.bam": "queued",
        "running.bam": "running",
        "done.bam": "done",
        "failed.bam": "failed",
        "quarantined.bam": "quarantined",
        "caf\udce9.bam": "queued",
    }
    assert (by_name["failed.bam"].attempts, by_name["failed.bam"].not_before) == (2, 1_700_000_800.0)
    assert by_name["quarantined.bam"].error == "CorruptBam: truncated BGZF block"
    assert by_name["requeued.bam"].not_before == 1_700_000_900.0
    assert by_name["caf\udce9.bam"].key == b"/watch/in/caf\xe9.bam"
    with Ledger.open(path, lock=True) as ledger:
        # The daemon's transitions work on migrated rows: the dead daemon's count is redone.
        running_row = by_name["running.bam"]
        assert ledger.recover() == 1
        assert ledger.start(running_row.key, running_row.identity)
        assert ledger.finish(running_row.key, running_row.identity)
        assert [e.path.name for e in ledger.waiting(now=1_700_000_850.0, limit=9)] == [
            "queued.bam",
            "failed.bam",
            "caf\udce9.bam",
        ]


def test_dx_watchs_v0_ledger_migrates(tmp_path: Path) -> None:
    path = v0(tmp_path, "ledger-v0-dx-watch.sqlite3", "dx-watch.sqlite")
    with sqlite3.connect(path) as db:
        before = {row[0]: row for row in db.execute("SELECT * FROM bams")}
    assert {row[3] for row in before.values()} == {"launched", "done", "failed", "retry"}
    for _ in range(2):
        with Ledger.open(path, lock=False) as ledger:
            migrated = {e.key.decode(): e for e in ledger.entries()}
            launched = [e.key for e in ledger.launched()]
        assert tables(path) == {"items"}
        assert migrated.keys() == before.keys()
        for file_id, (_, project, name, _status, job_id, result_id, attempts, reason, updated) in before.items():
            entry = migrated[file_id]
            assert (entry.scope, entry.name, entry.identity, entry.handle, entry.result) == (
                project.encode(),
                name,
                "",
                job_id,
                result_id,
            )
            assert (entry.attempts, entry.error, entry.updated_at) == (attempts, reason, updated)
        states = {e.name: (e.state, e.not_before) for e in migrated.values()}
        assert states == {
            "launched.bam": ("running", 0.0),
            "done.bam": ("done", 0.0),
            "failed.bam": ("quarantined", 0.0),
            "retry.bam": ("failed", 0.0),
        }
        assert launched == [b"file-LAUNCHED00000000000000"]
    with Ledger.open(path, lock=False) as ledger:
        assert ledger.recover() == 0  # the launched job is still followed
        assert [e.name for e in ledger.waiting(now=0.0, limit=5)] == ["retry.bam"]  # tried again at once


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(BamcountdError, match="schema version 99, newer"):
        Ledger.open(path, lock=True)
    with Ledger.open(tmp_path / "fresh.sqlite3", lock=True):  # the failed open left no lock behind
        pass
