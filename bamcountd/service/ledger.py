"""The ledger: one SQLite row per watched BAM, keyed by path and checked against the file's
identity (device, inode, size, mtime), holding where the file is in its life:

    seen -> queued -> running -> done | failed (retried later) | quarantined

The crash guarantee comes from one ordering rule, kept by the daemon: the result file is
written atomically (temp file, fsync, rename, folder fsync) *before* the ``done`` row is
committed (WAL, ``synchronous=FULL``).  A crash at any instant therefore leaves either

* no result and a row that is not ``done``: on start, ``running`` rows go back to ``queued``
  and the file is counted again; or
* the result and a row that is not yet ``done``: before counting, the daemon finds the
  result in place (same file identity, filters and regions as now) and marks the row ``done``
  without counting again (``result_adopted``); or
* the result and a ``done`` row: nothing more happens.

A BAM's result lives at one path derived from the BAM's path, so there are never two results
for one BAM, and a row is only dropped once its file is gone, so no file is lost.  One daemon
at a time: an exclusive ``flock`` on ``ledger.lock``, held while the ledger is open (the
kernel drops it when the process dies, even by SIGKILL).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from bamcountd.errors import BamcountdError, LedgerLocked

STATES = ("seen", "queued", "running", "done", "failed", "quarantined")
#: States in which a file waits to be counted (failed ones once their back-off is over).
WAITING = ("queued", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY,          -- absolute path, raw bytes (names need not be UTF-8)
    root BLOB NOT NULL,             -- the watch folder it was found under
    dev INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('seen', 'queued', 'running', 'done', 'failed', 'quarantined')),
    attempts INTEGER NOT NULL DEFAULT 0,  -- failed counts of this identity
    error TEXT,
    seen_at REAL NOT NULL,          -- when this identity was first seen: the settle clock
    not_before REAL NOT NULL DEFAULT 0,   -- retry back-off (wall clock)
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state, mtime_ns);
"""


@dataclass(frozen=True)
class Identity:
    """What makes a file *this* file: a replaced or rewritten file has another identity."""

    dev: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> Identity:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Entry:
    path: Path
    root: Path
    identity: Identity
    state: str
    attempts: int
    error: str | None
    seen_at: float
    not_before: float


