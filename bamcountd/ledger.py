"""The ledger: one SQLite row per item to count, for the watch-folder daemon and dx-watch alike.

An item is keyed by opaque bytes (the daemon: a BAM's absolute path; dx-watch: a DNAnexus
file ID) and checked against an ``identity`` text, what makes it *this* version of the item
(the daemon: ``"dev:inode:size:mtime_ns"``; dx-watch: ``""``, platform files never change).
The row holds where the item is in its life:

    seen -> queued -> running -> done | failed (retried later) | quarantined

and, for dx-watch, the job launched for it (``handle``: a running row with a handle is a job
on the platform, not a count in this process) and the result file's ID (``result``).

The crash guarantee comes from one ordering rule, kept by the daemon: the result file is
written atomically (temp file, fsync, rename, folder fsync) *before* the ``done`` row is
committed (WAL, ``synchronous=FULL``).  A crash at any instant therefore leaves either

* no result and a row that is not ``done``: on start, ``running`` rows go back to ``queued``
  (:meth:`Ledger.recover`) and the file is counted again; or
* the result and a row that is not yet ``done``: before counting, the daemon finds the
  result in place (same file identity, filters and regions as now) and marks the row ``done``
  without counting again (``result_adopted``); or
* the result and a ``done`` row: nothing more happens.

A BAM's result lives at one path derived from the BAM's path, so there are never two results
for one BAM, and a row is only dropped once its file is gone, so no file is lost.  One daemon
at a time: an exclusive ``flock`` on ``ledger.lock``, held while the ledger is open (the
kernel drops it when the process dies, even by SIGKILL).  dx-watch takes no lock: runners on
one state folder share the database, and the busy timeout makes a second one wait for the
first's transaction instead of failing.

Opening migrates a database written by bamcountd 0.1.0 in place, in one transaction: the
daemon's table ``files`` and dx-watch's table ``bams`` are copied into ``items`` and dropped.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from bamcountd.errors import BamcountdError, LedgerLocked

STATES = ("seen", "queued", "running", "done", "failed", "quarantined")
#: States in which an item waits to be counted (failed ones once their back-off is over).
WAITING = ("queued", "failed")
#: ``PRAGMA user_version`` of the schema below; 0.1.0's databases have 0.
SCHEMA_VERSION = 1
#: How long a statement waits for another connection's write transaction (seconds).
BUSY_TIMEOUT = 30.0

#: The statements that make the schema (one at a time: they run inside the migration's transaction).
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS items (
    key BLOB PRIMARY KEY,           -- daemon: absolute path, raw bytes; dx-watch: file ID (UTF-8)
    scope BLOB NOT NULL,            -- daemon: the watch folder's path; dx-watch: the project ID
    name TEXT NOT NULL,             -- for logs
    identity TEXT NOT NULL,         -- this version of the item; a new one starts over
    sort_key INTEGER NOT NULL,      -- waiting order (daemon: mtime_ns)
    state TEXT NOT NULL CHECK (state IN ('seen', 'queued', 'running', 'done', 'failed', 'quarantined')),
    attempts INTEGER NOT NULL DEFAULT 0,  -- failed attempts at this identity
    error TEXT,
    handle TEXT,                    -- the DNAnexus job launched for it
    result TEXT,                    -- the DNAnexus result file's ID
    seen_at REAL NOT NULL,          -- when this identity was first seen: the settle clock
    not_before REAL NOT NULL DEFAULT 0,   -- retry back-off (wall clock)
    updated_at REAL NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS items_by_state ON items (state, sort_key)",
)

_COLUMNS = (
    "key, scope, name, identity, sort_key, state, attempts, error, handle, result, seen_at, not_before, updated_at"
)
_INSERT = f"INSERT INTO items ({_COLUMNS}) VALUES ({', '.join('?' for _ in _COLUMNS.split(','))})"
#: 0.1.0's dx-watch statuses as states: failed was final, retry was tried again next poll.
_DX_STATES = {"launched": "running", "done": "done", "failed": "quarantined", "retry": "failed"}


#: An item's key (or scope): bytes as they are, text as UTF-8, a path as the file system's bytes.
Key = bytes | str | os.PathLike[str]


def _bytes(key: Key) -> bytes:
    if isinstance(key, bytes):
        return key
    return key.encode() if isinstance(key, str) else os.fsencode(key)


def file_identity(*, dev: int, inode: int, size: int, mtime_ns: int) -> str:
    """The daemon's identity of a file: a replaced or rewritten file has another one."""
    return f"{dev}:{inode}:{size}:{mtime_ns}"


