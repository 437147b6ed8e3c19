"""The ledger's state machine on real SQLite files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bamcountd.errors import LedgerLocked
from bamcountd.ledger import Ledger
from bamcountd.service.watch import Identity


def _open(state: Path) -> Ledger:
    """As the daemon opens it: its file in the state folder, the lock, then crash recovery."""
    ledger = Ledger.open(state / "ledger.sqlite3", lock=True)
    ledger.recover()
    return ledger


A = Identity(dev=1, inode=10, size=100, mtime_ns=1000)
A2 = Identity(dev=1, inode=11, size=100, mtime_ns=2000)  # the same path, replaced


def test_life_of_a_file_and_replacement(tmp_path: Path) -> None:
    path, root = tmp_path / "w" / "a.bam", tmp_path / "w"
    with _open(tmp_path / "state") as ledger:
        assert ledger.observe(path, root, A, now=100.0)
        assert not ledger.observe(path, root, A, now=200.0)  # nothing new: the settle clock runs on
        assert ledger.settled(seen_before=99.0) == []
        assert [e.path for e in ledger.settled(seen_before=100.0)] == [path]
        assert not ledger.queue(path, A2)  # a stale identity moves nothing
        assert ledger.queue(path, A)
        assert [e.path for e in ledger.waiting(now=0, limit=5)] == [path]
        assert ledger.start(path, A)
        assert ledger.fail(path, A, "boom", retry_at=50.0) == 1
        assert ledger.waiting(now=49.0, limit=5) == []  # backing off
        assert ledger.start(path, A)
        assert ledger.finish(path, A)
        entry = ledger.get(path)
        assert entry is not None and (entry.state, entry.attempts, entry.error) == ("done", 1, None)
        # Replaced: counted again from scratch.
        assert ledger.observe(path, root, A2, now=300.0)
        entry = ledger.get(path)
        assert entry is not None and (entry.state, entry.attempts, entry.identity) == ("seen", 0, A2)
        assert not ledger.finish(path, A)  # a late finish for the old identity is ignored
        ledger.forget(path)
        assert ledger.get(path) is None
        assert ledger.counts() == dict.fromkeys(("seen", "queued", "running", "done", "failed", "quarantined"), 0)


def test_running_rows_are_requeued_when_the_daemon_opens_it(tmp_path: Path) -> None:
    path, root = tmp_path / "a.bam", tmp_path
    ledger = _open(tmp_path / "state")
    ledger.observe(path, root, A)
    ledger.queue(path, A)
    ledger.start(path, A)
    ledger.close()  # as if the daemon died mid-count
    with _open(tmp_path / "state") as reopened:
        entry = reopened.get(path)
        assert entry is not None and entry.state == "queued"


def test_non_utf8_paths_round_trip(tmp_path: Path) -> None:
    import os

    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.bam"))
    with _open(tmp_path / "state") as ledger:
        ledger.observe(path, tmp_path, A)
        assert [e.path for e in ledger.entries()] == [path]


def test_a_second_process_cannot_open_a_held_ledger(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with _open(state):
        code = (
            "import sys\nfrom pathlib import Path\nfrom bamcountd.ledger import Ledger\n"
            "from bamcountd.errors import LedgerLocked\n"
            f"try:\n    Ledger.open(Path({str(state)!r}) / 'ledger.sqlite3', lock=True)\nexcept LedgerLocked as e:\n    print(e)\n    sys.exit(3)\n"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert other.returncode == 3 and "holds the ledger" in other.stdout
    with _open(state):  # released on close
        pass
    with pytest.raises(LedgerLocked), _open(state), _open(state):
        pass


def test_oldest_first(tmp_path: Path) -> None:
    with _open(tmp_path / "state") as ledger:
        ages = {"new.bam": 3000, "old.bam": 1000, "mid.bam": 2000}
        for name, mtime_ns in ages.items():
            identity = Identity(dev=1, inode=mtime_ns, size=1, mtime_ns=mtime_ns)
            ledger.observe(tmp_path / name, tmp_path, identity, sort_key=identity.stat.mtime_ns)
            ledger.queue(tmp_path / name, identity)
        assert [e.path.name for e in ledger.waiting(now=0, limit=2)] == ["old.bam", "mid.bam"]