class Ledger:
    """The SQLite ledger in the state folder.  Use it from one thread (the event loop's)."""

    def __init__(self, connection: sqlite3.Connection, lock_fd: int, path: Path) -> None:
        self._db = connection
        self._lock_fd = lock_fd
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> Self:
        """Open (creating) the ledger, take the one-daemon lock, and recover from a crash."""
        lock_path = state_dir / "ledger.lock"
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise BamcountdError(f"{state_dir}: cannot use the state folder ({error.strerror})") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(lock_fd)
            raise LedgerLocked(
                f"{lock_path}: another bamcountd daemon (pid {holder}) holds the ledger; "
                "stop it, or give each daemon its own --state folder"
            ) from None
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        path = state_dir / "ledger.sqlite3"
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transition survives a power cut, not just a process crash.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            os.close(lock_fd)
            raise BamcountdError(f"{path}: cannot open the ledger ({error})") from None
        ledger = cls(db, lock_fd, path)
        ledger.recover()
        return ledger

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> int:
        """After a crash or a stop: files that were being counted are counted again."""
        cursor = self._db.execute(
            "UPDATE files SET state = 'queued', updated_at = ? WHERE state = 'running'", (_now(),)
        )
        return cursor.rowcount

    # --- transitions ---------------------------------------------------------------------

    def observe(self, path: Path, root: Path, identity: Identity, *, now: float | None = None) -> bool:
        """Record that ``path`` exists with ``identity``; True if that is news (new or changed).

        A new identity starts over at ``seen`` with no attempts, whatever its predecessor's
        state (done, failed, quarantined): a replaced file is counted again.
        """
        now = _now() if now is None else now
        row = self._db.execute("SELECT dev, inode, size, mtime_ns FROM files WHERE path = ?", (_key(path),)).fetchone()
        if row is not None and Identity(*row) == identity:
            return False
        self._db.execute(
            """INSERT INTO files (path, root, dev, inode, size, mtime_ns, state, attempts, error, seen_at,
                                  not_before, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, 'seen', 0, NULL, ?, 0, ?)
               ON CONFLICT (path) DO UPDATE SET
                   root = excluded.root, dev = excluded.dev, inode = excluded.inode, size = excluded.size,
                   mtime_ns = excluded.mtime_ns, state = 'seen', attempts = 0, error = NULL,
                   seen_at = excluded.seen_at, not_before = 0, updated_at = excluded.updated_at""",
            (_key(path), _key(root), *_values(identity), now, now),
        )
        return True

    def forget(self, path: Path) -> None:
        """The file is gone: drop its row (so it leaves the queue).  Its result, if any, stays."""
        self._db.execute("DELETE FROM files WHERE path = ?", (_key(path),))

    def queue(self, path: Path, identity: Identity) -> bool:
        """seen -> queued, once the file has settled; False if the file changed meanwhile."""
        return self._move(path, identity, ("seen",), "queued")

    def start(self, path: Path, identity: Identity) -> bool:
        """queued/failed -> running."""
        return self._move(path, identity, WAITING, "running")

    def finish(self, path: Path, identity: Identity) -> bool:
        """running -> done.  Call only once the result file is durably in place."""
        return self._move(path, identity, ("running",), "done")

    def requeue(self, path: Path, identity: Identity, *, not_before: float = 0.0, error: str | None = None) -> bool:
        """running -> queued without spending an attempt (a stop, or the results folder failed)."""
        return self._move(path, identity, ("running",), "queued", not_before=not_before, error=error)

    def fail(self, path: Path, identity: Identity, error: str, *, retry_at: float) -> int:
        """running -> failed (retried from ``retry_at``); returns the attempts so far."""
        return self._failed(path, identity, error, "failed", retry_at)

    def quarantine(self, path: Path, identity: Identity, error: str) -> int:
        """running -> quarantined: not tried again until the file changes."""
        return self._failed(path, identity, error, "quarantined", 0.0)

    def _failed(self, path: Path, identity: Identity, error: str, state: str, retry_at: float) -> int:
        self._db.execute(
            """UPDATE files SET state = ?, attempts = attempts + 1, error = ?, not_before = ?, updated_at = ?
               WHERE path = ? AND state = 'running' AND dev = ? AND inode = ? AND size = ? AND mtime_ns = ?""",
            (state, error, retry_at, _now(), _key(path), *_values(identity)),
        )
        entry = self.get(path)
        return entry.attempts if entry is not None else 0

    def _move(
        self,
        path: Path,
        identity: Identity,
        sources: tuple[str, ...],
        target: str,
        *,
        not_before: float | None = None,
        error: str | None = None,
    ) -> bool:
        marks = ", ".join("?" for _ in sources)
        cursor = self._db.execute(
            f"""UPDATE files SET state = ?, updated_at = ?, not_before = COALESCE(?, not_before),
                       error = CASE WHEN ? = 'done' THEN NULL ELSE COALESCE(?, error) END
               WHERE path = ? AND state IN ({marks}) AND dev = ? AND inode = ? AND size = ? AND mtime_ns = ?""",
            (target, _now(), not_before, target, error, _key(path), *sources, *_values(identity)),
        )
        return cursor.rowcount == 1

    # --- queries -------------------------------------------------------------------------

    def get(self, path: Path) -> Entry | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE path = ?", (_key(path),)).fetchone()
        return _entry(row) if row is not None else None

    def settled(self, *, seen_before: float) -> list[Entry]:
        """``seen`` files whose identity has not changed since ``seen_before``."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE state = 'seen' AND seen_at <= ? ORDER BY mtime_ns, path",
            (seen_before,),
        )
        return [_entry(row) for row in rows]

    def waiting(self, *, now: float, limit: int) -> list[Entry]:
        """Files ready to count, oldest (by mtime) first."""
        rows = self._db.execute(
            f"""SELECT {_COLUMNS} FROM files WHERE state IN ('queued', 'failed') AND not_before <= ?
                ORDER BY mtime_ns, path LIMIT ?""",
            (now, limit),
        )
        return [_entry(row) for row in rows]

    def entries(self) -> Iterator[Entry]:
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY path").fetchall():
            yield _entry(row)

    def counts(self) -> dict[str, int]:
        found = dict(self._db.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        return {state: int(found.get(state, 0)) for state in STATES}


_COLUMNS = "path, root, dev, inode, size, mtime_ns, state, attempts, error, seen_at, not_before"


def _entry(row: tuple[bytes, bytes, int, int, int, int, str, int, str | None, float, float]) -> Entry:
    path, root, dev, inode, size, mtime_ns, state, attempts, error, seen_at, not_before = row
    return Entry(
        path=Path(os.fsdecode(path)),
        root=Path(os.fsdecode(root)),
        identity=Identity(dev, inode, size, mtime_ns),
        state=state,
        attempts=attempts,
        error=error,
        seen_at=seen_at,
        not_before=not_before,
    )


def _key(path: Path) -> bytes:
    return os.fsencode(path)


def _values(identity: Identity) -> tuple[int, int, int, int]:
    return identity.dev, identity.inode, identity.size, identity.mtime_ns


def _now() -> float:
    return time.time()