@dataclass(frozen=True)
class Entry:
    key: bytes
    scope: bytes
    name: str
    identity: str
    sort_key: int
    state: str
    attempts: int
    error: str | None
    handle: str | None
    result: str | None
    seen_at: float
    not_before: float
    updated_at: float

    @property
    def path(self) -> Path:
        """The daemon's key as a path."""
        return Path(os.fsdecode(self.key))

    @property
    def root(self) -> Path:
        """The daemon's scope as a path: the watch folder."""
        return Path(os.fsdecode(self.scope))

    @property
    def id(self) -> str:
        """dx-watch's key as text: the file ID."""
        return self.key.decode()

    @property
    def project(self) -> str:
        """dx-watch's scope as text: the project ID."""
        return self.scope.decode()


class Ledger:
    """The SQLite ledger at ``path``.  Use it from one thread."""

    def __init__(self, connection: sqlite3.Connection, lock_fd: int | None, path: Path) -> None:
        self._db = connection
        self._lock_fd = lock_fd
        self.path = path

    @classmethod
    def open(cls, path: Path, *, lock: bool) -> Self:
        """Open (creating, or migrating from 0.1.0) the ledger at ``path``.

        With ``lock``, first take the one-daemon lock, ``ledger.lock`` beside it.  Running rows
        are left as they are: the daemon calls :meth:`recover` once it holds the lock.
        """
        folder = path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BamcountdError(f"{folder}: cannot use the state folder ({error.strerror})") from None
        lock_fd = _lock(folder / "ledger.lock") if lock else None
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transition survives a power cut, not just a process crash.
            db.execute("PRAGMA synchronous=FULL")
            _migrate(db, path)
        except BaseException as error:
            if db is not None:
                db.close()
            if lock_fd is not None:
                os.close(lock_fd)
            if isinstance(error, sqlite3.Error):
                raise BamcountdError(f"{path}: cannot open the ledger ({error})") from None
            raise
        return cls(db, lock_fd, path)

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> int:
        """After a crash or a stop: items that were being counted here are counted again.

        A running row with a handle is a job launched on the platform: it stays running.
        """
        cursor = self._db.execute(
            "UPDATE items SET state = 'queued', updated_at = ? WHERE state = 'running' AND handle IS NULL", (_now(),)
        )
        return cursor.rowcount

    # --- guarded transitions (the daemon's) -----------------------------------------------

    def observe(
        self, key: Key, scope: Key, identity: str, *, name: str = "", sort_key: int = 0, now: float | None = None
    ) -> bool:
        """Record that ``key`` exists with ``identity``; True if that is news (new or changed).

        A new identity starts over at ``seen`` with no attempts, whatever its predecessor's
        state (done, failed, quarantined): a replaced file is counted again.
        """
        now = _now() if now is None else now
        key, scope = _bytes(key), _bytes(scope)
        row = self._db.execute("SELECT identity FROM items WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] == identity:
            return False
        self._db.execute(
            f"""{_INSERT}
               ON CONFLICT (key) DO UPDATE SET
                   scope = excluded.scope, name = excluded.name, identity = excluded.identity,
                   sort_key = excluded.sort_key, state = 'seen', attempts = 0, error = NULL, handle = NULL,
                   result = NULL, seen_at = excluded.seen_at, not_before = 0, updated_at = excluded.updated_at""",
            (key, scope, _printable(name), identity, sort_key, "seen", 0, None, None, None, now, 0.0, now),
        )
        return True

    def forget(self, key: Key) -> None:
        """The item is gone: drop its row (so it leaves the queue).  Its result, if any, stays."""
        self._db.execute("DELETE FROM items WHERE key = ?", (_bytes(key),))

    def queue(self, key: Key, identity: str) -> bool:
        """seen -> queued, once the file has settled; False if the file changed meanwhile."""
        return self._move(key, identity, ("seen",), "queued")

    def start(self, key: Key, identity: str) -> bool:
        """queued/failed -> running."""
        return self._move(key, identity, WAITING, "running")

    def finish(self, key: Key, identity: str, *, result: str | None = None) -> bool:
        """running -> done.  Call only once the result is durably in place (see above)."""
        return self._move(key, identity, ("running",), "done", result=result)

    def requeue(self, key: Key, identity: str, *, not_before: float = 0.0, error: str | None = None) -> bool:
        """running -> queued without spending an attempt (a stop, or the results folder failed)."""
        return self._move(key, identity, ("running",), "queued", not_before=not_before, error=error)

    def fail(self, key: Key, identity: str, error: str, *, retry_at: float) -> int:
        """running -> failed (retried from ``retry_at``); returns the attempts so far."""
        return self._failed(key, identity, error, "failed", retry_at)

    def quarantine(self, key: Key, identity: str, error: str) -> int:
        """running -> quarantined: not tried again until the file changes; returns the attempts."""
        return self._failed(key, identity, error, "quarantined", 0.0)

    def _failed(self, key: Key, identity: str, error: str, state: str, retry_at: float) -> int:
        self._db.execute(
            """UPDATE items SET state = ?, attempts = attempts + 1, error = ?, not_before = ?, updated_at = ?
               WHERE key = ? AND state = 'running' AND identity = ?""",
            (state, error, retry_at, _now(), _bytes(key), identity),
        )
        entry = self.get(key)
        return entry.attempts if entry is not None else 0

    def _move(
        self,
        key: Key,
        identity: str,
        sources: tuple[str, ...],
        target: str,
        *,
        not_before: float | None = None,
        error: str | None = None,
        result: str | None = None,
    ) -> bool:
        marks = ", ".join("?" for _ in sources)
        cursor = self._db.execute(
            f"""UPDATE items SET state = ?, updated_at = ?, not_before = COALESCE(?, not_before),
                       error = CASE WHEN ? = 'done' THEN NULL ELSE COALESCE(?, error) END,
                       result = COALESCE(?, result)
               WHERE key = ? AND state IN ({marks}) AND identity = ?""",
            (target, _now(), not_before, target, error, result, _bytes(key), *sources, identity),
        )
        return cursor.rowcount == 1

    # --- upserts (dx-watch's: facts it did, or read from the platform) ---------------------

    def record_launch(self, key: Key, *, scope: Key, name: str, handle: str, attempt: int) -> None:
        """Job ``handle`` counts the item (its ``attempt``-th try): running, followed by handle."""
        self._record(key, scope, name, state="running", handle=handle, attempts=attempt)

    def record_done(self, key: Key, *, scope: Key, name: str, result: str) -> None:
        """Counted: ``result`` is the result file.  Keeps the attempts (and the job) so far."""
        self._record(key, scope, name, state="done", result=result)

    def record_failed(self, key: Key, *, scope: Key, name: str, error: str, attempts: int) -> None:
        """Given up on: quarantined, not tried again."""
        self._record(key, scope, name, state="quarantined", error=error, attempts=attempts)

    def record_retry(self, key: Key, *, scope: Key, name: str, error: str, attempts: int, retry_at: float) -> None:
        """Failed for a reason a retry can fix: failed, waiting until ``retry_at``."""
        self._record(key, scope, name, state="failed", error=error, attempts=attempts, not_before=retry_at)

    def _record(
        self,
        key: Key,
        scope: Key,
        name: str,
        *,
        state: str,
        handle: str | None = None,
        result: str | None = None,
        error: str | None = None,
        attempts: int | None = None,
        not_before: float = 0.0,
    ) -> None:
        """Upsert: the state, error and back-off are set; handle, result and attempts where given."""
        now = _now()
        self._db.execute(
            f"""{_INSERT}
               ON CONFLICT (key) DO UPDATE SET
                   scope = excluded.scope, name = excluded.name, state = excluded.state,
                   attempts = COALESCE(?, attempts), error = excluded.error,
                   handle = COALESCE(excluded.handle, handle), result = COALESCE(excluded.result, result),
                   not_before = excluded.not_before, updated_at = excluded.updated_at""",
            # The last value is for the update: where attempts is not given, the row keeps its own.
            (
                _bytes(key),
                _bytes(scope),
                _printable(name),
                "",
                0,
                state,
                attempts or 0,
                error,
                handle,
                result,
                now,
                not_before,
                now,
                attempts,
            ),
        )

    # --- queries -------------------------------------------------------------------------

    def get(self, key: Key) -> Entry | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM items WHERE key = ?", (_bytes(key),)).fetchone()
        return Entry(*row) if row is not None else None

    def settled(self, *, seen_before: float) -> list[Entry]:
        """``seen`` items whose identity has not changed since ``seen_before``."""
        return self._select("state = 'seen' AND seen_at <= ? ORDER BY sort_key, key", seen_before)

    def waiting(self, *, now: float, limit: int) -> list[Entry]:
        """Items ready to count, lowest sort key (the daemon: oldest mtime) first."""
        return self._select(
            "state IN ('queued', 'failed') AND not_before <= ? ORDER BY sort_key, key LIMIT ?", now, limit
        )

    def launched(self) -> list[Entry]:
        """Jobs on the platform to follow, longest untouched first."""
        return self._select("state = 'running' AND handle IS NOT NULL ORDER BY updated_at, key")

    def entries(self) -> list[Entry]:
        return self._select("1 ORDER BY key")

    def counts(self) -> dict[str, int]:
        found = dict(self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        return {state: int(found.get(state, 0)) for state in STATES}

    def _select(self, where: str, *values: object) -> list[Entry]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM items WHERE {where}", values).fetchall()
        return [Entry(*row) for row in rows]


def _lock(lock_path: Path) -> int:
    """Take the one-daemon lock (writing our pid into it), or say who holds it."""
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise BamcountdError(f"{lock_path.parent}: cannot use the state folder ({error.strerror})") from None
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
    return lock_fd


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the database to :data:`SCHEMA_VERSION`, in one transaction (another process
    opening it at the same time waits, then finds it done)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise BamcountdError(
                f"{path}: the ledger has schema version {version}, newer than this bamcountd's "
                f"{SCHEMA_VERSION}; upgrade bamcountd"
            )
        if version < SCHEMA_VERSION:
            for statement in _SCHEMA:
                db.execute(statement)
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "files" in tables:
                db.executemany(_INSERT, _from_files(db))
                db.execute("DROP TABLE files")
            if "bams" in tables:
                db.executemany(_INSERT, _from_bams(db))
                db.execute("DROP TABLE bams")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


_Row = tuple[bytes, bytes, str, str, int, str, int, str | None, str | None, str | None, float, float, float]


def _from_files(db: sqlite3.Connection) -> list[_Row]:
    """0.1.0 daemon rows: the same states; the identity's four numbers become its text."""
    rows = db.execute(
        "SELECT path, root, dev, inode, size, mtime_ns, state, attempts, error, seen_at, not_before, updated_at "
        "FROM files"
    ).fetchall()
    return [
        (
            path,
            root,
            _printable(os.fsdecode(os.path.basename(path))),
            file_identity(dev=dev, inode=inode, size=size, mtime_ns=mtime_ns),
            mtime_ns,
            state,
            attempts,
            error,
            None,
            None,
            seen_at,
            not_before,
            updated_at,
        )
        for path, root, dev, inode, size, mtime_ns, state, attempts, error, seen_at, not_before, updated_at in rows
    ]


def _from_bams(db: sqlite3.Connection) -> list[_Row]:
    """0.1.0 dx-watch rows: launched is running with its job, failed (final) is quarantined,
    retry is failed with no back-off (it was tried again at the next poll)."""
    rows = db.execute("SELECT file_id, project, name, status, job_id, result_id, attempts, reason, updated FROM bams")
    return [
        (
            file_id.encode(),
            project.encode(),
            name,
            "",
            0,
            _DX_STATES[status],
            attempts,
            reason,
            job_id,
            result_id,
            updated,
            0.0,
            updated,
        )
        for file_id, project, name, status, job_id, result_id, attempts, reason, updated in rows.fetchall()
    ]


def _printable(name: str) -> str:
    """A name SQLite can store as text: bytes that are not UTF-8 become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _now() -> float:
    return time.time()
